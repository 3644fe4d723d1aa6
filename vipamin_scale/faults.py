"""Fault injection for the tests of resume, elastic restarts and preemption: a declared, documented option.

Two environment variables (not config fields: a fault is not part of a run's identity, so the resumed run
is the same run without them):

    VIPAMIN_SCALE_KILL_AT_STEP=N   the training process SIGKILLs itself right after global step N (no
                                   clean-up, exactly like a lost node), on a run's first attempt only
                                   (never after a torchrun restart, which must get past that step)
    VIPAMIN_SCALE_KILL_AFTER_CHECKPOINT=N
                                   the training process SIGKILLs itself right after writing its N-th
                                   checkpoint file (a pack writes one per run: with a pack of two, N = 3
                                   kills between the two runs' writes of its second save); first attempt only
    VIPAMIN_SCALE_KILL_RANK=r      only rank r kills itself (default: every rank)

Production runs leave them unset; `train` reads them once per run (`kill_switch`).
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

KILL_AT_STEP_ENV = "VIPAMIN_SCALE_KILL_AT_STEP"
KILL_RANK_ENV = "VIPAMIN_SCALE_KILL_RANK"
KILL_AFTER_CHECKPOINT_ENV = "VIPAMIN_SCALE_KILL_AFTER_CHECKPOINT"


@dataclass(frozen=True)
class KillSwitch:
    step: int = -1  # -1: never
    rank: int = -1  # -1: every rank
    checkpoint: int = -1  # -1: never

    def after_step(self, step: int, rank: int) -> None:
        """Called by the training loop after each global step."""
        if step == self.step and self.rank in (-1, rank):
            os.kill(os.getpid(), signal.SIGKILL)

    def after_checkpoint(self, count: int, rank: int) -> None:
        """Called after each checkpoint file written, with how many this process has written."""
        if count == self.checkpoint and self.rank in (-1, rank):
            os.kill(os.getpid(), signal.SIGKILL)


def kill_switch(restarted: bool) -> KillSwitch:
    """The kill switch the environment asks for; none after a torchrun restart."""
    if restarted:
        return KillSwitch()
    return KillSwitch(int(os.environ.get(KILL_AT_STEP_ENV, "-1")), int(os.environ.get(KILL_RANK_ENV, "-1")),
                      int(os.environ.get(KILL_AFTER_CHECKPOINT_ENV, "-1")))
