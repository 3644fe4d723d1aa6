"""Data: WebDataset shards (writer, CPU loader), transforms, the embedded digits demo.

    root = resolve_root(cfg.data)          # digits (built on first use) or data.root
    info = dataset_info(root)              # classes, num_classes, splits
    loader = build_loader(cfg.data, "train", train=True, img_size=..., mean=..., std=..., rank=..., world_size=...)
"""
from vipamin_scale.data.shards import DataError, dataset_info, make_shards
from vipamin_scale.data.wds import ShardLoader, build_loader, resolve_root

__all__ = ["build_loader", "dataset_info", "resolve_root", "make_shards", "ShardLoader", "DataError"]
