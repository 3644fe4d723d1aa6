"""Data: WebDataset shards (writer, CPU loader, DALI loader), transforms, benchmark protocols, the digits demo.

    root = resolve_root(cfg.data)          # digits (built on first use) or data.root
    info = dataset_info(root)              # classes, num_classes, splits
    check_splits(cfg.data, {"data.train_split": "train", ...}, train="data.train_split")  # before any compute
    loader = build_loader(cfg.data, "train", train=True, img_size=..., mean=..., std=..., rank=..., world_size=...)

`build_loader` reads data.backend: `wds` (data/wds.py: webdataset + PIL in DataLoader workers) or
`dali` (data/dali.py: DALI, GPU decoding when CUDA is available); both yield the same samples.
"""
from __future__ import annotations

from typing import Any

from vipamin_scale.data.shards import DataError, dataset_info, make_shards
from vipamin_scale.data.wds import ShardLoader, check_splits, resolve_root
from vipamin_scale.data.wds import build_loader as build_wds_loader

__all__ = ["build_loader", "check_splits", "dataset_info", "resolve_root", "make_shards", "ShardLoader", "DataError"]


def build_loader(data_cfg: Any, split: str, **kwargs: Any) -> Any:
    """The loader of one split for one rank, by data.backend (wds | dali); arguments as `data.wds.build_loader`."""
    backend = data_cfg.backend
    if backend == "wds":
        return build_wds_loader(data_cfg, split, **kwargs)
    if backend == "dali":
        from vipamin_scale.data.dali import build_dali_loader  # DALI is optional: import it only when asked

        return build_dali_loader(data_cfg, split, **kwargs)
    raise ValueError(f"data.backend: must be wds or dali; got {backend!r}")
