"""dali: the DALI loader (`mixed` decode on the GPU) against webdataset + PIL on the same shards."""
from __future__ import annotations

import time

from gpu_check.common import Record


def run(rec: Record, ctx: dict) -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("nvidia.dali") is None:
        rec.data["skipped"] = "DALI is not installed here (benchmarks/dali_to_device.sh brings its wheel)"
        rec.save()
        return

    from vipamin_scale.config import default_config
    from vipamin_scale.data import build_loader
    from vipamin_scale.data.digits import digits_root

    root = digits_root()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

    def loader(backend: str, split: str, train: bool):
        # wds: no worker processes (with workers, the eval batches come worker block by worker block,
        # a different order than one stream); DALI: 2 CPU threads
        cfg = default_config().data
        cfg.name, cfg.root, cfg.backend, cfg.batch_size = "shards", str(root), backend, 16
        cfg.num_workers = 2 if backend == "dali" else 0
        return build_loader(cfg, split, train=train, img_size=32, mean=mean, std=std, seed=0, batch_size=16)

    def epoch(ld) -> tuple[list[str], list[torch.Tensor]]:
        ld.set_epoch(0)
        keys, images = [], []
        for x, _y, k in ld:
            keys.extend(k)
            images.append(x.float().cpu())
        return keys, images

    t = time.perf_counter()
    dali_val = loader("dali", "val", False)
    rec.data["dali_device"] = "cpu" if dali_val.device_id is None else f"cuda:{dali_val.device_id} (mixed decode)"
    kv, iv = epoch(dali_val)
    rv, jv = epoch(loader("wds", "val", False))
    kt, _ = epoch(loader("dali", "train", True))
    rt, _ = epoch(loader("wds", "train", True))
    diff = max(float((a - b).abs().max()) for a, b in zip(iv, jv)) if len(iv) == len(jv) and iv else None
    rec.data.update(eval_keys=len(kv), eval_keys_equal_in_order=kv == rv, train_keys=len(kt),
                    train_keys_equal_as_sets=sorted(kt) == sorted(rt) and len(kt) == len(set(kt)),
                    eval_max_abs_pixel_diff_normalized=diff, seconds=round(time.perf_counter() - t, 2))
    rec.data["passed"] = bool(kv) and rec.data["eval_keys_equal_in_order"] and rec.data["train_keys_equal_as_sets"]
    rec.save()

