"""PromptedPack: K prompted runs over ONE frozen backbone, side by side along the batch.

    pack = PromptedPack([PromptedViT(backbone, ...), PromptedViT(backbone, ...), ...])   # one backbone object
    logits = pack(x, runs)        x (R * b, 3, H, W): b samples per run, in the order of `runs` (R = len(runs))
                                  -> (R * b, C), each segment through its run's prompts, fc_norm and head
    losses = run_losses(logits, labels, R)   -> (R,): each run's own mean cross-entropy

Layout. A pack of one is its run's model (`pack.runs` is the `PromptedViT`): its forward is the solo forward op
for op, and any engine trains it. A pack of K > 1 holds its runs' trainable tensors STACKED: for each solo
trainable parameter (and per-run buffer, e.g. BPT's frozen whitening `W`) one tensor `(K, *solo shape)`
under `runs.<solo name>`, row k being run k's; the backbone is `pack.backbone`. So the trainable names are
`runs.<solo name>` either way, and run k's part of any of them is the tensor itself (K = 1) or its row k
(`run_part`, `stacked`): its solo checkpoint. The optimizer steps the stacked tensors at once
(`engine/adamw.py`), so the kernels of a step do not grow with K.

Forward of K > 1 (R live runs, `idx` their rows):
  1. prompts (R, L_p, P, d): the run's prompt provider (`VPTPrompts`, `BPTPrompts`: any module) called for all R
     at once, `torch.vmap` over `torch.func.functional_call` with the stacked rows;
  2. tokens (R * b, T, d): ONE embedding and pass through the blocks, each layer's (R, P, d) prompts broadcast to
     their run's b samples inside the concatenation (`PromptedViT.forward_tokens`): no (R * b, L_p, P, d) copy;
  3. features (R, b, d) = `pool_features` (no per-run parameter); with `model.pool=mean` each run's own
     LayerNorm as one `layer_norm` + one `addcmul` over the stacked weights;
  4. logits (R, b, C) = ONE `baddbmm` with the stacked heads (R, C, d) and biases (R, C).
Every op of a ViT is per sample (LayerNorm, attention within a sample, MLP), so segment k's logits, and the
gradients of a loss that sums the runs' own mean losses, are those of run k alone up to float summation order
(the batched GEMMs): within 1e-6 (tests/test_pack.py).

The pack stays a plain `nn.Module`: engines wrap it (DDP over the whole pack).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vipamin_scale.models.prompted import PromptedViT, cross_entropy


def _stacked_tree(tensors: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> nn.Module:
    """A bare module tree holding `tensors` as parameters and `buffers` as buffers under their dotted names."""
    root = nn.Module()
    for name, value in [*tensors.items(), *buffers.items()]:
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        if name in tensors:
            node.register_parameter(leaf, nn.Parameter(value))
        else:
            node.register_buffer(leaf, value)
    return root


def _shape_of(model: PromptedViT) -> PromptedViT:
    """`model`'s shape without its per-run tensors: a shallow copy around the same backbone whose prompt provider,
    fc_norm and head are copies on the meta device (a pack's forward calls them with the stacked rows of the
    runs, `functional_call`, or reads only their settings: eps, dtype)."""
    import copy

    shape = copy.copy(model)
    shape._modules = dict(model._modules)  # its own registry; the backbone object is shared
    for name in ("prompt", "fc_norm", "head"):
        shape._modules[name] = copy.deepcopy(model._modules[name]).to("meta")
    return shape


class PromptedPack(nn.Module):
    def __init__(self, models: Sequence[PromptedViT]):
        super().__init__()
        if not models:
            raise ValueError("PromptedPack: needs at least one model")
        first = models[0]
        if any(m.backbone is not first.backbone for m in models):
            raise ValueError("PromptedPack: every run must wrap the same backbone object")
        self.num_runs = len(models)
        self.run_dims = 0 if len(models) == 1 else 1  # leading run dimensions of the trainable tensors
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}  # live runs -> their rows, on the device (made once)
        if len(models) == 1:
            self.runs = first  # the solo model itself
            return
        self._modules["backbone"] = first.backbone  # registered (moved, cast, wrapped with the pack); read as a property
        trainable = {n: p for n, p in first.named_parameters() if p.requires_grad}
        own = {n: b for n, b in first.named_buffers() if not n.startswith("backbone.")}
        for k, m in enumerate(models):
            shapes = {n: tuple(p.shape) for n, p in m.named_parameters() if p.requires_grad}
            if shapes != {n: tuple(p.shape) for n, p in trainable.items()}:
                raise ValueError(f"PromptedPack: run {k}'s trainable parameters {shapes} differ from run 0's")
        stack = lambda get: torch.stack([get(m).detach() for m in models])  # noqa: E731  (K, *solo shape)
        self.runs = _stacked_tree({n: stack(lambda m, n=n: m.get_parameter(n)) for n in trainable},
                                  {n: stack(lambda m, n=n: m.get_buffer(n)) for n in own})
        self.__dict__["template"] = _shape_of(first)  # not registered: it holds no data but the shared backbone

    @property
    def stacked(self) -> bool:
        return self.num_runs > 1

    @property
    def backbone(self) -> nn.Module:
        return self._modules["backbone"] if self.num_runs > 1 else self.runs.backbone

    # -- per-run state: the solo names and tensors ------------------------------------------------------
    def prefix(self) -> str:
        """The trainable names are `prefix() + <solo name>`, for every K."""
        return "runs."

    def run_part(self, value: torch.Tensor, k: int) -> torch.Tensor:
        """Run k's part of a trainable tensor (or of an optimizer moment of one): the row k of a stacked pack."""
        return value[k] if self.stacked else value

    def stack_parts(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """`run_part`'s inverse: the runs' solo tensors, in run order, as the pack holds them."""
        return torch.stack(list(parts)) if self.stacked else parts[0]

    # -- modes and engines' hooks -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "PromptedPack":
        super().train(mode)
        self.shape_of_run().train(mode)  # the backbone stays in eval mode
        return self

    def shape_of_run(self) -> PromptedViT:
        return self.template if self.stacked else self.runs

    def set_grad_checkpointing(self, enable: bool = True, wrapper=None) -> None:
        self.shape_of_run().set_grad_checkpointing(enable, wrapper)  # its forward_tokens runs the blocks

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- forward --------------------------------------------------------------------------------------------
    def _live_rows(self, runs: Sequence[int], device: torch.device) -> Optional[torch.Tensor]:
        """The rows of `runs` as a device index, made once per live set (None: every run, in order)."""
        key = tuple(runs)
        if key == tuple(range(self.num_runs)):
            return None
        if key not in self._rows:
            self._rows[key] = torch.tensor(key, dtype=torch.long, device=device)
        return self._rows[key]

    def forward(self, x: torch.Tensor, runs: Optional[Sequence[int]] = None) -> torch.Tensor:
        if not self.stacked:
            if runs is not None and list(runs) != [0]:
                raise ValueError(f"PromptedPack: a pack of one has run 0 only; got {list(runs)}")
            return self.runs(x)  # the solo forward, op for op
        runs = list(range(self.num_runs)) if runs is None else list(runs)
        R = len(runs)
        if x.shape[0] % R:
            raise ValueError(f"PromptedPack: a batch of {x.shape[0]} does not split into {R} equal segments")
        b = x.shape[0] // R  # samples per run
        rows = self._live_rows(runs, x.device)
        own = {n: t if rows is None else t.index_select(0, rows)
               for n, t in [*self.runs.named_parameters(), *self.runs.named_buffers()]}  # (R, *solo shape)
        run = self.template
        provider = {n[len("prompt."):]: t for n, t in own.items() if n.startswith("prompt.")}
        prompts = torch.vmap(lambda p: torch.func.functional_call(run.prompt, p, ()))(provider)  # (R, L_p, P, d)
        tokens = run.forward_tokens(x, prompts=prompts)  # (R * b, 1 + P + N_p, d)
        features = run.pool_features(tokens).view(R, b, -1)  # (R, b, d), in the heads' dtype
        if "fc_norm.weight" in own:  # model.pool=mean: each run's own LayerNorm
            features = F.layer_norm(features, features.shape[-1:], eps=run.fc_norm.eps)  # (R, b, d)
            features = torch.addcmul(own["fc_norm.bias"].unsqueeze(1), features, own["fc_norm.weight"].unsqueeze(1))
        logits = torch.baddbmm(own["head.bias"].unsqueeze(1), features, own["head.weight"].transpose(1, 2))  # (R, b, C)
        return logits.view(R * b, -1)  # (R * b, C)


def run_losses(logits: torch.Tensor, labels: torch.Tensor, runs: int) -> torch.Tensor:
    """Each run's mean cross-entropy `(R,)` over its segment of `logits` (R * b, C) and `labels` (R * b,): one op
    for all runs (a pack of one: the solo loss, op for op). The sum of these is the loss whose gradient is, for
    each run, its own loss's."""
    if runs == 1:
        return cross_entropy(logits, labels).unsqueeze(0)  # (1,)
    return F.cross_entropy(logits.float(), labels, reduction="none").view(runs, -1).mean(dim=1)  # (R,)
