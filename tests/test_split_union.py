"""Split unions ("train+val") in both loader backends: the concatenated stream, `limit` on the first split only,
per-split key checking, bad expressions."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from data_support import keys_of, loader_cfg, run_epoch

from vipamin_scale.data import DataError, build_loader
from vipamin_scale.data.shards import write_dataset
from vipamin_scale.data.wds import loader_spec

SIZE = 8
ZERO, ONE = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
N_TRAIN, N_VAL = 14, 7  # shards of 4: train 4+4+4+2, val 4+3


def _image(split: int, i: int) -> Image.Image:
    """Readable back from any pixel: R = 20 + 100 * split, G = 8 * i."""
    return Image.new("RGB", (SIZE, SIZE), (20 + 100 * split, 8 * i, 7))


def _identify(x: torch.Tensor) -> tuple[int, int]:
    r, g = (x[:2, SIZE // 2, SIZE // 2] * 255).tolist()
    return round((r - 20) / 100), round(g / 8)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("union") / "shards"
    splits = {name: [(f"{name}{i}", _image(s, i), i % 2) for i in range(n)]
              for s, (name, n) in enumerate((("train", N_TRAIN), ("val", N_VAL)))}
    write_dataset(splits, ["even", "odd"], out, shuffle=False, maxcount=4)  # key index = i
    return out


def _keys(split: str, n: int) -> list[str]:
    return [f"{split}_{i:08d}" for i in range(n)]


def _load(root: Path, split: str, backend: str = "wds", **kw):
    data = {k: kw.pop(k) for k in ("on_error", "batch_size") if k in kw}
    return build_loader(loader_cfg(root, backend, num_workers=0, **data), split, img_size=SIZE, mean=ZERO, std=ONE,
                        **kw)


def _check_images(batches) -> None:
    """Each image and label travel with their key."""
    for x, y, keys in batches:
        for image, label, key in zip(x, y.tolist(), keys):
            split, i = _identify(image)
            assert key == f"{('train', 'val')[split]}_{i:08d}" and label == i % 2


# ----------------------------------------------------------------------------------- the stream


def test_spec_lists_each_shard_with_its_own_split_and_offset(root):
    spec = loader_spec(loader_cfg(root, "wds"), "train+val", train=False, img_size=SIZE, mean=ZERO, std=ONE, limit=6)
    assert spec.split == "train+val" and spec.num_classes == 2
    assert spec.shards == [f"train-00000{i}.tar" for i in range(4)] + ["val-000000.tar", "val-000001.tar"]
    assert spec.shard_splits == ["train"] * 4 + ["val"] * 2 and spec.shard_offsets == [0, 4, 8, 12, 0, 4]
    assert spec.counts == [4, 2, 0, 0, 4, 3] and spec.num_samples == 6 + N_VAL  # limit: first split only
    assert spec.expected_key(5, 1) == "val_00000005" and spec.expected_key(1, 3) == "train_00000007"
    single = loader_spec(loader_cfg(root, "wds"), "val", train=False, img_size=SIZE, mean=ZERO, std=ONE)
    assert single.shard_splits == ["val", "val"] and single.shard_offsets == [0, 4]


def test_wds_eval_union_is_train_then_val_each_once(root):
    loader = _load(root, "train+val", train=False)
    assert loader.num_samples == N_TRAIN + N_VAL and "train+val" in repr(loader)
    batches = run_epoch(loader)
    assert len(batches) == len(loader) == -(-(N_TRAIN + N_VAL) // 5)
    assert keys_of(batches) == _keys("train", N_TRAIN) + _keys("val", N_VAL)
    _check_images(batches)
    limited = run_epoch(_load(root, "train+val", train=False, limit=6))
    assert keys_of(limited) == _keys("train", 6) + _keys("val", N_VAL)
    assert keys_of(limited)[:6] == keys_of(run_epoch(_load(root, "train", train=False, limit=6)))
    assert keys_of(run_epoch(_load(root, "val+train", train=False))) == _keys("val", N_VAL) + _keys("train", N_TRAIN)
    both = [keys_of(run_epoch(_load(root, "train+val", train=False, rank=r, world_size=2))) for r in range(2)]
    assert both[0] + both[1] == _keys("train", N_TRAIN) + _keys("val", N_VAL)  # over 2 ranks: each once


def test_wds_train_union_with_limit(root):
    n, world, B = 6, 2, 2
    allowed = set(_keys("train", n)) | set(_keys("val", N_VAL))
    want_batches = (n + N_VAL) // (world * B)
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            loader = _load(root, "train+val", train=True, limit=n, rank=rank, world_size=world, seed=3,
                           batch_size=world * B)  # the global batch: B a rank
            assert loader.num_samples == n + N_VAL
            batches = run_epoch(loader, epoch)
            assert len(batches) == len(loader) == want_batches and all(len(k) == B for _, _, k in batches)
            _check_images(batches)
            per_rank.append(set(keys_of(batches)))
        assert not per_rank[0] & per_rank[1]  # the ranks' samples are disjoint
        seen = per_rank[0] | per_rank[1]
        assert seen <= allowed and len(seen) == world * B * want_batches
    assert seen & set(_keys("val", N_VAL)) and seen & set(_keys("train", n))


def test_dali_union_matches_wds(root):
    for limit in (None, 6):
        dali = _load(root, "train+val", "dali", train=False, limit=limit)
        wds = _load(root, "train+val", train=False, limit=limit)
        got = run_epoch(dali)
        assert type(dali).__name__ == "DaliLoader" and len(got) == len(dali) == len(wds)
        assert [k for _, _, k in got] == [k for _, _, k in run_epoch(wds)]  # same keys, order and batches
        _check_images(got)
    train = _load(root, "train+val", "dali", train=True, limit=6, batch_size=2, seed=3)
    ref = _load(root, "train+val", train=True, limit=6, batch_size=2, seed=3)
    assert sorted(keys_of(run_epoch(train))) == sorted(keys_of(run_epoch(ref)))  # the same sample set


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("expr, match", [
    ("train+nope", r"manifest\.json: no split 'nope' \(in 'train\+nope'\); it has \['train', 'val'\]"),
    ("train+train", r"manifest\.json: split 'train' appears more than once in 'train\+train'"),
    ("train+", r"manifest\.json: split 'train\+' has an empty component"),
    ("+val", r"split '\+val' has an empty component"),
    ("nope", r"manifest\.json: no split 'nope'; it has \['train', 'val'\]"),
])
def test_bad_expressions(root, expr, match):
    for backend in ("wds", "dali"):
        if backend == "dali" and not _has_dali():
            continue
        with pytest.raises(DataError, match=match):
            _load(root, expr, backend, train=False)


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def test_swapped_shard_in_second_split_is_named(root, tmp_path):
    bad = tmp_path / "swapped"
    bad.mkdir()
    for p in root.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    a, b = (root / "val-000000.tar").read_bytes(), (root / "val-000001.tar").read_bytes()
    (bad / "val-000000.tar").write_bytes(b)  # newer than the .idx files: DALI rebuilds its index
    (bad / "val-000001.tar").write_bytes(a)
    want = "val-000000.tar: key val_00000004 where val_00000000 was expected"
    backends = ["wds"] + (["dali"] if _has_dali() else [])
    for backend in backends:
        with pytest.raises(DataError) as exc:
            run_epoch(_load(bad, "train+val", backend, train=False))
        assert want in str(exc.value) and "\n" not in str(exc.value), (backend, str(exc.value))
        skip = _load(bad, "train+val", backend, train=False, on_error="skip")
        assert keys_of(run_epoch(skip)) == _keys("train", N_TRAIN)  # both val shards left out, train intact
    assert keys_of(run_epoch(_load(bad, "train", train=False))) == _keys("train", N_TRAIN)
