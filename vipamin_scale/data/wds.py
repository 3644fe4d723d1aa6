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
stream of N positions. The stream is cut into global batches of B, the global batches are dealt
to ranks in contiguous blocks, and each rank's block to its workers in contiguous blocks (the
worker that the DataLoader's round-robin visits last holds the rank's final batch); a worker
reads only the shards that overlap its range, reading through (without decoding) the part of a
boundary shard that belongs to its neighbour. So

* with at least as many shards as slots, a worker reads about 1/slots of the data: a shard-level
  split, except that boundaries may fall inside a shard, which keeps every slot exactly balanced;
* with fewer shards than slots, several workers read the same shard and keep disjoint sample
  ranges of it (the fallback; it costs at most one full read of the split per worker, and less
  than striding by `index % slots`, which it replaces because it keeps each worker's samples
  contiguous and its batch count exact).

Either way every position belongs to exactly one slot.

train=False (eval, calibration): the stream is the shards in manifest order. Every sample of
  the split (after limit) is yielded exactly once per epoch across all ranks x workers, nothing
  dropped. Global batches: ceil(N / B); only the very last one may be short, so each rank has at
  most one short batch (its last). Ranks' batch counts differ by at most one. Order is
  deterministic and independent of the epoch.
train=True: per epoch, the shard order is permuted and the stream rotated by a random offset,
  both from (seed, epoch) (identical on every rank, so the ranges stay disjoint); each worker
  shuffles its range with a buffer of data.shuffle_buffer samples seeded by (seed, epoch, rank,
  worker). Every rank yields the same number of full batches, floor(N / (world_size x B)) (an error
  when N is less than one global batch); each sample at most once per epoch (the N mod (world x B)
  positions at the end of the rotated stream are left out, a different set each epoch).
  Iterating the same epoch twice gives the same batches in the same order, so a resumed run can
  skip the first n batches and continue exactly. Augmentation (data.augment, off by default)
  draws from a seed of (seed, epoch, key).
Within a rank, the DataLoader takes batches from its workers round-robin, which is deterministic.
The layout (world size, num_workers, batch size) is part of what decides the order.

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
  data.max_skip (0 = no limit) is an error. A batch is B consecutive positions of a worker's
  (shuffled) stream whether or not they are good, so skipping shortens a batch but keeps the
  batch count; a batch left with no good sample is dropped, which in training is an error (the
  ranks would fall out of step).
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from vipamin_scale.config import ConfigError
from vipamin_scale.data.shards import CLASSES, IMAGE_EXTS, MANIFEST, DataError, dataset_info, sample_key, to_rgb
from vipamin_scale.data.transforms import EvalTransform, eval_transform, train_transform

__all__ = ["build_loader", "dataset_info", "resolve_root", "ShardLoader", "DataError", "Segment", "SlotPlan",
           "plan_slot", "epoch_order", "limit_counts", "LoaderSpec", "loader_spec", "split_components",
           "check_splits"]

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


@dataclass(frozen=True)
class SlotPlan:
    """What one (rank, worker) slot reads in one epoch, and how many batches it yields."""

    segments: tuple[Segment, ...]
    num_batches: int
    num_samples: int


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


def global_batches(num_samples: int, batch_size: int, world_size: int, train: bool) -> tuple[int, int]:
    """(global batches per epoch, stream positions used): all samples for eval, full batches for train."""
    if train:
        per_rank = num_samples // (world_size * batch_size)
        return per_rank * world_size, per_rank * world_size * batch_size
    return math.ceil(num_samples / batch_size), num_samples


def plan_slot(counts: Sequence[int], *, batch_size: int, train: bool, world_size: int, rank: int,
              num_workers: int, worker: int, seed: int, epoch: int) -> SlotPlan:
    """What worker `worker` (of max(1, num_workers)) of `rank` reads in `epoch`; see the module docstring."""
    slots = max(1, num_workers)
    n_global, used = global_batches(sum(counts), batch_size, world_size, train)
    rank_start, rank_n = _blocks(n_global, world_size)[rank]
    w_start, w_n = _worker_blocks(rank_n, slots)[worker]
    lo = (rank_start + w_start) * batch_size
    hi = min((rank_start + w_start + w_n) * batch_size, used)
    segments = _slice(epoch_order(counts, train=train, seed=seed, epoch=epoch), lo, hi)
    return SlotPlan(tuple(segments), w_n, max(0, hi - lo))


def rank_num_batches(num_samples: int, *, batch_size: int, train: bool, world_size: int, rank: int) -> int:
    n_global, _ = global_batches(num_samples, batch_size, world_size, train)
    return _blocks(n_global, world_size)[rank][1]


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
                         epoch=self.epoch)
        skips = _Skips(self.on_error, self.max_skip,
                       f"split {self.split} epoch {self.epoch} rank {self.rank} worker {worker}")
        samples: Iterator[dict[str, Any]] = (s for seg in plan.segments for s in self._read(seg, skips))
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(f"vipamin_scale.wds.buffer/{self.seed}/{self.epoch}/{self.rank}/{worker}")
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        images: list[torch.Tensor] = []
        labels: list[int] = []
        keys: list[str] = []
        made = positions = consumed = 0
        for sample in samples:  # a batch is B consecutive positions; bad ones are left out of it
            positions += 1
            consumed += 1
            if not sample.get("__lost__"):
                try:
                    image, label = self._decode(sample)
                except DataError as exc:
                    skips.bad(exc)
                else:
                    images.append(image)
                    labels.append(label)
                    keys.append(sample["__key__"])
            if positions == self.batch_size or consumed == plan.num_samples:
                if images:
                    yield torch.stack(images), torch.tensor(labels, dtype=torch.int64), keys
                    made += 1
                images, labels, keys, positions = [], [], [], 0
        if self.train and made < plan.num_batches:
            raise DataError(f"{skips.count} bad samples left {skips.where} with {made} of {plan.num_batches} "
                            f"batches; the ranks would fall out of step")

    def _read(self, seg: Segment, skips: _Skips) -> Iterator[dict[str, Any]]:
        """Samples [seg.start, seg.stop) of one shard, read with webdataset's tar iterators."""
        path = self.root / self.shards[seg.shard]
        expected = self.shard_counts[seg.shard]
        if not path.is_file():
            skips.bad(DataError(f"{path}: shard file missing (listed in {self.root / MANIFEST})"), len(seg))
            yield from ({"__lost__": True} for _ in range(len(seg)))  # on_error=skip: keep the positions
            return
        pos = 0
        with open(path, "rb") as stream:
            files = tar_file_expander([{"url": str(path), "stream": stream}])
            for_shard = group_by_keys(files)
            while pos < seg.stop:
                want = sample_key(self.shard_splits[seg.shard], self.offsets[seg.shard] + pos)
                error = None
                try:
                    sample = next(for_shard)
                except StopIteration:
                    error = DataError(f"{path}: ends before key {want}, after {pos} of the {expected} samples "
                                      f"{MANIFEST} lists: truncated shard?")
                except Exception as exc:  # tarfile.ReadError, OSError, ... from the tar readers
                    error = DataError(f"{path}: unreadable at key {want} (sample {pos} of {expected}): {_short(exc)}")
                else:
                    if sample["__key__"] != want:
                        error = DataError(f"{path}: key {sample['__key__']} where {want} was expected: shard and "
                                          f"{MANIFEST} do not match")
                if error is not None:
                    lost = seg.stop - max(pos, seg.start)
                    skips.bad(error, lost)
                    yield from ({"__lost__": True} for _ in range(lost))
                    return
                if pos >= seg.start:
                    sample["__shard__"] = str(path)
                    yield sample
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
    `num_samples` the split's size after `limit` (all ranks together).
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
    name = getattr(data_cfg, "name", "shards")
    if name == "digits":
        from vipamin_scale.data.digits import digits_root

        return digits_root()
    if name == "shards":
        root = getattr(data_cfg, "root", None)
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
            if getattr(data_cfg, "on_error", "raise") == "raise":
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
    if train and num_samples < world_size * batch_size:
        raise DataError(f"{root / MANIFEST}: split {split!r} has {num_samples} samples, fewer than one global "
                        f"batch ({world_size} ranks x {batch_size}); lower data.batch_size")
    on_error = getattr(data_cfg, "on_error", "raise")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error: must be raise or skip; got {on_error!r}")
    if on_error == "raise":  # fail now, in one line, rather than inside a worker mid-epoch
        _check_shard_files(root, shards, counts)
    data_mean = getattr(data_cfg, "mean", None)
    data_std = getattr(data_cfg, "std", None)
    return LoaderSpec(
        root=root, split=split, shards=shards, shard_counts=shard_counts, counts=counts, num_classes=info["num_classes"], batch_size=batch_size, train=train, rank=rank,
        world_size=world_size, seed=seed, img_size=int(img_size),
        mean=list(data_mean) if data_mean is not None else list(mean),
        std=list(data_std) if data_std is not None else list(std),
        augment=bool(train and getattr(data_cfg, "augment", False)), on_error=on_error,
        max_skip=int(getattr(data_cfg, "max_skip", 0) or 0), num_workers=int(getattr(data_cfg, "num_workers", 0)),
        shuffle_buffer=int(getattr(data_cfg, "shuffle_buffer", 1000)), shard_splits=shard_splits,
        shard_offsets=shard_offsets)


def build_loader(data_cfg: Any, split: str, *, train: bool, img_size: int, mean: Sequence[float],
                 std: Sequence[float], rank: int = 0, world_size: int = 1, seed: int = 0,
                 limit: int | None = None, batch_size: int | None = None) -> ShardLoader:
    """The webdataset loader of one split (or a union "train+val") for one rank; semantics in the module
    docstring. (`vipamin_scale.data.build_loader` picks this one or DALI's by data.backend.)

    mean/std: the model's normalization; data.mean/data.std override them when set.
    batch_size: per rank; default data.batch_size (train) or data.eval_batch_size (eval).
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
    pin_memory = bool(getattr(data_cfg, "pin_memory", torch.cuda.is_available()))
    return ShardLoader(stream, num_workers=spec.num_workers, pin_memory=pin_memory)
