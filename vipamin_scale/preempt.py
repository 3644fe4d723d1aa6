"""Preemption: checkpoint at the next check, requeue the Slurm job, exit.

Signals. SIGUSR1 (slurm/*.sh: `#SBATCH --signal=USR1@120`, or `scancel --signal=USR1 JOBID` at any time)
and SIGUSR2 (submitit's, hence hydra/launcher=slurm's) both ask the process to stop. `install()` handles
them, once per process, from its start: the CLI's entry, each Hydra job's task (where a submitit job
enters: there it replaces submitit's own USR2 handler) and each pack worker's initializer call it, so a
signal that comes while a backbone loads or prompts initialize is kept, never the signal's default death. The
handler only sets a process-wide flag, which nothing clears: `signalled()` says whether this process
was asked to stop, whenever that was (a sweep checks it between its packs).

Where training acts on it. The train loop checks every `train.log_every` steps and at each epoch end;
there the ranks agree (the flag rides in the loop's one fused collective, `local`: the signal reaches
ranks at different steps, or only some of them), then every rank takes part in the checkpoint, rank 0
runs `scontrol requeue $SLURM_JOB_ID`, and every rank exits with `PREEMPT_EXIT_CODE`. The requeued job
runs the same script with `train.resume=true` and continues exactly where this one stopped (the
checkpoint records the step within the epoch; `train.py` skips the steps already taken). Two edges:

- asked before the first step (`requested`, a collective of its own, right after the build): the
  checkpoint of the position the run starts from (step 0: the initial prompts, so the resume skips the
  init; a resumed run: its checkpoint again), requeue, exit. No step is taken, so the resumed run is the
  uninterrupted one.
- asked at the run's last check (the end of its last epoch): the run finishes instead (its final test
  and result.json cost less than a checkpoint, a requeue and a new start); one line says so. The flag
  stays set: a sweep stops before its next pack, and a solo run exits 0 with its result.

Outside Slurm (no `SLURM_JOB_ID`) the same signal checkpoints and exits; resume by hand with
`train.resume=true`. `VIPAMIN_SCALE_PREEMPT_AT_STEP=N` acts as if the signal arrived just before
global step N ended (for tests; acted on at the first check at or after step N).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import NoReturn

# torch and vipamin_scale.distributed are imported where used: the CLI installs the handlers before every
# command, `--help` and `report` included
log = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on purpose, resumable
PREEMPT_AT_STEP_ENV = "VIPAMIN_SCALE_PREEMPT_AT_STEP"
REQUEUE_ENV = "VIPAMIN_SCALE_REQUEUE"  # "0": stop without requeueing (the job script requeues)

_flag = threading.Event()
_installed = False


def _on_signal(signum, frame) -> None:  # async-signal context: set a flag, nothing else
    _flag.set()


def install() -> bool:
    """Handle SIGUSR1 and SIGUSR2 in this process from now on (the first call; later ones do nothing);
    whether they are handled. Only the main thread can: elsewhere nothing is installed."""
    global _installed
    if not _installed and threading.current_thread() is threading.main_thread():
        for signum in PREEMPT_SIGNALS:
            signal.signal(signum, _on_signal)
        _installed = True
    return _installed


def signalled() -> bool:
    """Whether this process received a preemption signal since `install()` (never cleared)."""
    return _flag.is_set()


def wait_for_signal(timeout: float, step: int) -> bool:
    """Block, after global step `step`, until the preemption signal has been received (or `timeout` seconds);
    whether it was."""
    log.warning("holding at step %d for a preemption signal (VIPAMIN_SCALE_HOLD_AT_STEP)", step)
    got = _flag.wait(timeout)
    if not got:
        log.warning("no preemption signal within %.0f s of the hold (VIPAMIN_SCALE_HOLD_AT_STEP); going on", timeout)
    return got


def exit_requeued(said: str) -> NoReturn:
    """Rank 0 logs `said` and requeues the Slurm job (when in one, unless VIPAMIN_SCALE_REQUEUE=0: a job script
    with several workers requeues once they all stopped, as slurm/study.sh does); every rank exits with
    `PREEMPT_EXIT_CODE`."""
    import vipamin_scale.distributed as D

    job = os.environ.get("SLURM_JOB_ID")
    if D.rank() == 0:
        if job and (os.environ.get(REQUEUE_ENV) == "0" or not _first_worker()):
            log.info("%s; %s requeues Slurm job %s", said, "the job script" if os.environ.get(REQUEUE_ENV) == "0"
                     else "its first worker", job)
        elif job:
            # said before the requeue: `scontrol requeue` has Slurm stop this job's steps, this process with
            # them, possibly before the command returns
            log.info("%s; requeueing Slurm job %s", said, job)
            proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if proc.returncode != 0:
                log.error("`scontrol requeue %s` failed: %s; continue with train.resume=true", job, proc.stderr.strip())
        else:
            log.info("%s; continue with train.resume=true", said)
    D.destroy()
    raise SystemExit(PREEMPT_EXIT_CODE)


def _first_worker() -> bool:
    """Whether this process is its job's first: rank 0 of its process group; with none up (the ranks of a job that
    each train alone, e.g. packs claimed under torchrun), the job's first process (LOCAL_RANK and SLURM_PROCID 0), so
    that such a job is requeued once."""
    import vipamin_scale.distributed as D

    if D.is_dist():
        return D.rank() == 0
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0"


class Preemption:
    """One per training run (installs the handlers if the process has not); `requested()` is collective."""

    def __init__(self):
        install()
        self.at_step = int(os.environ.get(PREEMPT_AT_STEP_ENV, "-1"))

    def local(self, first_step: int, last_step: int) -> bool:
        """This rank's flag for the steps `first_step..last_step` since the last check (no collective)."""
        return signalled() or first_step <= self.at_step <= last_step

    def requested(self) -> bool:
        """Whether any rank was signalled (every rank calls it at the same point: before the first step)."""
        import torch

        import vipamin_scale.distributed as D

        if not D.is_dist():
            return signalled()
        flag = torch.tensor([1.0 if signalled() else 0.0], dtype=torch.float64)
        D.all_reduce_sum(flag)
        return flag.item() > 0

    def stop(self, global_step: int) -> NoReturn:
        """After the checkpoint: rank 0 requeues the Slurm job; every rank exits."""
        exit_requeued(f"preempted at step {global_step}: checkpoint written")
