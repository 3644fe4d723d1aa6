"""Write image classification data as WebDataset tar shards, and read back their description.

A shard directory holds:

    {split}-{i:06d}.tar   WebDataset shards. One sample = `<key>.jpg` or `<key>.png` (the encoded
                          image, stored as given except what `encode_image` converts so that both
                          readers decode the same pixels) + `<key>.cls` (the label, ASCII decimal).
    {split}-{i:06d}.idx   the shard's index for DALI's `fn.readers.webdataset` (format below), written
                          right after its tar; `data.dali` builds a missing or stale one into the cache.
    classes.json          list of class names; the index is the label.
    manifest.json         {"format": "vipamin_scale.shards", "version": 1, "num_classes": C,
                           "splits": {split: {"count": n, "shards": [file names],
                                              "shard_counts": [samples per shard]}}, ...}

Keys are `{split}_{index:08d}`, `index` counting samples of the split in write order, so a key is
unique in the directory, stable across rewrites with the same seed, and names the sample's global
position (what `data.wds` uses to split the data between ranks and to apply `limit`).
Sources are shuffled (seeded) before writing, so "the first N samples" is a random subset
rather than the first classes. `manifest.json` is written last and atomically: a directory
without it is an unfinished write.

DALI index (version v1.2, what DALI's `wds2idx` writes; written here by our own code): a first
line `v1.2 <samples>`, then one line per sample, its components in tar order, each as
`<ext> <data offset in bytes> <size in bytes> <member name>`. A sample is a run of consecutive
regular files with the same key; key and extension split at the first dot of the file name.

Bad input fails with one `DataError` line naming the file (or CSV row).
"""
from __future__ import annotations

import csv
import io
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence, Union

import numpy as np
import webdataset as wds
from PIL import Image

from vipamin_scale.config import UserError
from vipamin_scale.paths import atomic_write_bytes

MANIFEST = "manifest.json"
CLASSES = "classes.json"
FORMAT = "vipamin_scale.shards"
VERSION = 1
SPLITS = ("train", "val", "test")
IMAGE_EXTS = ("jpg", "png")  # what the writer stores; the readers accept exactly these
DEFAULT_MAXCOUNT = 10_000
DEFAULT_MAXSIZE = 500_000_000  # bytes of payload per shard (a shard may exceed it by one sample)
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test for a tree or CSV without splits
DALI_INDEX_VERSION = "v1.2"


class StoredImage(NamedTuple):
    """An image as a shard stores it (read from another shard): written again byte for byte, unchecked."""

    data: bytes
    ext: str  # jpg | png


# An image given to the writer: a PIL image (stored as PNG), already encoded bytes + extension,
# the Path of an image file (read only when the writer reaches it, so memory stays at one image), or
# a StoredImage (a copy from a shard).
ImageInput = Union[Image.Image, tuple[bytes, str], Path, StoredImage]
# One sample given to the writer: (source, image, label). `source` names where it came from
# (a file path, a CSV row) and is used only in error messages; the shard key is assigned by the writer.
Sample = tuple[str, ImageInput, int]

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_FILE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
_OTHER_IMAGE_EXTS = {".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}  # re-encoded as PNG


class DataError(UserError, RuntimeError):
    """Bad data or a bad shard directory; the one-line message names the file (and key or row)."""


class ShardsExist(DataError):
    """The output directory already holds shards; `how` says how to replace them (the Python keyword
    here, the CLI's flag in `vipamin-scale shards`: see `with_how`)."""

    def __init__(self, out_dir: Path, found: str, how: str = "pass overwrite=True"):
        self.out_dir, self.found, self.how = out_dir, found, how
        super().__init__(f"{out_dir}: already holds shards ({found}); {how} to replace them")

    def with_how(self, how: str) -> "ShardsExist":
        return ShardsExist(self.out_dir, self.found, how)


@dataclass
class SplitInfo:
    """What `write_split` wrote."""

    count: int = 0
    shards: list[str] = field(default_factory=list)
    shard_counts: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "shards": list(self.shards), "shard_counts": list(self.shard_counts)}


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:08d}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_name(shard: str) -> str:
    """The DALI index file beside shard `shard` (`train-000000.tar` -> `train-000000.idx`)."""
    return (shard[:-4] if shard.endswith(".tar") else shard) + ".idx"


# ----------------------------------------------------------------------------------- DALI index

# One component of a sample as the index lists it: (extension, data offset, size, member name).
Component = tuple[str, int, int, str]


def tar_samples(tar_path: str | Path, strict: bool = True) -> tuple[list[list[Component]], str | None]:
    """The samples of a tar in DALI's grouping, and None; with strict=False, reading stops at the first
    unreadable header and the reason comes back instead of an error (a truncated shard)."""
    import tarfile

    samples: list[list[Component]] = []
    last = None
    problem = None
    end = 0  # where the last member's data (padded to 512-byte blocks) ends
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                end = member.offset_data + -(-member.size // 512) * 512
                if not member.isreg():
                    continue
                name = member.name
                dot = name.find(".", name.rfind("/") + 1)
                key, ext = (name[:dot], name[dot + 1:]) if dot >= 0 else (name, "")
                if not key or key.endswith("/"):
                    continue  # hidden files: DALI skips them too
                if key != last:
                    samples.append([])
                    last = key
                samples[-1].append((ext, member.offset_data, member.size, name))
        with open(tar_path, "rb") as f:  # tarfile takes a cut header for the end of the archive: check the end
            f.seek(end)
            tail = f.read()
        if len(tail) < 1024 or tail.strip(b"\0"):
            raise tarfile.ReadError(f"unexpected end of data after byte {end} (no end-of-archive blocks)")
    except (tarfile.TarError, OSError, EOFError) as exc:
        if strict:
            raise DataError(f"{tar_path}: unreadable tar ({type(exc).__name__}: {exc})") from None
        problem = f"{type(exc).__name__}: {exc}"
    return samples, problem


def dali_index_text(samples: Sequence[Sequence[Component]]) -> str:
    lines = [f"{DALI_INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in sample) for sample in samples]
    return "\n".join(lines) + "\n"


def write_dali_index(tar_path: str | Path, idx_path: str | Path | None = None) -> Path:
    """Write the DALI index of a (complete) shard; default path: beside it (`index_name`)."""
    tar_path = Path(tar_path)
    idx_path = Path(idx_path) if idx_path is not None else tar_path.with_name(index_name(tar_path.name))
    samples, _ = tar_samples(tar_path)
    atomic_write_bytes(idx_path, dali_index_text(samples).encode())
    return idx_path


def read_dali_index(idx_path: str | Path) -> list[list[Component]]:
    """Parse a v1.2 DALI index file; a malformed one is a DataError naming it."""
    idx_path = Path(idx_path)
    try:
        lines = idx_path.read_text().splitlines()
        head = lines[0].split()
        if len(head) != 2 or head[0] != DALI_INDEX_VERSION or int(head[1]) != len(lines) - 1:
            raise ValueError(f"header {lines[0]!r} (want '{DALI_INDEX_VERSION} <samples>' and that many lines)")
        samples = []
        for line in lines[1:]:
            f = line.split()
            if not f or len(f) % 4:
                raise ValueError(f"line {line[:80]!r}")
            samples.append([(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4)])
    except (OSError, ValueError, IndexError) as exc:
        raise DataError(f"{idx_path}: not a readable DALI index ({exc})") from None
    return samples


# ----------------------------------------------------------------------------------- writing


def _check_split_name(split: str) -> None:
    if not _SPLIT_NAME.match(split):
        raise DataError(f"split name {split!r}: use letters, digits, '_' or '-' (it becomes part of file names and keys)")


# ----------------------------------------------------------------------------------- pixels

# PIL modes the writer stores as they are (PNG); both readers decode them to the same pixels (`to_rgb`).
STORED_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")


def to_rgb(img: Image.Image) -> Image.Image:
    """An image's pixels as 8-bit RGB: the one rule both readers follow (`data.wds` with PIL through this
    function, `data.dali` with `fn.decoders.image(output_type=RGB)`; tests/test_dali.py checks every
    mode below on both, within one level of 255):

    * alpha is dropped, not composited (RGBA, LA, a palette's transparency): the colour channels as stored;
    * gray (L, 1) is repeated in R, G and B; a palette is expanded to its colours;
    * 16-bit samples become round(v / 257) (16-bit mid gray 32768 -> 128, 0.50), DALI's rounding: exact for
      16-bit gray (modes I;16*, and I clipped to [0, 65535]); 16-bit RGB, RGBA and gray+alpha PNGs PIL
      decodes to their high byte (v >> 8) itself, at most one level below DALI;
    * CMYK (JPEG) by PIL's conversion. DALI's CPU decoder agrees within a level; its GPU decoder is not
      known to, so the writer stores no CMYK: it converts it with this function (`encode_image`).
    32-bit float images (mode F) have no agreed 8-bit reading: a ValueError.
    """
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette colours; also avoids PIL's warning for palette transparency
    elif img.mode == "I" or img.mode.startswith("I;16"):
        v = np.asarray(img).astype(np.int64).clip(0, 65535)  # (H, W)
        img = Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8))
    elif img.mode == "F":
        raise ValueError("32-bit float pixels (mode F) have no 8-bit reading; store 8- or 16-bit images")
    return img.convert("RGB")


def encode_image(image: ImageInput, source: str, verify: bool = True) -> tuple[bytes, str]:
    """Return (bytes, 'jpg'|'png'), what the shard stores, so that both readers decode the same pixels:

    * a PIL image in one of STORED_MODES becomes PNG as it is (16-bit gray stays 16-bit); any other mode
      (CMYK, YCbCr, I, ...) becomes an RGB PNG of `to_rgb`'s pixels; a mode `to_rgb` refuses (F), or an
      I image outside [0, 65535], is a DataError naming `source`;
    * encoded bytes are kept as given (after an optional full decode check, so a corrupt file fails here,
      naming `source`), except a CMYK JPEG, stored as the RGB PNG of `to_rgb` (see there);
    * a StoredImage (bytes another shard holds, which the readers already read) is kept exactly.
    """
    if isinstance(image, StoredImage):
        if image.ext not in IMAGE_EXTS:
            raise DataError(f"{source}: image extension {image.ext!r} not supported in shards (use jpg or png)")
        return bytes(image.data), image.ext
    if isinstance(image, Path):
        image = _read_image_file(image, source)
    if isinstance(image, Image.Image):
        if image.mode not in STORED_MODES:
            lo, hi = image.getextrema() if image.mode == "I" else (0, 0)
            if lo < 0 or hi > 65535:
                raise DataError(f"{source}: 32-bit integer pixels in [{lo}, {hi}], outside the 16-bit range "
                                f"[0, 65535]; store 8- or 16-bit images")
            try:
                image = to_rgb(image)
            except ValueError as exc:
                raise DataError(f"{source}: {exc}") from None
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), "png"
    try:
        data, ext = image
    except (TypeError, ValueError):
        raise DataError(f"{source}: image must be a PIL.Image or (bytes, ext); got {type(image).__name__}") from None
    ext = ext.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    if ext not in IMAGE_EXTS:
        raise DataError(f"{source}: image extension {ext!r} not supported in shards (use jpg or png)")
    rgb = None
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            if verify or im.mode == "CMYK":
                im.load()
            if im.mode == "CMYK":
                rgb = to_rgb(im)
    except Exception as exc:  # PIL raises many types for bad data
        if verify:
            raise DataError(f"{source}: not a readable image ({type(exc).__name__}: {exc})") from None
    return encode_image(rgb, source) if rgb is not None else (bytes(data), ext)


def write_split(
    samples: Iterable[Sample],
    out_dir: str | Path,
    split: str,
    *,
    num_classes: int | None = None,
    maxcount: int = DEFAULT_MAXCOUNT,
    maxsize: float = DEFAULT_MAXSIZE,
    verify: bool = True,
) -> SplitInfo:
    """Write `samples` as `{split}-{i:06d}.tar` shards into `out_dir`, keys `{split}_{index:08d}`
    in iteration order. Returns the count, the shard file names and the samples per shard.
    Writes no shard for an empty split."""
    _check_split_name(split)
    if maxcount <= 0 or maxsize <= 0:
        raise DataError(f"write_split: maxcount and maxsize must be > 0; got {maxcount}, {maxsize}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = SplitInfo()
    writer: wds.ShardWriter | None = None

    def finished(fname: str) -> None:  # ShardWriter calls this after closing each shard
        info.shards.append(Path(fname).name)
        info.shard_counts.append(writer.count)
        write_dali_index(fname)

    try:
        for source, image, label in samples:
            if isinstance(label, bool) or not isinstance(label, int) or label < 0 or (
                    num_classes is not None and label >= num_classes):
                raise DataError(f"{source}: label {label!r} is not a class index in [0, {num_classes or 'C'})")
            data, ext = encode_image(image, source, verify=verify)
            if writer is None:  # ShardWriter opens its first file at once: create it lazily
                writer = wds.ShardWriter(str(out_dir / f"{split}-%06d.tar"), maxcount=maxcount, maxsize=maxsize,
                                         post=finished, verbose=0, encoder=False, mtime=0.0)
            writer.write({"__key__": sample_key(split, info.count), ext: data, "cls": str(label).encode()})
            info.count += 1
    finally:
        if writer is not None:
            writer.close()
    assert sum(info.shard_counts) == info.count and info.shards == [shard_name(split, i) for i in range(len(info.shards))]
    return info


def write_dataset(
    splits: Mapping[str, Sequence[Sample]],
    classes: Sequence[str],
    out_dir: str | Path,
    *,
    maxcount: int = DEFAULT_MAXCOUNT,
    maxsize: float = DEFAULT_MAXSIZE,
    shuffle: bool = True,
    seed: int = 0,
    verify: bool = True,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write every split, then `classes.json` and (last) `manifest.json`. Returns the manifest.

    shuffle: permute each split's samples (seeded by `seed` and the split name) before writing.
    overwrite: remove an earlier shard directory's tars/classes/manifest first; otherwise a
    directory that already holds shards is an error.
    """
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    classes = [str(c) for c in classes]
    if not classes:
        raise DataError(f"{out_dir}: no classes to write")
    if len(set(classes)) != len(classes):
        raise DataError(f"{out_dir}: duplicate class names in {classes}")
    manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, "num_classes": len(classes),
                                "seed": seed, "shuffled": shuffle, "splits": {}}
    for split, samples in splits.items():
        samples = list(samples)
        if shuffle:
            random.Random(f"vipamin_scale.shards/{seed}/{split}").shuffle(samples)
        info = write_split(samples, out_dir, split, num_classes=len(classes), maxcount=maxcount,
                           maxsize=maxsize, verify=verify)
        manifest["splits"][split] = info.as_dict()
    manifest.update(extra or {})
    atomic_write_bytes(out_dir / CLASSES, (json.dumps(classes, indent=1) + "\n").encode())
    atomic_write_bytes(out_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = [p for p in out_dir.iterdir() if p.name in (MANIFEST, CLASSES) or p.suffix in (".tar", ".idx")]
    if ours and not overwrite:
        raise ShardsExist(out_dir, ours[0].name)
    for p in ours:
        p.unlink()


# ----------------------------------------------------------------------------------- sources


def _read_image_file(path: Path, source: str) -> ImageInput:
    ext = path.suffix.lower()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{source}: cannot read image file {path} ({exc.strerror or exc})") from None
    if ext in _FILE_EXTS:
        return data, _FILE_EXTS[ext]
    try:  # other formats are decoded once and stored as PNG
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.copy()
    except Exception as exc:
        raise DataError(f"{source}: not a readable image ({type(exc).__name__}: {exc})") from None


def _is_image(path: Path) -> bool:
    return path.is_file() and (path.suffix.lower() in _FILE_EXTS or path.suffix.lower() in _OTHER_IMAGE_EXTS)


def image_files(class_dir: Path) -> list[Path]:
    """The image files of one class folder (sorted); a folder with none is a DataError naming it: an empty
    class folder is a mistake, and counting it as a class would change num_classes silently."""
    files = [f for f in sorted(class_dir.iterdir()) if _is_image(f)]
    if not files:
        raise DataError(f"{class_dir}: class folder holds no image files (.jpg/.jpeg/.png/...); remove it or add images")
    return files


def check_class_count(classes: Sequence[str], source: str | Path) -> None:
    """A classification dataset needs at least 2 classes; one is a DataError naming `source`."""
    if len(classes) < 2:
        raise DataError(f"{source}: {len(classes)} class ({', '.join(map(repr, classes)) or 'none'}); "
                        f"a classification dataset needs at least 2")


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6 or fractions[0] <= 0:
        raise DataError(f"fractions: need (train, val, test) >= 0 summing to 1 with train > 0; got {tuple(fractions)}")
    return tuple(float(f) for f in fractions)  # type: ignore[return-value]


def split_by_fractions(items_by_class: Mapping[int, Sequence[Any]], fractions: Sequence[float],
                       seed: int) -> dict[str, list[tuple[Any, int]]]:
    """Stratified seeded split: within each class, round(n*val) items go to val, round(n*test)
    to test, the rest to train. Returns {split: [(item, label)]} (empty splits dropped)."""
    _, f_val, f_test = _check_fractions(fractions)
    rng = random.Random(f"vipamin_scale.split/{seed}")
    out: dict[str, list[tuple[Any, int]]] = {s: [] for s in SPLITS}
    for label in sorted(items_by_class):
        items = list(items_by_class[label])
        rng.shuffle(items)
        n_val, n_test = round(len(items) * f_val), round(len(items) * f_test)
        out["val"] += [(x, label) for x in items[:n_val]]
        out["test"] += [(x, label) for x in items[n_val:n_val + n_test]]
        out["train"] += [(x, label) for x in items[n_val + n_test:]]
    return {s: v for s, v in out.items() if v}


def shards_from_imagefolder(
    root: str | Path,
    out_dir: str | Path,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    **write_opts: Any,
) -> dict[str, Any]:
    """Shard an image tree. Two layouts:

    * `root/<split>/<class>/<image>` when every subfolder of `root` is one of train/val/test;
    * `root/<class>/<image>` otherwise, split per class by `fractions` (train, val, test), seeded.

    Classes are the sorted class-folder names (union over splits); at least 2, and a class folder
    without images is an error naming it (`image_files`). Image files: .jpg/.jpeg/.png are stored
    as `encode_image` says; .bmp/.gif/.tif/.tiff/.webp/.ppm/.pgm are re-encoded as PNG; other files
    are ignored. Returns the manifest.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DataError(f"{root}: no class (or split) folders")
    entries: dict[str, list[tuple[Path, str]]] = defaultdict(list)  # split -> [(file, class name)]
    named_as_splits = [p.name for p in subdirs if p.name in SPLITS]
    if named_as_splits and len(named_as_splits) != len(subdirs):
        others = [p.name for p in subdirs if p.name not in SPLITS]
        raise DataError(f"{root}: mixes split folders {named_as_splits} with other folders {others[:3]}; use "
                        f"root/<split>/<class>/ (splits {', '.join(SPLITS)}) or root/<class>/")
    if named_as_splits:
        layout = "split/class"
        for split_dir in subdirs:
            for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                entries[split_dir.name] += [(f, class_dir.name) for f in image_files(class_dir)]
        classes = sorted({c for split in entries.values() for _, c in split})
    else:
        layout = "class"
        classes = [p.name for p in subdirs]
        by_class = {i: image_files(d) for i, d in enumerate(subdirs)}
        for split, items in split_by_fractions(by_class, fractions, seed).items():
            entries[split] = [(f, classes[label]) for f, label in items]
    if not any(entries.values()):
        raise DataError(f"{root}: no image files (.jpg/.jpeg/.png/...) found")
    check_class_count(classes, root)
    index = {c: i for i, c in enumerate(classes)}
    splits = {s: [(str(f), f, index[c]) for f, c in entries[s]] for s in SPLITS if entries.get(s)}
    return write_dataset(splits, classes, out_dir, seed=seed,
                         extra={"source": str(root), "layout": layout}, **write_opts)


def shards_from_csv(
    csv_path: str | Path,
    out_dir: str | Path,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    **write_opts: Any,
) -> dict[str, Any]:
    """Shard the images listed in a CSV with columns `path,label[,split]` (a header row with
    those names is optional). Relative paths are relative to the CSV's folder. Labels are class
    indices when every label is an integer (classes "0".."max"), else class names (sorted).
    Without a split column the rows are split per class by `fractions`, seeded.
    Errors name the CSV file and row. Returns the manifest."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such CSV file")
    rows: list[tuple[int, Path, str, str | None]] = []  # (row number, file, label, split)
    with open(csv_path, newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            row = [c.strip() for c in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            if n == 1 and row[0].lower() == "path":
                continue  # header
            where = f"{csv_path}:{n}"
            if len(row) not in (2, 3):
                raise DataError(f"{where}: expected path,label[,split]; got {len(row)} columns")
            path, label = row[0], row[1]
            split = row[2] if len(row) == 3 else None
            if not path:
                raise DataError(f"{where}: empty path")
            if not label:
                raise DataError(f"{where}: missing label for {path}")
            if len(row) == 3:
                if not split:
                    raise DataError(f"{where}: empty split for {path}")
                _check_split_name(split)
            file = Path(path) if Path(path).is_absolute() else csv_path.parent / path
            if not file.is_file():
                raise DataError(f"{where}: no such image file: {file}")
            rows.append((n, file, label, split))
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    if len({r[3] is None for r in rows}) > 1:
        raise DataError(f"{csv_path}: give a split on every row or on none")
    if all(re.fullmatch(r"\d+", r[2]) for r in rows):
        classes = [str(i) for i in range(max(int(r[2]) for r in rows) + 1)]
        label_of = {r[2]: int(r[2]) for r in rows}
    else:
        classes = sorted({r[2] for r in rows})
        label_of = {c: i for i, c in enumerate(classes)}
    check_class_count(classes, csv_path)
    if rows[0][3] is None:
        by_class: dict[int, list[tuple[int, Path]]] = defaultdict(list)
        for n, file, label, _ in rows:
            by_class[label_of[label]].append((n, file))
        split_rows = {s: [(n, file, label) for (n, file), label in items]
                      for s, items in split_by_fractions(by_class, fractions, seed).items()}
    else:
        split_rows = defaultdict(list)
        for n, file, label, split in rows:
            split_rows[split].append((n, file, label_of[label]))
    splits = {s: [(f"{csv_path}:{n} ({file})", file, label) for n, file, label in items]
              for s, items in split_rows.items()}
    return write_dataset(splits, classes, out_dir, seed=seed, extra={"source": str(csv_path)}, **write_opts)


def make_shards(source: str | Path, out_dir: str | Path, **opts: Any) -> dict[str, Any]:
    """`vipamin-scale shards`: an image folder tree or a `.csv` file -> shard directory. Returns the manifest."""
    source = Path(source)
    if source.is_dir():
        return shards_from_imagefolder(source, out_dir, **opts)
    if source.suffix.lower() == ".csv":
        return shards_from_csv(source, out_dir, **opts)
    if not source.exists():
        raise DataError(f"{source}: no such file or directory")
    raise DataError(f"{source}: expected an image folder or a .csv file of path,label[,split]")


# ----------------------------------------------------------------------------------- reading


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: missing ({what}); is {path.parent} a directory written by `vipamin-scale shards`?")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


def dataset_info(root: str | Path) -> dict[str, Any]:
    """Read `classes.json` and `manifest.json` of a shard directory and check they agree.

    Returns {"root": Path, "classes": [names], "num_classes": C,
             "splits": {split: {"count", "shards", "shard_counts"}}, "manifest": the raw manifest}.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such shard directory")
    classes = _read_json(root / CLASSES, "list of class names")
    manifest = _read_json(root / MANIFEST, "split counts and shard lists")
    mpath = root / MANIFEST
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{root / CLASSES}: must be a non-empty JSON list of class names")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{mpath}: no 'splits' mapping")
    if manifest.get("num_classes", len(classes)) != len(classes):
        raise DataError(f"{mpath}: num_classes={manifest.get('num_classes')} but {CLASSES} lists {len(classes)}")
    splits = {}
    for split, entry in manifest["splits"].items():
        try:
            count, shards, counts = int(entry["count"]), list(entry["shards"]), [int(c) for c in entry["shard_counts"]]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{mpath}: split {split!r} needs count, shards and shard_counts") from None
        if len(counts) != len(shards) or sum(counts) != count or any(c < 0 for c in counts):
            raise DataError(f"{mpath}: split {split!r}: shard_counts {counts} do not add up to count {count}")
        splits[split] = {"count": count, "shards": shards, "shard_counts": counts}
    return {"root": root, "classes": classes, "num_classes": len(classes), "splits": splits, "manifest": manifest}
