"""The engine interface: what the train loop calls, whatever hosts the model.

An engine wraps a plain `PromptedViT` and its optimizer. The loop only calls `forward`,
`backward`, `step`, `pad_eval`, `trainable_state` and `load_trainable_state`: torch DDP
(`ddp.py`), DeepSpeed ZeRO (`deepspeed.py`), fairscale (`fairscale.py`) and FSDP2 (`fsdp2.py`)
all fit behind it. The trainable state is engine-neutral (parameter names of the unwrapped model,
optimizer moments by the same names), so a run saved under one engine and world size resumes
under another.

This module imports no engine; the registry (`vipamin_scale.engine.ENGINES`) imports them all.
It also holds what every engine shares: the optimizer (`adamw` over `param_groups`), the lr
schedule (`cosine_with_warmup`) and the trainable-name order.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig

import vipamin_scale.distributed as D
from vipamin_scale.config import ConfigError


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """lr multiplier: linear warmup from ~0 to 1, then cosine to 0 (VPT's schedule)."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def param_groups(model: nn.Module, weight_decay: float, runs: Optional[list[tuple[str, float, float]]] = None) -> list[dict]:
    """Trainable parameters in name order; biases and norm weights get no weight decay.

    `runs`: [(name prefix, lr, weight decay)] of a pack's runs (`models/packed.py`): two groups per
    run (decay, no decay), in run order, each with its run's lr and weight decay, so one AdamW steps
    every run exactly as its own would (AdamW's update is per element, its state per parameter).
    """
    if runs is None:
        runs = [("", None, weight_decay)]
    groups = []
    for prefix, lr, wd in runs:
        decay, no_decay = [], []
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if not p.requires_grad or not name.startswith(prefix):
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)
        extra = {} if lr is None else {"lr": lr}
        groups += [dict(params=decay, weight_decay=wd, **extra), dict(params=no_decay, weight_decay=0.0, **extra)]
    return groups


def adamw(model: nn.Module, lr: float, weight_decay: float,
          runs: Optional[list[tuple[str, float, float]]] = None) -> torch.optim.AdamW:
    """The optimizer every engine uses (plain torch AdamW, so the numbers agree across engines)."""
    return torch.optim.AdamW(param_groups(model, weight_decay, runs), lr=lr, betas=(0.9, 0.999))


def require_blocks(model: nn.Module, field: str = "engine.activation_checkpointing", verb: str = "checkpoint") -> None:
    """Activation checkpointing and compilation work per transformer block: the model must have some."""
    blocks = getattr(getattr(model, "backbone", None), "blocks", None)
    if not hasattr(model, "set_grad_checkpointing") or blocks is None or len(blocks) == 0:
        raise ConfigError(f"{field}: {type(model).__name__} has no transformer blocks "
                          f"(backbone.blocks) to {verb}; set {field}=false")


BACKBONE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # model.dtype


def store_backbone(model: nn.Module, dtype: str) -> torch.dtype:
    """Cast the frozen backbone (`model.backbone`, when the model has one) to `model.dtype`, in place;
    the trainable parameters (prompts, head, fc_norm) stay fp32. Done by the engine, after whoever trains
    ran the initializer on the fp32 backbone, so the prompts do not depend on `model.dtype`."""
    target = BACKBONE_DTYPES[dtype]
    backbone = getattr(model, "backbone", None)
    if backbone is not None and target != torch.float32:
        backbone.to(target)
    return target


def compile_blocks(model: nn.Module) -> None:
    """`torch.compile` each frozen ViT block in place (`nn.Module.compile`: names and state unchanged, so
    checkpoints and sharding see the same module). The blocks share one code path, so dynamo compiles one
    graph (per input shape) and reuses it; the prompt concatenation between blocks stays eager. As
    torchtitan does, before sharding (FSDP2 wraps the compiled blocks) and after activation checkpointing
    is switched on (the checkpoint wrapper calls the compiled block)."""
    for block in model.backbone.blocks:
        block.compile()


def set_lr_from_scheduler(optimizer, scheduler) -> None:
    """A scheduler's state does not carry the optimizer's current lr; put it back after a load."""
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def trainable_names(model: nn.Module, runs: Optional[list[tuple[str, float, float]]] = None) -> list[str]:
    """Names in the order `param_groups` puts them (per run: decay group first, then no-decay)."""
    names = []
    for prefix, _, _ in runs or [("", None, None)]:
        named = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix)),
                       key=lambda kv: kv[0])
        names += [n for n, p in named if p.ndim > 1] + [n for n, p in named if p.ndim <= 1]
    return names


class Engine(ABC):
    """The interface, and the construction every engine shares.

    One constructor for all engines (the registry builds any of them the same way):

        engine = SomeEngine(model, cfg, lr=lr, total_steps=total_steps, warmup_steps=warmup_steps)

    - `model`: the plain `PromptedViT` (moved to `device`; an engine may shard it in place);
    - `cfg`: the run's config; an engine reads `train.weight_decay`, `train.precision`, `model.dtype`,
      `train.compile`, `engine.activation_checkpointing` and its own `engine.*` fields (DeepSpeed: `zero_stage`,
      `ds_config`, `data.batch_size`);
    - `lr`: the (batch-scaled) peak learning rate; `total_steps`, `warmup_steps`: the schedule
      (`cosine_with_warmup`);
    - `device`: where the model lives; `None` is this rank's device (`distributed.device()`);
    - `runs`: a pack's runs as [(parameter name prefix, peak lr, weight decay)] (`param_groups`); `None`:
      one run, `lr` and `train.weight_decay`. The schedule's factor is the same for every run.

    Construction, in order: store the backbone in `model.dtype` (`store_backbone`), move the model, enable
    activation checkpointing (`_enable_activation_checkpointing`), compile the blocks (`train.compile`:
    `compile_blocks`), shard in place (`_shard`), build the optimizer
    (`_build_optimizer`) and the schedule, wrap (`_wrap`, which may replace `self.optimizer` and
    `self.scheduler` with the library's wrappers). Subclasses set `name` (the `engine.name` that
    picks them), do their own set-up before calling `super().__init__`, and override these hooks
    and the state methods.
    """

    name: str  # engine.name

    def __init__(self, model: nn.Module, cfg: DictConfig, *, lr: float, total_steps: int, warmup_steps: int,
                 device: Optional[torch.device] = None, runs: Optional[list[tuple[str, float, float]]] = None):
        self.device = D.device() if device is None else device
        self.backbone_dtype = store_backbone(model, cfg.model.dtype)
        self.model = model.to(self.device)
        self.precision = cfg.train.precision
        self.runs = runs
        self.names = trainable_names(model, runs)
        if cfg.engine.activation_checkpointing:
            require_blocks(model)
            self._enable_activation_checkpointing(model)
        if cfg.train.compile:
            require_blocks(model, "train.compile", "compile")
            compile_blocks(model)
        self._shard(model)
        self.optimizer = self._build_optimizer(model, lr, cfg.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_with_warmup(total_steps, warmup_steps))
        self.module = self._wrap(self.model)

    def _enable_activation_checkpointing(self, model: nn.Module) -> None:
        model.set_grad_checkpointing(True)  # torch.utils.checkpoint per block, non-reentrant

    def _shard(self, model: nn.Module) -> None:
        """Engines that replace parameters in place (FSDP2) do it here, before the optimizer sees them."""

    def _build_optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return adamw(model, lr, weight_decay, self.runs)

    @abstractmethod
    def _wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop calls (`model` itself, or the library's wrapper around it)."""

    def autocast(self):
        """train.precision=bf16|fp16 over an fp32-stored backbone: torch autocast. A bf16-stored backbone
        (model.dtype=bf16) runs in its own dtype, no autocast (PromptedViT casts at its edges)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        enabled = dtype is not None and self.backbone_dtype == torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    def forward(self, images: torch.Tensor, *args) -> torch.Tensor:
        """The wrapped model's forward (`args`: a pack's run indices, `models/packed.py`)."""
        with self.autocast():
            return self.module(images, *args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def pad_eval(self, num_batches: int) -> None:
        """Called by every rank before its `num_batches` eval batches; engines whose forward is a
        collective (ZeRO-3, FSDP2) call `_pad_forwards` here so every rank runs the same count."""

    def _pad_forwards(self, num_batches: int) -> None:
        """A rank with fewer eval batches than the most any rank has (the split need not divide
        evenly over ranks) first runs throw-away forwards, so all ranks run the same number."""
        most = torch.tensor([num_batches], dtype=torch.int64)
        D.all_reduce_max(most)
        size = self.model.backbone.patch_embed.img_size
        dummy = torch.zeros(1, 3, *size, device=self.device)
        with torch.no_grad():
            for _ in range(int(most.item()) - num_batches):
                self.forward(dummy)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def run_lr(self, k: int) -> float:
        """Run k's current lr (a pack: its two groups start at 2k)."""
        return self.optimizer.param_groups[2 * k]["lr"]

    # -- engine-neutral state -------------------------------------------------------------------
    def _full(self, t: torch.Tensor) -> torch.Tensor:
        """A parameter or optimizer moment as a whole CPU tensor (sharded engines gather it here)."""
        return t.detach().cpu().clone()

    def _like(self, value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """A whole tensor from a checkpoint, laid out as `param` is (sharded engines take their shard)."""
        return value.to(param.device)

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimizer's full state_dict (torch format: state by index in param-group order)."""
        return self.optimizer.state_dict()

    def trainable_state(self) -> dict[str, Any]:
        params = dict(self.model.named_parameters())
        opt = self._optimizer_state()
        moments = {}
        flat_ids = [i for g in opt["param_groups"] for i in g["params"]]
        for name, idx in zip(self.names, flat_ids):
            if idx in opt["state"]:
                moments[name] = {k: self._full(v) if torch.is_tensor(v) else v
                                 for k, v in opt["state"][idx].items()}
        return {
            "params": {n: self._full(params[n]) for n in self.names},
            "optimizer": moments,
            "scheduler": self.scheduler.state_dict(),
        }

    def load_trainable_state(self, state: dict[str, Any]) -> None:
        params = dict(self.model.named_parameters())
        missing = sorted(set(self.names) - set(state["params"]))
        if missing:
            raise KeyError(f"checkpoint: trainable parameters missing: {', '.join(missing)}")
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(self._like(state["params"][n], params[n]))
        opt = self._optimizer_state()
        flat_ids = [i for g in opt["param_groups"] for i in g["params"]]
        opt["state"] = {idx: {k: self._like(v, params[name]) if torch.is_tensor(v) and v.ndim > 0 else v
                              for k, v in state["optimizer"][name].items()}
                        for name, idx in zip(self.names, flat_ids) if name in state["optimizer"]}
        self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(state["scheduler"])
        set_lr_from_scheduler(self.optimizer, self.scheduler)
