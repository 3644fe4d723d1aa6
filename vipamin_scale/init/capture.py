"""One instrumented pass over calibration images: per-layer sums for the initializers.

Forward hooks on timm's own modules (no forked timm code) collect, per layer `l`, sums over
images in float64 (the caller all-reduces them and divides by the image count `B`):

Pass A — the prompted model with the random prompts `R` inserted (shallow or deep):
  E[l]  (N_p, d)        block l's input at the patch positions         (hook: blocks[l] pre)
  K[l]  (P + N_p, d_h)  keys at prompt and patch positions, head mean  (hook: blocks[l].attn.qkv)
  H[l]  ()              attention entropy of prompt queries, summed over heads and prompts
  T[l]  ()              mean patch-token norm at block l's input (for the scale diagnostic)
Pass B — the backbone with no prompts:
  S[l]  (N_e, d)        self-attention output before the projection    (hook: blocks[l].attn.proj pre)
  X[l]  (N_p, d)        block input at the patch positions (layer 0: patch_embed output), for BPT
  tokens[l] (n, d)      every patch token, kept for SPT (the one statistic that grows with B)
  rows[l]               every S row fed to a streaming QR, for init.subspace=tokens

The model and images may be on a GPU: the sums (and the weights `layer_weights` returns) are kept
on the CPU in float64, where the all-reduce and the pure math take them. Memory is independent of
`B` except SPT's token store. The forward stops (by an exception raised from the hook) once the
deepest layer needed has been seen: shallow prompts need block 0 only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from vipamin_scale.models.prompted import PromptedViT


class _StopForward(Exception):
    pass


@dataclass
class CaptureSpec:
    """What to collect, and for which layers."""

    layers: list[int]
    match: bool = False  # E, K   (pass A)
    entropy: bool = False  # H    (pass A)
    attn_out: bool = False  # S   (pass B)
    block_in: bool = False  # X   (pass B)
    block_in_cov: bool = False  # C: per image, the mean over patch tokens of x x^T (pass B)
    tokens: bool = False  # SPT tokens (pass B)
    token_source: str = "patch_embed"  # layer 0 tokens: patch_embed | pos_embedded
    row_sink: Optional[Callable[[int, torch.Tensor], None]] = None  # (layer, S rows (n, d)) for subspace=tokens

    @property
    def pass_a(self) -> bool:
        return self.match or self.entropy

    @property
    def pass_b(self) -> bool:
        return self.attn_out or self.block_in or self.block_in_cov or self.tokens or self.row_sink is not None


@dataclass
class LayerSums:
    count: int = 0  # images seen on this rank
    E: dict[int, torch.Tensor] = field(default_factory=dict)
    K: dict[int, torch.Tensor] = field(default_factory=dict)
    H: dict[int, torch.Tensor] = field(default_factory=dict)  # entropy sum over (images, heads, prompts)
    T: dict[int, torch.Tensor] = field(default_factory=dict)  # per-image mean patch-token norm, summed
    S: dict[int, torch.Tensor] = field(default_factory=dict)
    X: dict[int, torch.Tensor] = field(default_factory=dict)
    C: dict[int, torch.Tensor] = field(default_factory=dict)  # sum over images of mean_tokens x x^T
    tokens: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, table: str, layer: int, value: torch.Tensor) -> None:
        store = getattr(self, table)
        value = value.detach().to(device="cpu", dtype=torch.float64)
        store[layer] = value if layer not in store else store[layer] + value


def layer_weights(model: PromptedViT, layer: int) -> dict:
    """Block `layer`'s frozen weights the initializers use, float64 on the CPU: W_Q, W_K, W_V (d, d)
    from `attn.qkv` (out x in), b_V (d,), norm1's gamma, beta (d,) and eps."""
    blk = model.backbone.blocks[layer]
    d = model.dim
    W = blk.attn.qkv.weight.detach().to("cpu", torch.float64)  # (3d, d)
    b = blk.attn.qkv.bias
    b = torch.zeros(3 * d, dtype=torch.float64) if b is None else b.detach().to("cpu", torch.float64)
    return {"W_Q": W[:d], "W_K": W[d:2 * d], "W_V": W[2 * d:], "b_V": b[2 * d:],
            "gamma": blk.norm1.weight.detach().to("cpu", torch.float64),
            "beta": blk.norm1.bias.detach().to("cpu", torch.float64),
            "ln_eps": float(blk.norm1.eps)}


def _split_qkv(model: PromptedViT, layer: int, qkv_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k of shape (B, h, N, d_h) from a qkv Linear's output (B, N, 3d), norms as timm applies them."""
    attn = model.backbone.blocks[layer].attn
    B, N, _ = qkv_out.shape
    qkv = qkv_out.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return attn.q_norm(qkv[0]), attn.k_norm(qkv[1])


@torch.no_grad()
def capture_layer_stats(model: PromptedViT, batches: Iterable[torch.Tensor], random_prompts: torch.Tensor,
                        spec: CaptureSpec, progress: Optional[Callable[[int], None]] = None) -> LayerSums:
    """Stream `batches` of images through the hooked model; return this rank's sums."""
    model.eval()
    blocks = model.backbone.blocks
    P = model.num_prompts
    last = max(spec.layers)
    wanted = set(spec.layers)
    sums = _zero_sums(model, spec)
    handles = []

    def stop_after(layer: int) -> None:
        if layer == last:
            raise _StopForward

    # -- pass A hooks --------------------------------------------------------------------------
    def a_block_pre(layer):
        def hook(_module, args):
            if layer in wanted and spec.match:
                sums.add("E", layer, args[0][:, 1 + P:].sum(dim=0))
            if layer in wanted and spec.entropy:
                sums.add("T", layer, args[0][:, 1 + P:].double().norm(dim=-1).mean(dim=1).sum())
        return hook

    def a_qkv(layer):
        def hook(_module, _args, out):
            if layer in wanted:
                q, k = _split_qkv(model, layer, out)
                if spec.match:
                    sums.add("K", layer, k[:, :, 1:].mean(dim=1).sum(dim=0))  # heads averaged
                if spec.entropy:
                    scale = q.shape[-1] ** -0.5
                    logits = (q[:, :, 1:1 + P].double() @ k.double().transpose(-1, -2)) * scale
                    a = logits.softmax(dim=-1)
                    sums.add("H", layer, -(a * a.clamp_min(1e-300).log()).sum())
            if layer == last:
                raise _StopForward
        return hook

    # -- pass B hooks --------------------------------------------------------------------------
    def b_block_pre(layer):
        def hook(_module, args):
            x = args[0]
            if layer in wanted and layer > 0:
                if spec.block_in:
                    sums.add("X", layer, x[:, 1:].sum(dim=0))
                if spec.block_in_cov:
                    sums.add("C", layer, _token_moment(x[:, 1:]))
                if spec.tokens:
                    sums.tokens.setdefault(layer, []).append(x[:, 1:].reshape(-1, x.shape[-1]).float().cpu())
            if layer == 0 and 0 in wanted and spec.tokens and spec.token_source == "pos_embedded":
                sums.tokens.setdefault(0, []).append(x[:, 1:].reshape(-1, x.shape[-1]).float().cpu())
        return hook

    def b_patch_embed(_module, _args, out):
        if 0 in wanted:
            if spec.block_in:
                sums.add("X", 0, out.sum(dim=0))
            if spec.block_in_cov:
                sums.add("C", 0, _token_moment(out))
            if spec.tokens and spec.token_source == "patch_embed":
                sums.tokens.setdefault(0, []).append(out.reshape(-1, out.shape[-1]).float().cpu())

    def b_proj_pre(layer):
        def hook(_module, args):
            if layer in wanted:
                s = args[0]
                if spec.attn_out:
                    sums.add("S", layer, s.sum(dim=0))
                if spec.row_sink is not None:
                    spec.row_sink(layer, s.reshape(-1, s.shape[-1]).to("cpu", torch.float64))
            stop_after(layer)
        return hook

    def b_block_post(layer):
        def hook(_module, _args, _out):
            stop_after(layer)
        return hook

    for images in batches:
        n = images.shape[0]
        if spec.pass_a:
            for l, blk in enumerate(blocks):
                if l > last:
                    break
                handles.append(blk.register_forward_pre_hook(a_block_pre(l)))
                handles.append(blk.attn.qkv.register_forward_hook(a_qkv(l)))
            try:
                model.forward_tokens(images, prompts=random_prompts.to(images.device, images.dtype))
            except _StopForward:
                pass
            finally:
                _remove(handles)
        if spec.pass_b:
            bb = model.backbone
            handles.append(bb.patch_embed.register_forward_hook(b_patch_embed))
            for l, blk in enumerate(blocks):
                if l > last:
                    break
                handles.append(blk.register_forward_pre_hook(b_block_pre(l)))
                if spec.attn_out or spec.row_sink is not None:
                    handles.append(blk.attn.proj.register_forward_pre_hook(b_proj_pre(l)))
                else:
                    handles.append(blk.register_forward_hook(b_block_post(l)))
            try:
                bb.forward_features(images)
            except _StopForward:
                pass
            finally:
                _remove(handles)
        sums.count += n
        if progress is not None:
            progress(n)
    return sums


def _token_moment(x: torch.Tensor) -> torch.Tensor:
    """x (b, N, d) → sum over the b images of (1/N) Σ_tokens x x^T, (d, d) float64."""
    x = x.double()
    return torch.einsum("bnd,bne->de", x, x) / x.shape[1]


def _zero_sums(model: PromptedViT, spec: CaptureSpec) -> LayerSums:
    """Every requested (table, layer) starts at zero, so every rank holds the same tables, even a
    rank that reads no image: the all-reduces that follow then line up on every rank."""
    d, P = model.dim, model.num_prompts
    N_p = model.backbone.patch_embed.num_patches
    d_h = d // model.backbone.blocks[0].attn.num_heads
    shapes = {"E": (N_p, d), "K": (P + N_p, d_h), "H": (), "T": (), "S": (1 + N_p, d), "X": (N_p, d), "C": (d, d)}
    tables = (["E", "K"] if spec.match else []) + (["H", "T"] if spec.entropy else []) \
        + (["S"] if spec.attn_out else []) + (["X"] if spec.block_in else []) + (["C"] if spec.block_in_cov else [])
    sums = LayerSums()
    for table in tables:
        getattr(sums, table).update({l: torch.zeros(shapes[table], dtype=torch.float64) for l in spec.layers})
    return sums


def _remove(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()
