"""One process, or torch DDP over the process group, behind the engine interface.

    engine.name=ddp [engine.activation_checkpointing=true]

The plain model with torch AdamW; with world size > 1 it is wrapped in
`torch.nn.parallel.DistributedDataParallel` (gradients averaged over ranks), with world size 1
it runs as is. Activation checkpointing is torch's non-reentrant checkpoint per block.
"""
from __future__ import annotations

import torch.nn as nn

import vipamin_scale.distributed as D
from vipamin_scale.engine.base import Engine


class DDPEngine(Engine):
    name = "ddp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        if D.world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model
