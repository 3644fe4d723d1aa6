"""Few-shot draws from a shard directory the user already has (`data=shards data.root=DIR`).

    root = fewshot_root(Path("/data/cub_shards"), shots=4, draw=0, out_dir=Path("study/draws"))
    # -> study/draws/4shot_seed0, a shard directory: data=shards data.root=study/draws/4shot_seed0

The returned directory `<out_dir>/<shots>shot_seed<draw>/` reads like any shard directory, with either
backend (wds, dali):

* `train`: `shots` images per class of the source's `split` split, chosen by `protocols.fewshot_draw`'s
  rule (each class's images in the source's write order, permuted by
  Random("vipamin_scale.fewshot/<draw>/<class name>"), the first `shots` kept), so the draws are nested
  in k and the same for a draw wherever and whenever they are made. Their bytes are copied as the
  source stores them (no decode, no re-encoding) and written as `write_dataset` writes a split (seed =
  draw), with fresh keys `train_00000000`, ...
* every other split of the source (val, test, ...): the source's own, never read, copied or rewritten:
  its shard and DALI index files are symlinks to the source's files (absolute paths) and its manifest
  entry is the source's, so its keys check out. (A source split named `train` besides `split` has no
  place there and is left out.)
* manifest.json: what `write_dataset` writes, the linked splits' entries, and protocol "fewshot",
  shots, seed (the draw), source (the source directory, resolved), source_split, source_digest (per
  file: the SHA-256 of the source's manifest.json and classes.json, the size of each shard file of the
  drawn split), drawn (the source keys drawn, class by class) and linked (the splits that are the
  source's).

Drawing reads the labels of the drawn split only (each sample's `.cls` member, found through the tar
headers), then the chosen images. A class with fewer than `shots` images is one error line naming it.

Written once: built in a temporary directory beside the target and renamed into place while holding
an exclusive lock on `<out_dir>/.lock`, so processes asking at once wait for the one writing and then
find its draw. A later call checks the draw against the request (source, split, shots, draw) and
against the source as it is now (`source_digest`): a difference is one DataError line naming the
directory and what differs; remove the directory to draw again.
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from vipamin_scale.data.protocols import fewshot_draw
from vipamin_scale.data.shards import (CLASSES, IMAGE_EXTS, MANIFEST, DataError, StoredImage, dataset_info,
                                       index_name, sample_key, tar_samples, write_dataset)
from vipamin_scale.paths import atomic_write_bytes, exclusive_lock

__all__ = ["fewshot_root", "draw_dir", "is_shard_dir", "source_digest"]

PROTOCOL = "fewshot"
LOCK = ".lock"

# One sample of the source: (its key, (shard file, image data offset, image size, image extension), class name)
Located = tuple[str, tuple[Path, int, int, str], str]


def draw_dir(out_dir: str | Path, shots: int, draw: int) -> Path:
    """Where `fewshot_root` puts draw `draw` of `shots` shots (the name `vipamin-scale shards --protocol
    fewshot` gives its draws)."""
    return Path(out_dir) / f"{shots}shot_seed{draw}"


def is_shard_dir(path: str | Path) -> bool:
    """Whether `path` is a shard directory (it holds manifest.json and classes.json)."""
    path = Path(path)
    return (path / MANIFEST).is_file() and (path / CLASSES).is_file()


def fewshot_root(source_root: str | Path, shots: int, draw: int, out_dir: str | Path, *,
                 split: str = "train") -> Path:
    """The shard directory of draw `draw` of `shots` images per class from `source_root`'s `split` split,
    written once under `out_dir` and reused (module docstring). Raises one DataError line on a bad source,
    a class with fewer than `shots` images, or a directory that holds another draw or was drawn from a
    source that has changed since."""
    source_root, out_dir = Path(source_root), Path(out_dir)
    try:
        shots, draw = operator.index(shots), operator.index(draw)
    except TypeError:
        raise DataError(f"shots, draw: must be integers; got {shots!r}, {draw!r}") from None
    if shots < 1:
        raise DataError(f"shots: must be >= 1; got {shots}")
    info = dataset_info(source_root)
    if split not in info["splits"]:
        raise DataError(f"{source_root / MANIFEST}: no split {split!r} to draw from; it has {sorted(info['splits'])}")
    request = {"source": str(source_root.resolve()), "source_split": split, "shots": shots, "seed": draw}
    target = draw_dir(out_dir, shots, draw)
    if not (target / MANIFEST).is_file():
        chosen = _draw(source_root, info, split, shots, draw)  # bad data or a small class: nothing written yet
        with exclusive_lock(out_dir / LOCK):
            if not (target / MANIFEST).is_file():
                _write_draw(source_root, info, request, chosen, target)
                return target
    _check_reuse(target, request, source_digest(source_root, info, split))
    return target


def source_digest(source_root: Path, info: dict[str, Any], split: str) -> dict[str, str]:
    """{file: what it is now} for what a draw depends on: the SHA-256 of manifest.json and classes.json,
    and the byte size of each shard file of `split` (a split rewritten with other images under the same
    manifest changes them)."""
    out = {name: "sha256 " + hashlib.sha256((source_root / name).read_bytes()).hexdigest() for name in (MANIFEST, CLASSES)}
    for shard in info["splits"][split]["shards"]:
        path = source_root / shard
        out[shard] = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
    return out


def _check_reuse(target: Path, request: dict[str, Any], digest: dict[str, str]) -> None:
    manifest = dataset_info(target)["manifest"]
    for key, want in request.items():
        if manifest.get(key) != want:
            raise DataError(f"{target}: holds a draw with {key}={manifest.get(key)!r}, not {want!r}; use another "
                            f"directory, or remove it to draw again")
    old = manifest.get("source_digest") or {}
    changed = [name for name in sorted(set(old) | set(digest)) if old.get(name) != digest.get(name)]
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise DataError(f"{target}: its source {request['source']} changed since this draw was made ({shown}); "
                        f"remove {target} to draw again from the source as it is now, or restore the source")


def _draw(source_root: Path, info: dict[str, Any], split: str, shots: int, draw: int) -> list[Located]:
    """The samples of draw `draw` (`protocols.fewshot_draw` over `split`'s labels), class by class."""
    located = _labels(source_root, info, split)
    present = {name for _, _, name in located}
    missing = [name for name in info["classes"] if name not in present]
    where = f"{source_root / MANIFEST} ({split} split)"
    if missing:
        raise DataError(f"{where}: class {missing[0]!r}: 0 training images, fewer than {shots} shots")
    try:
        return fewshot_draw(located, shots, draw)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def _write_draw(source_root: Path, info: dict[str, Any], request: dict[str, Any], chosen: list[Located],
                target: Path) -> None:
    """Build the draw in a temporary directory beside `target`, then rename it into place."""
    split, draw = request["source_split"], request["seed"]
    digest = source_digest(source_root, info, split)
    label = {name: i for i, name in enumerate(info["classes"])}
    samples = []
    for key, (path, offset, size, ext), name in chosen:
        with open(path, "rb") as f:
            f.seek(offset)
            samples.append((f"{path}: key {key}", StoredImage(f.read(size), ext), label[name]))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        manifest = write_dataset({"train": samples}, info["classes"], tmp, seed=draw, extra={
            "protocol": PROTOCOL, **request, "source_digest": digest, "drawn": [key for key, _, _ in chosen]})
        linked = {name: entry for name, entry in info["splits"].items() if name not in (split, "train")}
        for entry in linked.values():
            for shard in entry["shards"]:
                for name in (shard, index_name(shard)):
                    if (source_root / name).exists():
                        _link(source_root / name, tmp / name)
        manifest["splits"].update(linked)
        manifest["linked"] = sorted(linked)
        atomic_write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        dataset_info(tmp)  # complete and readable before it becomes visible
        try:
            os.rename(tmp, target)
        except OSError as exc:
            raise DataError(f"{target}: exists and is not a draw (no {MANIFEST}); remove it or use another "
                            f"directory ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link(source: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(source.resolve(), link)
    except FileExistsError:
        raise DataError(f"{source}: its name is taken by the drawn split's files in {link.parent}") from None


def _labels(source_root: Path, info: dict[str, Any], split: str) -> list[Located]:
    """Every sample of `split` in write order with its label's class name and where its image lies,
    from the tar headers and the `.cls` members alone; keys and counts checked against the manifest."""
    entry, classes = info["splits"][split], info["classes"]
    out: list[Located] = []
    for shard, count in zip(entry["shards"], entry["shard_counts"]):
        path = source_root / shard
        if not path.is_file():
            raise DataError(f"{path}: shard file missing (listed in {source_root / MANIFEST})")
        samples, _ = tar_samples(path)
        if len(samples) != count:
            raise DataError(f"{path}: holds {len(samples)} samples where {source_root / MANIFEST} lists {count}")
        with open(path, "rb") as f:
            for components in samples:
                want = sample_key(split, len(out))
                first = components[0][3]
                dot = first.find(".", first.rfind("/") + 1)
                key = first[:dot] if dot >= 0 else first
                if key != want:
                    raise DataError(f"{path}: key {key} where {want} was expected: shard and {MANIFEST} do not match")
                parts = {ext: (offset, size) for ext, offset, size, _ in components}
                if "cls" not in parts:
                    raise DataError(f"{path}: key {key}: no label (.cls) in the sample")
                f.seek(parts["cls"][0])
                raw = f.read(parts["cls"][1])
                try:
                    label = int(raw)
                except ValueError:
                    raise DataError(f"{path}: key {key}: label {raw[:20]!r} is not an integer") from None
                if not 0 <= label < len(classes):
                    raise DataError(f"{path}: key {key}: label {label} outside [0, {len(classes)})")
                ext = next((e for e in IMAGE_EXTS if e in parts), None)
                if ext is None:
                    raise DataError(f"{path}: key {key}: no image (.jpg or .png) in the sample; it has {sorted(parts)}")
                out.append((key, (path, *parts[ext], ext), classes[label]))
    return out
