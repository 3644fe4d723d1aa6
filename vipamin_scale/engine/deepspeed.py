"""DeepSpeed ZeRO 1/2/3 behind the engine interface.

    engine.name=deepspeed engine.zero_stage=1|2|3 [engine.ds_config=FILE.json]

The DeepSpeed config is generated from the Hydra config (`deepspeed_config`): train batch =
data.batch_size (the global batch), micro batch = data.batch_size / world size, no gradient
accumulation, ZeRO stage, bf16/fp16 from train.precision. A user's JSON (engine.ds_config) is
merged on top; where it contradicts the Hydra config (batch sizes, stage, precision) that is one
ConfigError naming both fields.

The optimizer is ours, not DeepSpeed's: plain torch AdamW over the same parameter groups as the
DDP engine (no fused/CPU Adam extension to build, and the same update rule, so the numbers agree
with DDP). ZeRO partitions its state (and with stage 3 every parameter, the frozen backbone's
included). The trainable state is read and written by parameter name through DeepSpeed's
`safe_get/set_full_*` API, so a checkpoint saved under ZeRO-3 on 2 ranks loads under DDP on 1.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig

import vipamin_scale.distributed as D
from vipamin_scale.config import ConfigError, check_global_batch
from vipamin_scale.engine.base import Engine, set_lr_from_scheduler


def import_deepspeed():
    """DeepSpeed picks its accelerator at import: CPU when no GPU (then gloo, no extension builds)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def zero3_frozen_backbone(model: nn.Module) -> dict[str, Any]:
    """ZeRO-3's knobs for a frozen ViT whose trainable part (prompts, head) is tiny, in parameter elements
    of this model (width d; a block holds 12 d² weight elements: qkv 3, proj 1, fc1 4, fc2 4 for mlp 4d).

    ZeRO-3 is the engine for a backbone that does not fit on one device, so it should hold a few blocks,
    not the model; and its cost on a GPU was host time in per-module hooks, not bandwidth (0.28x DDP on
    one H200 at batch 64, ~0.5 s a step, benchmarks/RESULTS.md). Hence:
    - stage3_param_persistence_threshold = d²: every tensor smaller than one d x d matrix stays whole on
      every rank (biases, norms, position embedding, prompts, head: ~2 d² in all for ViT-H): no gathers,
      no hooks' work for them; the block matrices (>= d² each, 99.8 % of the bytes) are partitioned.
    - stage3_prefetch_bucket_size = 2 blocks: the next block's gather overlaps this block's compute.
    - stage3_max_live_parameters = 3 blocks, stage3_max_reuse_distance = 2 blocks: DeepSpeed's defaults
      (1e9 each) exceed ViT-H's 632M elements, so nothing would be released and ZeRO-3 would hold the
      whole model as DDP does; with these, a block is released after its forward unless its backward
      comes within two blocks (the last ones, at the forward -> backward turn).
    (`_wrap` also makes each ViT block one fetch unit, `set_z3_leaf_module`: one hook pair per block
    instead of one per Linear/LayerNorm.) A user's engine.ds_config overrides any of these."""
    d = int(model.backbone.embed_dim)
    block = max(sum(p.numel() for p in b.parameters()) for b in model.backbone.blocks)
    return {"stage3_param_persistence_threshold": d * d, "stage3_prefetch_bucket_size": 2 * block,
            "stage3_max_live_parameters": 3 * block, "stage3_max_reuse_distance": 2 * block}


def deepspeed_config(cfg, world_size: int, model: Optional[nn.Module] = None) -> dict[str, Any]:
    """The DeepSpeed JSON for this run: generated from the Hydra config (with ZeRO-3 and a `model` that has
    a ViT backbone, `zero3_frozen_backbone`'s settings), a user's file merged on top."""
    check_global_batch(int(cfg.data.batch_size), world_size)
    micro = int(cfg.data.batch_size) // world_size  # data.batch_size is the global batch
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": int(cfg.data.batch_size),
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": int(cfg.engine.zero_stage)},
        "zero_allow_untested_optimizer": True,  # our torch AdamW
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": {"enabled": cfg.train.precision == "fp16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if int(cfg.engine.zero_stage) == 3 and hasattr(getattr(model, "backbone", None), "blocks"):
        generated["zero_optimization"].update(zero3_frozen_backbone(model))
    if not cfg.engine.ds_config:
        return generated
    with open(cfg.engine.ds_config) as f:
        try:
            user = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"engine.ds_config: {cfg.engine.ds_config} is not valid JSON: {exc}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"engine.ds_config: {cfg.engine.ds_config} must hold a JSON object")
    src = cfg.engine.ds_config
    checks = [
        ("train_micro_batch_size_per_gpu", user.get("train_micro_batch_size_per_gpu"), micro,
         f"data.batch_size / world size ({cfg.data.batch_size} / {world_size})"),
        ("gradient_accumulation_steps", user.get("gradient_accumulation_steps"), 1,
         "the train loop (one optimizer step per batch)"),
        ("train_batch_size", user.get("train_batch_size"), int(cfg.data.batch_size), "data.batch_size"),
        ("zero_optimization.stage", (user.get("zero_optimization") or {}).get("stage"), int(cfg.engine.zero_stage),
         "engine.zero_stage"),
        ("bf16.enabled", (user.get("bf16") or {}).get("enabled"), cfg.train.precision == "bf16", "train.precision"),
        ("fp16.enabled", (user.get("fp16") or {}).get("enabled"), cfg.train.precision == "fp16", "train.precision"),
    ]
    for key, theirs, ours, field in checks:
        if theirs is not None and theirs != ours:
            raise ConfigError(f"engine.ds_config: {src} sets {key}={theirs!r} but {field} gives {ours!r}; "
                              f"make them agree (or drop {key} from the JSON)")
    if "optimizer" in user or "scheduler" in user:
        raise ConfigError(f"engine.ds_config: {src} sets optimizer/scheduler; the engine builds torch AdamW and "
                          f"the cosine schedule from train.* (drop those sections)")
    return _merge(generated, user)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _init_deepspeed_comm(deepspeed) -> None:
    """DeepSpeed's comm layer over our process group (torchrun's); a plain single process gets a
    1-rank group (NCCL with a GPU, gloo without: `distributed.backend`), since DeepSpeed always needs one."""
    if D.is_dist():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        os.environ.setdefault(key, value)  # what torchrun would set; deepspeed.initialize checks LOCAL_RANK
    deepspeed.init_distributed(dist_backend=D.backend(), auto_mpi_discovery=False, verbose=False)


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg: DictConfig, *, lr: float, total_steps: int, warmup_steps: int,
                 device: Optional[torch.device] = None):
        self.config = deepspeed_config(cfg, D.world_size(), model)  # config errors before the slow import
        self.ds = import_deepspeed()
        _init_deepspeed_comm(self.ds)
        self.stage = int(cfg.engine.zero_stage)
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
        super().__init__(model, cfg, lr=lr, total_steps=total_steps, warmup_steps=warmup_steps, device=device)
        # AdamW's state, created now as torch would at the first step (step 0, zero moments): ZeRO
        # links each parameter to its slice of the flat state after the first step, and for a second
        # param group that is not stepped yet it would link an empty state (exp_avg not found).
        self._init_moments(0.0)

    def _enable_activation_checkpointing(self, model: nn.Module) -> None:
        self.ds.checkpointing.configure(None, partition_activations=False, contiguous_checkpointing=False,
                                        checkpoint_in_cpu=False, synchronize=False, profile=False)
        model.set_grad_checkpointing(True, wrapper=_ds_checkpoint_block)

    def _wrap(self, model: nn.Module) -> nn.Module:
        """`deepspeed.initialize` over our torch AdamW and schedule: its engine is the module, its
        optimizer and scheduler wrappers replace ours."""
        if self.stage == 3:
            from deepspeed.utils import set_z3_leaf_module

            for block in getattr(getattr(model, "backbone", None), "blocks", []):
                set_z3_leaf_module(block, True)  # one fetch unit per ViT block (as FSDP2's units)
        module, self.optimizer, _, self.scheduler = self.ds.initialize(
            model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=self.config,
            dist_init_required=False)
        if self.stage == 3:
            # Parameters that belong to a module whose own forward never runs (the backbone's
            # cls_token / pos_embed, read by PromptedViT.embed): gathered with the root's forward.
            for owner in _modules_not_called(model):
                for p in owner.parameters(recurse=False):
                    self.ds.zero.register_external_parameter(model, p)
        return module

    def _flat_fp32_partitions(self) -> list[torch.Tensor]:
        """The tensors torch AdamW steps under ZeRO: this rank's flat fp32 partition per group
        (stage 3 puts them into the param groups only for the duration of a step)."""
        flats = getattr(self.optimizer, "fp32_partitioned_groups_flat", None)  # stage 3
        if flats is None:
            flats = getattr(self.optimizer, "single_partition_of_fp32_groups", None)  # stages 1, 2
        if flats is None:  # stage 0: the parameters themselves
            flats = [p for group in self._base_optimizer().param_groups for p in group["params"]]
        return list(flats)

    def _init_moments(self, step: float) -> None:
        """AdamW's state of every flat partition: `step`, zero moments. Filled in place where it
        exists, so the per-parameter views DeepSpeed keeps into it stay valid; then linked (ZeRO 1/2,
        BF16_Optimizer link each parameter to its slice only at their first step, and
        `safe_set_full_optimizer_state` needs the link, e.g. to resume before any step)."""
        base = self._base_optimizer()
        for flat in self._flat_fp32_partitions():
            state = base.state.get(flat)
            if state:
                state["step"].fill_(float(step))
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()
            else:
                base.state[flat] = {"step": torch.tensor(float(step), dtype=torch.float32),
                                    "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
                                    "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format)}
        link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()

    # -- the loop's interface -------------------------------------------------------------------
    def forward(self, images: torch.Tensor, *args) -> torch.Tensor:
        return self.module(images.to(self._dtype), *args)  # DeepSpeed holds the module in the working dtype

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss)

    def step(self) -> None:
        self.module.step()  # optimizer step, zero grad, scheduler step

    def pad_eval(self, num_batches: int) -> None:
        """Under ZeRO-3 every forward all-gathers parameters: every rank runs the same number."""
        if self.stage != 3 or D.world_size() == 1:
            return
        self._pad_forwards(num_batches)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- engine-neutral state -------------------------------------------------------------------
    def _base_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _shape(self, p: nn.Parameter) -> torch.Size:
        return p.ds_shape if hasattr(p, "ds_shape") else p.shape

    def trainable_state(self) -> dict[str, Any]:
        """Collective: every rank must call it (partitions are gathered); all get the full state."""
        base_state = self._base_optimizer().state
        step = next(iter(base_state.values()))["step"]
        step = None if float(step) == 0 else step  # no step taken yet: no moments (as torch AdamW)
        named = dict(self.model.named_parameters())
        params, moments = {}, {}
        for n in self.names:
            p = named[n]
            params[n] = self._full(p).detach().cpu().clone()
            if step is not None:
                moments[n] = {"step": step.detach().cpu().clone() if torch.is_tensor(step) else torch.tensor(float(step))}
                for key in ("exp_avg", "exp_avg_sq"):
                    moments[n][key] = self._full(p, key).detach().cpu().clone()
        return {"params": params, "optimizer": moments, "scheduler": self.scheduler.state_dict()}

    def load_trainable_state(self, state: dict[str, Any]) -> None:
        named = dict(self.model.named_parameters())
        missing = sorted(set(self.names) - set(state["params"]))
        if missing:
            raise KeyError(f"checkpoint: trainable parameters missing: {', '.join(missing)}")
        moments = state["optimizer"]
        self._init_moments(float(next(iter(moments.values()))["step"]) if moments else 0.0)
        for n in self.names:
            p = named[n]
            value = state["params"][n].to(self.device, torch.float32)
            self._set_full(p, value)
            for key in ("exp_avg", "exp_avg_sq") if n in moments else ():
                self._set_full(p, moments[n][key].to(self.device, torch.float32), key)
            self._set_working_param(p, value)
        self.scheduler.load_state_dict(state["scheduler"])
        set_lr_from_scheduler(self.optimizer, self.scheduler)

    def _full(self, p: nn.Parameter, key: str | None = None) -> torch.Tensor:
        """`p`'s whole fp32 master (with `key`: that AdamW state of it), in `p`'s full shape.
        Collective under ZeRO (the partitions are gathered)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if not _mapped(p):
            return self._unmapped_master(p, key)
        full = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        return full.reshape(self._shape(p))

    def _set_full(self, p: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
        """Write `value` (full shape, fp32) into `p`'s master (with `key`: that AdamW state); each
        rank keeps its own partition of it."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if not _mapped(p):
            with torch.no_grad():
                self._unmapped_master(p, key).copy_(value)
            return
        value = value.flatten() if self.stage == 3 else value
        if key is None:
            safe_set_full_fp32_param(p, value)
        else:
            safe_set_full_optimizer_state(p, value, key)

    def _unmapped_master(self, p: nn.Parameter, key: str | None = None) -> torch.Tensor:
        """Stage 0 without BF16_Optimizer, where DeepSpeed's `safe_get/set_full_*` see nothing (they
        return None, see `_mapped`): the fp32 master of `p`, or with `key` that AdamW state of it.
        fp32: `p` itself (our torch AdamW is used as is). fp16/bf16: DeepSpeed's FP16_Optimizer
        steps one flat fp32 tensor per group (`fp32_groups_flat`, `p` is a slice of it), its
        FP16_UnfusedOptimizer one fp32 copy per parameter (`fp32_groups`). A view: writing into it
        writes the master."""
        state = self._base_optimizer().state
        wrapper = self.optimizer
        for i, group in enumerate(getattr(wrapper, "fp16_groups", [])):
            offset = 0
            for j, q in enumerate(group):
                if q is p:
                    flat = getattr(wrapper, "fp32_groups_flat", None)
                    master = flat[i] if flat is not None else wrapper.fp32_groups[i][j]
                    source = master if key is None else state[master][key]
                    if flat is not None:
                        source = source.view(-1)[offset:offset + p.numel()]
                    return source.view(p.shape)
                offset += q.numel()
        return p if key is None else state[p][key]

    def _set_working_param(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """The module's (working-precision) copy; the fp32 master was set above."""
        with torch.no_grad():
            if self.stage == 3:
                with self.ds.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(value.to(p.dtype))
            else:
                p.data.copy_(value.to(p.dtype))


def _mapped(p: nn.Parameter) -> bool:
    """Whether DeepSpeed's `safe_get/set_full_*` reach `p`'s fp32 master and optimizer state: a
    ZeRO-3 parameter (`ds_id`) or one linked to a flat partition (`_hp_mapping`: ZeRO 1/2 and
    BF16_Optimizer, which DeepSpeed uses at stage 0 with bf16 and fp32 gradient accumulation)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _ds_checkpoint_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from deepspeed import checkpointing

    return checkpointing.checkpoint(block, x)


def _modules_not_called(model: nn.Module) -> list[nn.Module]:
    """Modules whose parameters the model reads directly without calling the module itself."""
    backbone = getattr(model, "backbone", None)
    return [backbone] if backbone is not None else []
