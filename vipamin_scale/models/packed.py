"""PromptedPack: K prompted runs over ONE frozen backbone, side by side along the batch.

    pack = PromptedPack([PromptedViT(backbone, ...), PromptedViT(backbone, ...), ...])   # one backbone object
    logits = pack(x, runs)     x (len(runs) * b, 3, H, W): b samples per run, in the order of `runs`
                               -> (len(runs) * b, C), each segment through its run's prompts, norm, head

Each run is an ordinary `PromptedViT` (its prompt provider, pooling LayerNorm `fc_norm` and head,
parameter names `runs.<k>.<solo name>`). The forward embeds the whole batch once, gives every sample
its own run's prompts at every layer (`prompts.repeat_interleave(b)`: a `(B, L_p, P, d)` tensor that
`PromptedViT.forward_tokens` inserts per sample), runs the backbone's blocks once, then pools and
classifies each segment with its run's own modules. Every op of a ViT is per sample (LayerNorm,
attention within a sample, MLP), so segment k's logits, and the gradients of a loss that sums the
runs' own losses, are exactly those of run k alone (up to float summation order in batched GEMMs).

A pack of one calls the run's prompts unexpanded (`(L_p, P, d)`), which is the solo model's forward
op for op. The pack stays a plain `nn.Module`: engines wrap it (DDP over the whole pack).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from vipamin_scale.models.prompted import PromptedViT


class PromptedPack(nn.Module):
    def __init__(self, models: Sequence[PromptedViT]):
        super().__init__()
        if not models:
            raise ValueError("PromptedPack: needs at least one model")
        backbone = models[0].backbone
        if any(m.backbone is not backbone for m in models):
            raise ValueError("PromptedPack: every run must wrap the same backbone object")
        self.runs = nn.ModuleList(models)

    @property
    def backbone(self) -> nn.Module:
        return self.runs[0].backbone

    def prefix(self, k: int) -> str:
        """Run k's parameter names are `prefix(k) + <its solo name>`."""
        return f"runs.{k}."

    def train(self, mode: bool = True) -> "PromptedPack":
        super().train(mode)
        for m in self.runs:
            m.train(mode)  # the backbone stays in eval mode
        return self

    def set_grad_checkpointing(self, enable: bool = True, wrapper=None) -> None:
        self.runs[0].set_grad_checkpointing(enable, wrapper)  # its forward_tokens runs the blocks

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor, runs: Optional[Sequence[int]] = None) -> torch.Tensor:
        runs = list(range(len(self.runs))) if runs is None else list(runs)
        if x.shape[0] % len(runs):
            raise ValueError(f"PromptedPack: a batch of {x.shape[0]} does not split into {len(runs)} equal segments")
        b = x.shape[0] // len(runs)  # samples per run
        first = self.runs[0]
        if len(runs) == 1:
            prompts = self.runs[runs[0]].prompt()  # (L_p, P, d): the solo forward, op for op
        else:
            prompts = torch.stack([self.runs[k].prompt() for k in runs])  # (R, L_p, P, d)
            prompts = prompts.repeat_interleave(b, dim=0)  # (R * b, L_p, P, d), one set per sample
        tokens = first.forward_tokens(x, prompts=prompts)  # (R * b, 1 + P + N_p, d)
        logits = [self.runs[k].classify(seg) for k, seg in zip(runs, tokens.split(b))]  # (b, C) each
        return logits[0] if len(logits) == 1 else torch.cat(logits)  # (R * b, C)
