"""The CPU loader over WebDataset shards (`data.backend=wds`): tar reading by the `webdataset`
library, PIL decoding, torch DataLoader workers.

    loader = build_loader(cfg.data, "train", train=True, img_size=224, mean=m, std=s,
                          rank=r, world_size=w, seed=cfg.train.seed)
    for epoch in range(E):
        loader.set_epoch(epoch)
        for images, labels, keys in loader:   # float32 (B,3,H,W), int64 (B,), list[str]
            ...

How an epoch is cut (pure functions below, `plan_slot`; no torch, so another backend can reuse them)
-----------------------------------------------------------------------------------------------
A "slot" is one (rank, DataLoader worker) pair: world_size x max(1, data.num_workers) slots.
The split's samples (after `limit`, which keeps the first `limit` in global write order) form one
stream of N positions (`epoch_order`). `plan_slot` says which samples a slot yields, batch by batch
(`SlotPlan.batches`), and which it reads (`SlotPlan.reads`: shard visits in stream order, the
positions to keep of each). Only a slot's own samples are decoded.

train=True: the order is a function of (seed, epoch) alone, never of the layout (world size,
  data.num_workers), so the same config trains the same prompts at every world size.
  * The stream: shards permuted and rotated by a random offset, both from (seed, epoch).
  * The global batches (`train_batches`): data.batch_size = B is the GLOBAL batch. The first
    floor(N / B) x B stream positions are cut into windows of k = max(1, data.shuffle_buffer // B)
    global batches; each window is permuted from (seed, epoch, window) (no permutation when
    shuffle_buffer <= 1) and cut into its k batches; a batch lists its positions in stream order.
    The N mod B positions at the end of the rotated stream are left out (a different set each
    epoch); every other sample comes exactly once per epoch.
  * Rank r takes positions [r x b, (r + 1) x b) of every global batch, b = B / world_size (B must
    be a multiple of the world size: a ConfigError naming data.batch_size otherwise), so every rank
    yields floor(N / B) batches of b (an error when N < B) and the ranks' gradients average to the
    world-1 gradient of the global batch.
  * Within a rank, worker w of W takes the rank's batches w, w + W, w + 2W, ...: the DataLoader's
    round-robin over its workers yields them in global order, so the worker count changes neither
    the samples nor their order.
  * Reading: a slot decodes only its own samples, each once. It reads (tar bytes, not decoded) the
    samples in between that are at most SEEK_GAP apart, and seeks over longer gaps with the DALI
    index beside the tar (`seek_runs`; `vipamin-scale shards` writes one). Without a fresh index a
    shard is read from its start through the slot's last sample in it: at most the whole stream
    per slot. A batch lists its positions in stream order, so rank r's slice of it lies mostly in
    the r-th 1/world of its window. Read samples wait in memory (raw bytes) until their batch is
    complete: about a window's worth at most.
  Iterating the same epoch twice gives the same batches in the same order, so a resumed run can
  skip the first n batches and continue exactly, at any world size (n counts global batches).
  Augmentation (data.augment, off by default) draws from a seed of (seed, epoch, key).
train=False (eval, calibration): the stream is the shards in manifest order; batch_size
  (data.eval_batch_size) is per rank. The ceil(N / B) batches of consecutive positions are dealt
  to ranks in contiguous blocks, and each rank's block to its workers in contiguous blocks (the
  worker that the DataLoader's round-robin visits last holds the rank's final batch, so the only
  short batch comes out last); a worker reads only the shards that overlap its range. Every sample
  of the split (after limit) is yielded exactly once per epoch across all ranks x workers, nothing
  dropped; ranks' batch counts differ by at most one. Order is deterministic and independent of
  the epoch.

Split unions (`"train+val"`: any number of distinct split names of manifest.json joined by `+`;
for the final run on train+val after choosing hyper-parameters on val):
* the stream is the first split's shards (in manifest order), then the second's, and so on;
  everything above (slot plan, shuffling, eval exactly-once, batch counts) works on that
  concatenated stream unchanged;
* `limit` applies to the FIRST split only: `train+val` with limit 320 is the 320 samples a `train`
  run with limit 320 reads, plus all of val;
* keys are checked as for one split: each shard's expected key uses its own split's name and its
  offset within that split (`LoaderSpec.expected_key`);
* an unknown, repeated or empty component is a DataError (naming manifest.json and the component)
  when the loader is built; messages that name the split print the whole expression.

Bad data (data.on_error):
* raise (default): the first problem stops the epoch with one `DataError` line naming the shard
  file and the key (for an unreadable tar, the key it could not read): a corrupt image, a missing
  or bad label, a truncated tar, a shard file listed in manifest.json but absent (checked when
  the loader is built).
* skip: the bad sample (or the unreadable rest of a shard, or a missing shard) is left out,
  logged on the `vipamin_scale.data` logger, and counted per worker and epoch; more than
  data.max_skip (0 = no limit) is an error. A batch is its planned positions whether or not
  they are good, so skipping shortens a batch but keeps the batch count; a batch left with no
  good sample is dropped, which in training is an error (the ranks would fall out of step).
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import io
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from vipamin_scale.config import ConfigError, check_global_batch
from vipamin_scale.data.shards import (CLASSES, IMAGE_EXTS, MANIFEST, DataError, dataset_info, index_name,
                                       read_dali_index, sample_key, to_rgb)
from vipamin_scale.data.transforms import EvalTransform, eval_transform, train_transform

__all__ = ["build_loader", "dataset_info", "resolve_root", "ShardLoader", "DataError", "Segment", "SlotPlan",
           "plan_slot", "epoch_order", "train_batches", "rank_slice", "limit_counts", "LoaderSpec", "loader_spec",
           "split_components", "check_splits"]

log = logging.getLogger("vipamin_scale.data")


# ----------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of shard number `shard` (positions inside the shard, write order)."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


Sample = tuple[int, int]  # (shard number, position inside the shard in write order)


@dataclass(frozen=True)
class SlotPlan:
    """What one (rank, worker) slot yields in one epoch, and what it reads to get there.

    batches: the samples of each batch the slot yields, in the order it yields them.
    reads: the shard visits in stream order, (shard, positions kept in increasing order); the reader
      (`_ShardStream._read`) keeps (decodes) only those."""

    batches: tuple[tuple[Sample, ...], ...]
    reads: tuple[tuple[int, tuple[int, ...]], ...]

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    @property
    def num_samples(self) -> int:
        return sum(len(b) for b in self.batches)


def limit_counts(shard_counts: Sequence[int], limit: int | None) -> list[int]:
    """Samples per shard when only the first `limit` samples (global write order) are kept."""
    if limit is None:
        return list(shard_counts)
    out, left = [], limit
    for c in shard_counts:
        out.append(min(c, left))
        left -= out[-1]
    return out


def _slice(order: Sequence[Segment], lo: int, hi: int) -> list[Segment]:
    """The segments covering stream positions [lo, hi) of `order`."""
    out, pos = [], 0
    for seg in order:
        a, b = max(lo, pos), min(hi, pos + len(seg))
        if a < b:
            out.append(Segment(seg.shard, seg.start + a - pos, seg.start + b - pos))
        pos += len(seg)
    return out


def epoch_order(counts: Sequence[int], *, train: bool, seed: int, epoch: int) -> list[Segment]:
    """The epoch's stream: shards in manifest order (eval), or permuted and rotated from (seed, epoch) (train)."""
    order = [Segment(i, 0, c) for i, c in enumerate(counts) if c > 0]
    if not train or not order:
        return order
    rng = random.Random(f"vipamin_scale.wds.order/{seed}/{epoch}")
    rng.shuffle(order)
    n = sum(counts)
    offset = rng.randrange(n)
    return _slice(order, offset, n) + _slice(order, 0, offset)


def train_batches(num_samples: int, *, batch_size: int, shuffle_buffer: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """The epoch's global training batches as stream positions (into `epoch_order`), a function of
    (N, B, shuffle_buffer, seed, epoch) only: floor(N / B) batches of B = data.batch_size. The first
    floor(N / B) x B positions are cut into windows of k = max(1, shuffle_buffer // B) global batches
    (the last window may hold fewer); each window is permuted from (seed, epoch, window) (not when
    shuffle_buffer <= 1) and cut into its batches; a batch lists its positions in increasing order."""
    n_batches = num_samples // batch_size
    k = max(1, shuffle_buffer // batch_size)
    out: list[list[int]] = []
    for window, first in enumerate(range(0, n_batches, k)):
        last = min(first + k, n_batches)
        positions = list(range(first * batch_size, last * batch_size))
        if shuffle_buffer > 1:
            random.Random(f"vipamin_scale.wds.window/{seed}/{epoch}/{window}").shuffle(positions)
        out += [sorted(positions[j * batch_size:(j + 1) * batch_size]) for j in range(last - first)]
    return out


def rank_slice(batch: Sequence[Any], rank: int, world_size: int) -> Sequence[Any]:
    """Rank `rank`'s part of a global training batch: positions [rank x b, (rank + 1) x b), b = B / world."""
    b = len(batch) // world_size
    return batch[rank * b:(rank + 1) * b]


def _blocks(total: int, parts: int) -> list[tuple[int, int]]:
    """`total` items cut into `parts` contiguous (start, count) blocks, the first ones one larger."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for p in range(parts):
        n = base + (p < extra)
        out.append((start, n))
        start += n
    return out


def _worker_blocks(total: int, workers: int) -> list[tuple[int, int]]:
    """A rank's `total` batches as contiguous (start, count) blocks per worker, sized as in `_blocks`,
    laid out so that the worker the DataLoader's round-robin visits last holds the final block
    (so a short final batch comes out last)."""
    sizes = [n for _, n in _blocks(total, workers)]
    extra = total % workers
    last = extra - 1 if extra else workers - 1
    starts, start = {}, 0
    for w in [w for w in range(workers) if w != last] + [last]:
        starts[w], start = start, start + sizes[w]
    return [(starts[w], sizes[w]) for w in range(workers)]


def plan_slot(counts: Sequence[int], *, batch_size: int, train: bool, world_size: int, rank: int,
              num_workers: int, worker: int, seed: int, epoch: int, shuffle_buffer: int = 0) -> SlotPlan:
    """What worker `worker` (of max(1, num_workers)) of `rank` yields and reads in `epoch`; see the
    module docstring. batch_size: global (train) or per rank (eval); shuffle_buffer: train only."""
    slots = max(1, num_workers)
    order = epoch_order(counts, train=train, seed=seed, epoch=epoch)
    starts = [0]
    for seg in order:
        starts.append(starts[-1] + len(seg))
    if train:
        check_global_batch(batch_size, world_size)
        mine = [list(rank_slice(b, rank, world_size)) for b in train_batches(
            sum(counts), batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed, epoch=epoch)[worker::slots]]
    else:
        n = sum(counts)
        rank_start, rank_n = _blocks(math.ceil(n / batch_size), world_size)[rank]
        w_start, w_n = _worker_blocks(rank_n, slots)[worker]
        first = rank_start + w_start
        mine = [list(range(g * batch_size, min((g + 1) * batch_size, n))) for g in range(first, first + w_n)]

    def locate(p: int) -> Sample:
        i = bisect.bisect_right(starts, p) - 1
        return order[i].shard, order[i].start + p - starts[i]

    reads: list[tuple[int, list[int]]] = []
    for p in sorted(p for b in mine for p in b):
        shard, pos = locate(p)
        if reads and reads[-1][0] == shard and reads[-1][1][-1] < pos:
            reads[-1][1].append(pos)
        else:
            reads.append((shard, [pos]))
    return SlotPlan(tuple(tuple(locate(p) for p in b) for b in mine), tuple((s, tuple(ps)) for s, ps in reads))


def rank_num_batches(num_samples: int, *, batch_size: int, train: bool, world_size: int, rank: int) -> int:
    """Batches rank `rank` yields per epoch: floor(N / B) on every rank (train, B global), its share of
    ceil(N / B) (eval, B per rank)."""
    if train:
        return num_samples // batch_size
    return _blocks(math.ceil(num_samples / batch_size), world_size)[rank][1]


# ----------------------------------------------------------------------------------- reading


@dataclass
class _Failure:
    """A worker's DataError, passed through the DataLoader as data so the message stays one line."""

    message: str


class _Skips:
    """data.on_error: raise the error, or count it (per worker and epoch) and go on."""

    def __init__(self, on_error: str, max_skip: int, where: str):
        self.on_error, self.max_skip, self.where, self.count = on_error, max_skip, where, 0

    def bad(self, exc: DataError, n: int = 1) -> None:
        if self.on_error != "skip":
            raise exc
        self.count += n
        log.warning("skipped %d sample(s) (%d so far in %s): %s", n, self.count, self.where, exc)
        if self.max_skip and self.count > self.max_skip:
            raise DataError(f"{exc} [{self.count} bad samples in {self.where}, more than data.max_skip={self.max_skip}]")


SEEK_GAP = 4  # positions further apart than this start a new run (a seek) instead of being read through
_TAR_BLOCK = 512


@functools.lru_cache(maxsize=64)
def _header_offsets(idx_path: str, mtime_ns: int) -> tuple[int, ...]:
    """Per sample of a DALI index, the byte offset of its first member's tar header (-1: cannot tell)."""
    try:
        samples = read_dali_index(idx_path)
    except DataError:
        return ()
    # the header is the 512-byte block right before the data; a name too long for it has extra blocks
    return tuple(s[0][1] - _TAR_BLOCK if s and len(s[0][3]) < 100 else -1 for s in samples)


def seek_runs(tar: Path, positions: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first position, byte offset of its header, count) for runs of `positions` (increasing) no more than
    SEEK_GAP apart, from the DALI index beside the tar when it is at least as new as the tar; the runs stop
    where the index cannot place a position, and there are none without an index (read from the start)."""
    idx = tar.with_name(index_name(tar.name))
    try:
        if idx.stat().st_mtime_ns < tar.stat().st_mtime_ns:
            return []
    except OSError:
        return []
    offsets = _header_offsets(str(idx), idx.stat().st_mtime_ns)
    runs: list[list[int]] = []
    for k, p in enumerate(positions):
        if runs and p - positions[k - 1] <= SEEK_GAP:
            runs[-1][2] += 1
        elif p < len(offsets) and offsets[p] >= 0:
            runs.append([p, offsets[p], 1])
        else:
            break
    return [(a, b, c) for a, b, c in runs]


def _short(exc: BaseException) -> str:
    """One line for an exception from the tar readers (webdataset appends the stream to its args)."""
    text = str(exc.args[0]) if exc.args else ""
    return f"{type(exc).__name__}: {text.split(' @ ')[0]}".rstrip(": ").splitlines()[0]


def _aug_seed(seed: int, epoch: int, key: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "little")


class _ShardStream(IterableDataset):
    """Yields collated batches of one slot; the plan is made inside the worker (see plan_slot)."""

    def __init__(self, *, root: Path, split: str, shards: list[str], shard_counts: list[int], counts: list[int],
                 num_classes: int, batch_size: int, train: bool, world_size: int, rank: int, num_workers: int,
                 seed: int, shuffle_buffer: int, transform: EvalTransform, augment: bool, on_error: str,
                 max_skip: int, shard_splits: list[str] | None = None, shard_offsets: list[int] | None = None):
        super().__init__()
        self.root, self.split, self.shards, self.shard_counts, self.counts = root, split, shards, shard_counts, counts
        # per shard: the split it belongs to and its first sample's index within that split (see LoaderSpec)
        self.shard_splits = list(shard_splits) if shard_splits is not None else [split] * len(shards)
        self.offsets = (list(shard_offsets) if shard_offsets is not None
                        else [sum(shard_counts[:i]) for i in range(len(shard_counts))])
        self.num_classes, self.batch_size, self.train = num_classes, batch_size, train
        self.world_size, self.rank, self.num_workers, self.seed = world_size, rank, num_workers, seed
        self.shuffle_buffer, self.transform, self.augment = shuffle_buffer, transform, augment
        self.on_error, self.max_skip = on_error, max_skip
        self.epoch = 0

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        try:
            yield from self._batches(worker)
        except DataError as exc:
            yield _Failure(str(exc))

    def _batches(self, worker: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        plan = plan_slot(self.counts, batch_size=self.batch_size, train=self.train, world_size=self.world_size,
                         rank=self.rank, num_workers=self.num_workers, worker=worker, seed=self.seed,
                         epoch=self.epoch, shuffle_buffer=self.shuffle_buffer)
        skips = _Skips(self.on_error, self.max_skip,
                       f"split {self.split} epoch {self.epoch} rank {self.rank} worker {worker}")
        batch_of = {s: i for i, batch in enumerate(plan.batches) for s in batch}
        missing = [len(batch) for batch in plan.batches]  # samples of each batch not read yet
        held: dict[Sample, dict[str, Any]] = {}  # read (not decoded) samples waiting for their batch
        made = done = 0
        for shard, positions in plan.reads:  # stream order; a batch is complete once its last sample is read
            for pos, sample in self._read(shard, positions, skips):
                held[shard, pos] = sample
                missing[batch_of[shard, pos]] -= 1
                while done < len(missing) and missing[done] == 0:
                    out = self._collate([held.pop(s) for s in plan.batches[done]], skips)
                    done += 1
                    if out is not None:  # bad samples are left out of their batch; an empty one is dropped
                        made += 1
                        yield out
        if self.train and made < plan.num_batches:
            raise DataError(f"{skips.count} bad samples left {skips.where} with {made} of {plan.num_batches} "
                            f"batches; the ranks would fall out of step")

    def _collate(self, samples: list[dict[str, Any]],
                 skips: _Skips) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
        images: list[torch.Tensor] = []
        labels: list[int] = []
        keys: list[str] = []
        for sample in samples:
            if sample.get("__lost__"):
                continue
            try:
                image, label = self._decode(sample)
            except DataError as exc:
                skips.bad(exc)
            else:
                images.append(image)
                labels.append(label)
                keys.append(sample["__key__"])
        if not images:
            return None
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64), keys

    def _read(self, shard: int, positions: Sequence[int], skips: _Skips) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position, sample) for `positions` (increasing) of one shard, read with webdataset's tar iterators.
        With a fresh DALI index beside the tar (`seek_runs`), each run of nearby positions is read from its
        first sample's header on; otherwise, or when the index does not fit the tar, from the start of the
        tar (the errors and their messages are always those of that read). Samples in between are read,
        not kept."""
        path = self.root / self.shards[shard]
        if not path.is_file():
            skips.bad(DataError(f"{path}: shard file missing (listed in {self.root / MANIFEST})"), len(positions))
            yield from ((p, {"__lost__": True}) for p in positions)  # on_error=skip: keep the positions
            return
        i = 0
        for first, offset, n in seek_runs(path, positions):
            try:
                for pos, sample in self._scan(path, shard, offset, first, positions[i:i + n]):
                    yield pos, sample
                    i += 1
            except DataError:  # the index does not fit the tar: read the rest from the start instead
                break
        if i == len(positions):
            return
        try:
            for pos, sample in self._scan(path, shard, 0, 0, positions[i:]):
                yield pos, sample
                i += 1
        except DataError as error:
            lost = positions[i:]
            skips.bad(error, len(lost))
            yield from ((p, {"__lost__": True}) for p in lost)

    def _scan(self, path: Path, shard: int, offset: int, pos: int,
              wanted: Sequence[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        """Read the tar from byte `offset` (the header of sample `pos`) through `wanted[-1]`, checking every key."""
        expected = self.shard_counts[shard]
        with open(path, "rb") as stream:
            stream.seek(offset)
            for_shard = group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}]))
            i = 0
            while i < len(wanted):
                want = sample_key(self.shard_splits[shard], self.offsets[shard] + pos)
                try:
                    sample = next(for_shard)
                except StopIteration:
                    raise DataError(f"{path}: ends before key {want}, after {pos} of the {expected} samples "
                                    f"{MANIFEST} lists: truncated shard?") from None
                except Exception as exc:  # tarfile.ReadError, OSError, ... from the tar readers
                    raise DataError(f"{path}: unreadable at key {want} (sample {pos} of {expected}): "
                                    f"{_short(exc)}") from None
                if sample["__key__"] != want:
                    raise DataError(f"{path}: key {sample['__key__']} where {want} was expected: shard and "
                                    f"{MANIFEST} do not match")
                if pos == wanted[i]:
                    sample["__shard__"] = str(path)
                    yield pos, sample
                    i += 1
                pos += 1

    def _decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        where = f"{sample['__shard__']}: key {sample['__key__']}"
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            fields = sorted(k for k in sample if not k.startswith("__"))
            raise DataError(f"{where}: no image (.jpg or .png) in the sample; it has {fields}")
        if "cls" not in sample:
            raise DataError(f"{where}: no label (.cls) in the sample")
        try:
            label = int(sample["cls"])
        except ValueError:
            raise DataError(f"{where}: label {bytes(sample['cls'][:20])!r} is not an integer") from None
        if not 0 <= label < self.num_classes:
            raise DataError(f"{where}: label {label} outside [0, {self.num_classes})")
        try:
            with Image.open(io.BytesIO(sample[ext])) as im:
                img = to_rgb(im)
        except Exception as exc:  # PIL raises many types for bad data
            raise DataError(f"{where}: cannot decode the {ext} image ({type(exc).__name__}: {exc})") from None
        seed = _aug_seed(self.seed, self.epoch, sample["__key__"]) if self.augment else None
        return self.transform(img, seed), label


# ----------------------------------------------------------------------------------- the loader


class ShardLoader:
    """Iterable of (images float32 (B,3,H,W), labels int64 (B,), keys list[str]) for one rank.

    `len()` is the number of batches this rank yields per epoch (the same every epoch);
    `num_samples` the split's size after `limit` (all ranks together); `batch_size` the global batch
    (train: each rank yields batch_size / world_size samples of it) or the rank's batch (eval).
    """

    def __init__(self, stream: _ShardStream, *, num_workers: int, pin_memory: bool):
        self._stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.split = stream.split
        self.train = stream.train
        self.batch_size = stream.batch_size
        self.num_samples = sum(stream.counts)
        self._len = rank_num_batches(self.num_samples, batch_size=stream.batch_size, train=stream.train,
                                     world_size=stream.world_size, rank=stream.rank)

    @property
    def epoch(self) -> int:
        return self._stream.epoch

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration yields (shuffling and augmentation depend on it)."""
        self._stream.epoch = int(epoch)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        if self.num_workers == 0:
            source: Any = iter(self._stream)
        else:  # fresh workers each epoch: they receive the current epoch with the dataset
            source = iter(DataLoader(self._stream, batch_size=None, num_workers=self.num_workers,
                                     pin_memory=self.pin_memory, persistent_workers=False))
        for item in source:
            if isinstance(item, _Failure):
                raise DataError(item.message)
            yield item

    def __repr__(self) -> str:
        s = self._stream
        return (f"ShardLoader(split={s.split!r}, train={s.train}, num_samples={self.num_samples}, "
                f"batch_size={s.batch_size}, batches={len(self)}, rank={s.rank}/{s.world_size}, "
                f"workers={self.num_workers}, root={str(s.root)!r})")


def resolve_root(data_cfg: Any) -> Path:
    """The shard directory of a data config: the embedded digits demo (built on first use) or data.root."""
    name = data_cfg.name
    if name == "digits":
        from vipamin_scale.data.digits import digits_root

        return digits_root()
    if name == "shards":
        root = data_cfg.root
        if not root:
            raise DataError("data.root: required when data.name=shards (a directory written by `vipamin-scale shards`)")
        return Path(root)
    raise DataError(f"data.name: must be digits or shards; got {name!r}")


@dataclass
class LoaderSpec:
    """A loader's checked arguments, shared by the backends (`build_loader` here, `data.dali`).

    `split` is the expression as given (`"train"` or a union `"train+val"`); the per-shard lists
    cover the union's stream (the components' shards one after another)."""

    root: Path
    split: str
    shards: list[str]
    shard_counts: list[int]  # per shard, as written
    counts: list[int]  # per shard, after `limit`
    num_classes: int
    batch_size: int
    train: bool
    rank: int
    world_size: int
    seed: int
    img_size: int
    mean: list[float]
    std: list[float]
    augment: bool
    on_error: str
    max_skip: int
    num_workers: int
    shuffle_buffer: int
    shard_splits: list[str]  # per shard, the split it belongs to
    shard_offsets: list[int]  # per shard, the index of its first sample within its own split

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def rank_batch_size(self) -> int:
        """Samples in one of this rank's full batches: batch_size / world_size (train), batch_size (eval)."""
        return self.batch_size // self.world_size if self.train else self.batch_size

    def expected_key(self, shard: int, pos: int) -> str:
        """The key that sample `pos` (write order) of shard number `shard` must have."""
        return sample_key(self.shard_splits[shard], self.shard_offsets[shard] + pos)


def split_components(expr: str, splits: Sequence[str], manifest: Path) -> list[str]:
    """The split names of `expr` ("train" or "train+val"), checked against the manifest's `splits`."""
    parts = expr.split("+")
    if len(parts) == 1:  # one split: as before unions existed
        if expr not in splits:
            raise DataError(f"{manifest}: no split {expr!r}; it has {sorted(splits)}")
        return parts
    for part in parts:
        if not part:
            raise DataError(f"{manifest}: split {expr!r} has an empty component; join split names with '+', "
                            f"e.g. 'train+val' (it has {sorted(splits)})")
        if part not in splits:
            raise DataError(f"{manifest}: no split {part!r} (in {expr!r}); it has {sorted(splits)}")
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    if repeated:
        raise DataError(f"{manifest}: split {repeated[0]!r} appears more than once in {expr!r}")
    return parts


def _check_shard_files(root: Path, shards: Sequence[str], counts: Sequence[int]) -> None:
    """Every shard a loader will read (count > 0) exists; else a DataError naming it."""
    for name, c in zip(shards, counts):
        if c and not (root / name).is_file():
            raise DataError(f"{root / name}: shard file missing (listed in {root / MANIFEST})")


def check_splits(data_cfg: Any, reads: Mapping[str, str], *, train: str | None = None,
                 limit: int | None = None) -> dict[str, Any]:
    """Check, before any compute, the data a run will read. Returns `dataset_info` of the data.

    reads: {config field: split expression}, e.g. {"data.train_split": "train+val",
    "data.test_split": "test"}: every split the run will read, named by the field that chose it.
    train: the field (a key of `reads`) of the split trained on: it must hold at least one full
    global batch, data.batch_size samples, after `limit` (applied as `build_loader` does: to the
    expression's first split).
    Also checked: the shard directory's manifest and class list (`dataset_info`), at least 2
    classes, each expression's splits (`split_components`), no empty split, and, with
    data.on_error=raise, that every shard file the run reads exists. Each problem is one line that
    starts with the field it comes from (data.root for the directory and the class count) and names
    the file: a ConfigError for a split or batch size the config asks for that the data does not
    have, a DataError for faulty data. (Each loader checks its own split again: `loader_spec`.)"""
    root = resolve_root(data_cfg)
    manifest = root / MANIFEST
    try:
        info = dataset_info(root)
    except DataError as exc:
        raise DataError(f"data.root: {exc}") from None
    if info["num_classes"] < 2:
        raise DataError(f"data.root: {root / CLASSES} lists {info['num_classes']} class {info['classes']}; "
                        f"a classification run needs at least 2")
    for field_name, expr in reads.items():
        try:
            parts = split_components(str(expr), list(info["splits"]), manifest)
        except DataError as exc:
            raise ConfigError(f"{field_name}: {exc}") from None
        num_samples = 0
        for i, part in enumerate(parts):
            entry = info["splits"][part]
            counts = limit_counts(entry["shard_counts"], limit if field_name == train and i == 0 else None)
            num_samples += sum(counts)
            if data_cfg.on_error == "raise":
                try:
                    _check_shard_files(root, entry["shards"], counts)
                except DataError as exc:
                    raise DataError(f"{field_name}: {exc}") from None
        if num_samples == 0:
            raise DataError(f"{field_name}: {manifest}: split {expr!r} has no samples")
        if field_name == train and num_samples < int(data_cfg.batch_size):
            held = f"{num_samples} samples" + (f" with data.max_train_samples={limit}" if limit is not None else "")
            raise ConfigError(f"data.batch_size: {data_cfg.batch_size} is more than {field_name}={expr!r} holds "
                              f"({held}, {manifest}): not one full global batch; lower data.batch_size")
    return info


def loader_spec(data_cfg: Any, split: str, *, train: bool, img_size: int, mean: Sequence[float],
                std: Sequence[float], rank: int = 0, world_size: int = 1, seed: int = 0,
                limit: int | None = None, batch_size: int | None = None) -> LoaderSpec:
    """Check a loader's arguments against the config and the manifest (see `build_loader`)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank/world_size: need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit: must be > 0 or None; got {limit}")
    if batch_size is None:
        batch_size = int(data_cfg.batch_size if train else data_cfg.eval_batch_size)
    if batch_size <= 0:
        raise ValueError(f"batch_size: must be > 0; got {batch_size}")
    root = resolve_root(data_cfg)
    info = dataset_info(root)
    shards: list[str] = []
    shard_counts: list[int] = []
    counts: list[int] = []
    shard_splits: list[str] = []
    shard_offsets: list[int] = []
    for i, part in enumerate(split_components(split, list(info["splits"]), root / MANIFEST)):
        entry = info["splits"][part]
        shards += entry["shards"]
        shard_counts += entry["shard_counts"]
        counts += limit_counts(entry["shard_counts"], limit if i == 0 else None)  # limit: the first split only
        shard_splits += [part] * len(entry["shards"])
        shard_offsets += [sum(entry["shard_counts"][:j]) for j in range(len(entry["shard_counts"]))]
    num_samples = sum(counts)
    if num_samples == 0:
        raise DataError(f"{root / MANIFEST}: split {split!r} has no samples")
    if train:
        check_global_batch(batch_size, world_size)
    if train and num_samples < batch_size:
        raise DataError(f"{root / MANIFEST}: split {split!r} has {num_samples} samples, fewer than one global "
                        f"batch (data.batch_size={batch_size}); lower data.batch_size")
    on_error = data_cfg.on_error  # raise | skip: checked by config.validate
    if on_error == "raise":  # fail now, in one line, rather than inside a worker mid-epoch
        _check_shard_files(root, shards, counts)
    data_mean = data_cfg.mean
    data_std = data_cfg.std
    return LoaderSpec(
        root=root, split=split, shards=shards, shard_counts=shard_counts, counts=counts, num_classes=info["num_classes"], batch_size=batch_size, train=train, rank=rank,
        world_size=world_size, seed=seed, img_size=int(img_size),
        mean=list(data_mean) if data_mean is not None else list(mean),
        std=list(data_std) if data_std is not None else list(std),
        augment=bool(train and data_cfg.augment), on_error=on_error,
        max_skip=int(data_cfg.max_skip), num_workers=int(data_cfg.num_workers),
        shuffle_buffer=int(data_cfg.shuffle_buffer), shard_splits=shard_splits,
        shard_offsets=shard_offsets)


def build_loader(data_cfg: Any, split: str, *, train: bool, img_size: int, mean: Sequence[float],
                 std: Sequence[float], rank: int = 0, world_size: int = 1, seed: int = 0,
                 limit: int | None = None, batch_size: int | None = None) -> ShardLoader:
    """The webdataset loader of one split (or a union "train+val") for one rank; semantics in the module
    docstring. (`vipamin_scale.data.build_loader` picks this one or DALI's by data.backend.)

    mean/std: the model's normalization; data.mean/data.std override them when set.
    batch_size: train: the GLOBAL batch, default data.batch_size, a multiple of world_size (each rank
    yields batch_size / world_size of each global batch); eval: per rank, default data.eval_batch_size.
    limit: keep the first `limit` samples of the split in write order (e.g. data.max_train_samples);
    of a union, of its first split only.
    """
    spec = loader_spec(data_cfg, split, train=train, img_size=img_size, mean=mean, std=std, rank=rank,
                       world_size=world_size, seed=seed, limit=limit, batch_size=batch_size)
    if spec.augment:
        transform = train_transform(spec.img_size, spec.mean, spec.std, augment=True)
    else:
        transform = eval_transform(spec.img_size, spec.mean, spec.std)
    stream = _ShardStream(
        root=spec.root, split=split, shards=spec.shards, shard_counts=spec.shard_counts, counts=spec.counts,
        num_classes=spec.num_classes, batch_size=spec.batch_size, train=train, world_size=world_size, rank=rank,
        num_workers=spec.num_workers, seed=seed, shuffle_buffer=spec.shuffle_buffer, transform=transform,
        augment=spec.augment, on_error=spec.on_error, max_skip=spec.max_skip, shard_splits=spec.shard_splits,
        shard_offsets=spec.shard_offsets)
    pin_memory = torch.cuda.is_available() if data_cfg.pin_memory is None else bool(data_cfg.pin_memory)
    return ShardLoader(stream, num_workers=spec.num_workers, pin_memory=pin_memory)
