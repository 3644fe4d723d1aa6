"""A run directory's records, in one place: who writes into it, what run it holds, how it ended.
This module alone reads and writes them (train, tune, the report and the benchmarks come here).

    <out_dir>/run.lock             the writer's lock: {pid, host, started, slurm_job, attempt}; rank 0 holds it
    <out_dir>/run.json             the run's identity: {fingerprint, identity, status}, where its initial
                                   prompts came from: init {key, file, sha256, computed} (`record_init`), and
                                   who trained it: attempts [{pid, host, started, slurm_job, attempt}, ...]
    <out_dir>/config.resolved.yaml the resolved config (every field, paths included)
    <out_dir>/result.json          how the run ended: the metrics (status ok) or the error (status failed)
    <out_dir>/result.rank<R>.json  a failure seen by rank R > 0 (rank 0 may not have lived to record it)
    <out_dir>/checkpoints/         the checkpoints (vipamin_scale/checkpoint.py); each records the config
    <out_dir>/overrides.json       what set the run apart within its study (`write_overrides`), when not a Hydra job

Reading runs back (`find_run_dirs`, `run_status`, `run_config`, `run_overrides`): a run directory is
one that holds run.json or result.json. A Hydra job's directory also holds `.hydra/` (written by
Hydra itself): its overrides and composed config are what the user typed, and are preferred; a run
made without Hydra (a tune's inline trial, a benchmark's run) is described by its own records.

Identity. A run is what its config says: `identity(cfg)` is the resolved config minus the fields that
cannot change a result (IGNORED: the fields the schema declares `identity=False`: where outputs go,
where the data lives, bookkeeping, the engine, the tune search's own settings), flattened to dotted
names; the fingerprint is its SHA-256.
`train.resume=true` (and a tune reusing a trial) continues a run only when the identities are equal;
otherwise `RunMismatch` names every differing field, old -> new, before any compute. The newest
valid checkpoint vouches for the run (it records its resolved config), as run.json does: a run
whose run.json was deleted or damaged is still refused under another config, and its run.json is
rewritten from the checkpoint's record.

One writer. `hold(out_dir)` creates `run.lock` atomically (O_EXCL) on rank 0 and every rank learns
the outcome through one collective. A lock held by a live process is refused with one line naming
the holder (`RunLocked`); a stale lock (a dead pid on this host, or a holder on another host in an earlier
attempt of the same Slurm job: a requeue, or a torchrun restart after SIGKILL) is taken over with a warning.
The lock is removed on exit. A process may hold a lock again (nested holds: removed when the outermost ends).
`claim(out_dirs)` takes several at once or none: how a study's workers claim a pack (`packs.run_packed`);
the workers of one Slurm job on several hosts (same job, same attempt) respect each other's locks.

Every JSON written here is strict JSON (`dumps`: no NaN/Infinity tokens). `finished` runs are never
overwritten by a failure record (`record_failure` leaves them alone).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import logging
import math
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from vipamin_scale.config import NOT_IDENTITY, UserError, in_identity
from vipamin_scale.paths import atomic_write_bytes

log = logging.getLogger(__name__)

RESULT = "result.json"
RUN = "run.json"
LOCK = "run.lock"
CONFIG = "config.resolved.yaml"
CHECKPOINTS = "checkpoints"  # the run's checkpoints (vipamin_scale/checkpoint.py), each holding its config
HYDRA = ".hydra"  # Hydra's own records of a job (overrides.yaml, config.yaml); read, never written here
# what set a run apart from the config its launcher started from, as `field=value` strings, for a run launched
# without Hydra (a study's: its regime, method, P, selected point and draw); a report reads it as a job's overrides
OVERRIDES = "overrides.json"
# What a run writes besides the records above (train.overwrite deletes them with the records; Hydra's
# .hydra/ and its job log stay): tracking.py's logs and tracker ids, train.py's initial prompts
OUTPUTS = ("metrics.jsonl", "tensorboard", "tracking.json", "prompts.safetensors")

# OSErrors of a place the run cannot write (full, read-only, not permitted): a user error, never a record
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT})


class RankFailed(Exception):
    """Another rank of the job failed first, and this rank stopped because of it (`cli.root_cause`)."""

    def __init__(self, rank: int, message: str, code: int):
        super().__init__(f"stopped because rank {rank} failed: {message}")
        self.rank, self.code = rank, code


def user_error_line(exc: BaseException) -> Optional[str]:
    """The one line a user error prints (`error: ...`), or None for an error that is a bug (a traceback)."""
    if isinstance(exc, (UserError, RankFailed)):
        return f"error: {exc}"
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        where = exc.filename if exc.filename is not None else "a run file"
        return f"error: {where}: {exc.strerror or os.strerror(exc.errno)}"
    return None

# Fields that cannot change a run's result (prefixes of dotted names): declared at the field in the
# schema (`identity=False`, config.NOT_IDENTITY); every other field counts.
IGNORED = NOT_IDENTITY


class RunDirError(UserError):
    """The run directory cannot take this run (held by another process, holds another run)."""


class RunLocked(RunDirError):
    """Another live process writes into the run directory."""


class RunMismatch(RunDirError):
    """The run directory holds a run made under a different config."""


class RunExists(RunDirError):
    """A fresh run (train.resume=false) was pointed at a directory that holds a run."""


class SweepFailed(SystemExit):
    """A packed sweep ended with runs that failed or were refused (`packs.launch_sweep`, once every run was
    tried and each one's line printed): `code` is the exit code Hydra's basic launcher would give, 2 for user
    errors only, 1 for a bug. A SystemExit, so Hydra's reporter (which turns an Exception into a traceback
    and exit 1) lets it through to `vipamin-scale`, which returns the code; uncaught, the process exits with it."""


# ----------------------------------------------------------------------------- strict JSON


def dumps(obj: Any, *, nan_as_null: bool = False) -> str:
    """Strict JSON (indent 2). A NaN/Infinity raises ValueError, or becomes null with `nan_as_null`."""
    if nan_as_null:
        obj = finite_or_null(obj)
    return json.dumps(obj, indent=2, allow_nan=False)


def finite_or_null(obj: Any) -> Any:
    """`obj` with every NaN/Infinity float (in dicts, lists, tuples) replaced by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any, *, nan_as_null: bool = False) -> None:
    """`dumps` then an atomic write."""
    atomic_write_bytes(Path(path), (dumps(obj, nan_as_null=nan_as_null) + "\n").encode())


# ----------------------------------------------------------------------------- identity


def identity(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config's fields that can change a result, {dotted name: value}, sorted. `cfg` is a
    config, or one already resolved to plain data (as a checkpoint records it)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if prefix and not in_identity(prefix):
            return
        if isinstance(node, Mapping) and node:
            for key, child in node.items():
                walk(child, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg, "")
    return dict(sorted(flat.items()))


def fingerprint(ident: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`field: old -> new` for every field that differs (absent on one side: `<unset>`)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{key}: {_show(a)} -> {_show(b)}")
    return out


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


# ----------------------------------------------------------------------------- the records


def read_json(path: Path) -> Optional[dict[str, Any]]:
    """A JSON object file; None when absent; a failed record when unreadable (a run never hides)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"status": "failed", "error": f"unreadable {path}: {exc}"}
    return doc if isinstance(doc, dict) else {"status": "failed", "error": f"unreadable {path}: not an object"}


def read_result(out_dir: Path) -> Optional[dict[str, Any]]:
    """The run's result.json (finished or failed), or None when the run has not ended."""
    return read_json(Path(out_dir) / RESULT)


def is_finished(out_dir: Path) -> bool:
    """The directory holds a run that ended with its metrics: result.json with status ok, and no run
    started since (run.json, where there is one, says finished; a fresh run over it says running)."""
    result, run = read_result(out_dir), read_run(out_dir)
    return (result is not None and result.get("status", "ok") == "ok"
            and (run is None or "identity" not in run or run.get("status") == "finished"))


def read_run(out_dir: Path) -> Optional[dict[str, Any]]:
    return read_json(Path(out_dir) / RUN)


def has_ended(out_dir: Path) -> bool:
    """The run left its result.json, finished or failed (a tune never runs such a trial again)."""
    return (Path(out_dir) / RESULT).is_file()


def check_same_run(out_dir: Path, cfg: DictConfig, what: str = "train.resume") -> None:
    """Raise RunMismatch when `out_dir` holds a run of another identity, naming every differing field.

    Two records vouch for the run, and each must agree with `cfg`: the newest valid checkpoint (it
    holds the resolved config it was trained under, so it speaks whether or not run.json survived)
    and run.json. A checkpoint beside a missing or unreadable run.json: one warning, and run.json is
    rewritten from the checkpoint's record (rank 0), never from `cfg`. Checkpoints of which none
    loads say nothing here (the resume itself reports them). No record at all: nothing to check."""
    out_dir = Path(out_dir)
    source, recorded = checkpoint_identity(out_dir)
    run = read_run(out_dir)
    if recorded is not None and (not run or "identity" not in run):
        _restore_record(out_dir, recorded, source, run)
    mismatch = _mismatch(out_dir, cfg, what, recorded, run)
    if mismatch is not None:
        raise mismatch


def _mismatch(out_dir: Path, cfg: DictConfig, what: str, recorded: Optional[Mapping[str, Any]],
              run: Optional[Mapping[str, Any]]) -> Optional[RunMismatch]:
    """RunMismatch when the checkpoint's recorded identity or run.json's differs from `cfg`'s, else None."""
    new = identity(cfg)
    for old in (recorded, (run or {}).get("identity")):
        diff = differences(old, new) if isinstance(old, Mapping) else []
        if diff:
            return RunMismatch(f"{what}: {out_dir} holds a run made under another config ({'; '.join(diff)}); "
                               f"use the same config or a new directory")
    return None


def earlier_run(out_dir: Path) -> Optional[tuple[str, bool]]:
    """What `out_dir` holds of a run: (in words, e.g. "unfinished: checkpoint ckpt-00000056.safetensors",
    whether it is worth keeping: a checkpoint or a finished result), or None when it holds none
    (absent, empty, or only Hydra's records and a lock)."""
    import vipamin_scale.checkpoint as ckpt

    out_dir = Path(out_dir)
    newest = ckpt.latest(out_dir / CHECKPOINTS)
    found = [name for name in (RUN, RESULT, "metrics.jsonl") if (out_dir / name).is_file()]
    found += sorted(p.name for p in out_dir.glob("result.rank*.json"))
    if newest is None and not found:
        return None
    finished = is_finished(out_dir)
    state = "finished" if finished else "failed" if read_result(out_dir) is not None else "unfinished"
    where = f"checkpoint {newest.name}" if newest is not None else ", ".join(found)
    return f"{state}: {where}", finished or newest is not None


def start_fresh(out_dir: Path, overwrite: bool) -> None:
    """A run that does not resume starts in a directory that holds no run. A directory holding one worth
    keeping (a checkpoint, a finished result) is refused (RunExists, one line naming what it holds and
    the ways on) unless `overwrite`; a run that ended or stopped before its first checkpoint is replaced.
    Either way rank 0 deletes the earlier run's records and outputs first, with one warning naming them
    (no metrics, checkpoint or result of two attempts mixed in one directory). Rank 0 looks; every rank
    learns the outcome (a node that does not see rank 0's files must not go on alone)."""
    import shutil

    import vipamin_scale.distributed as D

    out_dir = Path(out_dir)
    held = D.broadcast_object(earlier_run(out_dir) if D.rank() == 0 else None)
    if held is None:
        return
    exists = _exists(out_dir, held, overwrite)
    if exists is not None:
        raise exists
    what, worth_keeping = held
    if D.rank() == 0:
        gone = []
        for name in (CHECKPOINTS, RUN, RESULT, CONFIG, *OUTPUTS, *(p.name for p in out_dir.glob("result.rank*.json"))):
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
            gone.append(name)
        log.warning("%s: %s held a run (%s); deleted %s", "train.overwrite" if worth_keeping else "a fresh run",
                    out_dir, what, ", ".join(gone))
    D.barrier()


def _exists(out_dir: Path, held: Optional[tuple[str, bool]], overwrite: bool) -> Optional[RunExists]:
    """RunExists when a run that starts fresh without `overwrite` meets `held` (`earlier_run`) worth keeping."""
    if held is None or not held[1] or overwrite:
        return None
    return RunExists(f"train.out_dir: {out_dir} holds a run ({held[0]}); continue it with train.resume=true, "
                     f"start it over with train.overwrite=true, or use another directory")


def refusal(cfg: DictConfig) -> Optional[RunDirError]:
    """What `train` would refuse the run of `cfg` for because of its directory, before any compute, found
    without changing anything there: a run that continues (train.resume, or a torchrun restart) under
    another config than the directory's run (RunMismatch, as `check_same_run`); a run that starts fresh,
    without train.overwrite, in a directory holding a run worth keeping (RunExists, as `start_fresh`). None
    when it would go on. A launcher of many runs in one process asks first (`packs.run_packed`), so that a
    refused run is reported as its solo run's refusal is: one error line, and its directory as it was."""
    out_dir = Path(cfg.train.out_dir)
    if cfg.train.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return _mismatch(out_dir, cfg, "train.resume", checkpoint_identity(out_dir)[1], read_run(out_dir))
    return _exists(out_dir, earlier_run(out_dir), cfg.train.overwrite)


def checkpoint_identity(out_dir: Path) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
    """(path, identity) of the config recorded in the run's newest valid checkpoint; (None, None) when
    there is no checkpoint, none loads, or it records no config."""
    import vipamin_scale.checkpoint as ckpt

    try:
        found = ckpt.load_latest(Path(out_dir) / CHECKPOINTS, quiet=True)
    except ckpt.CheckpointError:
        return None, None
    config = found[1].get("config") if found is not None else None
    if not isinstance(config, Mapping) or not config:
        return None, None
    return found[0], identity(config)


def _restore_record(out_dir: Path, ident: dict[str, Any], source: Path, run: Optional[dict[str, Any]]) -> None:
    """Rewrite a missing or unreadable run.json from a checkpoint's identity (rank 0; one warning line).
    Its status follows result.json: finished (ok), failed, else running."""
    import vipamin_scale.distributed as D

    if D.rank() != 0:
        return
    why = "is missing" if run is None else f"is unreadable ({run.get('error', 'no identity')})"
    log.warning("%s %s; rewritten from the config recorded in %s", Path(out_dir) / RUN, why, source)
    result = read_result(out_dir)
    status = "running" if result is None else "finished" if result.get("status", "ok") == "ok" else "failed"
    write_json(Path(out_dir) / RUN, {"fingerprint": fingerprint(ident), "status": status, "identity": ident})


def begin(out_dir: Path, cfg: DictConfig) -> None:
    """Record the run's identity (status running; a resumed run keeps the record of its initial prompts and of its
    earlier attempts), who trains it (`attempts`: host, pid, Slurm job, when, one per start) and its resolved
    config. Rank 0 only."""
    out_dir = Path(out_dir)
    ident = identity(cfg)
    old = read_run(out_dir) or {}
    same = old.get("fingerprint") == fingerprint(ident)
    kept = {"init": old["init"]} if same and "init" in old else {}
    me = {k: v for k, v in _lock_record().items() if k != "pid_start"}
    write_json(out_dir / RUN, {"fingerprint": fingerprint(ident), "status": "running", "identity": ident, **kept,
                               "attempts": [*(old.get("attempts", []) if same else []), me]}, nan_as_null=False)
    atomic_write_bytes(out_dir / CONFIG, OmegaConf.to_yaml(cfg, resolve=True).encode())


def _set_status(out_dir: Path, status: str) -> None:
    """The status of a recorded run (a run that failed before `begin` records no identity)."""
    run = read_run(out_dir)
    if run and "identity" in run:
        write_json(Path(out_dir) / RUN, {**run, "status": status})


def record_init(out_dir: Path, init: Mapping[str, Any]) -> None:
    """Record in run.json where the run's initial prompts came from (`init/cache.py`): the init key, the file the
    initializer wrote (this run's own, another run's of its pack, or train.init_cache's), its SHA-256, and whether
    this run computed it. Rank 0, after `begin`."""
    run = read_run(out_dir)
    if run and "identity" in run:
        write_json(Path(out_dir) / RUN, {**run, "init": dict(init)})


def finish(out_dir: Path, result: Mapping[str, Any]) -> None:
    """Write result.json (no `status` key means ok; strict JSON: a NaN is an error), mark the run finished."""
    write_json(Path(out_dir) / RESULT, dict(result))
    _set_status(out_dir, "finished")


def record_failure(out_dir: Path, error: str, *, rank: int = 0,
                   extra: Optional[Mapping[str, Any]] = None) -> bool:
    """Leave a failed result.json (`result.rank<R>.json` on rank R > 0) so a sweep's report and a tune
    list the run with its error. Never replaces a finished run's result; returns whether it wrote."""
    out_dir = Path(out_dir)
    if is_finished(out_dir):
        log.warning("%s holds a finished run; its result.json is kept (this attempt failed: %s)", out_dir,
                    error.splitlines()[0] if error else "")
        return False
    record = {"status": "failed", "error": error, "rank": rank, **(extra or {})}
    write_json(out_dir / (RESULT if rank == 0 else f"result.rank{rank}.json"), record, nan_as_null=True)
    if rank == 0:
        _set_status(out_dir, "failed")
    return True


def record_exception(cfg: DictConfig, exc: BaseException) -> None:
    """`record_failure` for an exception of a run (its method, prompt length and traceback kept);
    nothing for an error about the directory itself (held, holding another run, or not writable)."""
    if isinstance(exc, RunDirError) or isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return
    rank = int(os.environ.get("RANK", "0"))
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8000:]
    try:  # never let the record hide the error it records
        extra = {"traceback": tb, "method": cfg.init.method if not cfg.prompt.init_file else "file",
                 "prompt_length": cfg.prompt.length, "deep": cfg.prompt.deep}
        record_failure(Path(cfg.train.out_dir), f"{type(exc).__name__}: {exc}".strip(), rank=rank,
                       extra=extra)
    except Exception as inner:
        print(f"warning: could not record the failed run: {type(inner).__name__}: {inner}", file=sys.stderr)


# ----------------------------------------------------------------------------- reading runs back


def is_run_dir(path: Path) -> bool:
    """`path` holds a run: its run record (run.json), its result.json, or a Hydra job's overrides."""
    path = Path(path)
    return ((path / RUN).is_file() or (path / RESULT).is_file()
            or (path / HYDRA / "overrides.yaml").is_file())


def find_run_dirs(root: Path) -> list[Path]:
    """Every run directory under `root` (itself included), sorted; none inside a run's checkpoints."""
    root = Path(root)
    found = ({p.parent for name in (RUN, RESULT) for p in root.rglob(name)}
             | {p.parent.parent for p in root.rglob("overrides.yaml") if p.parent.name == HYDRA})
    return sorted(d for d in found if is_run_dir(d) and "checkpoints" not in d.relative_to(root).parts)


def rank_failures(out_dir: Path) -> list[str]:
    """The errors of the failure records that ranks > 0 left (result.rank<R>.json), by rank file name."""
    records = (read_json(p) or {} for p in sorted(Path(out_dir).glob("result.rank*.json")))
    return [str(r.get("error", "")) for r in records]


def run_status(out_dir: Path) -> tuple[str, dict[str, Any]]:
    """(status, result) of a run directory: `ok` or `failed` as its result.json says; `failed` with the
    first rank's error when only a rank > 0 recorded one; else `incomplete` (running, killed, preempted)."""
    result = read_result(out_dir)
    if result is not None:
        return str(result.get("status", "ok")), result
    errors = rank_failures(out_dir)
    if errors:
        return "failed", {"error": errors[0]}
    return "incomplete", {}


def _load_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def run_config(out_dir: Path) -> dict[str, Any]:
    """The run's config as a nested dict: Hydra's composed one (`.hydra/config.yaml`, unresolved) for a
    Hydra job, else the resolved config this module recorded; {} when there is neither."""
    out_dir = Path(out_dir)
    for path in (out_dir / HYDRA / "config.yaml", out_dir / CONFIG):
        doc = _load_yaml(path) if path.is_file() else None
        if isinstance(doc, dict):
            return doc
    return {}


def write_overrides(out_dir: Path, overrides: list[str]) -> None:
    """Record what set this run apart (OVERRIDES), for a run its launcher composed without Hydra."""
    write_json(Path(out_dir) / OVERRIDES, {"overrides": list(overrides)})


def run_overrides(out_dir: Path) -> list[str]:
    """What set this run apart, as `field=value` strings: a Hydra job's overrides (`.hydra/overrides.yaml`),
    else its launcher's record (OVERRIDES), else every field of its recorded identity (a report keeps those
    whose values differ between runs)."""
    out_dir = Path(out_dir)
    path = out_dir / HYDRA / "overrides.yaml"
    if path.is_file():
        return [str(o) for o in (_load_yaml(path) or [])]
    given = read_json(out_dir / OVERRIDES)
    if given is not None and isinstance(given.get("overrides"), list):
        return [str(o) for o in given["overrides"]]
    run = read_run(out_dir) or {}
    return [f"{key}={_show(value)}" for key, value in (run.get("identity") or {}).items()]


# ----------------------------------------------------------------------------- the lock


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks (/proc/<pid>/stat field 22): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(holder: Mapping[str, Any]) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = holder.get("pid_start")
    return start is None or _proc_start(pid) in (None, start)


def is_held(out_dir: Path) -> bool:
    """Whether a live process on this host holds the directory's lock (a holder on another host: assumed live)."""
    holder = read_json(Path(out_dir) / LOCK)
    if not holder or "pid" not in holder:
        return False
    return holder.get("host") != socket.gethostname() or _alive(holder)


def _attempt() -> list[int]:
    """This process's attempt within its job: (Slurm requeues, torchrun restarts); a later attempt's process
    takes over what an earlier one left."""
    return [int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)]


def _lock_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "pid_start": _proc_start(os.getpid()), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "attempt": _attempt()}


_held: dict[str, int] = {}  # the locks this process holds: path -> how many holds (nested)


def _stale(holder: Mapping[str, Any], me: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a lock's holder is gone, and why: a dead pid on this host; on another host, an earlier attempt
    of this Slurm job (a holder with no attempt recorded: any holder of the same job)."""
    if "pid" not in holder:
        return True, "unreadable"
    if holder.get("host") == me["host"]:
        return not _alive(holder), f"pid {holder.get('pid')} is gone"
    same_job = me["slurm_job"] is not None and holder.get("slurm_job") == me["slurm_job"]
    earlier = "attempt" not in holder or list(holder["attempt"]) < list(me["attempt"])
    return same_job and earlier, f"Slurm job {me['slurm_job']} restarted on {me['host']}"


def acquire(out_dir: Path) -> Path:
    """Create `run.lock` atomically (a complete temp file hard-linked into place: the link fails when the
    lock exists, and a reader never sees half a lock); take over a stale one (`_stale`) with a warning;
    RunLocked when another live process holds it. This process holding it already: one more hold."""
    out_dir = Path(out_dir)
    path = out_dir / LOCK
    if str(path) in _held:
        _held[str(path)] += 1
        return path
    me = _lock_record()
    tmp = out_dir / f".{LOCK}.{me['host']}.{me['pid']}"
    tmp.write_text(dumps(me) + "\n")
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)
                _held[str(path)] = 1
                return path
            except FileExistsError:
                pass
            holder = read_json(path) or {}
            stale, why = _stale(holder, me)
            if not stale:
                raise RunLocked(f"train.out_dir: {out_dir} is in use by pid {holder.get('pid')} on host "
                                f"{holder.get('host')} (since {holder.get('started')}); wait for it to end, or "
                                f"remove {path} if that process is gone")
            log.warning("taking over the stale lock %s (%s)", path, why)
            path.unlink(missing_ok=True)
        raise RunLocked(f"train.out_dir: {out_dir}: could not take {path} (another process keeps taking it)")
    finally:
        tmp.unlink(missing_ok=True)


def release(out_dir: Path) -> None:
    """End one hold of `run.lock`; the outermost removes it (if this process holds it)."""
    path = Path(out_dir) / LOCK
    count = _held.pop(str(path), 0)
    if count > 1:
        _held[str(path)] = count - 1
        return
    holder = read_json(path) or {}
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def claim(out_dirs: list[Path]) -> bool:
    """Hold every directory's lock, or none: False (nothing held) when a live process holds one of them."""
    taken: list[Path] = []
    try:
        for out_dir in out_dirs:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            acquire(out_dir)
            taken.append(out_dir)
        return True
    except RunLocked:
        for out_dir in reversed(taken):
            release(out_dir)
        return False


def is_free(out_dir: Path) -> bool:
    """Whether this process could take the directory's lock now: none, or a stale one (`_stale`)."""
    holder = read_json(Path(out_dir) / LOCK)
    return not holder or str(Path(out_dir) / LOCK) in _held or _stale(holder, _lock_record())[0]


@contextlib.contextmanager
def hold(out_dir: Path) -> Iterator[None]:
    """Rank 0 holds the run directory's lock for the block; every rank raises the same RunLocked."""
    import vipamin_scale.distributed as D

    out_dir = Path(out_dir)
    error = None
    if D.rank() == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            acquire(out_dir)
        except (RunLocked, OSError) as exc:
            error = exc
    told = None if error is None else (type(error).__name__, str(error), getattr(error, "errno", None),
                                       getattr(error, "filename", None))
    seen = D.broadcast_object(told)  # every rank learns rank 0's outcome
    if seen is not None and error is None:
        name, message, err, filename = seen
        error = RunLocked(message) if name == "RunLocked" else OSError(err, os.strerror(err or errno.EIO), filename)
    if error is not None:
        raise error
    try:
        yield
    finally:
        if D.rank() == 0:
            release(out_dir)
