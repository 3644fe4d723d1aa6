"""Loader throughput: decode + RandomResizedCrop(224, bicubic) + flip + normalize, webdataset+PIL vs DALI (not a test).

    .venv/bin/python benchmarks/bench_data.py [--images 512] [--threads 2] [--batch 64] [--epochs 4]

Data: `--images` JPEGs (quality 90) of ImageNet-like sizes (shorter side 300..500, aspect 3/4..4/3),
cut and scaled from scikit-learn's two sample photographs, written once with `vipamin-scale`'s shard
writer (shards of 128) into a temporary directory. Both backends read the same shards through
`vipamin_scale.data.build_loader` with data.augment=true, train=True, 1 rank:
* wds: webdataset tar reading + PIL decode + torchvision RandomResizedCrop/flip/normalize in
  `--threads` DataLoader worker processes;
* dali: DALI's webdataset reader + `fn.decoders.image` + `fn.random_resized_crop` + `crop_mirror_normalize`
  with `--threads` CPU threads (device_id=None: CPU, even when a GPU is present, so both sides use
  the same cores), and, when CUDA is available, a `dali_gpu` row (decoding with device="mixed").
Each backend runs `--epochs` epochs, the backends alternating epoch by epoch (so a change in machine
load hits both); the first epoch is warm-up (worker start, page cache); images/s is the best (and
the median) of the others: floor(images / batch) * batch images per epoch, timed from the first batch request to the
last batch in hand, on the host, including what a new epoch costs each backend (fresh DataLoader
workers; a new DALI pipeline, whose shutdown waits for its prefetched runs). Prints a table; writes
benchmarks/results/data.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_images(n: int, seed: int = 0) -> list[tuple[str, tuple[bytes, str], int]]:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427 x 640 RGB photographs
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = photos[i % 2]
        short = int(rng.integers(300, 501))
        aspect = float(rng.uniform(3 / 4, 4 / 3))
        w, h = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
        ch, cw = int(rng.integers(200, 427)), int(rng.integers(300, 640))
        y, x = int(rng.integers(0, 427 - ch + 1)), int(rng.integers(0, 640 - cw + 1))
        img = Image.fromarray(a[y:y + ch, x:x + cw]).resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append((f"bench #{i}", (buf.getvalue(), "jpg"), i % 10))
    return out


def make_loader(backend: str, root: Path, threads: int, batch: int, gpu: bool = False):
    from vipamin_scale.config import default_config
    from vipamin_scale.data import build_loader

    cfg = default_config().data
    cfg.name, cfg.root, cfg.backend = "shards", str(root), backend
    cfg.augment, cfg.num_workers, cfg.batch_size, cfg.shuffle_buffer = True, threads, batch, 256
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    if backend == "dali" and not gpu:  # CPU pipeline on a GPU machine too: equal footing with PIL
        from vipamin_scale.data.dali import DaliLoader
        from vipamin_scale.data.wds import loader_spec

        spec = loader_spec(cfg, "train", train=True, img_size=224, mean=mean, std=std, seed=0)
        return DaliLoader(spec, device_id=None, num_threads=threads)
    return build_loader(cfg, "train", train=True, img_size=224, mean=mean, std=std, seed=0)


def epoch(loader, number: int, gpu: bool) -> tuple[float, int]:
    """Seconds for one epoch (first batch request to last batch in hand), and its images."""
    import torch

    loader.set_epoch(number)
    n = 0
    t0 = time.perf_counter()
    for images, labels, _ in loader:
        assert images.shape[1:] == (3, 224, 224) and images.dtype == torch.float32
        n += images.shape[0]
    if gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data.json"))
    args = ap.parse_args()

    import torch

    from vipamin_scale.data.shards import write_dataset

    torch.set_num_threads(1)  # the loaders' own threads/workers do the work
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(tmp) / "shards"
        samples = make_images(args.images)
        size_mb = sum(len(s[1][0]) for s in samples) / 2 ** 20
        write_dataset({"train": samples}, [str(c) for c in range(10)], root, maxcount=128, verify=False)
        setups = [("wds", False), ("dali", False)] + ([("dali", True)] if torch.cuda.is_available() else [])
        loaders = {(b, g): make_loader(b, root, args.threads, args.batch, g) for b, g in setups}
        times: dict = {k: [] for k in loaders}
        images = 0
        for number in range(args.epochs):  # alternate the backends epoch by epoch: drifting load hits both
            for k, loader in loaders.items():
                seconds, images = epoch(loader, number, gpu=k[1])
                times[k].append(seconds)
        rows = []
        for (backend, gpu), ts in times.items():
            best = min(ts[1:]) if len(ts) > 1 else ts[0]
            timed = sorted(ts[1:] or ts)
            rows.append({"backend": "dali_gpu" if gpu else backend, "threads": args.threads,
                         "images_per_epoch": images, "epoch_s_all": ts, "images_per_s": images / best,
                         "images_per_s_median": images / timed[len(timed) // 2]})
    for row in rows:
        row["vs_wds"] = row["images_per_s"] / rows[0]["images_per_s"]
        row["vs_wds_median"] = row["images_per_s_median"] / rows[0]["images_per_s_median"]
    meta = {"images": args.images, "jpeg_mib": round(size_mb, 1), "batch": args.batch, "threads": args.threads,
            "epochs": args.epochs, "img_size": 224, "transform": "decode + RandomResizedCrop(224, bicubic) + flip + "
            "normalize", "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "cuda": torch.cuda.is_available()}
    print(f"{args.images} JPEGs ({size_mb:.1f} MiB), batch {args.batch}, {args.threads} threads/workers, "
          f"best of epochs 2..{args.epochs}")
    print("| backend | images/s (best) | vs wds | images/s (median) | vs wds |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['backend']} | {row['images_per_s']:.1f} | {row['vs_wds']:.2f} | "
              f"{row['images_per_s_median']:.1f} | {row['vs_wds_median']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, allow_nan=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
