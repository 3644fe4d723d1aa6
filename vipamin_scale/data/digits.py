"""The embedded demo dataset: scikit-learn's digits (1797 real 8x8 handwritten digits, 10 classes),
written once as shards into the cache and reused.

Choices (bump DIGITS_DIR's version when any changes):
* split: stratified by class, seeded (seed 0): train 1000 / val 297 / test 500;
* images: the 17 grey levels (0..16) scaled to 0..255 (rounded), upscaled 4x to 32x32 by
  nearest neighbour (every pixel becomes a 4x4 block, so values stay exact), replicated to RGB,
  stored as PNG; a 32-pixel test model reads them untouched, the demo resizes them to its size;
* shards of at most 250 samples: train 4, val 2, test 2; keys and write order as in `shards.py`.

Building is idempotent and safe when several processes start at once: each builds in its own
temporary directory beside the target and renames it into place; whoever loses the race drops
its copy and uses the winner's.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from vipamin_scale.data.shards import MANIFEST, dataset_info, write_dataset
from vipamin_scale.paths import cache_dir as default_cache_dir, exclusive_lock

DIGITS_DIR = "digits_shards_v1"
FEWSHOT_DIR = "digits_fewshot_v1"  # <cache>/digits_fewshot_v1/{tree, <k>shot_seed<draw>}
SPLIT_SIZES = {"train": 1000, "val": 297, "test": 500}
IMAGE_SIZE = 32
SEED = 0
MAXCOUNT = 250


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 32, 32, 3), labels int64 (1797,)) as stored in the shards."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), values 0..16 -> 0..255
    scale = IMAGE_SIZE // grey.shape[1]
    big = grey.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest-neighbour upscale
    return np.repeat(big[..., None], 3, axis=3), digits.target.astype(np.int64)


def _split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=SPLIT_SIZES["test"], stratify=labels, random_state=SEED)
    train, val = train_test_split(rest, train_size=SPLIT_SIZES["train"], test_size=SPLIT_SIZES["val"],
                                  stratify=labels[rest], random_state=SEED)
    return {"train": train, "val": val, "test": test}


def build_digits(out_dir: str | Path) -> dict:
    """Write the digits shards into `out_dir` (which must not hold shards). Returns the manifest."""
    images, labels = digits_images()
    splits = {split: [(f"sklearn digits #{i}", Image.fromarray(images[i]), int(labels[i])) for i in idx]
              for split, idx in _split_indices(labels).items()}
    return write_dataset(splits, [str(c) for c in range(10)], out_dir, maxcount=MAXCOUNT, seed=SEED,
                         extra={"source": "sklearn.datasets.load_digits", "image_size": IMAGE_SIZE,
                                "upscale": "nearest"})


def digits_root(cache_dir: str | Path | None = None) -> Path:
    """The digits shard directory `<cache>/digits_shards_v1/`, built on first use."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / DIGITS_DIR
    if (target / MANIFEST).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{DIGITS_DIR}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        build_digits(tmp)
        dataset_info(tmp)  # the copy is complete and readable before it becomes visible
        try:
            os.rename(tmp, target)
        except OSError:  # another process renamed its copy first (target exists, not empty)
            if not (target / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def digits_fewshot(shots: list[int], draws: int, cache_dir: str | Path | None = None) -> dict[tuple[int, int], Path]:
    """The digits' few-shot draws as shard directories, written once: {(k, draw): dir}.

    Draw d takes k training images per class (`protocols.fewshot_shards`, seed d; the k-shot
    draws of one seed are nested) and keeps val and test whole. The same (k, d) is the same images
    wherever it is written. Safe when several processes of one machine call it at once: the writing
    holds an exclusive lock on `<root>/.lock` (released by the kernel if the holder dies), so one
    writes and the others wait, then find the draws done."""
    from vipamin_scale.data.protocols import fewshot_shards

    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / FEWSHOT_DIR
    tree = root / "tree"
    names = {(k, d): root / f"{k}shot_seed{d}" for d in range(draws) for k in shots}
    if (tree / ".done").is_file() and all((p / MANIFEST).is_file() for p in names.values()):
        return names
    with exclusive_lock(root / ".lock"):
        if not (tree / ".done").is_file():
            images, labels = digits_images()
            for split, idx in _split_indices(labels).items():
                for i in idx:
                    path = tree / split / str(int(labels[i])) / f"{i:04d}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(images[i]).save(path)
            (tree / ".done").write_text("ok\n")
        for d in range(draws):
            if not all((names[k, d] / MANIFEST).is_file() for k in shots):
                fewshot_shards(tree, root, shots=shots, seed=d, overwrite=True)
    return names
