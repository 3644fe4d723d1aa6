"""The engine interface: what the train loop calls, whatever hosts the model.

An engine wraps a plain `PromptedViT` and its optimizer. The loop only calls `forward`,
`backward`, `step`, `pad_eval`, `trainable_state` and `load_trainable_state`: torch DDP
(`ddp.py`), DeepSpeed ZeRO (`deepspeed.py`), fairscale (`fairscale.py`) and FSDP2 (`fsdp2.py`)
all fit behind it. The trainable state is engine-neutral (parameter names of the unwrapped model,
optimizer moments by the same names), so a run saved under one engine and world size resumes
under another.

This module imports no engine; the registry (`vipamin_scale.engine.ENGINES`) imports them all.
It also holds what every engine shares: torch's optimizer (`adamw` over `param_groups`), the lr
schedule (`cosine_with_warmup`) and the trainable-name order. The DDP engine steps with the pack's
AdamW instead (`engine/adamw.py`: the same update, one set of ops for all the runs of a pack); the
others train packs of one run with torch's.

A pack of K > 1 runs (`models/packed.py`) holds its trainable tensors stacked, `(K, *solo shape)`:
`model.run_dims` (1; 0 for any other model) says how many leading dimensions are runs, and weight decay
applies where the SOLO tensor is a matrix (ndim > 1), never to biases and norm weights.
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


def decays(model: nn.Module, p: torch.Tensor) -> bool:
    """Whether AdamW's weight decay applies to `p`: a matrix or the prompts of a run, not a bias or a norm weight
    (its ndim as the solo run holds it, `model.run_dims` leading run dimensions left out)."""
    return p.ndim - getattr(model, "run_dims", 0) > 1


def trainable_names(model: nn.Module) -> list[str]:
    """The trainable parameters' names in the order `param_groups` puts them: those with weight decay first,
    then the others, each in name order."""
    named = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda kv: kv[0])
    return [n for n, p in named if decays(model, p)] + [n for n, p in named if not decays(model, p)]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """torch AdamW's two groups of a run: the trainable parameters with weight decay, and the rest (biases,
    norm weights) without, each in name order (`trainable_names`)."""
    named = dict(model.named_parameters())
    names = trainable_names(model)
    decay = [named[n] for n in names if decays(model, named[n])]
    no_decay = [named[n] for n in names if not decays(model, named[n])]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW as every engine but DDP steps it (so the numbers agree across engines: `engine/adamw.py`
    is the same update, bit for bit on the CPU)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999))


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
    """A torch scheduler's state does not carry the optimizer's current lr; put it back after a load (the
    pack's AdamW reads its lr from its schedule: nothing to do)."""
    for group, lr in zip(getattr(optimizer, "param_groups", ()), scheduler.get_last_lr()):
        group["lr"] = lr


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
    - `runs`: a pack's runs as [(peak lr, weight decay, warmup steps)], in the pack's run order (DDP only:
      the others train one run); `None`: one run, `lr`, `train.weight_decay` and `warmup_steps`. Every run's
      schedule is `cosine_with_warmup(total_steps, its warmup)` times its peak lr.

    Construction, in order: store the backbone in `model.dtype` (`store_backbone`), move the model, enable
    activation checkpointing (`_enable_activation_checkpointing`), compile the blocks (`train.compile`:
    `compile_blocks`), shard in place (`_shard`), build the optimizer
    (`_build_optimizer`) and the schedule (`_build_scheduler`), wrap (`_wrap`, which may replace `self.optimizer` and
    `self.scheduler` with the library's wrappers). Subclasses set `name` (the `engine.name` that
    picks them), do their own set-up before calling `super().__init__`, and override these hooks
    and the state methods.
    """

    name: str  # engine.name

    def __init__(self, model: nn.Module, cfg: DictConfig, *, lr: float, total_steps: int, warmup_steps: int,
                 device: Optional[torch.device] = None, runs: Optional[list[tuple[float, float, int]]] = None):
        self.device = D.device() if device is None else device
        self.runs = list(runs) if runs is not None else [(lr, cfg.train.weight_decay, warmup_steps)]
        if len(self.runs) > 1 and not self.trains_packs:
            raise ConfigError(f"engine.name: {self.name} trains one run at a time; packs of several runs train with "
                              f"engine.name=ddp")
        self.backbone_dtype = store_backbone(model, cfg.model.dtype)
        self.model = model.to(self.device)
        self.precision = cfg.train.precision
        self.names = trainable_names(model)
        if cfg.engine.activation_checkpointing:
            require_blocks(model)
            self._enable_activation_checkpointing(model)
        if cfg.train.compile:
            require_blocks(model, "train.compile", "compile")
            compile_blocks(model)
        self._shard(model)
        self.optimizer = self._build_optimizer(model, lr, cfg.train.weight_decay)
        self.scheduler = self._build_scheduler(total_steps, warmup_steps)
        self.module = self._wrap(self.model)

    trains_packs = False  # whether the engine steps a pack of several runs (DDP: the pack's AdamW)

    def _enable_activation_checkpointing(self, model: nn.Module) -> None:
        model.set_grad_checkpointing(True)  # torch.utils.checkpoint per block, non-reentrant

    def _shard(self, model: nn.Module) -> None:
        """Engines that replace parameters in place (FSDP2) do it here, before the optimizer sees them."""

    def _build_optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return adamw(model, lr, weight_decay)

    def _build_scheduler(self, total_steps: int, warmup_steps: int):
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_with_warmup(total_steps, warmup_steps))

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
        """Run k's current lr (a host value; engines other than DDP train one run, k = 0)."""
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
