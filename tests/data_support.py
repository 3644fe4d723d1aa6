"""Helpers shared by the data tests of both backends (webdataset and DALI)."""
from __future__ import annotations

from pathlib import Path

from vipamin_scale.config import default_config


def loader_cfg(root: Path, backend: str, **data):
    """`cfg.data` for a shard directory: batch 4, eval batch 5, then the given fields."""
    cfg = default_config()
    cfg.data.name, cfg.data.root, cfg.data.backend = "shards", str(root), backend
    for k, v in {"batch_size": 4, "eval_batch_size": 5, **data}.items():
        setattr(cfg.data, k, v)
    return cfg.data


def run_epoch(loader, epoch: int = 0) -> list:
    """Every (images, labels, keys) batch of one epoch."""
    loader.set_epoch(epoch)
    return [(x, y, k) for x, y, k in loader]


def keys_of(batches) -> list[str]:
    return [k for _, _, ks in batches for k in ks]
