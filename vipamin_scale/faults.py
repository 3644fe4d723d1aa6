"""Fault injection for the tests of resume, elastic restarts and preemption: a declared, documented option.

Two environment variables (not config fields: a fault is not part of a run's identity, so the resumed run
is the same run without them):

    VIPAMIN_SCALE_KILL_AT_STEP=N   the training process SIGKILLs itself right after global step N (no
                                   clean-up, exactly like a lost node), on a run's first attempt only
                                   (never after a torchrun restart, which must get past that step)
    VIPAMIN_SCALE_KILL_RANK=r      only rank r kills itself (default: every rank)

Production runs leave them unset; `train` reads them once per run (`kill_switch`).
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

KILL_AT_STEP_ENV = "VIPAMIN_SCALE_KILL_AT_STEP"
KILL_RANK_ENV = "VIPAMIN_SCALE_KILL_RANK"


@dataclass(frozen=True)
class KillSwitch:
    step: int = -1  # -1: never
    rank: int = -1  # -1: every rank

    def after_step(self, step: int, rank: int) -> None:
        """Called by the training loop after each global step."""
        if step == self.step and self.rank in (-1, rank):
            os.kill(os.getpid(), signal.SIGKILL)


def kill_switch(restarted: bool) -> KillSwitch:
    """The kill switch the environment asks for; none after a torchrun restart."""
    if restarted:
        return KillSwitch()
    return KillSwitch(int(os.environ.get(KILL_AT_STEP_ENV, "-1")), int(os.environ.get(KILL_RANK_ENV, "-1")))
