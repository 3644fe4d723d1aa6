"""PromptedViT: a frozen timm ViT, visual prompts (shallow or deep) and a linear head.

Token layout (spec): `[CLS, p_1..p_P, patch_1..patch_Np]`. Shallow: the prompts are inserted
after CLS before block 0. Deep: additionally, positions `1..P` of the input of every block
`l >= 1` are replaced by layer `l`'s prompts. timm's blocks run unchanged (fused attention on).

Prompts come from a provider module returning a `(L_p, P, d)` tensor: `VPTPrompts` (a plain
parameter) here, BPT's bilinear prompts elsewhere. Only the provider and the head train; the
backbone is frozen and stays in eval mode even when the module is put in train mode.

A pack of R runs (`models/packed.py`) hands `forward_tokens` one prompt set per run, `(R, L_p, P, d)`,
for R equal groups of consecutive samples: each layer's `(R, P, d)` prompts are broadcast to their
run's samples inside the concatenation (`expand`, never copied per sample), so no `(R·b, L_p, P, d)`
tensor exists. After the last block, `pool_features` (no per-run parameter) and the run's own
`fc_norm` and `head` (`classify`) make the logits.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import vipamin_scale.digest as digest
from vipamin_scale.config import ConfigError

POOLS = ("cls", "mean", "img_mean", "prompt_mean")


class VPTPrompts(nn.Module):
    """Prompts as one trainable tensor `(L_p, P, d)`."""

    def __init__(self, prompts: torch.Tensor):
        super().__init__()
        self.prompts = nn.Parameter(prompts.detach().clone().float())

    def forward(self) -> torch.Tensor:
        return self.prompts


class PromptedViT(nn.Module):
    def __init__(self, backbone: VisionTransformer, num_classes: int, prompt_length: int, deep: bool,
                 prompts: Optional[nn.Module] = None, dropout: float = 0.0, pool: str = "cls",
                 seed: int = 0):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"model.pool: must be one of {', '.join(POOLS)}; got {pool!r}")
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.num_prompts = prompt_length
        self.deep = deep
        self.pool = pool
        self.dim = backbone.embed_dim
        self.depth = len(backbone.blocks)
        self.num_prompt_layers = self.depth if deep else 1
        if prompts is None:
            prompts = VPTPrompts(random_prompts(self.num_prompt_layers, prompt_length, self.dim,
                                                self.patch_size, seed))
        self.prompt = prompts
        self.prompt_dropout = nn.Dropout(dropout)
        # `mean` pooling is MAE's setting: the average token goes through a LayerNorm of its own,
        # trained with the head (MAE pretrain checkpoints carry no fc_norm).
        self.fc_norm = nn.LayerNorm(self.dim, eps=1e-6) if pool == "mean" else nn.Identity()
        self.head = nn.Linear(self.dim, num_classes)
        self._block_wrapper = None  # set by `set_grad_checkpointing`
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * 0.02)
            self.head.bias.zero_()
        self._check_prompt_shape(self.prompt())

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.patch_size)

    @property
    def prompt_shape(self) -> tuple[int, int, int]:
        return (self.num_prompt_layers, self.num_prompts, self.dim)

    def _check_prompt_shape(self, prompts: torch.Tensor, source: str = "prompt provider") -> None:
        if tuple(prompts.shape) != self.prompt_shape:
            raise ValueError(f"{source}: prompts of shape {tuple(prompts.shape)} do not fit this model, "
                             f"which needs (L_p, P, d) = {self.prompt_shape} "
                             f"({'deep' if self.deep else 'shallow'}, P={self.num_prompts}, d={self.dim})")

    def train(self, mode: bool = True) -> "PromptedViT":
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, no drop-path, ever
        return self

    def set_grad_checkpointing(self, enable: bool = True, wrapper=None) -> None:
        """Recompute each block's activations in backward instead of keeping them.

        `wrapper(block, x)` runs one block; the default is torch's non-reentrant checkpoint.
        Engines pass their own (DeepSpeed's, fairscale's). Used only while grad is enabled.
        """
        if enable and wrapper is None:
            wrapper = _checkpoint_block
        self._block_wrapper = wrapper if enable else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- forward ------------------------------------------------------------------------------
    @property
    def backbone_dtype(self) -> torch.dtype:
        """The dtype the frozen backbone computes in: its stored one (model.dtype, set by the engine), or
        what an engine's mixed-precision policy presents it as (FSDP2's param_dtype, DeepSpeed's bf16)."""
        return self.backbone.patch_embed.proj.weight.dtype

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS + position embedding: the `N_e` embedded tokens (in the backbone's dtype)."""
        bb = self.backbone
        x = bb.patch_embed(x.to(self.backbone_dtype))
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        return bb.norm_pre(x)

    def _insert(self, x: torch.Tensor, prompts: torch.Tensor, keep_from: int) -> torch.Tensor:
        """`[CLS, prompts, x[:, keep_from:]]`: the layer's prompts (P, d), or one set per run (R, P, d) for R
        equal groups of consecutive samples, broadcast to the samples (a view) inside the concatenation."""
        B, P = x.shape[0], self.num_prompts
        if prompts.ndim == 2:  # one run: the solo model's ops
            return torch.cat([x[:, :1], self.prompt_dropout(prompts.unsqueeze(0).expand(B, -1, -1)), x[:, keep_from:]],
                             dim=1)  # (B, 1 + P + N, d)
        R = prompts.shape[0]
        groups = x.view(R, B // R, *x.shape[1:])  # (R, b, N_e, d): run r's samples
        per_sample = prompts.unsqueeze(1).expand(-1, B // R, -1, -1)  # (R, b, P, d): a view of (R, P, d)
        out = torch.cat([groups[:, :, :1], per_sample, groups[:, :, keep_from:]], dim=2)  # (R, b, 1 + P + N, d)
        return out.view(B, 1 + P + x.shape[1] - keep_from, x.shape[2])  # (B, 1 + P + N, d)

    def forward_tokens(self, x: torch.Tensor, prompts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens after the last block (before the final norm), `(B, 1 + P + N_p, d)`.

        `prompts=None` uses the model's own; a tensor of the same shape may be passed instead
        (the initializer's pass A runs the backbone with random prompts this way), or one prompt set
        per run, `(R, L_p, P, d)` for R equal groups of consecutive samples (a pack, `models/packed.py`;
        prompt dropout is not applied to them: packs refuse it).
        """
        prompts = self.prompt() if prompts is None else prompts
        x = self.embed(x)  # (B, N_e, d)
        if prompts.ndim == 4 and x.shape[0] % prompts.shape[0]:
            raise ValueError(f"forward_tokens: {x.shape[0]} samples do not split into {prompts.shape[0]} equal runs")
        layers = prompts.to(x.dtype).unbind(-3)  # L_p x (P, d) or (R, P, d): one backward stack, no per-layer zeros
        x = self._insert(x, layers[0], 1)
        wrapper = self._block_wrapper if torch.is_grad_enabled() else None
        for layer, block in enumerate(self.backbone.blocks):
            if self.deep and layer > 0:
                x = self._insert(x, layers[layer], 1 + self.num_prompts)
            x = block(x) if wrapper is None else wrapper(block, x)
        return x

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the run's `fc_norm` and head read from the last block's tokens `(B, T, d)` -> `(B, d)`, in the
        head's dtype; no per-run parameter is used here (a pack pools all its runs at once). `mean` (MAE's
        setting) averages the tokens (its own LayerNorm, `fc_norm`, follows); the others take the
        backbone's final norm, then CLS or a token mean."""
        P, dtype = self.num_prompts, self.head.weight.dtype
        if self.pool == "mean":  # fc_norm trains with the head: in the head's dtype
            return x[:, 1:].to(dtype).mean(dim=1)
        x = self.backbone.norm(x)
        if self.pool == "cls":
            return x[:, 0].to(dtype)
        if self.pool == "img_mean":
            return x[:, 1 + P:].mean(dim=1).to(dtype)
        return x[:, 1:1 + P].mean(dim=1).to(dtype)  # prompt_mean

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features the head reads: `fc_norm(pool_features(x))`."""
        return self.fc_norm(self.pool_features(x))

    def classify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits `(B, classes)` from the last block's tokens. The pooled features go to the head in its
        weights' dtype: fp32 as stored (a bf16 backbone's features are cast back), bf16 where an engine
        presents the whole model so."""
        return self.head(self.pool_tokens(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_tokens(x))


def _checkpoint_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(block, x, use_reentrant=False)


def xavier_bound(patch_size: tuple[int, int], d: int) -> float:
    """The half-width `v = sqrt(6 / (3 * ph * pw + d))` of VPT's uniform prompt init (spec: VIPAMIN.md,
    "Random prompts"; `3 * ph * pw` is the patch embedding's fan-in, `d` its fan-out)."""
    ph, pw = (int(s) for s in patch_size)
    if ph <= 0 or pw <= 0 or d <= 0:
        raise ValueError(f"xavier_bound: patch size {patch_size} and width d={d} must be positive")
    return math.sqrt(6.0 / (3 * ph * pw + d))


def xavier_prompts(num_layers: int, P: int, d: int, patch_size: tuple[int, int], seed: int,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """VPT's Xavier-uniform prompts `R` of shape `(num_layers, P, d)` (`num_layers` is `L_p`), U(-v, v).

    Drawn in float64 from a CPU generator seeded with `seed`, then cast to `dtype`: the same
    `(num_layers, P, d, patch_size, seed)` gives the same tensor whatever the process, rank or device.
    """
    if num_layers < 1 or P < 1 or d < 1:
        raise ValueError(f"xavier_prompts: need num_layers, P, d >= 1, got {num_layers}, {P}, {d}")
    v = xavier_bound(patch_size, d)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    R = torch.rand((num_layers, P, d), generator=g, dtype=torch.float64)  # (L_p, P, d), U[0, 1)
    R = R.mul_(2.0 * v).sub_(v)
    return R.to(dtype)


def random_prompts(num_layers: int, length: int, dim: int, patch_size: tuple[int, int], seed: int) -> torch.Tensor:
    """VPT's Xavier-uniform prompts `(L_p, P, d)`, seeded (float32)."""
    return xavier_prompts(num_layers, length, dim, patch_size, seed).float()


def read_prompts_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a prompts file (safetensors), checked against the SHA-256 it records (written by
    `vipamin-scale init` and by training). A missing, unreadable or damaged (digest mismatch) file is a
    ConfigError naming `prompt.init_file` and the path. A file that records no digest (written before
    prompts files carried one, or by the user's own code) is the user's data and is read unverified."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt.init_file: no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError (header too large, ...)
        raise ConfigError(f"prompt.init_file: {path} is not a readable safetensors file "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if digest.verify(tensors, metadata) is False:
        raise ConfigError(f"prompt.init_file: {path} is damaged (its tensors or metadata do not match the "
                          f"SHA-256 recorded in it); write it again with `vipamin-scale init`")
    return tensors


def load_prompts_file(path: str | Path, model: PromptedViT) -> torch.Tensor:
    """The `prompts` tensor of a prompts file (`read_prompts_file`: digest checked), checked against the
    model's shape and for NaN/Inf; a ConfigError naming `prompt.init_file` and the path otherwise."""
    path = Path(path)
    tensors = read_prompts_file(path)
    keys, prompts = sorted(tensors), tensors.get("prompts")
    if prompts is None:
        raise ConfigError(f"prompt.init_file: {path} has no `prompts` tensor (has {keys})")
    try:
        model._check_prompt_shape(prompts, source=f"prompt.init_file: {path}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not prompts.is_floating_point() or not torch.isfinite(prompts).all():
        bad = int((~torch.isfinite(prompts)).sum()) if prompts.is_floating_point() else prompts.numel()
        raise ConfigError(f"prompt.init_file: {path}: the `prompts` tensor has {bad} non-finite "
                          f"(NaN/Inf) or non-float values of {prompts.numel()}")
    return prompts.float()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)
