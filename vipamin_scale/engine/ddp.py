"""One process, or torch DDP over the process group, behind the engine interface.

    engine.name=ddp [engine.activation_checkpointing=true]

The plain model (a run, or a pack of runs: `models/packed.py`) stepped by the pack's AdamW
(`engine/adamw.py`: torch's AdamW update for every run at once, per-run lr, weight decay and warmup,
the same ops whatever the number of runs); with world size > 1 it is wrapped in
`torch.nn.parallel.DistributedDataParallel` (gradients averaged over ranks), with world size 1 it
runs as is. Activation checkpointing is torch's non-reentrant checkpoint per block.
"""
from __future__ import annotations

import torch.nn as nn

import vipamin_scale.distributed as D
from vipamin_scale.engine.adamw import PackAdamW, PackSchedule
from vipamin_scale.engine.base import Engine, cosine_with_warmup, decays


class DDPEngine(Engine):
    name = "ddp"
    trains_packs = True

    def _build_optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> PackAdamW:
        named = dict(model.named_parameters())  # `self.names`' order: the state's indices are torch AdamW's
        return PackAdamW([(n, named[n], decays(model, named[n])) for n in self.names], [wd for _, wd, _ in self.runs])

    def _build_scheduler(self, total_steps: int, warmup_steps: int) -> PackSchedule:
        schedules = {w: cosine_with_warmup(total_steps, w) for _, _, w in self.runs}  # runs of one warmup share it
        return PackSchedule(self.optimizer, [lr for lr, _, _ in self.runs], [schedules[w] for _, _, w in self.runs],
                            total_steps)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if D.world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    @property
    def lr(self) -> float:
        return self.scheduler.run_lr(0)

    def run_lr(self, k: int) -> float:
        return self.scheduler.run_lr(k)
