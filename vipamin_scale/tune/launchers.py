"""How a tune's trials run (`tune.launcher`): each trial is an ordinary training run with its own
directory, config and records (vipamin_scale/runs.py), whoever starts it.

    inline   one after another in this process (under torchrun every rank runs the same loop: each
             trial is a distributed run)
    local    each as a `vipamin-scale train` subprocess, `tune.workers` at once (`tune.command`
             replaces the command, e.g. "launch/torchrun.sh train")
    slurm    each as a Slurm job through submitit (`tune.slurm` holds submitit's parameters)
    packed   all of a rung's trials in this process as packs over one backbone (`run_packed`, packs of at
             most `tune.pack_size` runs, auto: measured at the first rung; each trial equals its inline run);
             under torchrun each pack is a distributed run of all ranks, as inline's trials are

The contract of a launcher: `run(trials)` gets trials that have not ended, all of one rung (so they may
run side by side), and returns when each has ended with a result.json, finished or failed (a trial
that could not record itself is recorded as failed here); an exception of one trial never stops the
others. `from_config(cfg, base_overrides, train_fn)` makes it from the tune's config. A new launcher
is a subclass registered under its `tune.launcher` name (`@register`) plus the name in
config.TuneConfig.launcher's choices; one that trains in this process gets each trial's whole config
from `InlineLauncher.config` (as `packed` does).
"""
from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

import vipamin_scale.runs as runs
from vipamin_scale.tune.space import apply_point, fmt_params, hydra_value

log = logging.getLogger(__name__)

TrainFn = Callable[[DictConfig], Any]


@dataclass
class Trial:
    name: str  # "rung0/c003", "rung0/c003/draw1", "final/seed1": its directory under the run directory
    dir: Path
    params: dict[str, Any]  # the candidate's values
    overrides: dict[str, Any]  # everything set on the base config (params + budget, split, seed, draw, ...)
    rung: Optional[int] = None
    candidate: Optional[int] = None
    seed: Optional[int] = None
    draw: Optional[int] = None  # the selection draw (tune.select_draws > 1 or tune.draw_roots)

    def record(self) -> dict[str, Any]:
        out = {"name": self.name, "params": self.params, "overrides": self.overrides, "rung": self.rung,
               "candidate": self.candidate, "seed": self.seed}
        return out if self.draw is None else {**out, "draw": self.draw}


def trial_config(base: DictConfig, trial: Trial) -> DictConfig:
    """The trial's whole config: the base config plus the trial's overrides, written into its directory."""
    cfg = apply_point(base, trial.overrides)  # still the typed schema: a wrong type is an error here
    cfg.train.out_dir = str(trial.dir)
    return cfg


class Launcher:
    """Runs a rung's trials (the module's docstring states the contract)."""

    name = ""

    @classmethod
    def from_config(cls, cfg: DictConfig, base_overrides: Sequence[str], train_fn: Optional[TrainFn]) -> "Launcher":
        raise NotImplementedError

    def run(self, trials: Sequence[Trial]) -> None:
        raise NotImplementedError


LAUNCHERS: dict[str, type[Launcher]] = {}


def register(cls: type[Launcher]) -> type[Launcher]:
    LAUNCHERS[cls.name] = cls
    return cls


@register
class InlineLauncher(Launcher):
    """Trials one after another in this process: `train_fn(cfg)` on the base config plus the trial's
    overrides (run_training by default; a stand-in for tests). An exception is recorded as a failed
    trial (result.json) and the search goes on; KeyboardInterrupt and SystemExit are not caught."""

    name = "inline"

    def __init__(self, base: DictConfig, train_fn: Optional[TrainFn] = None):
        self.base = base
        if train_fn is None:
            from vipamin_scale.train import run_training as train_fn
        self.train_fn = train_fn

    @classmethod
    def from_config(cls, cfg, base_overrides, train_fn):
        return cls(cfg, train_fn)

    def config(self, trial: Trial) -> DictConfig:
        return trial_config(self.base, trial)

    def run(self, trials: Sequence[Trial]) -> None:
        import vipamin_scale.distributed as D
        for trial in trials:  # each trial records itself (vipamin_scale.runs), which is what a report reads
            cfg = self.config(trial)
            log.info("tune: %s %s", trial.name, fmt_params(trial.params))
            try:
                self.train_fn(cfg)
            except Exception as exc:  # recorded; the search goes on
                log.warning("tune: %s failed: %s: %s", trial.name, type(exc).__name__, exc)
                runs.record_exception(cfg, exc)
            D.barrier()


@register
class LocalLauncher(Launcher):
    """Each trial as its own `vipamin-scale train` process, `workers` at once; its output goes to
    `<trial>/trial.log`. A process that exits non-zero without a result.json is recorded as failed."""

    name = "local"

    def __init__(self, base_overrides: Sequence[str], workers: int = 1, command: Optional[str] = None):
        self.base_overrides = list(base_overrides)
        self.workers = workers
        self.command = shlex.split(command) if command else [sys.executable, "-m", "vipamin_scale.cli", "train"]

    @classmethod
    def from_config(cls, cfg, base_overrides, train_fn):
        return cls(base_overrides, cfg.tune.workers, cfg.tune.command)

    def argv(self, trial: Trial) -> list[str]:
        return [*self.command, *self.base_overrides, *(f"{k}={hydra_value(v)}" for k, v in trial.overrides.items()),
                f"hydra.run.dir={trial.dir}", "train.progress=false"]

    def _one(self, trial: Trial) -> None:
        trial.dir.mkdir(parents=True, exist_ok=True)
        log.info("tune: %s %s", trial.name, fmt_params(trial.params))
        with open(trial.dir / "trial.log", "ab") as out:
            rc = subprocess.call(self.argv(trial), stdout=out, stderr=subprocess.STDOUT)
        if not runs.has_ended(trial.dir):
            runs.record_failure(trial.dir, f"exit code {rc} without result.json; see {trial.dir / 'trial.log'}: "
                                  f"{_last_line(trial.dir / 'trial.log')}")
        elif rc != 0:
            log.warning("tune: %s exited %d", trial.name, rc)

    def run(self, trials: Sequence[Trial]) -> None:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            list(pool.map(self._one, trials))


@register
class SlurmLauncher(LocalLauncher):
    """Each trial as a Slurm job through submitit (parameters: tune.slurm, e.g. slurm_partition,
    timeout_min, gpus_per_node, cpus_per_task); submitit's logs under `<run dir>/.submitit/`."""

    name = "slurm"

    def __init__(self, base_overrides: Sequence[str], folder: Path, parameters: Mapping[str, Any],
                 command: Optional[str] = None):
        super().__init__(base_overrides, 1, command)
        self.folder, self.parameters = Path(folder), dict(parameters)

    @classmethod
    def from_config(cls, cfg, base_overrides, train_fn):
        return cls(base_overrides, Path(cfg.train.out_dir) / ".submitit",
                   OmegaConf.to_container(cfg.tune.slurm, resolve=True), cfg.tune.command)

    def run(self, trials: Sequence[Trial]) -> None:
        import submitit

        executor = submitit.AutoExecutor(folder=str(self.folder / "%j"))
        executor.update_parameters(**{"name": "vipamin-tune", **{k: v for k, v in self.parameters.items()
                                                                 if v is not None}})
        jobs = []
        for trial in trials:
            trial.dir.mkdir(parents=True, exist_ok=True)
            jobs.append((trial, executor.submit(submitit.helpers.CommandFunction(self.argv(trial), verbose=False))))
        for trial, job in jobs:
            try:
                job.result()
            except Exception as exc:  # the job failed; its result.json (if any) says why
                if not runs.has_ended(trial.dir):
                    runs.record_failure(trial.dir, f"slurm job {job.job_id}: {type(exc).__name__}: {str(exc).strip()[-500:]}")


@register
class PackedLauncher(InlineLauncher):
    """A rung's trials (every draw of every candidate) trained as packs in this process
    (vipamin_scale/packs.py): a run that fails alone is recorded by its pack; a pack that fails as a whole
    records the exception for each of its runs, and the other packs go on."""

    name = "packed"

    def __init__(self, base: DictConfig, pack_size: Optional[int | str] = None):
        super().__init__(base, train_fn=lambda cfg: None)  # trains through run_packed, never train_fn
        self.pack_size = pack_size

    @classmethod
    def from_config(cls, cfg, base_overrides, train_fn):
        return cls(cfg, cfg.tune.pack_size)

    def run(self, trials: Sequence[Trial]) -> None:
        import vipamin_scale.distributed as D
        from vipamin_scale.pack_memory import resolve_pack_size
        from vipamin_scale.packs import run_packed

        for trial in trials:
            log.info("tune: %s %s", trial.name, fmt_params(trial.params))
        cfgs = [self.config(t) for t in trials]
        # auto: measured once, at the first rung (the later rungs' runs differ in their epochs, not their steps)
        self.pack_size = resolve_pack_size(self.pack_size, cfgs, "tune.pack_size")
        # under torchrun run_tune joined the process group: every pack is trained by all ranks together
        run_packed(cfgs, self.pack_size, keep_going=True)
        D.barrier()
        for trial in trials:  # a run that could not record itself (e.g. its directory was held)
            if D.rank() == 0 and not runs.has_ended(trial.dir):
                runs.record_failure(trial.dir, "the packed run ended without result.json (see the tune's log)")
        D.barrier()


def make_launcher(cfg: DictConfig, base_overrides: Sequence[str] = (), train_fn: Optional[TrainFn] = None) -> Launcher:
    """The launcher `tune.launcher` names (LAUNCHERS)."""
    return LAUNCHERS[cfg.tune.launcher].from_config(cfg, base_overrides, train_fn)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""
