"""Engines: what hosts the plain `PromptedViT` for training (the interface is `base.Engine`).

    engine = build_engine(cfg, model, total_steps, warmup_steps, lr)

`engine.name` picks one: `ddp` (base.py: one process or torch DDP), `deepspeed` (ZeRO 0/1/2/3),
`fairscale` (OSS + ShardedDDP), `fsdp2` (torch `fully_shard`). Each engine module imports `base`,
never this package, and the heavy ones (DeepSpeed, fairscale) are imported only when chosen.
"""
from __future__ import annotations

import torch.nn as nn
from omegaconf import OmegaConf

from vipamin_scale import distributed as D
from vipamin_scale.config import ConfigError
from vipamin_scale.engine.base import Engine


def build_engine(cfg, model: nn.Module, total_steps: int, warmup_steps: int, lr: float) -> Engine:
    name = cfg.engine.name
    if name == "ddp":
        return Engine(model, lr, cfg.train.weight_decay, total_steps, warmup_steps, D.device(), cfg.train.precision,
                      activation_checkpointing=cfg.engine.activation_checkpointing)
    if name == "deepspeed":
        from vipamin_scale.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, lr, total_steps, warmup_steps)
    if name == "fairscale":
        from vipamin_scale.engine.fairscale import FairscaleEngine

        return FairscaleEngine(model, lr, cfg.train.weight_decay, total_steps, warmup_steps, D.device(),
                               cfg.train.precision, activation_checkpointing=cfg.engine.activation_checkpointing,
                               offload_activations=bool(OmegaConf.select(cfg, "engine.offload_activations",
                                                                         default=False)))
    if name == "fsdp2":
        from vipamin_scale.engine.fsdp2 import FSDP2Engine

        return FSDP2Engine(model, lr, cfg.train.weight_decay, total_steps, warmup_steps, D.device(), cfg.train.precision,
                           activation_checkpointing=cfg.engine.activation_checkpointing)
    raise ConfigError(f"engine.name: must be one of ddp, deepspeed, fairscale, fsdp2; got {name!r}")
