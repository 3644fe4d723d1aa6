"""Where the project keeps things it makes once and reuses (converted weights, demo shards)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$VIPAMIN_SCALE_CACHE`, else `~/.cache/vipamin_scale`; created on first use."""
    root = Path(os.environ.get("VIPAMIN_SCALE_CACHE", Path.home() / ".cache" / "vipamin_scale"))
    root.mkdir(parents=True, exist_ok=True)
    return root


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
