"""Engine-neutral training checkpoints that execute nothing when loaded: written atomically, the
last K kept, the newest valid one found.

A checkpoint holds the trainable state (prompts, head, optimizer moments by parameter name,
scheduler), the position (epoch, step in epoch, global step), every rank's RNG state and the
resolved config. It is one safetensors file, `ckpt-<global step, 8 digits>.safetensors`:

- every tensor (parameters, AdamW moments and steps, torch/CUDA RNG states as uint8 tensors) is a
  safetensors tensor named by its path in the payload (`trainable/params/head.weight`);
- everything else is plain JSON in the header's metadata (key `vipamin_scale.checkpoint`), a
  tensor's place held by `{"__tensor__": name}`. Python's and numpy's RNG states are converted to
  JSON lists by `rng_state` (and back by `set_rng_state`);
- the SHA-256 of the tensors and that JSON (`vipamin_scale.digest`, key `vipamin_scale.sha256`):
  a file whose bytes no longer match it is damaged, like a truncated one (`load_latest` falls back
  to the previous checkpoint with a warning). A checkpoint written before checkpoints carried a
  digest loads unverified, with a warning (a run in progress across the upgrade resumes).

Reading one is a safetensors parse and a JSON parse: no pickle, so a crafted file in a run
directory can be refused but never run code. The file is written under a temp name, fsynced and
renamed (`paths.atomic_write_bytes`), so `latest` never sees half of one; a write that fails
leaves no temp file behind.

Errors a user can act on are `CheckpointError` (a `ConfigError`: one `error: ...` line, exit 2,
at the CLI): no valid checkpoint, a checkpoint from the old pickle format (`ckpt-*.pt`, no longer
read), a checkpoint whose trainable parameters do not fit the model. It is the project's one
checkpoint error: a backbone's weights file that cannot be read or does not fit
(`models/backbones.py`) raises it too.
"""
from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import vipamin_scale.digest as digest
from vipamin_scale.config import ConfigError
from vipamin_scale.paths import atomic_write_bytes

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
_NAME = re.compile(r"^ckpt-(\d{8})\.safetensors$")
_OLD_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")  # the pickle format before this one: refused, never read
_META_KEY = "vipamin_scale.checkpoint"
_TENSOR = "__tensor__"
_REQUIRED = {"trainable": dict, "rng": list, "epoch": int, "step_in_epoch": int, "global_step": int}


class CheckpointError(ConfigError):
    """A checkpoint (a training checkpoint, or a backbone's weights) cannot be used; the message names
    the file (and the parameter or keys, if any)."""


# -- RNG states, JSON-able ----------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch (and CUDA) as uint8 tensors, python and numpy as JSON lists."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- payload <-> (JSON, tensors) ----------------------------------------------------------------------
def _split(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`obj` as JSON-able data; every tensor moved into `tensors` under its path."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR: path}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"checkpoint: keys under {path or '/'} must be strings")
        return {k: _split(v, f"{path}/{k}" if path else k, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"checkpoint: {path}: cannot store a {type(obj).__name__}")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def to_bytes(payload: dict[str, Any]) -> bytes:
    """The checkpoint file's bytes: tensors in safetensors, the rest as JSON in its metadata, and the
    SHA-256 of both (`vipamin_scale.digest`)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = _split(payload, "", tensors)
    return digest.to_bytes(tensors, {_META_KEY: json.dumps(meta)})


# -- files --------------------------------------------------------------------------------------------
def checkpoint_path(directory: Path, global_step: int) -> Path:
    return Path(directory) / f"ckpt-{global_step:08d}{SUFFIX}"


def save(directory: Path, payload: dict[str, Any], global_step: int, keep_last: Optional[int]) -> Path:
    """Write `payload` atomically as the checkpoint of `global_step`, then keep the newest `keep_last`
    (None: keep every one; `prune` later)."""
    directory = Path(directory)
    path = checkpoint_path(directory, global_step)
    atomic_write_bytes(path, to_bytes(payload))
    if keep_last is not None:
        prune(directory, keep_last)
    return path


def prune(directory: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints in `directory`."""
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)


def list_checkpoints(directory: Path) -> list[Path]:
    """This format's checkpoints in `directory`, oldest first."""
    return _matching(directory, _NAME)


def _matching(directory: Path, pattern: re.Pattern) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if pattern.match(p.name))


def latest(directory: Path) -> Optional[Path]:
    """The newest checkpoint file (valid or not; `load_latest` checks)."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load(path: Path, quiet: bool = False) -> dict[str, Any]:
    """Read one checkpoint (executes nothing). A file that is not a complete checkpoint of this
    format, or whose bytes do not match its digest, is a `CheckpointError` naming it. `quiet`: no
    warning for a checkpoint written before digests (loaded unverified)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: {path} is not a readable checkpoint ({_one_line(exc)})") from None
    meta = metadata.get(_META_KEY)
    if meta is None:
        raise CheckpointError(f"checkpoint: {path} is a safetensors file but not a vipamin_scale checkpoint "
                              f"(no {_META_KEY!r} metadata)")
    intact = digest.verify(tensors, metadata)
    if intact is False:
        raise CheckpointError(f"checkpoint: {path} is damaged (its tensors or metadata do not match the SHA-256 "
                              f"recorded in it)")
    if intact is None and not quiet:
        log.warning("checkpoint: %s records no SHA-256 (written before checkpoints carried one): loaded unverified",
                    path)
    try:
        payload = _join(json.loads(meta), tensors)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint: {path}: damaged metadata ({_one_line(exc)})") from None
    if not isinstance(payload, dict):
        payload = {}
    trainable = payload.get("trainable") if isinstance(payload.get("trainable"), dict) else {}
    bad = [k for k, kind in _REQUIRED.items() if not isinstance(payload.get(k), kind)]
    bad += [f"trainable.{k}" for k in ("params", "optimizer", "scheduler") if not isinstance(trainable.get(k), dict)]
    if bad:
        raise CheckpointError(f"checkpoint: {path}: damaged metadata (missing or wrong type: {', '.join(bad)})")
    return payload


def load_latest(directory: Path, quiet: bool = False) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest checkpoint that loads, with its path; None when there is none at all.

    A damaged newer one (truncated, garbage, a digest mismatch) is skipped with a warning naming it
    (none with `quiet`: a caller that only peeks, before the resume itself reads it), and the previous
    one is tried. `CheckpointError` when checkpoints exist but none loads, or when only old-format
    `ckpt-*.pt` files exist (they would need unpickling: the run has to be restarted)."""
    found = list_checkpoints(directory)
    for path in reversed(found):
        try:
            return path, load(path, quiet=quiet)
        except CheckpointError as exc:
            if not quiet:
                log.warning("%s; trying the previous checkpoint", exc)
    if found:
        raise CheckpointError(f"checkpoint: no valid checkpoint in {directory} (all {len(found)} damaged: "
                              f"{', '.join(p.name for p in found)}); restart the run in a new train.out_dir "
                              f"or remove them")
    old = _matching(directory, _OLD_NAME)
    if old:
        raise CheckpointError(f"checkpoint: {old[-1]} is in the old pickle format (ckpt-*.pt), which is no longer "
                              f"loaded (loading it could run code); restart the run in a new train.out_dir "
                              f"(or remove the old checkpoints to start this one afresh)")
    return None


def check_trainable(path: Path, state: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """The checkpoint's trainable parameters (and their AdamW moments) must be exactly the model's,
    by name and shape; else one `CheckpointError` naming the file and the first parameter that differs."""
    params, moments = state["params"], state["optimizer"]
    for name in sorted(set(shapes) | set(params)):
        if name not in params:
            raise CheckpointError(f"checkpoint: {path} does not fit the model: trainable parameter {name} "
                                  f"{tuple(shapes[name])} is missing from it (another model/prompt config?)")
        got = tuple(params[name].shape) if torch.is_tensor(params[name]) else None
        if name not in shapes:
            raise CheckpointError(f"checkpoint: {path} does not fit the model: it has trainable parameter {name} "
                                  f"{got}, which the model has not (another model/prompt config?)")
        if got != tuple(shapes[name]):
            raise CheckpointError(f"checkpoint: {path} does not fit the model: parameter {name} has shape {got} "
                                  f"there, {tuple(shapes[name])} in the model (another model/prompt config?)")
        if name not in moments:
            continue  # saved before the first step: no moments yet
        moment = moments[name]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            value = moment.get(key) if isinstance(moment, dict) else None
            if not torch.is_tensor(value) or (key != "step" and tuple(value.shape) != got):
                raise CheckpointError(f"checkpoint: {path}: damaged optimizer state for {name} ({key})")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
