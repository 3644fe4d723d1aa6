"""The one progress bar: tqdm on stderr, redrawn at most every 2 s, off where `enabled` is false.

    with progress_bar(total, "train", "step", initial=step, enabled=rank == 0) as bar:
        bar.update()

Used by the train loop (steps) and the initializer's calibration pass (batches); only rank 0
draws one.
"""
from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True):
    """A tqdm bar (also a context manager that closes it); a no-op bar when not `enabled`."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit=unit,
                dynamic_ncols=True, mininterval=2.0, file=sys.stderr)
