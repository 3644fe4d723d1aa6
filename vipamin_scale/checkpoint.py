"""Engine-neutral training checkpoints: written atomically, the last K kept, the newest found.

A checkpoint holds the trainable state (prompts, head, optimizer moments by parameter name,
scheduler), the position (epoch, step in epoch, global step), every RNG state and the resolved
config. Written as a temp file then renamed, so a crash never leaves a half-written checkpoint
that a resume would pick up.
"""
from __future__ import annotations

import io
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from vipamin_scale.paths import atomic_write_bytes

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(directory: Path, global_step: int) -> Path:
    return Path(directory) / f"ckpt-{global_step:08d}.pt"


def save(directory: Path, payload: dict[str, Any], global_step: int, keep_last: int) -> Path:
    directory = Path(directory)
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = checkpoint_path(directory, global_step)
    atomic_write_bytes(path, buf.getvalue())
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def latest(directory: Path) -> Optional[Path]:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load(path: Path) -> dict[str, Any]:
    # Our own files: tensors, numbers, RNG tuples and plain dicts (numpy's RNG state needs full unpickling).
    return torch.load(str(path), map_location="cpu", weights_only=False)
