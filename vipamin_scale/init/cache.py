"""Each initialization computed once: the initial prompts of runs that differ only in what the initializer does
not read (lr, weight decay, schedule, epochs, ...: `config.init_key`) are computed by one of them and reused.

    shared = SharedInits()                                         one per pack (train.PackTrainer)
    prompts, record = shared.prompts(cfg, backbone, data_root, out_dir)

- Within a pack: the first run of a key runs the initializer (`run.run_init`, writing its own
  `<out_dir>/prompts.safetensors`); the pack's other runs of that key copy that file into their own directory
  and take the same tensor.
- Across processes, with `train.init_cache=DIR`: the prompts of key K are `DIR/<K>.safetensors`. Rank 0 holds an
  exclusive lock on `DIR/<K>.lock` (fcntl: released by the kernel if its holder dies) while it looks for the file
  and, when it is missing or damaged, while the initializer computes it and writes it atomically; so processes
  asking for one key at once wait for one computation instead of repeating it. A file is read only when its
  SHA-256 (`vipamin_scale.digest`, recorded in it) matches; a damaged one is computed again, with a warning.
  Each run then copies the file into its own directory.

Either way every run's `prompts.safetensors` is the bytes the initializer wrote (its timings included), the
prompts are the same tensor an unshared run computes (the initializer reads nothing else: tests/test_pack.py),
and the record says where they came from: {key, file (the computed file), sha256 (its digest), computed
(whether this run computed it)}, written into the run's run.json by `runs.record_init`.

Collective under torchrun like `run_init`: every rank calls it; rank 0 decides (and tells the others) whether
the cache holds the key. BPT's whitening statistics are shared within the pack by the same key (`whitening`).
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import DictConfig

import vipamin_scale.digest as digest
import vipamin_scale.distributed as D
from vipamin_scale.config import init_key

log = logging.getLogger(__name__)

PROMPTS = "prompts.safetensors"  # a run's own initial prompts, in its directory


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """An exclusive fcntl lock on `lock` (created), held for the block; the kernel drops it if this process dies."""
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def read_verified(path: Path) -> Optional[tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """A prompts file's tensors and metadata when it is readable and its digest matches; None otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # missing, cut, not safetensors: the cache computes it again
        return None
    return (tensors, metadata) if digest.verify(tensors, metadata) else None


def file_digest(path: Path) -> Optional[str]:
    """The SHA-256 a prompts file records (`vipamin_scale.digest`), read from its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(digest.KEY)


class SharedInits:
    """The inits a pack computed, by key: the first run's file and prompts (see the module docstring)."""

    def __init__(self, compute: Optional[Callable[..., dict[str, Any]]] = None):
        if compute is None:
            from vipamin_scale.init.run import run_init as compute
        self.compute = compute  # run_init(cfg, out, backbone=) -> {"prompts": (L_p, P, d), ...}
        self.done: dict[str, tuple[Path, torch.Tensor]] = {}  # key -> (computed file, prompts)
        self.whitenings: dict[str, Any] = {}

    def prompts(self, cfg: DictConfig, backbone, data_root: str | Path,
                out_dir: Path) -> tuple[Optional[torch.Tensor], Optional[dict[str, Any]]]:
        """The run's initial prompts (L_p, P, d) and the record of where they came from; (None, None) when the run
        has no initializer to run (random prompts, or prompt.init_file)."""
        if cfg.prompt.init_file or cfg.init.method == "random":
            return None, None
        key = init_key(cfg, data_root)
        own = Path(out_dir) / PROMPTS
        computed = key not in self.done
        if computed:
            if cfg.train.init_cache:
                computed, path, prompts = self._cached(cfg, backbone, key)
            else:
                path, prompts = own, self.compute(cfg, own, backbone=backbone)["prompts"]
            self.done[key] = (path, prompts)
        path, prompts = self.done[key]
        if D.rank() == 0 and path != own:
            own.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, own)  # the run's own file: the computed bytes
        D.barrier()
        return prompts.clone(), {"key": key, "file": str(path), "sha256": file_digest(path), "computed": computed}

    def _cached(self, cfg: DictConfig, backbone, key: str) -> tuple[bool, Path, torch.Tensor]:
        """(whether this process computed it, the cache file, the prompts) of `key` in train.init_cache."""
        cache = Path(cfg.train.init_cache)
        path = cache / f"{key}.safetensors"
        with _exclusive(cache / f"{key}.lock") if D.rank() == 0 else contextlib.nullcontext():
            found = read_verified(path) if D.rank() == 0 else None
            if D.rank() == 0 and found is None and path.exists():
                log.warning("%s is damaged (its digest does not match); computing it again", path)
            hit = D.broadcast_object(found is not None)
            if hit:
                tensors = found[0] if found is not None else read_verified(path)[0]
                return False, path, tensors["prompts"].float()
            return True, path, self.compute(cfg, path, backbone=backbone)["prompts"]

    def whitening(self, cfg: DictConfig, backbone, data_root: str | Path):
        """BPT's whitening statistics of the run (`init.bpt_stats.bpt_whitening`), computed once per key."""
        from vipamin_scale.init.bpt_stats import bpt_whitening

        key = init_key(cfg, data_root)
        if key not in self.whitenings:
            self.whitenings[key] = bpt_whitening(cfg, backbone)
        return self.whitenings[key]
