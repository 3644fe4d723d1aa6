"""PyTorch's own sharding, FSDP2 (`torch.distributed.fsdp.fully_shard`), behind the engine interface.

    engine=fsdp2 [engine.activation_checkpointing=true]

Layout (as torchtitan's `apply_fsdp`, applied from outside to the plain `PromptedViT`):
- each (frozen) ViT block is its own FSDP unit: its parameters live sharded over the ranks
  (dim 0, ~1/world each), are all-gathered just before the block's forward and freed after it,
  and gathered again for its backward (the prompts of earlier layers need gradients through it);
- the root unit holds the rest: patch and position embedding, norms, prompts and head. Its
  trainable parameters are DTensors sharded the same way; FSDP2 reduce-scatters (averages)
  their gradients and torch AdamW steps on each rank's shard.
So the frozen backbone's memory per rank falls with the world size (what DDP and the ZeRO-1/2
engines cannot do), at the price of an all-gather per block per forward (and per backward).
With train.precision=bf16 every unit has FSDP2's `MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)` (`mixed_precision`): bf16 all-gathers and compute, fp32 gradient reduction,
no autocast; PromptedViT hands the head its features in the head's (then bf16) dtype.

Activation checkpointing is torch's non-reentrant checkpoint per block (the base engine's); the
recomputation all-gathers the block again. Every forward is a collective: `pad_eval` evens out
the ranks' eval batch counts. The trainable state is engine-neutral: full CPU tensors by
parameter name, gathered on every rank (`DTensor.full_tensor`, a collective), and a loaded full
tensor is cut into this rank's shard (`distribute_tensor`), so a run saved under fsdp2 resumes
under DDP, DeepSpeed or fairscale at any world size, and the other way round. With world size 1
(no process group) the model stays a plain module.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

import vipamin_scale.distributed as D
from vipamin_scale.engine.base import Engine

log = logging.getLogger(__name__)


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def mixed_precision(precision: str):
    """FSDP2's policy for train.precision: bf16 gathers and computes every unit in bf16 (a frozen fp32
    backbone's all-gather moves half the bytes; a bf16-stored one, model.dtype=bf16, is cast by nothing)
    and reduce-scatters the trainable gradients in fp32 (the sharded parameters and AdamW's state stay
    fp32), as torchtitan does, without autocast. fp32 and fp16 keep FSDP2's default (no casts; fp16 runs
    under the base engine's autocast)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


class FSDP2Engine(Engine):
    name = "fsdp2"

    def _shard(self, model: nn.Module) -> None:
        if not D.is_dist():
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.mesh = init_device_mesh(self.device.type, (D.world_size(),))
        mp = mixed_precision(self.precision)
        for block in model.backbone.blocks:
            fully_shard(block, mesh=self.mesh, mp_policy=mp)
        fully_shard(model, mesh=self.mesh, mp_policy=mp)
        self.bf16_policy = self.precision == "bf16"
        local = sum(p.to_local().numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        if D.rank() == 0:
            log.info("fsdp2: %d blocks + root sharded over %d ranks: %d of %d parameter elements on rank 0",
                     len(model.backbone.blocks), D.world_size(), local, total)

    bf16_policy = False  # FSDP2's bf16 MixedPrecisionPolicy applied (then no autocast)

    def autocast(self):
        if self.bf16_policy:  # the policy already runs every sharded unit in bf16
            return torch.autocast(self.device.type, enabled=False)
        return super().autocast()

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model  # fully_shard worked in place (and synchronizes gradients itself): no DDP on top

    def pad_eval(self, num_batches: int) -> None:
        if D.is_dist():
            self._pad_forwards(num_batches)

    def _full(self, t: torch.Tensor) -> torch.Tensor:
        if _is_dtensor(t):
            return t.detach().full_tensor().cpu().clone()  # collective: every rank calls it
        return super()._full(t)

    def _like(self, value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        if _is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
        return super()._like(value, param)
