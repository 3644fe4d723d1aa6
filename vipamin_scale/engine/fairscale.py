"""fairscale behind the engine interface: OSS (optimizer state sharded over ranks) + ShardedDDP.

    engine.name=fairscale [engine.activation_checkpointing=true]

fairscale 0.4.13's FullyShardedDataParallel needs CUDA (streams, `torch.cuda.current_device`), so
on CPU/gloo the sharding that works is ZeRO-1/2-like: `OSS` wraps our torch AdamW and gives each
rank the state of a part of the trainable parameters; `ShardedDataParallel` reduces each gradient
to the rank that owns it; OSS broadcasts the updated parameters after the step. Activation
checkpointing uses fairscale's `checkpoint_wrapper` per ViT block (saved block inputs stay on the
model's device).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

import vipamin_scale.distributed as D
from vipamin_scale.engine.base import Engine, param_groups


class FairscaleEngine(Engine):
    name = "fairscale"

    def _enable_activation_checkpointing(self, model: nn.Module) -> None:
        from fairscale.nn import checkpoint_wrapper

        wrapped = {}

        def run_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            # checkpoint_wrapper patches the block's forward in place (names and state unchanged);
            # done once per block, on first use.
            if id(block) not in wrapped:
                wrapped[id(block)] = checkpoint_wrapper(block)
            return wrapped[id(block)](x)

        model.set_grad_checkpointing(True, wrapper=run_block)

    def _build_optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        if not D.is_dist():
            return super()._build_optimizer(model, lr, weight_decay)
        from fairscale.optim import OSS

        return OSS(param_groups(model, weight_decay), optim=torch.optim.AdamW, lr=lr, betas=(0.9, 0.999))

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not D.is_dist():
            return model
        from fairscale.nn.data_parallel import ShardedDataParallel

        return ShardedDataParallel(model, self.optimizer)

    def step(self) -> None:
        self.optimizer.step()  # each rank updates its shard, then OSS broadcasts the new values
        # ShardedDDP's grads are views into its reduce buckets: zero them through the wrapper (the
        # optimizer's set_to_none would detach them from the buckets and reduce stale values).
        self.module.zero_grad(set_to_none=True)
        self.scheduler.step()

    def _optimizer_state(self) -> dict[str, Any]:
        if D.is_dist():
            # OSS keeps each rank's shard; consolidated on every rank (collective; the state of
            # prompts + head is small), so every rank returns the same full state.
            self.optimizer.consolidate_state_dict(recipient_rank=-1)
        return self.optimizer.state_dict()
