"""One training loop, engine-agnostic, for a pack of K runs over one frozen backbone (K = 1: a solo run).

    train_pack(cfgs)  -> [result dict per run]: what each `<train.out_dir>/result.json` holds (a failed
                         run: its failure record); the trained prompts and heads are in the runs'
                         checkpoints, never returned
    run_training(cfg) =  train_pack([cfg])[0], raising what made the run fail
    measure_pack_memory(cfgs) -> (train, eval) peak bytes of a pack's build and first steps, and of an eval
                         batch (no run records: how `pack_size=auto` measures, vipamin_scale/pack_memory.py)

A pack (issue 22, ARCHITECTURE.md "Packs") is K ordinary runs, each a full config with its own run
directory, trained side by side over one backbone (`models/packed.py`): the runs' trainable tensors are
held stacked, one forward over the runs' batches, each layer's prompts broadcast to their run's samples,
the K heads as one batched matmul and the K losses as one cross-entropy; loss = the sum of the runs' own
mean losses, so each run's gradients are its own. One optimizer step for the pack (`engine/adamw.py`:
torch's AdamW update for every run at once, each run's lr, weight decay and warmup as tensors), so the ops
of a step do not grow with K; its state by parameter name is each run's solo checkpoint. `config.check_pack`
says what may differ (the fields declared `packable`); anything else is one ConfigError naming the field,
before any compute. Per-run randomness: the head, the Xavier prompts and the initializers draw from
generators seeded by the run's own config, so they are drawn as in the solo run. Prompt dropout draws
from the global RNG, which a pack cannot split per run: `prompt.dropout > 0` is refused in packs of
K > 1 (as is any engine but ddp, the one whose optimizer steps a pack).

Batches. Runs of the same data (data.root, train.seed: the same batches) share one loader, others have
their own. Each step copies the batch of every loader that live runs read ONCE to the device (from the
loader's pinned memory, non_blocking; a DALI batch already there is used as it is) and repeats it on the
device for the runs that share it.

Initial prompts are computed once per distinct init (`init/cache.py`): runs of the pack whose initializer
reads the same fields (`config.init_key`) share one computation, and with `train.init_cache` so do
processes; every run still writes its own prompts.safetensors and records where it came from (run.json).

Pieces (torchtitan's trainer): `PackTrainer.restore` (the position to resume from), `build` = `build_data`
(backbone, loaders), `build_runs` (initializers, models, the pack), `build_engine` (lr, schedule, engine);
`train_step` (one step, no host sync), `train_epoch`, `check` (the fused collective), `evaluate`, `save`,
`finish` (the results). What changes while training is a `TrainState` (epoch, step, the loss window,
timings); which runs are live is each `Run`'s (its error or result).

Host syncs. The step never waits for the host: each run's loss stays on the device, accumulated in
float64 with the first non-finite step and its value. Every `train.log_every` steps, at the end of
every epoch, and so before every checkpoint, `check` runs ONE collective (an all-gather of
[loss sums, first bad steps, bad values, preemption flag]) and reads it once: the mean losses are
logged, the preemption flag acted on, and a non-finite loss fails its run.

Non-finite loss: the run stops at the next check (at most `train.log_every - 1` steps after the bad
one, its in-memory prompts then unused); no checkpoint is written after the bad step (checks precede
every checkpoint); the error (`TrainingDiverged`) names the first bad step, its epoch and its lr. With
train.log_every=1 that is the step itself. Alone, the run raises; in a pack of K > 1 the run is
recorded as failed (the same record and line as alone) and the others go on.

Per epoch: every rank runs the same number of steps (the loader guarantees it), the loss is averaged
over ranks for logging, top-1 accuracy is computed over the whole eval split (counts all-reduced). A
checkpoint per run is written at the end of every epoch (rank 0, atomic, last K kept, the solo
parameter names and shapes), so a packed run resumes solo and a solo run in a pack. `train.resume=true`
continues from the newest checkpoint every run of the pack has (a pack killed between two runs' writes
resumes all from the previous one), skipping the steps already taken in a partial epoch, so a resumed
run ends where an uninterrupted one would.

World size: data.batch_size is the global batch and the loader's global batches depend on (seed,
epoch) only (data/wds.py), so a step is the same samples and the same averaged gradient at every world
size: the same config trains the same prompts (up to float summation order) at world 1, 2 or 4, and a
run resumed at another world size continues the same sequence (steps count global batches). What is
drawn per rank stays per rank: with prompt.dropout > 0 the dropout masks come from each rank's torch
RNG (restored per rank on resume; a new rank takes rank 0's state), so world sizes then differ by
their dropout draws.

The run directories' records go through `vipamin_scale.runs`: rank 0 holds each run's lock for the
whole pack; a resume continues only a run of the same identity (else one line naming the differing
fields, before any compute); a resume of a finished run returns its result.json untouched; a run that
does not resume refuses a directory holding another run's checkpoint or result (`runs.start_fresh`;
train.overwrite=true deletes it first), and a pack's runs must all resume from one step or all start. A data
error in a pack of K > 1 at world 1 fails the runs reading that data alone; under torchrun it ends the
pack (a rank's data error is not seen by the others, as for a solo run).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import vipamin_scale.checkpoint as ckpt
import vipamin_scale.distributed as D
import vipamin_scale.runs as runs
from vipamin_scale.config import (ConfigError, UserError, check_global_batch, check_pack, eval_split, pack_key,
                                  validate)
from vipamin_scale.data import build_loader, check_splits, dataset_info, resolve_root
from vipamin_scale.engine import build_engine
from vipamin_scale.faults import KillSwitch, kill_switch
from vipamin_scale.init.cache import SharedInits
from vipamin_scale.models import build_model, load_backbone, normalization
from vipamin_scale.models.packed import PromptedPack, run_losses
from vipamin_scale.preempt import Preemption
from vipamin_scale.progress import progress_bar
from vipamin_scale.tracking import MetricsLog, wants_diagnostics

log = logging.getLogger(__name__)

__all__ = ["PackTrainer", "Run", "TrainState", "TrainingDiverged", "check_pack", "free_device_memory",
           "measure_pack_memory", "pack_key", "run_training", "train_pack"]


class TrainingDiverged(UserError):
    """The loss became NaN/Inf: the run stops (exit 2); the checkpoints written before it stay."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def splits_read(cfg: DictConfig) -> dict[str, str]:
    """{config field: split} of every split a training run reads (for `data.check_splits`)."""
    eval_field, eval_name = eval_split(cfg)
    reads = {"data.train_split": cfg.data.train_split, eval_field: eval_name}
    return {**reads, "data.test_split": cfg.data.test_split} if cfg.train.test_at_end else reads


# ----------------------------------------------------------------------------- the runs of a pack


@dataclass
class Run:
    """One run of a pack: its config, records and per-run state (index `k` in the pack's model)."""

    cfg: DictConfig
    out_dir: Path
    k: int = -1
    root: Optional[Path] = None
    metrics: Optional[MetricsLog] = None
    state: Optional[dict[str, Any]] = None  # the checkpoint resumed from
    resume_from: Optional[Path] = None
    best: dict[str, Any] = field(default_factory=lambda: {"acc": -1.0, "epoch": -1})
    last_eval: dict[str, Any] = field(default_factory=dict)
    init_time: float = 0.0
    init: Optional[dict[str, Any]] = None  # where its initial prompts came from (init/cache.py)
    num_trainable: int = 0
    prompt_params: int = 0
    vpt_prompt_params: int = 0
    error: Optional[BaseException] = None
    result: Optional[dict[str, Any]] = None

    @property
    def live(self) -> bool:
        return self.error is None and self.result is None

    @property
    def data_key(self) -> tuple:  # runs with equal keys read the same training batches
        return (str(self.root), self.cfg.train.seed)


def train_pack(cfgs: Sequence[DictConfig]) -> list[dict[str, Any]]:
    """Train the runs of `cfgs` as one pack (module docstring); each entry is the run's result.json
    content, or its failure record ({"status": "failed", "error": ...}) for a run that failed alone."""
    out = []
    for run in _train_pack(cfgs):
        if run.error is not None:
            out.append(runs.read_result(run.out_dir) or {"status": "failed", "error": f"{type(run.error).__name__}: {run.error}"})
        else:
            out.append(run.result)
    return out


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """A solo run: the pack of one."""
    (run,) = _train_pack([cfg], alone=True)
    if run.error is not None:
        raise run.error
    return run.result


def measure_pack_memory(cfgs: Sequence[DictConfig], steps: int = 2) -> tuple[int, int]:
    """(train, eval): the peak bytes of building the pack of `cfgs` and taking `steps` training steps (the second holds
    the optimizer's moments, as every later one), and of one eval batch after them (every run's, as `evaluate` runs
    it), without run records (their directories get the initial prompts and metrics only). On a GPU the CUDA
    allocator's peaks, what this process holds there included; on a CPU the CPU allocator's peak above what it held
    before each phase (the profiler's memory events: slow, for tests). The global RNGs are restored."""
    check_pack(cfgs)
    rng = ckpt.rng_state()
    try:
        return _measure(cfgs, steps, D.device())
    finally:
        ckpt.set_rng_state(rng)
        free_device_memory()  # the measured pack went with `_measure`'s frame


def _measure(cfgs: Sequence[DictConfig], steps: int, device: torch.device) -> tuple[int, int]:
    trainer = PackTrainer([Run(cfg, Path(cfg.train.out_dir)) for cfg in cfgs], restarted=False, alone=False)
    trainer.kill = KillSwitch()  # no injected fault in a measurement (`train` sets the run's own)

    def train() -> None:
        trainer.build()
        trainer.engine.model.train()
        iters = {}
        for key, loader in trainer.train_loaders.items():
            loader.set_epoch(0)
            iters[key] = iter(loader)
        for _ in range(min(steps, trainer.steps_per_epoch)):
            trainer.train_step({key: next(it)[:2] for key, it in iters.items()}, trainer.pack)

    def evaluate() -> None:
        trainer.evaluate({root: _FirstBatch(loader) for root, loader in trainer.eval_loaders.items()})

    peaks = _peak_bytes(train, device), _peak_bytes(evaluate, device)
    trainer._close_metrics()
    return peaks


def _peak_bytes(fn, device: torch.device) -> int:
    """The peak bytes allocated while `fn()` runs: the CUDA allocator's (all it holds included), or the CPU's above
    what it held before."""
    if device.type != "cuda":
        from vipamin_scale.profiling import allocator_peak

        return allocator_peak(fn)[0]
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device)


class _FirstBatch:
    """A loader's first batch as a loader of one batch (a measured eval)."""

    def __init__(self, loader):
        self.batch = next(iter(loader))

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        return iter([self.batch])


def free_device_memory() -> None:
    """Release what dropped tensors left cached on the GPU (reference cycles collected first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train_pack(cfgs: Sequence[DictConfig], alone: bool = False) -> list[Run]:
    cfgs = list(cfgs)
    for cfg in cfgs:
        validate(cfg)
    check_pack(cfgs)
    D.init_from_env()
    check_global_batch(cfgs[0].data.batch_size, D.world_size())
    pack = [Run(cfg, Path(cfg.train.out_dir)) for cfg in cfgs]
    # A torchrun restart (elastic, --max-restarts) always continues from the newest checkpoint.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    with contextlib.ExitStack() as held:
        for run in pack:
            with _failing_alone(run, alone):
                check_splits(run.cfg.data, splits_read(run.cfg), train="data.train_split",
                             limit=run.cfg.data.max_train_samples)
                held.enter_context(runs.hold(run.out_dir))  # one writer per run directory
                if run.cfg.train.resume or restarted:
                    runs.check_same_run(run.out_dir, run.cfg)
                    if runs.is_finished(run.out_dir):
                        if D.rank() == 0:
                            log.info("%s holds a finished run; nothing to do (result.json kept)", run.out_dir)
                        run.result = runs.read_result(run.out_dir)
                else:  # never into another attempt's checkpoints, metrics and result
                    runs.start_fresh(run.out_dir, run.cfg.train.overwrite)
        live = [run for run in pack if run.live]
        if live:
            D.barrier()  # every rank has read the records before rank 0 rewrites them
            if D.rank() == 0:
                for run in live:
                    runs.begin(run.out_dir, run.cfg)
            PackTrainer(live, restarted, alone).train()
    return pack


@contextlib.contextmanager
def _failing_alone(run: Run, alone: bool):
    """A user error of one run of a pack (K > 1) fails that run alone: recorded as its solo run's would be."""
    try:
        yield
    except UserError as exc:
        if alone:
            raise
        run.error = exc
        if not isinstance(exc, runs.RunDirError):
            runs.record_exception(run.cfg, exc)
        log.error("%s: %s: %s (the pack's other runs go on)", run.out_dir, type(exc).__name__, exc)


# ----------------------------------------------------------------------------- the trainer


@dataclass
class TrainState:
    """What changes while a pack trains; the trainer's components (loaders, pack, engine) are fixed once built.
    The loss window lives on the device (`accumulate` never reads it); `check` reads it once and resets it."""

    epoch: int = 0
    step: int = 0  # global steps taken
    skip: int = 0  # steps of `epoch` taken before a resume
    loss_sum: Optional[torch.Tensor] = None  # (K,) float64: every run's loss summed over the window
    first_bad: Optional[torch.Tensor] = None  # (K,) float64: the first non-finite step of the window (0: none)
    bad_value: Optional[torch.Tensor] = None  # (K,) float64: its loss
    lrs: dict[int, list[float]] = field(default_factory=dict)  # step -> every run's lr in it (host values)
    window_steps: int = 0  # steps in the window
    window_start: int = 1  # the window's first step
    train_time: float = 0.0
    images_seen: int = 0
    checkpoints_written: int = 0  # checkpoint files this process wrote (the kill switch counts them)

    def reset_window(self, runs: int, device: torch.device) -> None:
        self.loss_sum, self.first_bad, self.bad_value = (
            torch.zeros(runs, dtype=torch.float64, device=device) for _ in range(3))
        self.lrs, self.window_steps, self.window_start = {}, 0, self.step + 1

    def accumulate(self, full: torch.Tensor) -> None:
        """Add one step's losses (K,) (0 for runs that are not live) to the window, on the device."""
        bad = ~torch.isfinite(full) & (self.first_bad == 0)
        self.first_bad = torch.where(bad, float(self.step), self.first_bad)
        self.bad_value = torch.where(bad, full, self.bad_value)
        self.loss_sum += full
        self.window_steps += 1


class PackTrainer:
    """The loop over a pack's live runs; `train()` runs restore, build, the epochs and finish."""

    def __init__(self, pack: list[Run], restarted: bool, alone: bool):
        self.pack, self.restarted, self.alone = pack, restarted, alone
        self.cfg = pack[0].cfg  # what the runs share (check_pack)
        self.rank, self.world = D.rank(), D.world_size()
        self._live_index: dict[tuple[int, ...], torch.Tensor] = {}  # live runs' k -> that index on the device
        self.state = TrainState()

    def live(self) -> list[Run]:
        return [run for run in self.pack if run.live]

    # -- restore ----------------------------------------------------------------------------------
    def restore(self) -> None:
        """The checkpoint of every run at the newest position they all have (read before any compute;
        a damaged newer one is skipped, with a warning). None for all when one has none."""
        if not (self.cfg.train.resume or self.restarted):
            return
        found = [ckpt.load_latest(run.out_dir / "checkpoints") for run in self.pack]
        if all(f is None for f in found):
            return
        if any(f is None for f in found):  # a pack trains in lockstep: one start for all (plan_packs groups so)
            have = [str(run.out_dir) for run, f in zip(self.pack, found) if f is not None]
            lack = [str(run.out_dir) for run, f in zip(self.pack, found) if f is None]
            raise ConfigError(f"train.resume: a pack resumes its runs at one step, but {', '.join(lack[:3])}"
                              f"{' ...' if len(lack) > 3 else ''} has no checkpoint while {', '.join(have[:3])}"
                              f"{' ...' if len(have) > 3 else ''} has; train them in separate packs")
        step = min(state["global_step"] for _, state in found)
        for run, (path, state) in zip(self.pack, found):
            if state["global_step"] != step:
                path, state = _checkpoint_at(run.out_dir / "checkpoints", step)
            run.resume_from, run.state = path, state

    # -- build ------------------------------------------------------------------------------------
    def build(self) -> None:
        backbone = self.build_data()
        self.build_runs(backbone)
        self.build_engine()

    def build_data(self):
        """Each run's data root and metrics log, the shared backbone (read once), the train loaders (one per
        data key) and eval loaders (one per root); the runs must agree on classes and steps per epoch."""
        cfg = self.cfg
        for run in self.pack:
            run.root = resolve_root(run.cfg.data)
            # a resume's log reads as the uninterrupted run's: nothing the cut attempt logged past its checkpoint
            rewind = (run.state["global_step"] if run.resume_from is not None
                      else -1 if cfg.train.resume or self.restarted else None)
            run.metrics = MetricsLog.from_config(run.cfg, run.out_dir, enabled=self.rank == 0, rewind=rewind)
        counts = {int(dataset_info(run.root)["num_classes"]) for run in self.pack}
        if len(counts) > 1:
            raise ConfigError(f"data.root: the runs of a pack must have as many classes; got {sorted(counts)}")
        self.num_classes = counts.pop()
        backbone = load_backbone(cfg).to(D.device())
        self.kill.after_backbone(self.rank)
        # The loaders first: a pack whose data disagree in step count fails before any compute.
        mean, std = normalization(cfg, backbone)
        self.loader_args = dict(img_size=cfg.model.img_size, mean=mean, std=std, rank=self.rank, world_size=self.world)
        self.train_loaders: dict[tuple, Any] = {}
        for run in self.pack:
            if run.data_key not in self.train_loaders:
                self.train_loaders[run.data_key] = build_loader(
                    run.cfg.data, cfg.data.train_split, train=True, seed=run.cfg.train.seed,
                    limit=cfg.data.max_train_samples, **self.loader_args)
        steps = {len(loader) for loader in self.train_loaders.values()}
        if len(steps) > 1:
            raise ConfigError(f"data.root: the runs of a pack must take as many steps per epoch; their data give "
                              f"{sorted(steps)} (data.max_train_samples may equalize them)")
        self.steps_per_epoch = steps.pop()
        self.eval_loaders = self._eval_loaders(eval_split(cfg)[1])
        return backbone

    def build_runs(self, backbone) -> None:
        """Each run's model around the shared backbone, from its initial prompts (computed once per distinct
        init, `init/cache.py`) and BPT's statistics; then the pack of them (`models/packed.py`)."""
        models, self.diagnostics = [], {}
        shared = SharedInits()
        for k, run in enumerate(self.pack):
            run.k = k
            seed_everything(run.cfg.train.seed)  # as the solo run (the initializers do not read the global RNG)
            t0 = time.perf_counter()
            prompts = None
            if run.resume_from is None:
                prompts, run.init = shared.prompts(run.cfg, backbone, run.root, run.out_dir)
                if run.init is not None and self.rank == 0:
                    runs.record_init(run.out_dir, run.init)
            run.init_time = time.perf_counter() - t0
            whitening = shared.whitening(run.cfg, backbone, run.root)  # deterministic: a resume recomputes the same
            model = build_model(run.cfg, self.num_classes, prompts=prompts, whitening=whitening, backbone=backbone)
            if run.resume_from is not None:  # before ZeRO-3 partitions the parameters
                ckpt.check_trainable(run.resume_from, run.state["trainable"],
                                     {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad})
            if run.resume_from is None and wants_diagnostics(run.cfg.train):
                from vipamin_scale.init.run import prompt_diagnostics

                self.diagnostics[k] = prompt_diagnostics(run.cfg, model, {"prompts": model.prompt().detach().double()})
            run.num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before ZeRO-3
            run.prompt_params = sum(p.numel() for p in model.prompt.parameters() if p.requires_grad)
            run.vpt_prompt_params = int(np.prod(model.prompt_shape))
            models.append(model)
        self.model = PromptedPack(models)
        seed_everything(self.cfg.train.seed)  # the initializers must not shift training's random stream

    def build_engine(self) -> None:
        """The engine over the pack: each run's batch-scaled lr, weight decay and warmup (its own schedule)."""
        cfg, pack = self.cfg, self.pack
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        global_batch = cfg.data.batch_size  # the same samples per step at every world size
        lrs = [run.cfg.train.lr * global_batch / 256.0 for run in pack]
        warmups = [int(round(run.cfg.train.warmup_epochs * self.steps_per_epoch)) for run in pack]
        schedules = None if len(pack) == 1 else [(lr, run.cfg.train.weight_decay, w)
                                                 for run, lr, w in zip(pack, lrs, warmups)]
        self.engine = build_engine(cfg, self.model, self.total_steps, warmups[0], lrs[0], runs=schedules)
        if self.rank == 0:
            for run, lr in zip(pack, lrs):
                log.info("%s: model %s: %d trainable parameters (prompts %s + head), lr %.3g (base %.3g x %d/256), "
                         "%d steps/epoch, world %d, pack of %d", run.out_dir, cfg.model.name, run.num_trainable,
                         tuple(self.model.shape_of_run().prompt_shape), lr, run.cfg.train.lr, global_batch,
                         self.steps_per_epoch, self.world, len(pack))

    def _eval_loaders(self, split: str) -> dict[str, Any]:
        """One eval loader per data root (its runs evaluated in one pass)."""
        loaders: dict[str, Any] = {}
        for run in self.pack:
            if str(run.root) not in loaders:
                loaders[str(run.root)] = build_loader(run.cfg.data, split, train=False, **self.loader_args)
        return loaders

    def load_state(self) -> None:
        """Every run's trainable state and the RNG from their checkpoints; the position (epoch, step in
        epoch, global step) into `self.state`."""
        resumed = [run for run in self.pack if run.resume_from is not None]
        if not resumed:
            return
        self.engine.load_trainable_state(merge_states(self.model, [(run.k, run.state["trainable"]) for run in self.pack]))
        state = resumed[0].state
        ckpt.set_rng_state(state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0])
        for run in self.pack:
            run.best = run.state.get("best", run.best)
        epoch, skip, step = state["epoch"], state["step_in_epoch"], state["global_step"]
        if skip >= self.steps_per_epoch:
            epoch, skip = epoch + 1, 0
        self.state.epoch, self.state.skip, self.state.step = epoch, skip, step
        if self.rank == 0:
            for run in resumed:
                log.info("resumed from %s (epoch %d, step %d)", run.resume_from, epoch, step)

    # -- one step ---------------------------------------------------------------------------------
    def device_batch(self, batches: dict[tuple, tuple[torch.Tensor, torch.Tensor]],
                     live: list[Run]) -> tuple[torch.Tensor, torch.Tensor]:
        """The live runs' batches side by side on the device, `(R * b, 3, H, W)` and `(R * b,)`: each loader's batch
        copied ONCE (non_blocking: from the loader's pinned memory the copy does not wait), then repeated on the
        device for the runs that read it."""
        device, copies = self.engine.device, {}
        for run in live:
            if run.data_key not in copies:
                images, labels = batches[run.data_key]
                copies[run.data_key] = (images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        if len(live) == 1:
            return copies[live[0].data_key]
        keys = [run.data_key for run in live]
        return torch.cat([copies[key][0] for key in keys]), torch.cat([copies[key][1] for key in keys])

    def train_step(self, batches: dict[tuple, tuple[torch.Tensor, torch.Tensor]], live: list[Run]) -> torch.Tensor:
        """One optimizer step of every live run; returns their losses `(R,)` float64, on the device.
        No host sync: nothing here reads a device value (the copies do not wait: `device_batch`)."""
        images, labels = self.device_batch(batches, live)  # (R * b, 3, H, W), (R * b,)
        logits = self.engine.forward(images, [run.k for run in live])  # (R * b, C)
        losses = run_losses(logits, labels, len(live))  # (R,): each run's own mean loss
        self.engine.backward(losses.sum())  # each run's gradient is its own loss's (a failed run's rows get zeros)
        self.engine.step()
        return losses.detach().double()

    # -- the fused check --------------------------------------------------------------------------
    def _accumulate(self, losses: torch.Tensor, live: list[Run]) -> None:
        ks = tuple(run.k for run in live)
        if len(ks) == len(self.pack):
            full = losses  # (K,): every run live, in pack order
        else:  # made once per live set: a host list copied to the device every step would wait on it
            if ks not in self._live_index:
                self._live_index[ks] = torch.tensor(ks, device=losses.device)
            full = torch.zeros_like(self.state.loss_sum).index_copy_(0, self._live_index[ks], losses)  # (K,)
        self.state.accumulate(full)

    def check(self, preempt_local: bool) -> bool:
        """The one collective of a check: log every live run's mean loss over the window's steps, fail a run whose
        loss went non-finite, reset the window, and return whether any rank was asked to stop (preemption)."""
        st, K = self.state, len(self.pack)
        flag = torch.full((1,), 1.0 if preempt_local else 0.0, dtype=torch.float64, device=st.loss_sum.device)
        rows = D.all_gather(torch.cat([st.loss_sum, st.first_bad, st.bad_value, flag])).tolist()  # (W, 3K + 1)
        for run in self.live():
            k = run.k
            bad = [r[K + k] for r in rows if r[K + k] > 0]
            if bad:
                s = int(min(bad))
                value = sum(r[2 * K + k] for r in rows if r[K + k] == s) / self.world
                lr = st.lrs[s][k]
                self._fail(run, TrainingDiverged(
                    f"train: the loss is {value} at step {s} (epoch {st.epoch}), lr {lr:.4g}; the run stopped at "
                    f"the next check (step {st.step}, train.log_every={self.cfg.train.log_every}), the checkpoints "
                    f"written before step {s} are kept; lower train.lr or check the prompts and data"))
                continue
            mean_loss = sum(r[k] for r in rows) / (st.window_steps * self.world)
            run.metrics.write({"event": "train", "epoch": st.epoch, "step": st.step, "loss": mean_loss,
                               "lr": self.engine.run_lr(k)})
            if K == 1:
                self.progress.set_postfix(loss=f"{mean_loss:.4f}", epoch=st.epoch)
        st.reset_window(K, self.engine.device)
        return any(r[-1] > 0 for r in rows)

    def _fail(self, run: Run, exc: BaseException) -> None:
        """The run stops here; alone it raises, in a pack it is recorded (as alone) and the others go on."""
        if self.alone:
            raise exc
        run.error = exc
        runs.record_exception(run.cfg, exc)
        run.metrics.close()
        log.error("%s: %s: %s%s", run.out_dir, type(exc).__name__, exc,
                  " (the pack's other runs go on)" if len(self.pack) > 1 else "")

    # -- one epoch --------------------------------------------------------------------------------
    def train_epoch(self) -> bool:
        """The epoch's steps from `state.skip` on; returns whether a stop was asked at its last check."""
        st = self.state
        for loader in self.train_loaders.values():
            loader.set_epoch(st.epoch)
        self.engine.model.train()
        iters = {key: iter(loader) for key, loader in self.train_loaders.items()}
        stop = False
        for i in range(self.steps_per_epoch):
            batches = self._next_batches(iters)
            live = self.live()
            if not live:
                break
            if i < st.skip:
                continue
            st.lrs[st.step + 1] = [self.engine.run_lr(k) if self.pack[k].live else 0.0 for k in range(len(self.pack))]
            self.kill.before_step(len(self.pack))
            losses = self.train_step(batches, live)
            st.step += 1
            self._accumulate(losses, live)
            st.images_seen += batches[live[0].data_key][1].numel() * self.world
            self.progress.update(1)
            last = i == self.steps_per_epoch - 1
            if st.step % self.cfg.train.log_every == 0 or last:
                stop = self.check(self.preempt.local(st.window_start, st.step))
                if stop and not last:
                    self.save(i + 1)
                    self._close_metrics()
                    self.preempt.stop(st.step)
            self.kill.after_step(st.step, self.rank)
        return stop

    def _next_batches(self, iters: dict[tuple, Any]) -> dict[tuple, Any]:
        """The next batch of every loader that live runs read; at world 1 a loader's error fails its runs alone."""
        batches = {}
        for key, it in iters.items():
            readers = [run for run in self.live() if run.data_key == key]
            if not readers:
                continue
            try:
                images, labels, _ = next(it)
            except Exception as exc:
                if self.alone or self.world > 1 or not isinstance(exc, (UserError, OSError, ValueError)):
                    raise
                for run in readers:
                    self._fail(run, exc)
                continue
            batches[key] = (images, labels)
        return batches

    # -- evaluate ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loaders: dict[str, Any]) -> dict[int, dict[str, float]]:
        """Top-1 accuracy and mean loss of every live run on its eval split: {k: {acc, loss, count}}.
        The runs of one data root are evaluated in one pass (their batch copied once, repeated on the device)."""
        self.engine.model.eval()
        out = {}
        for root, loader in loaders.items():
            group = [run for run in self.live() if str(run.root) == root]
            if not group:
                continue
            R = len(group)
            stats = torch.zeros(R, 3, dtype=torch.float64, device=self.engine.device)  # (R, [correct, total, loss sum])
            self.engine.pad_eval(len(loader))  # ZeRO-3: ranks with fewer eval batches join the others' collectives
            for images, labels, _ in loader:
                images = images.to(self.engine.device, non_blocking=True)
                labels = labels.to(self.engine.device, non_blocking=True)  # (b,)
                logits = self.engine.forward(images.repeat(R, 1, 1, 1) if R > 1 else images,
                                             [run.k for run in group]).float().view(R, labels.shape[0], -1)  # (R, b, C)
                losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.expand(R, -1),
                                                           reduction="none")  # (R, b)
                stats[:, 2] += losses.sum(dim=1).double()
                stats[:, 0] += (logits.argmax(dim=2) == labels).sum(dim=1).double()
                stats[:, 1] += labels.numel()
            D.all_reduce_sum(stats)
            for run, (correct, total, loss_sum) in zip(group, stats.tolist()):
                out[run.k] = {"acc": correct / max(total, 1.0), "loss": loss_sum / max(total, 1.0), "count": int(total)}
        return out

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, step_in_epoch: int) -> None:
        """Every live run's checkpoint at the state's position (solo parameter names); every rank's RNG state is
        gathered, rank 0 writes (the trainable state is replicated). Every run's new checkpoint is written before
        any run's old ones are pruned: a pack killed between two runs' writes still finds, in every run, the step
        it resumes from (the pack's earliest), whatever train.keep_last."""
        st = self.state
        rngs = D.all_gather_object(ckpt.rng_state())
        state = self.engine.trainable_state()
        if self.rank == 0:
            for run in self.live():
                payload = {"trainable": split_state(self.model, state, run.k), "rng": rngs, "epoch": st.epoch,
                           "step_in_epoch": step_in_epoch, "global_step": st.step, "best": run.best,
                           "world_size": self.world, "engine": self.engine.name,
                           "config": OmegaConf.to_container(run.cfg, resolve=True)}
                ckpt.save(run.out_dir / "checkpoints", payload, st.step, keep_last=None)
                st.checkpoints_written += 1
                self.kill.after_checkpoint(st.checkpoints_written, self.rank)
            for run in self.live():
                ckpt.prune(run.out_dir / "checkpoints", run.cfg.train.keep_last)
        D.barrier()

    def _close_metrics(self) -> None:
        for run in self.live():
            run.metrics.close()

    # -- the whole run ----------------------------------------------------------------------------
    def train(self) -> None:
        cfg, st = self.cfg, self.state
        self.preempt = Preemption()  # SIGUSR1/SIGUSR2 (Slurm): checkpoint at the next check, requeue, exit
        self.restore()
        resumed = any(run.resume_from is not None for run in self.pack)
        self.kill = kill_switch(self.restarted, resumed)  # tests' fault injection (faults.py); off unless asked for
        self.build()
        self.load_state()
        if self.rank == 0:
            for run in self.pack:
                if run.resume_from is None:
                    run.metrics.start(OmegaConf.to_container(run.cfg, resolve=True), self.diagnostics.get(run.k))
        if self.preempt.requested():  # asked before the first step (while building): stop here (preempt.py)
            self.save(st.skip)
            self._close_metrics()
            self.preempt.stop(st.step)
        self.progress = progress_bar(self.total_steps, "train", "step", initial=st.step,
                                     enabled=cfg.train.progress and self.rank == 0)
        st.reset_window(len(self.pack), self.engine.device)
        while st.epoch < cfg.train.epochs:
            t_epoch = time.perf_counter()
            stop = self.train_epoch()
            st.skip = 0
            st.train_time += time.perf_counter() - t_epoch
            if not self.live():
                break
            if (st.epoch + 1) % cfg.train.eval_every == 0 or st.epoch + 1 == cfg.train.epochs:
                self.record_eval(self.evaluate(self.eval_loaders))
            st.epoch += 1
            self.save(0)
            if stop and st.epoch < cfg.train.epochs:
                self._close_metrics()
                self.preempt.stop(st.step)
            if stop and self.rank == 0:
                log.info("asked to stop at step %d, the run's last check: finishing the run instead of a checkpoint "
                         "and requeue", st.step)
        self.progress.close()
        self.finish()

    def record_eval(self, evals: dict[int, dict[str, float]]) -> None:
        """The epoch's eval of every run into its metrics, its best and the log."""
        cfg, st = self.cfg, self.state
        for k, ev in evals.items():
            run = self.pack[k]
            run.last_eval = ev
            if ev["acc"] > run.best["acc"]:
                run.best = {"acc": ev["acc"], "epoch": st.epoch}
            run.metrics.write({"event": cfg.train.eval_split, "epoch": st.epoch, "step": st.step, **ev})
            if self.rank == 0:
                log.info("%s: epoch %d: %s acc %.4f loss %.4f", run.out_dir, st.epoch, cfg.train.eval_split,
                         ev["acc"], ev["loss"])

    def finish(self) -> None:
        """Each live run's result: the final test (train.test_at_end), result.json, metrics closed."""
        cfg, st = self.cfg, self.state
        tests = self.evaluate(self._eval_loaders(cfg.data.test_split)) if cfg.train.test_at_end else {}
        for run in self.live():
            result: dict[str, Any] = {
                "method": run.cfg.init.method if not run.cfg.prompt.init_file else "file",
                "prompt_length": cfg.prompt.length, "deep": cfg.prompt.deep,
                "best_val": run.best, "final_eval": run.last_eval, "trainable_params": run.num_trainable,
                "init_time_s": run.init_time, "train_time_s": st.train_time,
                "images_per_s": st.images_seen / st.train_time if st.train_time > 0 else None,
                "world_size": self.world, "device": str(self.engine.device), "steps": st.step,
                "prompt_params": run.prompt_params, "vpt_prompt_params": run.vpt_prompt_params,
                "pack_size": len(self.pack),
            }
            if run.k in tests:
                result["test"] = tests[run.k]
                run.metrics.write({"event": "test", "step": st.step, **result["test"]})
            if self.rank == 0:
                runs.finish(run.out_dir, result)
            run.metrics.close()
            run.result = result


# ----------------------------------------------------------------------------- per-run state


def split_state(pack: PromptedPack, state: dict[str, Any], k: int) -> dict[str, Any]:
    """Run k's part of the engine's trainable state, under its solo names and shapes (a solo checkpoint)."""
    prefix, K = pack.prefix(), pack.num_runs
    sched = state["scheduler"]
    if K > 1:  # LambdaLR's per-group lists: run k's two groups
        sched = {key: v[2 * k:2 * k + 2] if isinstance(v, list) and len(v) == 2 * K else v for key, v in sched.items()}

    def part(v: Any) -> Any:  # a run's row of a stacked tensor (its own copy); the shared AdamW step as it is
        return pack.run_part(v, k).clone() if torch.is_tensor(v) and v.ndim > 0 and pack.stacked else v

    return {"params": {n[len(prefix):]: part(v) for n, v in state["params"].items()},
            "optimizer": {n[len(prefix):]: {key: part(v) for key, v in m.items()} for n, m in state["optimizer"].items()},
            "scheduler": sched}


def merge_states(pack: PromptedPack, states: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """The engine's trainable state of the pack from its runs' solo states, in run order (`split_state`'s inverse)."""
    states = [s for _, s in sorted(states, key=lambda ks: ks[0])]
    prefix, first = pack.prefix(), states[0]

    def stack(values: list[Any]) -> Any:
        return pack.stack_parts(values) if torch.is_tensor(values[0]) and values[0].ndim > 0 else values[0]

    params = {prefix + n: stack([s["params"][n] for s in states]) for n in first["params"]}
    moments = {prefix + n: {key: stack([s["optimizer"][n][key] for s in states]) for key in m}
               for n, m in first["optimizer"].items()}
    if len(states) == 1:
        sched = first["scheduler"]
    else:
        sched = {key: sum((s["scheduler"][key] for s in states), []) if isinstance(v, list) else v
                 for key, v in first["scheduler"].items()}
    return {"params": params, "optimizer": moments, "scheduler": sched}


def _checkpoint_at(directory: Path, global_step: int) -> tuple[Path, dict[str, Any]]:
    """The valid checkpoint of `global_step` in `directory` (a pack resumes every run at one position)."""
    for path in reversed(ckpt.list_checkpoints(directory)):
        try:
            state = ckpt.load(path)
        except ckpt.CheckpointError:
            continue
        if state["global_step"] == global_step:
            return path, state
    raise ckpt.CheckpointError(f"checkpoint: {directory} has no checkpoint of step {global_step}, where the pack's "
                               f"other runs resume; raise train.keep_last, or resume this run alone")
