"""Where the project keeps things it makes once and reuses (converted weights, demo shards)."""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping


def cache_dir() -> Path:
    """`$VIPAMIN_SCALE_CACHE`, else `~/.cache/vipamin_scale`; created on first use."""
    root = Path(os.environ.get("VIPAMIN_SCALE_CACHE", Path.home() / ".cache" / "vipamin_scale"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created when absent; `fcntl.flock`, which the kernel
    releases if the holder dies): the writers of one cache wait for each other instead of writing over
    each other."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename: a reader never sees half a file, and
    a write that fails (disk full, ...) removes its temp file and leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_marked_section(path: Path, begin: str, end: str, section: str) -> None:
    """Put `section` (which starts with the `begin` marker and ends with `end`) into the markdown
    file `path` in place of the text between the markers, or append it; atomic. The rest of the
    file is kept as it is."""
    path = Path(path)
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_bytes(path, text.encode())


# An absolute path inside a text: '/' not after a word character, '.', ':' or another '/' (so neither
# a/b, 1/2 nor the // of a URL), then path segments.
_ABSOLUTE = re.compile(r"(?<![\w.:/~-])/(?:[\w.+@-]+/)*[\w.+@-]+/?")


def portable(obj: Any, places: Mapping[str, Any]) -> Any:
    """`obj` (a string, or every string inside dicts and lists) naming no directory of this machine, for
    a record that is committed: an absolute path under one of `places` ({label: directory}) is written
    relative to it, `label/rest` (`label` for the directory itself; the label "" gives the bare relative
    path), and any other absolute path keeps only its file name, `…/name`."""
    if isinstance(obj, Mapping):
        return {k: portable(v, places) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, places) for v in obj]
    if not isinstance(obj, str):
        return obj
    bases = sorted(((label, str(Path(d)).rstrip("/")) for label, d in places.items()), key=lambda p: -len(p[1]))

    def one(match: re.Match) -> str:
        path = match.group(0).rstrip("/")
        for label, base in bases:
            if path == base:
                return label or "."
            if path.startswith(base + "/"):
                rest = path[len(base) + 1:]
                return f"{label}/{rest}" if label else rest
        return f"…/{Path(path).name}"

    return _ABSOLUTE.sub(one, obj)
