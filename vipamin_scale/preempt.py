"""Preemption: checkpoint at the next step boundary, requeue the Slurm job, exit.

Slurm sends SIGUSR1 before a job's time limit (`#SBATCH --signal=USR1@120`), and an operator can
send it at any time (`scancel --signal=USR1 JOBID`). Each rank's handler only sets a flag; at
every check of the train loop (every `train.log_every` steps and at epoch end) the ranks agree
(the flag rides in the loop's one fused collective, `local`; or `requested`, a collective of its
own: the signal reaches ranks at different steps, or only some of them), then every rank takes part in the checkpoint, rank 0 runs
`scontrol requeue $SLURM_JOB_ID`, and every rank exits with `PREEMPT_EXIT_CODE`. The requeued
job runs the same script with `train.resume=true` and continues exactly where this one stopped
(the checkpoint records the step within the epoch; `train.py` skips the steps already taken).

Outside Slurm (no `SLURM_JOB_ID`) the same signal checkpoints and exits; resume by hand with
`train.resume=true`. `VIPAMIN_SCALE_PREEMPT_AT_STEP=N` acts as if the signal arrived just
before global step N ended (for tests; acted on at the first check at or after step N).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

import torch

import vipamin_scale.distributed as D

log = logging.getLogger(__name__)

PREEMPT_SIGNAL = signal.SIGUSR1
PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on purpose, resumable
PREEMPT_AT_STEP_ENV = "VIPAMIN_SCALE_PREEMPT_AT_STEP"

_flag = threading.Event()


def _on_signal(signum, frame) -> None:  # async-signal context: set a flag, nothing else
    _flag.set()


def wait_for_signal(timeout: float) -> bool:
    """Block until the preemption signal has been received (or `timeout` seconds); whether it was."""
    got = _flag.wait(timeout)
    if not got:
        log.warning("no preemption signal within %.0f s of the hold (VIPAMIN_SCALE_HOLD_AT_STEP); going on", timeout)
    return got


class Preemption:
    """One per training run: `requested(step)` is collective (every rank calls it at the same step)."""

    def __init__(self):
        _flag.clear()
        self.at_step = int(os.environ.get(PREEMPT_AT_STEP_ENV, "-1"))
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            signal.signal(PREEMPT_SIGNAL, _on_signal)

    def local(self, first_step: int, last_step: int) -> bool:
        """This rank's flag for the steps `first_step..last_step` since the last check (no collective)."""
        return _flag.is_set() or first_step <= self.at_step <= last_step

    def requested(self, global_step: int) -> bool:
        local = self.local(global_step, global_step)
        if not D.is_dist():
            return local
        flag = torch.tensor([1.0 if local else 0.0], dtype=torch.float64)
        D.all_reduce_sum(flag)
        return flag.item() > 0

    def stop(self, global_step: int) -> None:
        """After the checkpoint: rank 0 requeues the Slurm job; every rank exits."""
        job = os.environ.get("SLURM_JOB_ID")
        if D.rank() == 0:
            if job:
                # said before the requeue: `scontrol requeue` has Slurm stop this job's steps, this process with
                # them, possibly before the command returns
                log.info("preempted at step %d: checkpoint written; requeueing Slurm job %s", global_step, job)
                proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                if proc.returncode != 0:
                    log.error("`scontrol requeue %s` failed: %s; continue with train.resume=true", job,
                              proc.stderr.strip())
            else:
                log.info("preempted at step %d: checkpoint written; continue with train.resume=true", global_step)
        D.destroy()
        raise SystemExit(PREEMPT_EXIT_CODE)
