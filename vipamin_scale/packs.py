"""Packing a sweep: group its runs into packs (`train.train_pack`), hand the packs to workers that claim them.

    plan_packs(cfgs, pack_size=None, workers=1, cost=None) -> [[run index, ...], ...]
        runs that can share a pack (equal `train.pack_key`), each compatible group cut into packs of at most
        pack_size and, with several workers, of at most a worker's share of the whole cost (so that every worker
        finds work); the longest first (the cost: `run_cost`, or the caller's)
    run_packed(cfgs, pack_size=None, ..., workers=1, wait=False) -> [result per run]
        every pack trained by the workers that claim it (below); results in the order of `cfgs`

The packs are a queue and the workers claim them. A worker is this process, each of `workers` spawned processes
(one torch thread each; worker w on GPU w mod the device count), or each rank of a torchrun or srun job that has
no process group up (world size W in the environment: each rank trains alone, on its own LOCAL_RANK device, and
every rank plans the same packs). A worker takes the next pack of the plan whose runs have not ended and whose run
directories' locks it can all take (`runs.claim`: the locks are the claim), trains the runs of it that have not
ended by then, and claims again until the plan is done; a pack another worker holds is left to it. A worker that
dies leaves its locks stale and its runs resumable (train.resume): the next claimant takes them over. Ranks claim
only when their runs continue (train.resume=true, as a study's and tune's do) or with `wait`; ranks whose runs start
fresh take the plan's packs round-robin instead (pack r, r + W, ...), since a run that starts fresh refuses a
directory that holds a run, and one another rank just trained is such a directory. With `wait`,
a worker whose claims are done waits, with a line every 30 s, until every run of `cfgs` has ended (training any
pack whose holder died), then every worker returns every run's result (read from the run directories): the
barrier of a study's selection round. Without it, the runs another worker trained have None. Which worker
trains a run never changes its result: each run of a pack equals its solo run.

When this process already joined a process group, every pack is trained by all ranks together instead (a
distributed run each), and every rank returns every result. A run its directory refuses (`runs.refusal`: it holds
another run) is left out before any compute, as its solo run stops.

The three ways in call `run_packed`: Python (`vipamin_scale.train_pack` for one pack), the Hydra launcher
(`vipamin-scale train -m hydra/launcher=packed ...`, `launch_sweep` below, the plugin class in
`hydra_plugins/vipamin_scale_packed`), a tune launcher (`tune.launcher=packed`: each rung's candidate
configs, `run_packed(cfgs, tune.pack_size)`, results in candidate order), and the study (`study/execute.py`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

import vipamin_scale.checkpoint as ckpt
import vipamin_scale.distributed as D
import vipamin_scale.preempt as preempt
import vipamin_scale.runs as runs
from vipamin_scale.config import ConfigError, pack_key
from vipamin_scale.pack_memory import resolve_pack_size
from vipamin_scale.pool import environ
from vipamin_scale.train import free_device_memory, train_pack

log = logging.getLogger(__name__)

WAIT_LINE_S = 30.0  # a worker waiting at the barrier says so this often
POLL_S = 1.0  # and looks at the run directories this often


def run_cost(cfg: DictConfig) -> float:
    """A run's work for planning, in (epochs x tokens a sample): the ViT's sequence, its patch tokens at
    model.img_size (`patch_tokens`) and the CLS, plus the prompt's. Runs of one sweep read the same data, so the
    epochs and the prompt length tell them apart; a caller that knows each run's steps passes its own cost (the
    study does)."""
    return float(cfg.train.epochs) * (patch_tokens(cfg) + 1 + int(cfg.prompt.length))


def patch_tokens(cfg: DictConfig) -> int:
    """The patch tokens of model.name at model.img_size: the patch size from the tiny test configs or the timm
    name (`..._patch14_...`); 14 when neither says."""
    import re

    from vipamin_scale.models.backbones import TINY_CONFIGS

    name = str(cfg.model.name)
    found = re.search(r"patch(\d+)", name)
    patch = TINY_CONFIGS[name]["patch_size"] if name in TINY_CONFIGS else int(found.group(1)) if found else 14
    return (int(cfg.model.img_size) // patch) ** 2


def plan_packs(cfgs: Sequence[DictConfig], pack_size: Optional[int] = None, workers: int = 1,
               cost: Optional[Callable[[DictConfig], float]] = None) -> list[list[int]]:
    """Indices of `cfgs` grouped by compatibility and, for runs that resume, by the step they resume from (a
    pack trains in lockstep), each group cut into packs (module docstring); the costliest first, ties in
    first-appearance order."""
    if pack_size is not None and pack_size < 1:
        raise ConfigError(f"hydra.launcher.pack_size: must be >= 1 (or null: every compatible run); got {pack_size}")
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault((pack_key(cfg), resume_point(cfg)), []).append(i)
    costs = [(cost or run_cost)(cfg) for cfg in cfgs]
    share = sum(costs) / workers if workers > 1 else math.inf
    plan = []
    for g in groups.values():
        parts = math.ceil(sum(costs[i] for i in g) / share) if share < math.inf else 1
        size = min(pack_size or len(g), math.ceil(len(g) / max(1, parts)))
        plan += [g[j:j + size] for j in range(0, len(g), size)]
    order = sorted(range(len(plan)), key=lambda j: (-sum(costs[i] for i in plan[j]), j))
    return [plan[j] for j in order]


def resume_point(cfg: DictConfig) -> Optional[str]:
    """The newest checkpoint's name a resuming run would start from (None: it starts at step 0); read
    from the file names only (the resume itself validates the files)."""
    if not cfg.train.resume:
        return None
    newest = ckpt.latest(Path(cfg.train.out_dir) / runs.CHECKPOINTS)
    return newest.name if newest is not None else None


class PackEvents:
    """What `run_packed` tells its caller as it goes (a study's progress lines): the plan once, then each pack
    of it as this process ends it or finds it another worker's, and the barrier's wait. The default hears nothing."""

    def planned(self, plan: list[list[int]], workers: int) -> None:
        """`plan`: the packs (run indices) in the order the `workers` processes of this call claim them."""

    def done(self, j: int, results: list[dict[str, Any]]) -> None:
        """Pack j of the plan ended here; its runs' results."""

    def elsewhere(self, j: int) -> None:
        """Pack j of the plan is another worker's (held by it, or ended)."""

    def waiting(self, line: str) -> None:
        """This worker waits for the packs other workers hold (`line` says which); called every 30 s."""


def run_packed(cfgs: Sequence[DictConfig], pack_size: Optional[int] = None, keep_going: bool = False,
               workers: int = 1, events: Optional[PackEvents] = None,
               cost: Optional[Callable[[DictConfig], float]] = None, wait: bool = False) -> list[Optional[dict[str, Any]]]:
    """Train `cfgs` as packs (module docstring); results in the order of `cfgs`. A run that fails alone is
    recorded by its pack (`train_pack`); an exception of a whole pack (e.g. its shared backbone cannot load)
    is raised, or with `keep_going` recorded for each of its runs (their result: the failure record, with
    "bug": True when the exception is not a user error, whose traceback is then logged) while the next
    packs go on. A run its directory refuses (`runs.refusal`) is not trained and nothing is written there;
    its result is {"status": "failed", "error": ..., "refused": True}. `workers` > 1 (no torchrun): that
    many spawned processes claim the packs. `cost`: each run's work, for the plan (`run_cost`)."""
    cfgs = list(cfgs)
    events = events or PackEvents()
    results: list[Optional[dict[str, Any]]] = [None] * len(cfgs)
    together = D.is_dist()  # a process group is up (its collectives would reach the other ranks)
    world = 1 if together else int(os.environ.get("WORLD_SIZE", "1"))
    workers = 1 if world > 1 or together else max(1, workers)
    plan = plan_packs(cfgs, pack_size, workers * world, cost)
    if world > 1 and not (wait or all(cfg.train.resume for cfg in cfgs)):
        # runs that start fresh refuse a directory holding a run, which a run another rank just trained does too:
        # the ranks take the packs round-robin (each refuses only its own), not by claim
        rank = int(os.environ.get("RANK", "0"))
        plan = plan[rank::world]
        log.info("rank %d of %d: packs round-robin (train.resume=false: a run another rank finished would look like "
                 "an earlier sweep's)", rank, world)
    refused = _refused(cfgs, [i for pack in plan for i in pack])
    for i, exc in refused.items():  # as its solo run: one line (the caller prints it), its directory untouched
        results[i] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "refused": True}
    if refused:
        log.info("%d runs refused before any compute (their directories hold other runs)", len(refused))
    plan = [kept for kept in ([i for i in pack if i not in refused] for pack in plan) if kept]
    workers = min(workers, max(1, len(plan)))
    log.info("%d runs in %d packs (sizes %s)%s", len(cfgs), len(plan), [len(p) for p in plan],
             f"; rank {os.environ.get('RANK', '0')} is one of {world} workers claiming them" if world > 1 else
             f", claimed by {workers} processes" if workers > 1 else "")
    events.planned(plan, workers)

    def ended(j: int, done: Optional[list[dict[str, Any]]]) -> None:
        if done is None:
            events.elsewhere(j)
            return
        for i, result in zip(plan[j], done):
            results[i] = result
        events.done(j, done)

    jobs = [([cfgs[i] for i in pack], keep_going, not together) for pack in plan]
    if workers > 1:
        from vipamin_scale.pool import run_in_processes, worker_counter

        try:
            got = run_in_processes(_pool_turn, jobs, workers, initializer=_worker_device,
                                   initargs=(worker_counter(),), on_done=lambda j, r: r != STOPPED and ended(j, r))
        except BrokenProcessPool:
            if not wait:
                raise
            log.warning("a pack worker process died; this process takes over its packs (their runs resume)")
            got = []
        if STOPPED in got or preempt.signalled():
            preempt.exit_requeued(f"preempted: {got.count(STOPPED)} of {len(jobs)} packs stopped (their runs "
                                  f"checkpointed or not started)")
    else:
        for j, job in enumerate(jobs):
            if preempt.Preemption().requested() if together else preempt.signalled():
                preempt.exit_requeued(f"preempted before pack {j + 1} of {len(jobs)}: the packs before it ended")
            with _alone(world):
                ended(j, _claim_and_train(*job))
    if wait and not together:
        with _alone(world):
            _barrier(cfgs, plan, jobs, ended, events)
        for i, cfg in enumerate(cfgs):
            if results[i] is None:
                results[i] = runs.read_result(Path(cfg.train.out_dir))
    return results


def _alone(world: int):
    """This rank trains alone: the torchrun environment hidden (the device, LOCAL_RANK, is kept)."""
    return environ(WORLD_SIZE="1", RANK="0") if world > 1 else contextlib.nullcontext()


def _ended(cfg: DictConfig) -> bool:
    return runs.has_ended(Path(cfg.train.out_dir))


def _claim_and_train(cfgs: list[DictConfig], keep_going: bool, claim: bool = True) -> Optional[list[dict[str, Any]]]:
    """A worker's turn at one pack: None when its runs have all ended or another live worker holds one of them;
    else, holding every run's lock, the pack's runs that have not ended by then trained (`_train_recorded`) and
    every run's result. `claim=False` (every rank of a process group trains the pack together): no claim here,
    the trainer's own lock (rank 0's) stands."""
    if not claim:
        return _train_recorded(cfgs, keep_going)
    dirs = [Path(cfg.train.out_dir) for cfg in cfgs if not _ended(cfg)]
    if not dirs or not runs.claim(dirs):
        return None
    try:
        live = [k for k, cfg in enumerate(cfgs) if not _ended(cfg)]  # not ended by another worker before the claim
        got = dict(zip(live, _train_recorded([cfgs[k] for k in live], keep_going) if live else []))
        return [got[k] if k in got else runs.read_result(Path(cfg.train.out_dir)) for k, cfg in enumerate(cfgs)]
    finally:
        for out_dir in reversed(dirs):
            runs.release(out_dir)


STOPPED = "stopped"  # a spawned worker's answer for a pack it stopped on a preemption signal (or never began)


def _pool_turn(cfgs: list[DictConfig], keep_going: bool, claim: bool = True) -> Any:
    """`_claim_and_train` in a spawned worker: a preemption (signalled before the pack, or the trainer's exit 75)
    is answered STOPPED, not raised (the pool would wait forever for a worker that exited)."""
    if preempt.signalled():
        return STOPPED
    try:
        return _claim_and_train(cfgs, keep_going, claim)
    except SystemExit as exc:
        if exc.code == preempt.PREEMPT_EXIT_CODE:
            return STOPPED
        raise


def _barrier(cfgs: list[DictConfig], plan: list[list[int]], jobs: list[tuple], ended: Callable,
             events: PackEvents) -> None:
    """Wait until every run of `cfgs` has ended; a pack whose holder is gone is claimed and trained here."""
    said = time.monotonic()
    while True:
        if preempt.signalled():
            preempt.exit_requeued("preempted at a round's barrier: this worker's packs had ended")
        left = [j for j, pack in enumerate(plan) if not all(_ended(cfgs[i]) for i in pack)]
        for j in left:
            if all(runs.is_free(Path(cfgs[i].train.out_dir)) for i in plan[j] if not _ended(cfgs[i])):
                got = _claim_and_train(*jobs[j])
                if got is not None:
                    ended(j, got)
        left = [j for j in left if not all(_ended(cfgs[i]) for i in plan[j])]
        if not left:
            return
        if time.monotonic() - said >= WAIT_LINE_S:
            said = time.monotonic()
            events.waiting(_held_line(cfgs, plan, left))
        time.sleep(POLL_S)


def _held_line(cfgs: list[DictConfig], plan: list[list[int]], left: list[int]) -> str:
    """Which packs other workers hold, and who: `waiting for 2 pack(s) of 9 runs that other workers hold (pid 12 on
    n3, ...)`."""
    holders = set()
    for j in left:
        for i in plan[j]:
            holder = runs.read_json(Path(cfgs[i].train.out_dir) / runs.LOCK) or {}
            if holder.get("pid"):
                holders.add(f"pid {holder['pid']} on {holder.get('host')}")
    return (f"waiting for {len(left)} pack(s) of {sum(len(plan[j]) for j in left)} runs that other workers hold"
            + (f" ({', '.join(sorted(holders))})" if holders else ""))


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
        if not runs.is_free(out_dir):  # another process's (this worker's own claim is no obstacle)
            continue
        for path in ckpt.list_checkpoints(out_dir / runs.CHECKPOINTS):
            if path not in before[cfg.train.out_dir]:
                path.unlink()


def _worker_device(counter) -> None:
    """A pack worker's set-up: its number w from the pool's shared counter picks its GPU (LOCAL_RANK = w, so
    `distributed.device()` is GPU w mod the device count); one torch thread."""
    import torch

    preempt.install()  # a signal before this worker's first pack is kept, not its death
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
