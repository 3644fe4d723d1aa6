"""Shards writer -> loader round trips, the epoch plan, transforms, bad data, the digits demo."""
from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from vipamin_scale.config import ConfigError, default_config
from vipamin_scale.data import DataError, build_loader, dataset_info, make_shards, resolve_root
from vipamin_scale.data import digits as digits_mod
from vipamin_scale.data.shards import write_dataset
from vipamin_scale.data.transforms import EvalTransform, TrainTransform
from vipamin_scale.data.wds import plan_slot, rank_num_batches, seek_runs
from conftest import cli, cli_env
from data_support import keys_of, loader_cfg, run_epoch

CLASSES = ["cat", "dog", "eel"]
PER_CLASS = 11  # 33 training samples: uneven on purpose
SIZE = 16
ZERO, ONE = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


def _solid(c: int, i: int, size=(SIZE, SIZE)) -> Image.Image:
    """Class c, image i of that class, readable back from any pixel: R = 10 + 60c, G = 8i."""
    return Image.new("RGB", size, (10 + 60 * c, 8 * i, 7))


def _identify(x: torch.Tensor) -> tuple[int, int]:
    """Inverse of _solid for a loaded image normalized with mean 0, std 1."""
    r, g = (x[:2, SIZE // 2, SIZE // 2] * 255).tolist()
    return round((r - 10) / 60), round(g / 8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """root/<split>/<class>/<image>: train 3 x 11, val 3 x 3; a few images larger and not square."""
    root = tmp_path_factory.mktemp("tree")
    for split, n in (("train", PER_CLASS), ("val", 3)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                size = (SIZE, SIZE) if i % 4 else (SIZE + 8, SIZE + 4)
                _solid(c, i, size).save(d / f"{i:03d}.png")
            (d / "notes.txt").write_text("not an image: ignored")
    return root


def _shards(tmp_path_factory, tree: Path, maxcount: int) -> Path:
    out = tmp_path_factory.mktemp(f"shards{maxcount}")
    make_shards(tree, out, maxcount=maxcount, seed=3)
    return out


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, tree) -> Path:  # 9 train shards >= 2 ranks x 2 workers
    return _shards(tmp_path_factory, tree, 4)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory, tree) -> Path:  # 1 train shard < 4 slots: the fallback
    return _shards(tmp_path_factory, tree, 100)


def _cfg(root: Path, **data):
    return loader_cfg(root, "wds", **{"num_workers": 2, **data})


_run, _keys = run_epoch, keys_of


# ----------------------------------------------------------------------------------- writer


def test_manifest_classes_and_keys(many_shards, tree):
    info = dataset_info(many_shards)
    assert info["classes"] == CLASSES == json.loads((many_shards / "classes.json").read_text())
    train, val = info["splits"]["train"], info["splits"]["val"]
    assert (train["count"], val["count"]) == (33, 9)
    assert train["shards"] == [f"train-{i:06d}.tar" for i in range(9)]
    assert train["shard_counts"] == [4] * 8 + [1]
    keys, labels = [], Counter()
    for name in train["shards"]:
        with tarfile.open(many_shards / name) as tar:
            members = tar.getnames()
            for m in members:
                if m.endswith(".cls"):
                    labels[int(tar.extractfile(m).read())] += 1
        keys += sorted({m.split(".")[0] for m in members})
        assert sorted({m.split(".", 1)[1] for m in members}) == ["cls", "png"]
    assert keys == [f"train_{i:08d}" for i in range(33)]  # unique, stable, write order
    assert labels == {0: 11, 1: 11, 2: 11}
    with pytest.raises(DataError, match="already holds shards"):
        make_shards(tree, many_shards)


@pytest.mark.slow
def test_shards_cli_into_a_shard_directory_names_the_overwrite_flag(tree, tmp_path):
    out = tmp_path / "out"
    first = subprocess.run(cli("shards", str(tree), str(out)), env=cli_env(), capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(cli("shards", str(tree), str(out)), env=cli_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert again.stderr.startswith(f"error: {out}: already holds shards") and "pass --overwrite" in again.stderr
    assert "overwrite=True" not in again.stderr
    with pytest.raises(DataError, match=r"already holds shards .*; pass overwrite=True to replace them"):
        make_shards(tree, out)  # the Python API names its keyword
    forced = subprocess.run(cli("shards", str(tree), str(out), "--overwrite"), env=cli_env(), capture_output=True,
                            text=True, timeout=300)
    assert forced.returncode == 0, forced.stderr


def test_class_layout_is_split_by_fractions(tmp_path):
    for c, name in enumerate(["a", "b"]):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(10):
            _solid(c, i).save(tmp_path / "src" / name / f"{i}.png")
    manifest = make_shards(tmp_path / "src", tmp_path / "out", fractions=(0.6, 0.2, 0.2), maxcount=7)
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 12, "val": 4, "test": 4}
    assert manifest["layout"] == "class" and manifest["num_classes"] == 2
    cfg = _cfg(tmp_path / "out", num_workers=0)
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        labels = torch.cat([y for _, y, _ in build_loader(cfg, split, train=False, img_size=SIZE, mean=ZERO, std=ONE)])
        assert Counter(labels.tolist()) == {0: n, 1: n}  # stratified


# ----------------------------------------------------------------------------------- epoch plan


def test_plan_covers_each_position_once():
    rng = random.Random(0)
    for _ in range(300):
        counts = [rng.randint(0, 9) for _ in range(rng.randint(1, 7))]
        n = sum(counts)
        if n == 0:
            continue
        world, workers, bs = rng.randint(1, 3), rng.randint(0, 3), rng.randint(1, 5)
        train = rng.random() < 0.5 and n >= world * bs
        planned = bs * world if train else bs  # train: data.batch_size is the global batch, bs a rank
        epoch, shuffle_buffer = rng.randint(0, 3), rng.choice([0, 7, 100])
        seen, per_rank = [], []
        for rank in range(world):
            batches = 0
            for w in range(max(1, workers)):
                plan = plan_slot(counts, batch_size=planned, train=train, world_size=world, rank=rank,
                                 num_workers=workers, worker=w, seed=1, epoch=epoch, shuffle_buffer=shuffle_buffer)
                samples = [s for b in plan.batches for s in b]
                seen += samples
                assert sorted(samples) == sorted((shard, p) for shard, ps in plan.reads for p in ps)  # reads them
                assert plan.num_samples == len(samples) <= plan.num_batches * bs
                batches += plan.num_batches
            assert batches == rank_num_batches(n, batch_size=planned, train=train, world_size=world, rank=rank)
            per_rank.append(batches)
        assert len(seen) == len(set(seen))  # at most once
        if train:
            assert len(seen) == n // (world * bs) * world * bs and len(set(per_rank)) == 1
        else:
            assert sorted(seen) == [(i, p) for i, c in enumerate(counts) for p in range(c)]  # exactly once


def _round_robin(per_worker: list[list]) -> list:
    """The DataLoader's order over its workers' iterables: one item from each in turn, skipping exhausted ones."""
    out, its = [], [iter(x) for x in per_worker]
    while its:
        for it in list(its):
            item = next(it, None)
            if item is None:
                its.remove(it)
            else:
                out.append(item)
    return out


def test_train_steps_do_not_depend_on_world_size_or_workers():
    """Every step's global batch is the world-1 batch: the union of the ranks' step-s batches, in any
    (world, workers) layout, for every step of 2 epochs; the rank slices are disjoint."""
    counts, B = [7, 5, 9, 3, 8, 6], 12  # 38 samples: 3 global batches an epoch, 2 left out
    for shuffle_buffer in (0, 25, 1000):
        def steps(world: int, workers: int, rank: int, epoch: int) -> list:
            per_worker = [plan_slot(counts, batch_size=B, train=True, world_size=world, rank=rank,
                                    num_workers=workers, worker=w, seed=5, epoch=epoch,
                                    shuffle_buffer=shuffle_buffer).batches for w in range(max(1, workers))]
            return _round_robin(per_worker)

        for epoch in (0, 1):
            ref = steps(1, 0, 0, epoch)
            assert len(ref) == 38 // B and all(len(b) == B for b in ref)
            assert len({s for b in ref for s in b}) == 3 * B  # each sample at most once
            for world, workers in ((1, 3), (2, 0), (2, 2), (3, 1), (4, 3), (6, 2)):
                ranks = [steps(world, workers, r, epoch) for r in range(world)]
                for step, batch in enumerate(ref):
                    parts = [ranks[r][step] for r in range(world)]
                    assert all(len(p) == B // world for p in parts)
                    assert len({s for p in parts for s in p}) == B  # disjoint
                    assert sorted(s for p in parts for s in p) == sorted(batch), (shuffle_buffer, world, workers)
                assert all(len(r) == len(ref) for r in ranks)
        assert steps(1, 0, 0, 0) != steps(1, 0, 0, 1)  # a new order every epoch
    with pytest.raises(ConfigError, match=r"^data.batch_size: the global training batch \(12\) must be a multiple "
                                          r"of the world size \(5\)"):
        plan_slot(counts, batch_size=B, train=True, world_size=5, rank=0, num_workers=0, worker=0, seed=5, epoch=0)


def test_plan_is_shard_local_with_enough_shards():
    counts = [4] * 8 + [1]
    for w in range(2):
        for rank in range(2):
            plan = plan_slot(counts, batch_size=4, train=False, world_size=2, rank=rank, num_workers=2,
                             worker=w, seed=0, epoch=0)
            assert len({shard for shard, _ in plan.reads}) <= 3  # about 9/4 shards, not all 9


# ----------------------------------------------------------------------------------- loader


@pytest.mark.parametrize("layout", ["many_shards", "one_shard"])
def test_round_trip_every_sample_once_over_2_ranks_x_2_workers(layout, request):
    root = request.getfixturevalue(layout)
    cfg = _cfg(root)
    expected = {(c, i) for c in range(3) for i in range(PER_CLASS)}
    seen, keys = set(), []
    for rank in range(2):
        loader = build_loader(cfg, "train", train=False, img_size=SIZE, mean=ZERO, std=ONE, rank=rank, world_size=2)
        assert loader.num_samples == 33
        batches = _run(loader)
        assert len(batches) == len(loader)
        assert all(len(k) == 5 for _, _, k in batches[:-1]) and 1 <= len(batches[-1][2]) <= 5
        for x, y, ks in batches:
            assert x.dtype == torch.float32 and x.shape == (len(ks), 3, SIZE, SIZE) and y.dtype == torch.int64
            for image, label in zip(x, y.tolist()):
                c, i = _identify(image)
                assert label == c  # the label travels with its image
                seen.add((c, i))
        keys += _keys(batches)
        if rank == 0:
            assert _keys(_run(loader, epoch=5)) == _keys(batches)  # eval order: fixed
    assert sorted(keys) == [f"train_{i:08d}" for i in range(33)]  # every sample exactly once
    assert seen == expected


@pytest.mark.parametrize("layout", ["many_shards", "one_shard"])
def test_train_loader_steps_same_at_world_1_and_2x2_workers(layout, request):
    """Real DataLoader workers: at every step the two ranks' batches (2 workers each) are the world-1
    batch (no workers) split in two, for 2 epochs."""
    root = request.getfixturevalue(layout)
    kw = dict(train=True, img_size=SIZE, mean=ZERO, std=ONE, seed=3)
    one = build_loader(_cfg(root, num_workers=0, batch_size=8, shuffle_buffer=16), "train", **kw)
    two = [build_loader(_cfg(root, num_workers=2, batch_size=8, shuffle_buffer=16), "train", rank=r, world_size=2,
                        **kw) for r in range(2)]
    for epoch in (0, 1):
        ref = [k for _, _, k in _run(one, epoch)]
        got = [[k for _, _, k in _run(loader, epoch)] for loader in two]
        assert len(ref) == len(got[0]) == len(got[1]) == 33 // 8
        for step, keys in enumerate(ref):
            assert got[0][step] + got[1][step] == keys  # rank r: positions [4r, 4r + 4) of the global batch


def test_reading_seeks_by_the_index_and_falls_back_without_a_fitting_one(one_shard, tmp_path):
    """Same batches whether a shard is read by seeking with its .idx, with a wrong .idx, or from its start."""
    root = tmp_path / "copy"
    shutil.copytree(one_shard, root)
    tar = root / "train-000000.tar"
    runs = seek_runs(tar, [1, 3, 20, 28, 31])  # SEEK_GAP = 4: 3 -> 20 and 20 -> 28 seek, 1 -> 3, 28 -> 31 read on
    assert [(a, c) for a, _, c in runs] == [(1, 2), (20, 1), (28, 2)]
    data = tar.read_bytes()
    assert [data[b:b + 15] for _, b, _ in runs] == [b"train_00000001.", b"train_00000020.", b"train_00000028."]
    cfg = _cfg(root, num_workers=0, batch_size=8, shuffle_buffer=16)
    kw = dict(train=True, img_size=SIZE, mean=ZERO, std=ONE, rank=1, world_size=2, seed=3)

    def epoch():
        return [(k, x) for x, _, k in _run(build_loader(cfg, "train", **kw), 1)]

    by_index = epoch()
    idx = root / "train-000000.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:1] + lines[:0:-1]) + "\n")  # samples listed backwards: offsets that do not fit
    assert seek_runs(tar, [1])[0][1] != runs[0][1]
    wrong_index = epoch()
    idx.unlink()
    assert seek_runs(tar, [1, 3]) == []
    from_start = epoch()
    for other in (wrong_index, from_start):
        assert [k for k, _ in other] == [k for k, _ in by_index]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(other, by_index))


@pytest.mark.parametrize("layout", ["many_shards", "one_shard"])
def test_train_equal_batches_no_repeats_reproducible(layout, request):
    cfg = _cfg(request.getfixturevalue(layout), shuffle_buffer=16, batch_size=8)  # global: 4 a rank
    loaders = [build_loader(cfg, "train", train=True, img_size=SIZE, mean=ZERO, std=ONE, rank=r, world_size=2, seed=7)
               for r in range(2)]
    epoch0 = [_run(loader, 0) for loader in loaders]
    for loader, batches in zip(loaders, epoch0):
        assert len(loader) == len(batches) == 33 // (2 * 4)  # floor(N / (world x B)) on every rank
        assert all(x.shape[0] == 4 for x, _, _ in batches)
    keys0 = _keys(epoch0[0]) + _keys(epoch0[1])
    assert len(keys0) == len(set(keys0)) == 32
    again = _run(loaders[0], 0)
    assert _keys(again) == _keys(epoch0[0])
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, epoch0[0]))
    epoch1 = _run(loaders[0], 1)
    assert _keys(epoch1) != _keys(epoch0[0])
    assert len(set(_keys(epoch1))) == 16
    assert keys0 != sorted(keys0)  # shuffled


def test_limit_keeps_first_samples_in_write_order(many_shards):
    cfg = _cfg(many_shards, num_workers=0, batch_size=8)
    loader = build_loader(cfg, "train", train=False, img_size=SIZE, mean=ZERO, std=ONE, limit=10)
    assert loader.num_samples == 10 and len(loader) == 2
    assert _keys(_run(loader)) == [f"train_{i:08d}" for i in range(10)]
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_loader(cfg, "train", train=True, img_size=SIZE, mean=ZERO, std=ONE, limit=7, world_size=2)


def test_model_size_image_is_only_normalized():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = EvalTransform(SIZE, mean, std)(Image.fromarray(pixels))
    want = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    big = Image.fromarray(rng.integers(0, 256, size=(30, 20, 3), dtype=np.uint8))  # 20 wide, 30 high
    reference = T.Compose([T.Resize(SIZE, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(SIZE), T.ToTensor(),
                           T.Normalize(mean, std)])
    torch.testing.assert_close(EvalTransform(SIZE, mean, std)(big), reference(big), rtol=0, atol=1e-6)
    assert torch.equal(TrainTransform(SIZE, mean, std, augment=False)(big), EvalTransform(SIZE, mean, std)(big))
    aug = TrainTransform(SIZE, mean, std, augment=True)
    state = torch.get_rng_state()
    assert torch.equal(aug(big, seed=3), aug(big, seed=3)) and torch.equal(torch.get_rng_state(), state)


def test_data_mean_std_override_and_augment(many_shards):
    cfg = _cfg(many_shards, num_workers=0, mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0])
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1), torch.tensor([0.5, 0.25, 2.0]).view(3, 1, 1)
    checked = 0
    with tarfile.open(many_shards / "val-000000.tar") as tar:
        for x, _, keys in build_loader(cfg, "val", train=False, img_size=SIZE, mean=ZERO, std=ONE, limit=4):
            for image, key in zip(x, keys):
                stored = Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read())).convert("RGB")
                if stored.size == (SIZE, SIZE):
                    pixels = torch.from_numpy(np.array(stored)).permute(2, 0, 1).float() / 255
                    torch.testing.assert_close(image, (pixels - mean) / std, rtol=0, atol=1e-6)
                    checked += 1
    assert checked >= 1
    cfg = _cfg(many_shards, num_workers=0, augment=True)
    loader = build_loader(cfg, "train", train=True, img_size=SIZE, mean=ZERO, std=ONE)
    a, b = _run(loader, 0), _run(loader, 0)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))


def test_csv_source(tmp_path):
    (tmp_path / "img").mkdir()
    rows = [("path", "label", "split")]
    for i in range(12):
        name = "ant" if i % 2 else "bird"
        Image.new("RGB", (20, 20), (0, 0, 0) if name == "ant" else (255, 255, 255)).save(tmp_path / "img" / f"{i}.jpg")
        rows.append((f"img/{i}.jpg", name, "train" if i < 8 else "test"))
    with open(tmp_path / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    manifest = make_shards(tmp_path / "data.csv", tmp_path / "out", maxcount=3)
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 8, "test": 4}
    assert dataset_info(tmp_path / "out")["classes"] == ["ant", "bird"]
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        assert tar.getnames()[:2] == ["train_00000000.cls", "train_00000000.jpg"]
    cfg = _cfg(tmp_path / "out", num_workers=0)
    for x, y, _ in build_loader(cfg, "train", train=False, img_size=SIZE, mean=ZERO, std=ONE):
        assert torch.equal(y, (x.mean(dim=(1, 2, 3)) > 0.5).long())  # bird (1) is the white one
    # integer labels, no split column: a seeded fraction split
    (tmp_path / "int.csv").write_text("".join(f"img/{i}.jpg,{i % 3}\n" for i in range(12)))
    manifest = make_shards(tmp_path / "int.csv", tmp_path / "out2", fractions=(0.5, 0.25, 0.25))
    assert manifest["num_classes"] == 3 and sum(v["count"] for v in manifest["splits"].values()) == 12


# ----------------------------------------------------------------------------------- bad data


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


def test_bad_csv_rows_name_file_and_row(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "a.csv").write_text("path,label\nok.png,0\nmissing.png,1\n")
    with pytest.raises(DataError) as exc:
        make_shards(tmp_path / "a.csv", tmp_path / "out")
    assert "a.csv:3" in _one_line(exc) and "missing.png" in str(exc.value)
    (tmp_path / "b.csv").write_text("ok.png,\n")
    with pytest.raises(DataError, match=r"b\.csv:1: missing label"):
        make_shards(tmp_path / "b.csv", tmp_path / "out")
    (tmp_path / "src" / "x").mkdir(parents=True)
    (tmp_path / "src" / "x" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "src" / "y").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "src" / "y" / "ok.png")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        make_shards(tmp_path / "src", tmp_path / "out")
    (tmp_path / "src" / "train").mkdir()
    with pytest.raises(DataError, match="mixes split folders"):
        make_shards(tmp_path / "src", tmp_path / "out")


def test_absent_and_truncated_shards(many_shards, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(many_shards, root)
    (root / "train-000002.tar").unlink()
    with pytest.raises(DataError) as exc:
        build_loader(_cfg(root), "train", train=False, img_size=SIZE, mean=ZERO, std=ONE)
    assert "train-000002.tar: shard file missing" in _one_line(exc)
    shutil.copy(many_shards / "train-000002.tar", root)
    shard = root / "train-000004.tar"
    shard.write_bytes(shard.read_bytes()[:2000])
    loader = build_loader(_cfg(root), "train", train=False, img_size=SIZE, mean=ZERO, std=ONE, limit=8)  # shards 0, 1
    assert len(_keys(_run(loader))) == 8
    loader = build_loader(_cfg(root, num_workers=0), "train", train=False, img_size=SIZE, mean=ZERO, std=ONE, limit=20)
    with pytest.raises(DataError) as exc:
        _run(loader)
    assert "train-000004.tar: unreadable at key train_00000016" in _one_line(exc)
    (root / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json: missing"):
        dataset_info(root)


def _corrupt_dir(tmp_path: Path) -> Path:
    samples = [(f"s{i}", _solid(0, i), 0) for i in range(6)]
    samples[3] = ("s3", (b"\x89PNG\r\n\x1a\n garbage", "png"), 0)
    write_dataset({"train": samples}, ["zero"], tmp_path / "bad", shuffle=False, verify=False, maxcount=4)
    return tmp_path / "bad"


def test_corrupt_image_names_shard_and_key(tmp_path, caplog):
    root = _corrupt_dir(tmp_path)
    loader = build_loader(_cfg(root), "train", train=False, img_size=SIZE, mean=ZERO, std=ONE)  # 2 workers
    with pytest.raises(DataError) as exc:
        _run(loader)
    msg = _one_line(exc)
    assert "train-000000.tar: key train_00000003: cannot decode the png image" in msg
    skip = build_loader(_cfg(root, on_error="skip", num_workers=0), "train", train=False, img_size=SIZE, mean=ZERO, std=ONE)
    with caplog.at_level("WARNING", logger="vipamin_scale.data"):
        batches = _run(skip)
    assert _keys(batches) == [f"train_{i:08d}" for i in (0, 1, 2, 4, 5)]
    assert [len(k) for _, _, k in batches] == [4, 1]  # batch boundaries kept: the bad one shortens its batch
    assert "train_00000003" in caplog.text
    limited = build_loader(_cfg(root, on_error="skip", max_skip=0, num_workers=0, batch_size=2), "train", train=True,
                           img_size=SIZE, mean=ZERO, std=ONE)
    assert sorted(len(k) for _, _, k in _run(limited)) == [1, 2, 2]  # same batch count, one batch short


def test_missing_label_names_shard_and_key(many_shards, tmp_path):
    root = tmp_path / "nolabel"
    shutil.copytree(many_shards, root)
    src = root / "val-000000.tar"
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(src, "w") as tar:
        for m, data in members:
            if m.name != "val_00000002.cls":
                tar.addfile(m, io.BytesIO(data))
    loader = build_loader(_cfg(root, num_workers=0), "val", train=False, img_size=SIZE, mean=ZERO, std=ONE)
    with pytest.raises(DataError) as exc:
        _run(loader)
    assert "val-000000.tar: key val_00000002: no label" in _one_line(exc)


# ----------------------------------------------------------------------------------- digits


def test_digits_built_once_with_stated_counts(tmp_path, monkeypatch):
    root = digits_mod.digits_root(tmp_path)
    assert root == tmp_path / "digits_shards_v1"
    info = dataset_info(root)
    assert info["classes"] == [str(i) for i in range(10)]
    assert {s: v["count"] for s, v in info["splits"].items()} == {"train": 1000, "val": 297, "test": 500}
    with tarfile.open(root / "train-000000.tar") as tar:
        img = Image.open(io.BytesIO(tar.extractfile("train_00000000.png").read()))
        assert img.size == (32, 32) and img.mode == "RGB"
        a = np.array(img)
        assert (a == a[::4, ::4].repeat(4, 0).repeat(4, 1)).all()  # nearest 4x upscale of 8x8
    # reused from the cache: no second build
    monkeypatch.setattr(digits_mod, "build_digits", lambda out: pytest.fail("rebuilt"))
    assert digits_mod.digits_root(tmp_path) == root
    cfg = default_config().data
    monkeypatch.setenv("VIPAMIN_SCALE_CACHE", str(tmp_path))
    assert resolve_root(cfg) == root
    loader = build_loader(cfg, "val", train=False, img_size=32, mean=ZERO, std=ONE)
    assert loader.num_samples == 297


def test_digits_lost_race_uses_the_winner(tmp_path, monkeypatch):
    def build_and_lose(out):  # another process finishes first while we build
        manifest = write_dataset({"train": [("x", _solid(0, 0), 0)]}, ["0"], out)
        shutil.copytree(out, tmp_path / "digits_shards_v1")
        return manifest

    monkeypatch.setattr(digits_mod, "build_digits", build_and_lose)
    assert digits_mod.digits_root(tmp_path) == tmp_path / "digits_shards_v1"
    assert [p.name for p in tmp_path.iterdir()] == ["digits_shards_v1"]  # our temp copy is gone


def test_digits_fewshot_writers_wait_for_the_lock_holder(tmp_path):
    """Two processes asking for the same few-shot draws at once must not write over each other:
    while one holds <root>/.lock the other writes nothing, then finds the draws it needs."""
    import fcntl

    root = tmp_path / digits_mod.FEWSHOT_DIR
    root.mkdir()
    code = ("import sys; from vipamin_scale.data.digits import digits_fewshot; "
            "out = digits_fewshot([1, 2], 2, cache_dir=sys.argv[1]); print(sorted(str(p) for p in out.values()))")
    with open(root / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                                env=cli_env())
        time.sleep(3)
        assert proc.poll() is None and sorted(p.name for p in root.iterdir()) == [".lock"]  # waiting, wrote nothing
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    made = digits_mod.digits_fewshot([1, 2], 2, cache_dir=tmp_path)  # this process finds them done
    assert out.strip() == str(sorted(str(p) for p in made.values()))
    for (k, d), path in made.items():
        info = dataset_info(path)
        assert info["splits"]["train"]["count"] == 10 * k and info["splits"]["test"]["count"] == 500
