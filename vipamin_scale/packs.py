"""Packing a sweep: group its runs into packs (`train.train_pack`), spread the packs over ranks.

    plan_packs(cfgs, pack_size=None) -> [[run index, ...], ...]   runs that can share a pack (equal
                                        `train.pack_key`), in sweep order, cut into packs of at most
                                        pack_size (None: each compatible group is one pack)
    run_packed(cfgs, pack_size=None) -> [result per run]          every pack trained; under torchrun with
                                        W ranks, rank r trains packs r, r + W, ... alone (world 1 each, no
                                        collective between packs) and returns None for the others' runs
                                        (their result.json is in their run directories). When this process
                                        already joined a process group, every pack is trained by all ranks
                                        together instead (a distributed run each), and every rank returns
                                        every result. A run its directory refuses (`runs.refusal`: it holds
                                        another run) is left out before any compute, as its solo run stops

The three ways in call `run_packed`: Python (`vipamin_scale.train_pack` for one pack), the Hydra launcher
(`vipamin-scale train -m hydra/launcher=packed ...`, `launch_sweep` below, the plugin class in
`hydra_plugins/vipamin_scale_packed`), and a tune launcher (`tune.launcher=packed`: each rung's candidate
configs, `run_packed(cfgs, tune.pack_size)`, results in candidate order).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

import vipamin_scale.checkpoint as ckpt
import vipamin_scale.distributed as D
import vipamin_scale.runs as runs
from vipamin_scale.config import ConfigError, pack_key
from vipamin_scale.pack_memory import resolve_pack_size
from vipamin_scale.pool import environ
from vipamin_scale.train import free_device_memory, train_pack

log = logging.getLogger(__name__)


def plan_packs(cfgs: Sequence[DictConfig], pack_size: Optional[int] = None) -> list[list[int]]:
    """Indices of `cfgs` grouped by compatibility and, for runs that resume, by the step they resume
    from (a pack trains in lockstep; first appearance order), each group cut into packs."""
    if pack_size is not None and pack_size < 1:
        raise ConfigError(f"hydra.launcher.pack_size: must be >= 1 (or null: every compatible run); got {pack_size}")
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault((pack_key(cfg), resume_point(cfg)), []).append(i)
    size = pack_size or max(len(cfgs), 1)
    return [g[j:j + size] for g in groups.values() for j in range(0, len(g), size)]


def resume_point(cfg: DictConfig) -> Optional[str]:
    """The newest checkpoint's name a resuming run would start from (None: it starts at step 0); read
    from the file names only (the resume itself validates the files)."""
    if not cfg.train.resume:
        return None
    newest = ckpt.latest(Path(cfg.train.out_dir) / runs.CHECKPOINTS)
    return newest.name if newest is not None else None


class PackEvents:
    """What `run_packed` tells its caller as it goes (a study's progress lines): the plan once, then each pack
    as it ends, in this process. The default hears nothing."""

    def planned(self, plan: list[list[int]], workers: int) -> None:
        """`plan`: the packs (run indices) in the order they are handed to the `workers` processes."""

    def done(self, j: int, results: list[dict[str, Any]]) -> None:
        """Pack j of the plan ended; its runs' results."""


def run_packed(cfgs: Sequence[DictConfig], pack_size: Optional[int] = None, keep_going: bool = False,
               workers: int = 1, events: Optional[PackEvents] = None) -> list[Optional[dict[str, Any]]]:
    """Train `cfgs` as packs (module docstring); results in the order of `cfgs`. A run that fails alone is
    recorded by its pack (`train_pack`); an exception of a whole pack (e.g. its shared backbone cannot load)
    is raised, or with `keep_going` recorded for each of its runs (their result: the failure record, with
    "bug": True when the exception is not a user error, whose traceback is then logged) while the next
    packs go on. A run its directory refuses (`runs.refusal`) is not trained and nothing is written there;
    its result is {"status": "failed", "error": ..., "refused": True}. `workers` > 1 (and no torchrun): the
    packs are trained by that many spawned processes at once (one torch thread each; on a machine with GPUs,
    worker w on GPU w mod the device count), in plan order, each pack alone in its process."""
    cfgs = list(cfgs)
    plan = plan_packs(cfgs, pack_size)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if D.is_dist():  # a process group is up (its collectives would reach the other ranks): train packs together
        world, rank = 1, 0
    results: list[Optional[dict[str, Any]]] = [None] * len(cfgs)
    mine = plan[rank::world] if world > 1 else plan
    refused = _refused(cfgs, [i for pack in mine for i in pack])
    for i, exc in refused.items():  # as its solo run: one line (the caller prints it), its directory untouched
        results[i] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "refused": True}
    if refused:
        log.info("%d runs refused before any compute (their directories hold other runs)", len(refused))
    mine = [kept for kept in ([i for i in pack if i not in refused] for pack in mine) if kept]
    workers = 1 if world > 1 or D.is_dist() else max(1, min(workers, len(mine)))
    log.info("%d runs in %d packs (sizes %s)%s", len(cfgs), len(plan), [len(p) for p in plan],
             f"; rank {rank} of {world} trains {len(mine)} of them" if world > 1 else
             f" over {workers} processes" if workers > 1 else "")
    events = events or PackEvents()
    events.planned(mine, workers)

    def ended(j: int, done: list[dict[str, Any]]) -> None:
        for i, result in zip(mine[j], done):
            results[i] = result
        events.done(j, done)

    jobs = [([cfgs[i] for i in pack], keep_going) for pack in mine]
    if workers > 1:
        from vipamin_scale.pool import run_in_processes, worker_counter

        run_in_processes(_train_recorded, jobs, workers, initializer=_worker_device, initargs=(worker_counter(),),
                         on_done=ended)
    else:
        for j, job in enumerate(jobs):
            # this rank trains alone: the torchrun environment hidden (the device, LOCAL_RANK, is kept)
            with environ(WORLD_SIZE="1", RANK="0") if world > 1 else contextlib.nullcontext():
                ended(j, _train_recorded(*job))
    return results


def _train_recorded(cfgs: list[DictConfig], keep_going: bool) -> list[dict[str, Any]]:
    """One pack trained (`train_or_split`); with `keep_going`, an exception of the whole pack recorded for each
    of its runs (the one place a failed pack is recorded) instead of raised."""
    try:
        return train_or_split(cfgs)
    except Exception as exc:
        if not keep_going:
            raise
        bug = runs.user_error_line(exc) is None  # a bug: its traceback, as Hydra's basic launcher prints it
        log.error("a pack of %d runs failed: %s: %s", len(cfgs), type(exc).__name__, exc, exc_info=exc if bug else None)
        for cfg in cfgs:
            runs.record_exception(cfg, exc)
        return [{**(runs.read_result(Path(cfg.train.out_dir)) or {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}),
                 **({"bug": True} if bug else {})} for cfg in cfgs]


def train_or_split(cfgs: list[DictConfig], split: bool = False) -> list[dict[str, Any]]:
    """`train_pack(cfgs)`; a pack of K > 1 that runs out of device memory (torch.OutOfMemoryError) is split in two
    halves, each trained from where the pack started (`_drop_new_checkpoints`; a fresh run's start replaces the rest
    of the attempt, a resumed run's rewinds it), with one warning line, down to packs of one. A run that runs out of
    memory alone after a split (`split`) fails alone: recorded as a run failing in a pack is, the others go on; a pack
    of one given as such raises, as its solo run. Under a process group (every rank trains the pack) the error is
    raised: the ranks would have to agree on the split."""
    before = {cfg.train.out_dir: set(ckpt.list_checkpoints(Path(cfg.train.out_dir) / runs.CHECKPOINTS)) for cfg in cfgs}
    try:
        return train_pack(cfgs)
    except torch.OutOfMemoryError as exc:
        if D.is_dist() or len(cfgs) == 1 and not split:
            raise
        error = f"{type(exc).__name__}: {exc}"
        if len(cfgs) == 1:
            runs.record_exception(cfgs[0], exc)
    free_device_memory()  # what the failed attempt held, released with its exception
    if len(cfgs) == 1:
        log.error("%s: %s (the pack's other runs go on)", cfgs[0].train.out_dir, error)
        return [runs.read_result(Path(cfgs[0].train.out_dir)) or {"status": "failed", "error": error}]
    half = (len(cfgs) + 1) // 2
    log.warning("a pack of %d runs (%s ... %s) ran out of device memory: split into packs of %d and %d, each trained "
                "from its start", len(cfgs), cfgs[0].train.out_dir, cfgs[-1].train.out_dir, half, len(cfgs) - half)
    _drop_new_checkpoints(cfgs, before)
    return train_or_split(cfgs[:half], split=True) + train_or_split(cfgs[half:], split=True)


def _drop_new_checkpoints(cfgs: Sequence[DictConfig], before: dict[str, set[Path]]) -> None:
    """Delete the checkpoints a failed attempt wrote (those not in `before`, each run's listing before it), so that
    its runs start again where it started; a directory another live process holds is left alone."""
    for cfg in cfgs:
        out_dir = Path(cfg.train.out_dir)
        if runs.is_held(out_dir):
            continue
        for path in ckpt.list_checkpoints(out_dir / runs.CHECKPOINTS):
            if path not in before[cfg.train.out_dir]:
                path.unlink()


def _worker_device(counter) -> None:
    """A pack worker's set-up: its number w from the pool's shared counter picks its GPU (LOCAL_RANK = w, so
    `distributed.device()` is GPU w mod the device count); one torch thread."""
    import torch

    with counter.get_lock():
        w = counter.value
        counter.value += 1
    os.environ["LOCAL_RANK"] = str(w)
    torch.set_num_threads(1)


def _refused(cfgs: Sequence[DictConfig], which: Sequence[int]) -> dict[int, Exception]:
    """{index: the RunDirError its directory refuses the run for} among `which` (`runs.refusal`). When a
    process group is up, every rank trains every pack: rank 0 looks and every rank learns the outcome."""
    if D.is_dist():
        return D.broadcast_object(_refused_here(cfgs, which) if D.rank() == 0 else None)
    return _refused_here(cfgs, which)


def _refused_here(cfgs: Sequence[DictConfig], which: Sequence[int]) -> dict[int, Exception]:
    found = {i: runs.refusal(cfgs[i]) for i in which}
    return {i: exc for i, exc in found.items() if exc is not None}


# ----------------------------------------------------------------------------- the Hydra launcher


def launch_sweep(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """`hydra/launcher=packed`'s launch: every job's config composed and recorded in its job directory as
    Hydra's basic launcher would (`.hydra/`: config, hydra config, overrides; train.out_dir = the job's
    directory), then all trained by `run_packed` with `hydra.launcher.pack_size`. Returns Hydra's JobReturns
    when every run ended well; else, once each failed or refused run's `error:` line is printed (a bug's
    traceback logged), raises `runs.SweepFailed` with `sweep_code`'s exit code (the CLI returns it)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import JobReturn, JobStatus, _save_config, configure_log, setup_globals

    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    cfgs, jobs = [], []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        sweep = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(sweep):
            sweep.hydra.job.id, sweep.hydra.job.num = idx, idx
        HydraConfig.instance().set_config(sweep)
        out_dir = Path(str(sweep.hydra.sweep.dir)) / str(sweep.hydra.sweep.subdir)
        with read_write(sweep.hydra.runtime), open_dict(sweep.hydra.runtime):
            sweep.hydra.runtime.output_dir = str(out_dir.resolve())
        HydraConfig.instance().set_config(sweep)  # `${hydra:runtime.output_dir}` is the job's directory
        hydra_cfg = sweep.hydra
        with read_write(sweep), open_dict(sweep):
            task_cfg = OmegaConf.create({k: sweep[k] for k in sweep if k != "hydra"})
        task_cfg = OmegaConf.create(OmegaConf.to_container(task_cfg, resolve=True))
        task_cfg.train.out_dir = str(out_dir)
        if int(os.environ.get("RANK", "0")) == 0 and runs.refusal(task_cfg) is None:  # a refused run's records stay
            record = out_dir / str(hydra_cfg.output_subdir or ".hydra")
            record.mkdir(parents=True, exist_ok=True)
            _save_config(task_cfg, "config.yaml", record)
            _save_config(OmegaConf.create({"hydra": hydra_cfg}), "hydra.yaml", record)
            _save_config(OmegaConf.create(list(overrides)), "overrides.yaml", record)
        cfgs.append(task_cfg)
        jobs.append((list(overrides), task_cfg, hydra_cfg, out_dir))
    results = run_packed(cfgs, resolve_pack_size(launcher.pack_size, cfgs, "hydra.launcher.pack_size"), keep_going=True)
    returns = []
    for (overrides, task_cfg, hydra_cfg, out_dir), result in zip(jobs, results):
        ret = JobReturn(overrides=overrides, cfg=task_cfg, hydra_cfg=OmegaConf.create({"hydra": hydra_cfg}),
                        working_dir=str(out_dir), task_name="train")
        ret.status = JobStatus.COMPLETED  # a failed run is recorded in its result.json, as a solo job's is
        ret.return_value = result
        returns.append(ret)
    failed = [r for r in results if r is not None and r.get("status") == "failed"]
    for record in failed:  # the line each failed job prints under Hydra's basic launcher (a bug: its traceback, logged)
        if not record.get("bug"):
            print(f"error: {_message(record.get('error') or '')}", file=sys.stderr, flush=True)
    trained = [r for r in failed if not r.get("refused")]
    if trained:
        log.error("%d of %d packed runs failed; their result.json say why (`vipamin-scale report`)", len(trained),
                  len(results))
    code = sweep_code(results)
    if code:
        raise runs.SweepFailed(code)
    return returns


def sweep_code(results: Sequence[Optional[dict[str, Any]]]) -> int:
    """A packed sweep's exit code from its runs' results: 0 when none failed, 1 when a pack failed with a
    bug (not a user error), else 2 when a run failed (a user error), as Hydra's basic launcher exits."""
    failed = [r for r in results if r is not None and r.get("status") == "failed"]
    return 1 if any(r.get("bug") for r in failed) else 2 if failed else 0


def _message(error: str) -> str:
    """A failure record's error without its exception class ("TrainingDiverged: train: ..." -> "train: ...")."""
    head, sep, rest = error.partition(": ")
    return rest if sep and head.isidentifier() else error


__all__ = ["plan_packs", "run_packed", "train_or_split", "launch_sweep", "sweep_code"]
