"""Fault injection for the tests of resume, elastic restarts, preemption and out-of-memory packs: a declared,
documented option.

Environment variables (not config fields: a fault is not part of a run's identity, so the resumed run
is the same run without them):

    VIPAMIN_SCALE_KILL_AT_STEP=N   the training process SIGKILLs itself right after global step N (no
                                   clean-up, exactly like a lost node), on a run's first attempt only
                                   (never after a torchrun restart, which must get past that step)
    VIPAMIN_SCALE_KILL_AFTER_CHECKPOINT=N
                                   the training process SIGKILLs itself right after writing its N-th
                                   checkpoint file (a pack writes one per run: with a pack of two, N = 3
                                   kills between the two runs' writes of its second save); first attempt only
    VIPAMIN_SCALE_KILL_RANK=r      only rank r acts on these switches (default: every rank)
    VIPAMIN_SCALE_HOLD_AT_STEP=N   right after global step N, wait (up to 5 min) for a preemption signal
                                   (SIGUSR1, SIGUSR2), with a warning line, once per process, in a run's first
                                   attempt of a job's first attempt only (not once resumed or requeued): a test's
                                   `scancel --signal=USR1` then lands mid-training however loaded the machine
                                   (not in the last epoch, where a run finishes instead of stopping); the rank
                                   goes on at the signal and the next check acts on it
    VIPAMIN_SCALE_SIGNAL_AT_BUILD=1
                                   the training process sends itself SIGUSR1 right after its backbone is
                                   built, on a run's first attempt only (not once resumed): a preemption
                                   signal that comes before the first step, while the run still builds
    VIPAMIN_SCALE_OOM_ABOVE_K=N    a pack of more than N runs raises torch.OutOfMemoryError at its first training
                                   step (after the build: its run directories are started), as a device too small
                                   for it would; `packs.train_or_split` then splits it (N = 0: a run alone too)

Production runs leave them unset; `train` reads them once per run (`kill_switch`).
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

KILL_AT_STEP_ENV = "VIPAMIN_SCALE_KILL_AT_STEP"
KILL_RANK_ENV = "VIPAMIN_SCALE_KILL_RANK"
KILL_AFTER_CHECKPOINT_ENV = "VIPAMIN_SCALE_KILL_AFTER_CHECKPOINT"
HOLD_AT_STEP_ENV = "VIPAMIN_SCALE_HOLD_AT_STEP"
SIGNAL_AT_BUILD_ENV = "VIPAMIN_SCALE_SIGNAL_AT_BUILD"
OOM_ABOVE_K_ENV = "VIPAMIN_SCALE_OOM_ABOVE_K"
HOLD_TIMEOUT_S = 300.0


_held_once = False  # a process holds once (a study's worker trains many runs, each passing the hold's step)


def _hold_done() -> None:
    global _held_once
    _held_once = True


@dataclass(frozen=True)
class KillSwitch:
    step: int = -1  # -1: never
    rank: int = -1  # -1: every rank
    checkpoint: int = -1  # -1: never
    hold: int = -1  # -1: never
    signal_at_build: bool = False
    oom_above: int = -1  # -1: never

    def before_step(self, runs: int) -> None:
        """Called by the training loop before each step of its pack of `runs` runs."""
        if 0 <= self.oom_above < runs:
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {OOM_ABOVE_K_ENV}={self.oom_above}, "
                                         f"K={runs})")

    def after_step(self, step: int, rank: int) -> None:
        """Called by the training loop after each global step."""
        if step == self.step and self.rank in (-1, rank):
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.hold and self.rank in (-1, rank) and not _held_once:
            from vipamin_scale.preempt import wait_for_signal

            _hold_done()
            wait_for_signal(HOLD_TIMEOUT_S, step)

    def after_backbone(self, rank: int) -> None:
        """Called by the build right after the backbone is loaded."""
        if self.signal_at_build and self.rank in (-1, rank):
            os.kill(os.getpid(), signal.SIGUSR1)

    def after_checkpoint(self, count: int, rank: int) -> None:
        """Called after each checkpoint file written, with how many this process has written."""
        if count == self.checkpoint and self.rank in (-1, rank):
            os.kill(os.getpid(), signal.SIGKILL)


def kill_switch(restarted: bool, resumed: bool = False) -> KillSwitch:
    """The kill switch the environment asks for; none after a torchrun restart, and no hold or signal in a
    resumed run (a requeued job passes the hold's step and builds again)."""
    if restarted:
        return KillSwitch()
    requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    return KillSwitch(int(os.environ.get(KILL_AT_STEP_ENV, "-1")), int(os.environ.get(KILL_RANK_ENV, "-1")),
                      int(os.environ.get(KILL_AFTER_CHECKPOINT_ENV, "-1")),
                      -1 if resumed or requeued else int(os.environ.get(HOLD_AT_STEP_ENV, "-1")),
                      not resumed and os.environ.get(SIGNAL_AT_BUILD_ENV) == "1",
                      int(os.environ.get(OOM_ABOVE_K_ENV, "-1")))
