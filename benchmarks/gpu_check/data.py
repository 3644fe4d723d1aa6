"""data: loader images/s at 224 px: webdataset + PIL, DALI CPU, DALI `mixed` (benchmarks/bench_data.py)."""
from __future__ import annotations

import importlib.util

from gpu_check.common import Record


def run(rec: Record, ctx: dict) -> None:
    import torch
    from bench_data import epoch, make_images, make_loader

    from vipamin_scale.data.shards import write_dataset

    s = ctx["sizes"]
    root = ctx["work"] / "data_shards"
    samples = make_images(s["data_images"])
    write_dataset({"train": samples}, [str(c) for c in range(10)], root, maxcount=128, verify=False)
    dali = importlib.util.find_spec("nvidia.dali") is not None
    setups = [("wds", False)] + ([("dali", False)] if dali else []) + (
        [("dali", True)] if dali and torch.cuda.is_available() else [])
    if not dali:
        rec.data["dali_skipped"] = "DALI is not installed (benchmarks/dali_to_device.sh brings its wheel)"
    rec.data.update(images=s["data_images"], batch=s["data_batch"], threads=s["data_threads"], epochs=s["data_epochs"],
                    img_size=224, transform="decode + RandomResizedCrop(224) + flip + normalize (bench_data.py)")
    for backend, gpu in setups:
        key = "dali_mixed" if gpu else ("dali_cpu" if backend == "dali" else "wds_pil")

        def measure(backend=backend, gpu=gpu):
            loader = make_loader(backend, root, s["data_threads"], s["data_batch"], gpu)
            times, n = [], 0
            for number in range(s["data_epochs"]):
                seconds, n = epoch(loader, number, gpu)
                times.append(seconds)
            best = min(times[1:] or times)
            return {"images_per_s": n / best, "epoch_s_all": times, "images_per_epoch": n}

        rec.item(key, measure)
    a, b = rec.data.get("dali_mixed") or {}, rec.data.get("wds_pil") or {}
    if a.get("images_per_s") and b.get("images_per_s"):
        rec.data.update(dali_mixed_vs_wds_pil=a["images_per_s"] / b["images_per_s"],
                        target="dali_mixed_vs_wds_pil >= 2 (the same CPU threads)")
    rec.save()
