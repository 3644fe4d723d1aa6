"""The DALI loader over the same WebDataset shards (`data.backend=dali`): DALI's `fn.readers.webdataset`
reads the tars through index files, `fn.decoders.image` decodes on the GPU (`device="mixed"`) when CUDA
is available and on the CPU otherwise (a `device_id=None` pipeline), DALI's PyTorch iterator hands
the batches over. Same contract as `data.wds.ShardLoader`:

    loader = build_loader(cfg.data, "train", train=True, ...)      # data.backend=dali
    loader.set_epoch(e); len(loader); loader.num_samples
    for images, labels, keys in loader:   # float32 (B,3,H,W) (on the GPU when decoding there), int64 (B,), list[str]

Which samples (the same as the webdataset backend)
--------------------------------------------------
A split union ("train+val") is the same concatenated stream as there (see `data.wds`); keys are
checked per shard against its own split (`LoaderSpec.expected_key`).
One DALI pipeline per rank, so a rank is one slot: it reads `plan_slot(..., num_workers=0)`'s
batches, one after another. Per rank and step the keys, and their order, are exactly the webdataset
backend's (whatever its data.num_workers), so

* eval (train=False): every sample of the split (after limit) exactly once per epoch across ranks,
  in stream order; ceil(N / B) global batches (B = data.eval_batch_size per rank), only the last one short;
* train: data.batch_size is the global batch; every rank floor(N / B) batches of B / world_size, its
  slice of each global batch of `train_batches` (a function of seed and epoch, not of the layout),
  each sample at most once per epoch.

DALI's own sharding (`shard_id`/`num_shards`) cuts the sample list into equal contiguous parts and
pads or wraps around at the end, and its `random_shuffle` draws from a buffer that carries samples
over epoch boundaries (a sample can come twice in an "epoch" and another not at all), so neither is
used. Instead, for every epoch we write small index files (the v1.2 format of `data.shards`) that
list exactly the rank's samples in the order they are to be read, each line pointing into the
shard's tar; the reader runs on one "DALI shard" with no shuffling and reads them in that order.

Augmentation (data.augment) is DALI's random resized crop (bicubic, area 0.08..1, aspect 3/4..4/3)
+ flip with probability 1/2, from a pipeline seed of (seed, epoch, rank): reproducible for the same
layout, not the same draws as torchvision's, and (unlike the webdataset backend's per-key seeds) not
the same draws at another world size.

Eval transform (as `transforms.EvalTransform`): shorter side to img_size by torchvision's rule (longer
side int(S * long / short)), bicubic with antialiasing, center crop with torchvision's offsets
(round half to even), (x / 255 - mean) / std, CHW float32. An image already S x S is untouched.
Decoding follows `data.shards.to_rgb`'s rule (alpha dropped, 16-bit scaled by 1/257): the same pixels
as PIL within one level for every mode the writer stores (JPEG decoders may differ by a level or two).
Resampled images differ from PIL's by a mean under one level of 255 and a few levels at edges:
tests/test_dali.py states the bound it checks.

Index files: each shard's `.idx` beside its tar (written by `data.shards`), or, when absent or older
than the tar, built from the tar into `<cache>/dali_index/`. The index is checked against the
manifest (count, keys) and the file size before a pipeline is built.

data.num_workers is the number of DALI CPU threads (at least 1). A new pipeline is built for each
iteration (an epoch's index files differ), and one more after a bad image (below).

Bad data (data.on_error), as the webdataset backend, with these differences:
* found before the first batch, from the index (the rank's part of the epoch is checked up front):
  missing shard file, truncated shard (samples missing from the tar, or data past its end), a key
  that does not match the manifest, a sample without image or without label. raise: one DataError
  naming shard and key; skip: counted per rank and epoch (data.max_skip as in wds), the position
  kept: it is read as a copy of another sample of the epoch and dropped from its batch.
* bad label text or value: after the batch is read; named with shard and key, skipped the same way.
* undecodable image: DALI aborts the pipeline without saying which sample. The loader then decodes
  the batch it was reading (and the prefetched ones) with PIL from the tar, names the first image
  PIL cannot decode ("<shard>: key <key>: cannot decode the png image (...)") and raises, or (skip)
  counts it, and builds a new pipeline that resumes at that batch with the bad sample replaced as
  above. When PIL can decode all of them, one DataError line names the shards and keys of the batch
  and quotes DALI's reason.
Batches keep their boundaries: a skipped sample shortens its batch; an empty batch is dropped, which
in training is an error (the ranks would fall out of step).
"""
from __future__ import annotations

import hashlib
import io
import logging
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from vipamin_scale.data.shards import (IMAGE_EXTS, MANIFEST, Component, DataError, dali_index_text, index_name,
                                       read_dali_index, tar_samples, to_rgb)
from vipamin_scale.data.wds import LoaderSpec, _Skips, loader_spec, plan_slot, rank_num_batches
from vipamin_scale.paths import atomic_write_bytes, cache_dir

__all__ = ["DaliLoader", "build_dali_loader", "shard_index"]

log = logging.getLogger("vipamin_scale.data")
READER = "reader"
PREFETCH = 2  # DALI's default prefetch_queue_depth: how many batches may run ahead of the one asked for


# ----------------------------------------------------------------------------------- index files


def _cached_index(tar: Path) -> Path:
    stat = tar.stat()
    digest = hashlib.blake2b(f"{tar.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode(), digest_size=10).hexdigest()
    return cache_dir() / "dali_index" / digest / index_name(tar.name)


def shard_index(tar: Path) -> tuple[list[list[Component]], str | None]:
    """A shard's samples as its DALI index lists them, and a reason when the tar could be read only in part.
    The `.idx` beside the tar is used when it is at least as new as the tar; else one is built into the
    cache (keyed by the tar's path, size and mtime)."""
    beside = tar.with_name(index_name(tar.name))
    if beside.is_file() and beside.stat().st_mtime_ns >= tar.stat().st_mtime_ns:
        return read_dali_index(beside), None
    cached = _cached_index(tar)
    if cached.is_file():
        return read_dali_index(cached), None
    samples, problem = tar_samples(tar, strict=False)
    if problem is None:  # only a complete read is worth keeping
        atomic_write_bytes(cached, dali_index_text(samples).encode())
    else:  # the read stopped inside the last sample: it may lack members
        samples = samples[:-1]
    return samples, problem


@dataclass
class _Entry:
    """One position of the rank's epoch: the sample it should be, and what the pipeline reads for it."""

    shard: int
    pos: int
    key: str
    tar: Path
    image: Component | None = None  # None: the position is lost (or found bad) and is dropped
    label: Component | None = None

    @property
    def good(self) -> bool:
        return self.image is not None


def _dali_reason(exc: BaseException) -> str:
    """The line of a DALI pipeline error that says what went wrong."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if "encountered:" in lines:
        rest = lines[lines.index("encountered:") + 1:]
        if rest:
            return rest[0]
    return next((ln for ln in lines if "no longer valid" not in ln and "Critical error" not in ln), "") or \
        (lines[0] if lines else type(exc).__name__)


# ----------------------------------------------------------------------------------- the loader


class DaliLoader:
    """Iterable of (images float32 (B,3,H,W), labels int64 (B,), keys list[str]) for one rank, read by DALI.

    `len()`: batches this rank yields per epoch (as ShardLoader); `num_samples`: the split's size after limit.
    """

    def __init__(self, spec: LoaderSpec, *, device_id: int | None, num_threads: int):
        self.spec = spec
        self.split, self.train, self.batch_size = spec.split, spec.train, spec.batch_size
        self.num_samples = spec.num_samples
        self.device_id = device_id
        self.num_threads = max(1, int(num_threads))
        self._epoch = 0
        self._indexes: dict[int, tuple[list[list[Component]], str | None]] = {}
        self._len = rank_num_batches(self.num_samples, batch_size=spec.batch_size, train=spec.train,
                                     world_size=spec.world_size, rank=spec.rank)
        self._tmp = Path(tempfile.mkdtemp(prefix="vipamin_dali_"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration yields (training order and augmentation depend on it)."""
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        s = self.spec
        device = "cpu" if self.device_id is None else f"cuda:{self.device_id}"
        return (f"DaliLoader(split={s.split!r}, train={s.train}, num_samples={self.num_samples}, "
                f"batch_size={s.batch_size}, batches={len(self)}, rank={s.rank}/{s.world_size}, "
                f"device={device}, threads={self.num_threads}, root={str(s.root)!r})")

    # -------------------------------------------------------------------- the epoch's positions

    def _index(self, shard: int) -> tuple[list[list[Component]], str | None]:
        if shard not in self._indexes:
            self._indexes[shard] = shard_index(self.spec.root / self.spec.shards[shard])
        return self._indexes[shard]

    def _entries(self, skips: _Skips) -> tuple[list[_Entry], int]:
        """The rank's positions of this epoch in reading order (`plan_slot`'s batches, one after another),
        checked against the index (shard by shard, in stream order); and the batch count."""
        s = self.spec
        plan = plan_slot(s.counts, batch_size=s.batch_size, train=s.train, world_size=s.world_size, rank=s.rank,
                         num_workers=0, worker=0, seed=s.seed, epoch=self._epoch, shuffle_buffer=s.shuffle_buffer)
        checked: dict[tuple[int, int], _Entry] = {}
        for shard, positions in plan.reads:
            checked.update(((shard, e.pos), e) for e in self._check_segment(shard, list(positions), skips))
        return [checked[sample] for batch in plan.batches for sample in batch], plan.num_batches

    def _check_segment(self, shard: int, positions: list[int], skips: _Skips) -> list[_Entry]:
        s = self.spec
        tar = s.root / s.shards[shard]
        expected = s.shard_counts[shard]
        entries = [_Entry(shard, p, s.expected_key(shard, p), tar) for p in positions]
        if not tar.is_file():
            skips.bad(DataError(f"{tar}: shard file missing (listed in {s.root / MANIFEST})"), len(entries))
            return entries
        samples, problem = self._index(shard)
        size = tar.stat().st_size
        lost_from = expected  # first position that cannot be read, and why
        why = ""
        for p in range(expected):
            want = s.expected_key(shard, p)
            if p >= len(samples) and problem:
                why = f"{tar}: unreadable at key {want} (sample {p} of {expected}): {problem.splitlines()[0]}"
            elif p >= len(samples):
                why = (f"{tar}: ends before key {want}, after {p} of the {expected} samples {MANIFEST} lists: "
                       f"truncated shard?")
            else:
                key = samples[p][0][3].split(".", 1)[0] if samples[p] else ""
                end = max(offset + n for _, offset, n, _ in samples[p])
                if key != want:
                    why = f"{tar}: key {key} where {want} was expected: shard and {MANIFEST} do not match"
                elif end > size:
                    why = (f"{tar}: unreadable at key {want} (sample {p} of {expected}): the data ends at byte "
                           f"{size}, the index wants {end}: truncated shard?")
            if why:
                lost_from = p
                break
        lost = [e for e in entries if e.pos >= lost_from]
        if lost:
            skips.bad(DataError(why), len(lost))
        for e in entries:
            if e.pos >= lost_from:
                continue
            parts = {c[0]: c for c in samples[e.pos]}
            image = next((parts[x] for x in IMAGE_EXTS if x in parts), None)
            where = f"{tar}: key {e.key}"
            if image is None:
                skips.bad(DataError(f"{where}: no image (.jpg or .png) in the sample; it has {sorted(parts)}"))
            elif "cls" not in parts:
                skips.bad(DataError(f"{where}: no label (.cls) in the sample"))
            else:
                e.image, e.label = image, parts["cls"]
        return entries

    # -------------------------------------------------------------------- pipelines

    def _pipeline(self, entries: Sequence[_Entry], filler: _Entry) -> Any:
        """A built DALI pipeline reading `entries` in order (bad ones read as `filler`), with its iterator."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        runs: list[tuple[Path, list[str]]] = []  # consecutive positions of one tar -> one index file
        for e in entries:
            src = e if e.good else filler
            line = " ".join(f"{c[0]} {c[1]} {c[2]} {c[3]}" for c in (src.image, src.label))
            if runs and runs[-1][0] == src.tar:
                runs[-1][1].append(line)
            else:
                runs.append((src.tar, [line]))
        folder = Path(tempfile.mkdtemp(dir=self._tmp))
        index_paths = []
        for i, (_, lines) in enumerate(runs):
            path = folder / f"{i:06d}.idx"
            path.write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
            index_paths.append(str(path))
        try:
            pipe = self._graph([str(tar) for tar, _ in runs], index_paths)
            iterator = DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER, auto_reset=False,
                                           last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=False)
        finally:  # the reader has parsed the index files when the pipeline is built
            shutil.rmtree(folder, ignore_errors=True)
        return iterator

    def _graph(self, paths: list[str], index_paths: list[str]) -> Any:
        from nvidia.dali import fn, types
        from nvidia.dali import math as dmath
        from nvidia.dali.pipeline import Pipeline

        s = self.spec
        S = s.img_size
        gpu = self.device_id is not None
        seed = int.from_bytes(hashlib.blake2b(f"{s.seed}/{self._epoch}/{s.rank}".encode(), digest_size=4).digest(),
                              "little") & 0x7FFFFFFF
        pipe = Pipeline(batch_size=s.rank_batch_size, num_threads=self.num_threads, device_id=self.device_id, seed=seed,
                        prefetch_queue_depth=PREFETCH)
        mean = [255.0 * m for m in s.mean]
        std = [255.0 * x for x in s.std]
        with pipe:
            raw, cls = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=["jpg;png", "cls"],
                                             missing_component_behavior="error", name=READER)
            if gpu:
                img = fn.decoders.image(raw, device="mixed", output_type=types.RGB, jpeg_fancy_upsampling=True)
            else:
                img = fn.decoders.image(raw, device="cpu", output_type=types.RGB)
            if s.augment:
                img = fn.random_resized_crop(img, size=[S, S], random_area=[0.08, 1.0],
                                             random_aspect_ratio=[3 / 4, 4 / 3], interp_type=types.INTERP_CUBIC,
                                             antialias=True)
                img = fn.crop_mirror_normalize(img, mirror=fn.random.coin_flip(probability=0.5), mean=mean, std=std,
                                               dtype=types.FLOAT, output_layout="CHW")
            else:
                shape = fn.peek_image_shape(raw, dtype=types.INT32)  # H, W, C from the header
                h, w = shape[0], shape[1]
                short = dmath.min(h, w)
                new_h, new_w = (S * h) // short, (S * w) // short  # torchvision: int(S * long / short)
                img = fn.resize(img, size=fn.cast(fn.stack(new_h, new_w), dtype=types.FLOAT),
                                interp_type=types.INTERP_CUBIC, antialias=True)

                def center(d):  # torchvision's int(round(d / 2)): half to even
                    q = d // 2
                    return q + (q % 2) * (d % 2)

                img = fn.slice(img, fn.stack(center(new_h - S), center(new_w - S)), fn.stack(0 * h + S, 0 * w + S),
                               axes=[0, 1])
                img = fn.crop_mirror_normalize(img, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")
            pipe.set_outputs(img, fn.pad(cls, fill_value=0))
        return pipe

    # -------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        s = self.spec
        B = s.rank_batch_size
        skips = _Skips(s.on_error, s.max_skip, f"split {s.split} epoch {self._epoch} rank {s.rank} (dali)")
        entries, num_batches = self._entries(skips)
        made = 0
        batch = 0  # the next batch to read
        total = -(-len(entries) // B)
        while batch < total:
            filler = next((e for e in entries[batch * B:] if e.good), None)
            if filler is None:  # nothing left to read: every remaining batch would be empty
                break
            iterator = self._pipeline(entries[batch * B:], filler)
            failure = None
            while True:
                try:
                    out = next(iterator)
                except StopIteration:
                    break
                except DataError:
                    raise
                except RuntimeError as exc:  # DALI aborted the pipeline (an undecodable image, ...)
                    failure = exc
                    break
                result = self._batch(out[0], entries[batch * B:(batch + 1) * B], skips)
                batch += 1
                if result is not None:
                    made += 1
                    yield result
            del iterator
            if failure is None:
                break
            self._find_bad(entries[batch * B:(batch + 1 + PREFETCH) * B], failure, skips)
        if s.train and made < num_batches:
            raise DataError(f"{skips.count} bad samples left {skips.where} with {made} of {num_batches} "
                            f"batches; the ranks would fall out of step")

    def _batch(self, out: dict[str, torch.Tensor], chunk: Sequence[_Entry],
               skips: _Skips) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
        images, raw_labels = out["images"], out["labels"]
        if images.shape[0] != len(chunk):
            raise DataError(f"{self.spec.root}: DALI returned {images.shape[0]} samples where {len(chunk)} were read "
                            f"(keys {chunk[0].key}..{chunk[-1].key})")
        keep, labels, keys = [], [], []
        for row, (e, text) in enumerate(zip(chunk, raw_labels.cpu().numpy())):
            if not e.good:
                continue
            where = f"{e.tar}: key {e.key}"
            data = bytes(text).rstrip(b"\0")
            try:
                label = int(data)
            except ValueError:
                skips.bad(DataError(f"{where}: label {data[:20]!r} is not an integer"))
                continue
            if not 0 <= label < self.spec.num_classes:
                skips.bad(DataError(f"{where}: label {label} outside [0, {self.spec.num_classes})"))
                continue
            keep.append(row)
            labels.append(label)
            keys.append(e.key)
        if not keep:
            return None
        if len(keep) < len(chunk):
            images = images[torch.tensor(keep, device=images.device)]
        return images, torch.tensor(labels, dtype=torch.int64), keys

    def _find_bad(self, window: Sequence[_Entry], failure: RuntimeError, skips: _Skips) -> None:
        """After DALI aborted: decode the window's images with PIL; name (raise) or drop (skip) the bad ones."""
        reason = _dali_reason(failure)
        found = 0
        for e in window:
            if not e.good:
                continue
            ext, offset, size, _ = e.image
            try:
                with open(e.tar, "rb") as f:
                    f.seek(offset)
                    data = f.read(size)
                with Image.open(io.BytesIO(data)) as im:
                    to_rgb(im)
            except Exception as exc:  # PIL raises many types for bad data
                found += 1
                e.image = e.label = None
                skips.bad(DataError(f"{e.tar}: key {e.key}: cannot decode the {ext} image ({type(exc).__name__}: "
                                    f"{exc}; DALI: {reason})"))
        if not found:
            tars = sorted({str(e.tar) for e in window})
            raise DataError(f"{', '.join(tars)}: DALI failed reading keys {window[0].key}..{window[-1].key}, which "
                            f"PIL decodes: {reason}")


def build_dali_loader(data_cfg: Any, split: str, *, train: bool, img_size: int, mean: Sequence[float],
                      std: Sequence[float], rank: int = 0, world_size: int = 1, seed: int = 0,
                      limit: int | None = None, batch_size: int | None = None) -> DaliLoader:
    """`data.wds.build_loader`'s arguments and checks; decodes on the current CUDA device when there is one."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise DataError("data.backend=dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)") from None
    spec = loader_spec(data_cfg, split, train=train, img_size=img_size, mean=mean, std=std, rank=rank,
                       world_size=world_size, seed=seed, limit=limit, batch_size=batch_size)
    device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
    return DaliLoader(spec, device_id=device_id, num_threads=spec.num_workers)
