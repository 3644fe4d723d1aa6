"""Benchmark protocols as shard builders: VTAB-1k (VPT's splits) and few-shot FGVC.

Both read a source with splits, in one of these layouts:

* an image tree `root/<split>/<class>/<image>` (split: train, val, test; classes: sorted folder names);
* a CSV `path,label,split` (header optional; paths relative to the CSV; labels integers or names);
* (VTAB only) a task folder with the lists `train800.txt val200.txt train800val200.txt test.txt`, one
  `<relative image path> <integer label>` per line (the VTAB-1k exports in circulation): used as given.

VTAB-1k (`vtab_shards`), VPT's convention. From the source's `train` list in its order:
    train800        = train[:800]
    val200          = val[:200] when the source has a val split (tasks with an official validation
                      split), else train[n90 : n90 + 200], n90 = len(train) * 90 // 100 (the 90% point)
    train800val200  = train800 + val200
    test            = the whole test split
"Its order" is the CSV's row order (the export's, e.g. TFDS order); an image tree has no meaningful
order (sorted by class), so its train list is first permuted with `seed`. The manifest records the
rule, the source sizes, n90 and the source entries of train800 and val200 ("drawn").
Hyper-parameters are chosen on train800 -> val200, the final run trains on train800val200 and tests
on test (vipamin_scale/configs/data/vtab_select.yaml, vtab_final.yaml).

Few-shot FGVC (`fewshot_shards`): for each k in shots, `OUT/<k>shot_seed<seed>/` with
    train = k images per class, drawn from the source's train list: each class's list (source order)
            is permuted by Random("vipamin_scale.fewshot/<seed>/<class name>") and its first k kept,
            so the draws are nested (the 1-shot images are among the 2-shot ones, ...) and seed-stable;
    val, test = the source's, unchanged (when present).
The manifest records protocol, shots, seed and the source entries drawn. A class with fewer than k
training images is an error naming it.
"""
from __future__ import annotations

import csv
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from vipamin_scale.data.shards import SPLITS, DataError, check_class_count, image_files, write_dataset

__all__ = ["VtabTask", "VTAB_TASKS", "VTAB_SPLITS", "FEWSHOT_SHOTS", "vtab_task", "vtab_positions", "vtab_shards",
           "fewshot_draw", "fewshot_shards", "read_source"]


@dataclass(frozen=True)
class VtabTask:
    name: str  # our name (and the usual folder name of VTAB-1k exports)
    group: str  # natural | specialized | structured
    num_classes: int
    tfds: str  # the TFDS dataset / VPT task it comes from


VTAB_TASKS: tuple[VtabTask, ...] = (
    VtabTask("caltech101", "natural", 102, "caltech101"),
    VtabTask("cifar100", "natural", 100, "cifar100"),
    VtabTask("dtd", "natural", 47, "dtd"),
    VtabTask("oxford_flowers102", "natural", 102, "oxford_flowers102"),
    VtabTask("oxford_iiit_pet", "natural", 37, "oxford_iiit_pet"),
    VtabTask("svhn", "natural", 10, "svhn_cropped"),
    VtabTask("sun397", "natural", 397, "sun397"),
    VtabTask("patch_camelyon", "specialized", 2, "patch_camelyon"),
    VtabTask("eurosat", "specialized", 10, "eurosat"),
    VtabTask("resisc45", "specialized", 45, "resisc45"),
    VtabTask("diabetic_retinopathy", "specialized", 5, "diabetic_retinopathy_detection/btgraham-300"),
    VtabTask("clevr_count", "structured", 8, "clevr: count_all"),
    VtabTask("clevr_distance", "structured", 6, "clevr: closest_object_distance"),
    VtabTask("dmlab", "structured", 6, "dmlab"),
    VtabTask("kitti_distance", "structured", 4, "kitti: closest_vehicle_distance"),
    VtabTask("dsprites_location", "structured", 16, "dsprites: label_x_position, 16 bins"),
    VtabTask("dsprites_orientation", "structured", 16, "dsprites: label_orientation, 16 bins"),
    VtabTask("smallnorb_azimuth", "structured", 18, "smallnorb: label_azimuth"),
    VtabTask("smallnorb_elevation", "structured", 9, "smallnorb: label_elevation"),
)
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
VTAB_LISTS = tuple(f"{s}.txt" for s in VTAB_SPLITS)
TRAIN_PERCENT = 90
FEWSHOT_SHOTS = (1, 2, 4, 8, 16)

# One source entry: (where it came from, for errors and the manifest; image file; class name).
Entry = tuple[str, Path, str]


def vtab_task(name: str) -> VtabTask:
    for task in VTAB_TASKS:
        if task.name == name:
            return task
    raise DataError(f"VTAB task {name!r}: unknown; one of {', '.join(t.name for t in VTAB_TASKS)}")


# ----------------------------------------------------------------------------------- sources


def read_source(source: str | Path) -> tuple[dict[str, list[Entry]], list[str], str]:
    """A source with splits -> ({split: [(source id, file, class name)]} in source order, class names, kind)."""
    source = Path(source)
    if source.is_dir():
        return _read_tree(source)
    if source.suffix.lower() == ".csv" and source.is_file():
        return _read_csv(source)
    raise DataError(f"{source}: expected an image tree root/<split>/<class>/ or a .csv of path,label,split")


def _read_tree(root: Path) -> tuple[dict[str, list[Entry]], list[str], str]:
    split_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    others = [p.name for p in split_dirs if p.name not in SPLITS]
    if not split_dirs or others:
        raise DataError(f"{root}: need split folders ({', '.join(SPLITS)}) holding class folders; "
                        f"found {others[:3] or 'none'}")
    splits: dict[str, list[Entry]] = {}
    for d in split_dirs:
        splits[d.name] = [(str(f), f, c.name) for c in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
                          for f in image_files(c)]
    classes = sorted({c for entries in splits.values() for _, _, c in entries})
    check_class_count(classes, root)
    return splits, classes, "tree"


def _read_csv(path: Path) -> tuple[dict[str, list[Entry]], list[str], str]:
    splits: dict[str, list[Entry]] = defaultdict(list)
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            row = [c.strip() for c in row]
            if not row or not any(row) or row[0].startswith("#") or (n == 1 and row[0].lower() == "path"):
                continue
            if len(row) != 3 or not all(row):
                raise DataError(f"{path}:{n}: expected path,label,split (all three given)")
            file = Path(row[0]) if Path(row[0]).is_absolute() else path.parent / row[0]
            if not file.is_file():
                raise DataError(f"{path}:{n}: no such image file: {file}")
            splits[row[2]].append((f"{path}:{n}", file, row[1]))
    names = {c for entries in splits.values() for _, _, c in entries}
    classes = ([str(i) for i in range(max(int(c) for c in names) + 1)] if all(re.fullmatch(r"\d+", c) for c in names)
               else sorted(names))
    return dict(splits), classes, "csv"


def _read_lists(folder: Path, task: VtabTask | None) -> dict[str, list[Entry]]:
    out: dict[str, list[Entry]] = {}
    for split in VTAB_SPLITS:
        path = folder / f"{split}.txt"
        entries = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(f"{path}:{n}: expected '<image path> <integer label>'")
            file = folder / parts[0]
            if not file.is_file():
                raise DataError(f"{path}:{n}: no such image file: {file}")
            if task is not None and int(parts[1]) >= task.num_classes:
                raise DataError(f"{path}:{n}: label {parts[1]} outside [0, {task.num_classes}) of {task.name}")
            entries.append((f"{path}:{n}", file, str(int(parts[1]))))
        out[split] = entries
    return out


# ----------------------------------------------------------------------------------- VTAB-1k


def vtab_positions(n_train: int, n_val: int = 0) -> dict[str, Any]:
    """Where VPT's VTAB-1k splits come from in a train list of n_train (and a val list of n_val)."""
    n90 = n_train * TRAIN_PERCENT // 100
    if n_val:
        if n_val < 200 or n_train < 800:
            raise DataError(f"VTAB-1k: need >= 800 train and >= 200 val images; the source has {n_train} and {n_val}")
        return {"train800": ("train", 0, 800), "val200": ("val", 0, 200), "n90": None}
    if n90 < 800 or n90 + 200 > n_train:
        raise DataError(f"VTAB-1k: a train list of {n_train} images cannot hold train[:800] and "
                        f"train[{n90}:{n90 + 200}] (its 90% point) apart; give a val split or >= 2000 train images")
    return {"train800": ("train", 0, 800), "val200": ("train", n90, n90 + 200), "n90": n90}


def vtab_shards(source: str | Path, out_dir: str | Path, *, task: str | None = None, seed: int = 0,
                order: str | None = None, **write_opts: Any) -> dict[str, Any]:
    """Write VTAB-1k's train800 / val200 / train800val200 / test shards of one task. Returns the manifest.

    task: a name of VTAB_TASKS (checks the class count; recorded); order: "source" keeps the train
    list's order, "shuffle" permutes it with `seed` first (default: source for CSV, shuffle for a tree).
    """
    source = Path(source)
    info = vtab_task(task) if task else None
    extra: dict[str, Any] = {"protocol": "vtab-1k", "task": task, "source": str(source)}
    if source.is_dir() and all((source / name).is_file() for name in VTAB_LISTS):
        splits = _read_lists(source, info)
        sizes = {s: len(v) for s, v in splits.items()}
        if (sizes["train800"], sizes["val200"], sizes["train800val200"]) != (800, 200, 1000):
            raise DataError(f"{source}: VTAB-1k lists must hold 800/200/1000 images; they hold {sizes}")
        union = splits["train800"] + splits["val200"]
        if sorted(e[1] for e in splits["train800val200"]) != sorted(e[1] for e in union):
            raise DataError(f"{source}: train800val200.txt is not train800.txt + val200.txt")
        n_classes = info.num_classes if info else 1 + max(int(e[2]) for v in splits.values() for e in v)
        classes = [str(i) for i in range(n_classes)]
        extra["rule"] = "lists"
    else:
        src, classes, kind = read_source(source)
        if "train" not in src or "test" not in src:
            raise DataError(f"{source}: VTAB-1k needs train and test splits; it has {sorted(src)}")
        order = order or ("source" if kind == "csv" else "shuffle")
        if order not in ("source", "shuffle"):
            raise DataError(f"order: must be source or shuffle; got {order!r}")
        train = list(src["train"])
        if order == "shuffle":
            random.Random(f"vipamin_scale.vtab/{seed}").shuffle(train)
        pos = vtab_positions(len(train), len(src.get("val", [])))
        lists = {"train": train, "val": src.get("val", [])}
        (a_split, a0, a1), (b_split, b0, b1) = pos["train800"], pos["val200"]
        splits = {"train800": lists[a_split][a0:a1], "val200": lists[b_split][b0:b1]}
        splits["train800val200"] = splits["train800"] + splits["val200"]
        splits["test"] = list(src["test"])
        extra.update(rule="val[:200]" if pos["n90"] is None else "train[n90:n90+200]", order=order, n90=pos["n90"],
                     source_counts={s: len(v) for s, v in src.items()})
        if info is not None and len(classes) != info.num_classes:
            raise DataError(f"{source}: {len(classes)} classes, but VTAB {info.name} has {info.num_classes}")
    extra["drawn"] = {s: [sid for sid, _, _ in splits[s]] for s in ("train800", "val200")}
    index = {c: i for i, c in enumerate(classes)}
    samples = {s: [(sid, f, index[c]) for sid, f, c in v] for s, v in splits.items()}
    return write_dataset(samples, classes, out_dir, seed=seed, extra=extra, **write_opts)


# ----------------------------------------------------------------------------------- few-shot FGVC


def fewshot_draw(train: Sequence[Entry], shots: int, seed: int) -> list[Entry]:
    """k = shots images per class from `train` (see the module docstring): nested in k, stable for a seed."""
    if shots < 1:
        raise DataError(f"shots: must be >= 1; got {shots}")
    by_class: dict[str, list[Entry]] = defaultdict(list)
    for e in train:
        by_class[e[2]].append(e)
    chosen: list[Entry] = []
    for name in sorted(by_class):
        items = list(by_class[name])
        if len(items) < shots:
            raise DataError(f"class {name!r}: {len(items)} training images, fewer than {shots} shots")
        random.Random(f"vipamin_scale.fewshot/{seed}/{name}").shuffle(items)
        chosen += items[:shots]
    return chosen


def fewshot_shards(source: str | Path, out_dir: str | Path, *, shots: Iterable[int] = FEWSHOT_SHOTS, seed: int = 0,
                   **write_opts: Any) -> dict[int, dict[str, Any]]:
    """Write `out_dir/<k>shot_seed<seed>/` for each k in shots. Returns {k: manifest}."""
    src, classes, _ = read_source(source)
    if "train" not in src:
        raise DataError(f"{source}: few-shot needs a train split; it has {sorted(src)}")
    missing = sorted(set(classes) - {e[2] for e in src["train"]})
    if missing:
        raise DataError(f"{source}: classes {missing[:5]} have no training image")
    index = {c: i for i, c in enumerate(classes)}
    out: dict[int, dict[str, Any]] = {}
    for k in sorted(set(int(k) for k in shots)):
        chosen = fewshot_draw(src["train"], k, seed)
        splits = {"train": chosen, **{s: src[s] for s in ("val", "test") if s in src}}
        samples = {s: [(sid, f, index[c]) for sid, f, c in v] for s, v in splits.items()}
        extra = {"protocol": "fewshot", "shots": k, "seed": seed, "source": str(source),
                 "drawn": [sid for sid, _, _ in chosen]}
        out[k] = write_dataset(samples, classes, Path(out_dir) / f"{k}shot_seed{seed}", seed=seed, extra=extra,
                               **write_opts)
    return out
