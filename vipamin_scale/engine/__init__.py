"""Engines: what hosts the plain `PromptedViT` for training (the interface is `base.Engine`).

    engine = build_engine(cfg, model, total_steps, warmup_steps, lr)

`engine.name` picks one from the registry `ENGINES`: `ddp` (`ddp.py`: one process or torch DDP),
`deepspeed` (ZeRO 0/1/2/3), `fairscale` (OSS + ShardedDDP), `fsdp2` (torch `fully_shard`). Every
engine takes the one constructor `Engine(model, cfg, lr=, total_steps=, warmup_steps=, device=)`
(see `base.Engine`). This package imports the engine modules; they import `base`, never this
package. The heavy libraries (DeepSpeed, fairscale) are imported only when an engine that needs
them is built.
"""
from __future__ import annotations

import torch.nn as nn

from vipamin_scale.config import ConfigError
from vipamin_scale.engine.base import Engine
from vipamin_scale.engine.ddp import DDPEngine
from vipamin_scale.engine.deepspeed import DeepSpeedEngine
from vipamin_scale.engine.fairscale import FairscaleEngine
from vipamin_scale.engine.fsdp2 import FSDP2Engine

ENGINES: dict[str, type[Engine]] = {cls.name: cls for cls in (DDPEngine, DeepSpeedEngine, FairscaleEngine, FSDP2Engine)}

__all__ = ["ENGINES", "DDPEngine", "DeepSpeedEngine", "Engine", "FSDP2Engine", "FairscaleEngine", "build_engine"]


def build_engine(cfg, model: nn.Module, total_steps: int, warmup_steps: int, lr: float, runs=None) -> Engine:
    """The engine `cfg.engine.name` names, built on this rank's device (`runs`: a pack's, see `base.Engine`)."""
    name = cfg.engine.name
    if name not in ENGINES:
        raise ConfigError(f"engine.name: must be one of {', '.join(ENGINES)}; got {name!r}")
    if runs is not None:
        return ENGINES[name](model, cfg, lr=lr, total_steps=total_steps, warmup_steps=warmup_steps, runs=runs)
    return ENGINES[name](model, cfg, lr=lr, total_steps=total_steps, warmup_steps=warmup_steps)
