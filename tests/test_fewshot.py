"""Few-shot draws from a shard directory (data/fewshot.py: `fewshot_root`): k images per class by the
protocol's rule, nested in k, the same in another process; the other splits the source's own, unread and
uncopied; the user's directory untouched; a changed source or a too-small class is one line."""
from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from conftest import cli_env
from PIL import Image

from data_support import loader_cfg, run_epoch
from vipamin_scale.data import DataError, build_loader, check_splits, dataset_info
from vipamin_scale.data.cli import main as shards_cli
from vipamin_scale.data.fewshot import LOCK, fewshot_root
from vipamin_scale.data.shards import write_dataset

SIZE = 4
ZERO, ONE = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
PER_CLASS = {"a": 5, "b": 6, "c": 7}  # training images per class


def _jpeg(color) -> tuple[bytes, str]:
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), "jpg"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The user's shards: train 5/6/7 images of classes a/b/c (PNG and JPEG, 4 a shard), val 6, test 9."""
    root = tmp_path_factory.mktemp("user") / "shards"
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, (name, n) in enumerate(PER_CLASS.items()):
        for i in range(n):
            color = (40 * label, 30 * i, 7 * i + 1)
            image = _jpeg(color) if i % 2 else Image.new("RGB", (SIZE, SIZE), color)
            splits["train"].append((f"{name}{i}", image, label))
        splits["val"] += [(f"v{name}{i}", Image.new("RGB", (SIZE, SIZE), (label, i, 200)), label) for i in range(2)]
        splits["test"] += [(f"t{name}{i}", Image.new("RGB", (SIZE, SIZE), (label, i, 100)), label) for i in range(3)]
    write_dataset(splits, list(PER_CLASS), root, maxcount=4, seed=5)
    return root


def _files(root: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)} of every file under root."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _members(tar_dir: Path, split: str) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of a split's tars."""
    out: dict[str, dict[str, bytes]] = defaultdict(dict)
    for tar in sorted(tar_dir.glob(f"{split}-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                out[key][ext] = t.extractfile(m).read()
    return dict(out)


def _expected_draw(source: Path, shots: int, draw: int) -> list[str]:
    """The protocol's rule written out again: each class's train keys in write order, permuted by
    Random("vipamin_scale.fewshot/<draw>/<class>"), the first k kept; classes in sorted order."""
    classes = json.loads((source / "classes.json").read_text())
    by_class = defaultdict(list)
    for key, sample in sorted(_members(source, "train").items()):
        by_class[classes[int(sample["cls"])]].append(key)
    out = []
    for name in sorted(by_class):
        keys = list(by_class[name])
        random.Random(f"vipamin_scale.fewshot/{draw}/{name}").shuffle(keys)
        out += keys[:shots]
    return out


def _read(root: Path, split: str, backend: str = "wds"):
    loader = build_loader(loader_cfg(root, backend, num_workers=1 if backend == "dali" else 0), split, train=False,
                          img_size=SIZE, mean=ZERO, std=ONE)
    batches = run_epoch(loader)
    return (torch.cat([x for x, _, _ in batches]), torch.cat([y for _, y, _ in batches]),
            [k for _, _, ks in batches for k in ks])


def test_k_per_class_by_the_rule_nested_bytes_as_stored_and_the_source_untouched(source, tmp_path):
    before = _files(source)
    source_train = _members(source, "train")
    drawn = {}
    for k in (1, 2, 5):
        root = fewshot_root(source, k, 3, tmp_path / "draws")
        assert root == tmp_path / "draws" / f"{k}shot_seed3"
        manifest = dataset_info(root)["manifest"]
        drawn[k] = manifest["drawn"]
        assert drawn[k] == _expected_draw(source, k, 3)
        assert (manifest["protocol"], manifest["shots"], manifest["seed"], manifest["source_split"]) == \
            ("fewshot", k, 3, "train")
        assert manifest["source"] == str(source.resolve()) and manifest["linked"] == ["test", "val"]
        assert manifest["source_digest"]["classes.json"].startswith("sha256 ")
        _, labels, _ = _read(root, "train")
        assert Counter(labels.tolist()) == {0: k, 1: k, 2: k}
        # each drawn image is the source's stored bytes (PNG and JPEG alike), with its label
        got = sorted((s["cls"], s.get("png", s.get("jpg"))) for s in _members(root, "train").values())
        want = sorted((source_train[key]["cls"], source_train[key].get("png", source_train[key].get("jpg")))
                      for key in drawn[k])
        assert got == want
    assert sum("jpg" in source_train[key] for key in drawn[5]) > 0  # JPEGs among them, kept as JPEGs
    assert set(drawn[1]) < set(drawn[2]) < set(drawn[5])  # nested in k
    assert fewshot_root(source, 2, 4, tmp_path / "draws") and \
        dataset_info(tmp_path / "draws" / "2shot_seed4")["manifest"]["drawn"] != drawn[2]  # another draw
    assert _files(source) == before  # the user's shards: not a byte or a timestamp changed


def test_the_other_splits_are_the_sources_own_through_both_loaders(source, tmp_path):
    root = fewshot_root(source, 2, 0, tmp_path)
    for split in ("val", "test"):
        for name in dataset_info(root)["splits"][split]["shards"]:
            assert (root / name).is_symlink() and (root / name).resolve() == (source / name).resolve()
        for backend in ("wds", "dali"):  # each backend reads the draw's split as it reads the source's
            x, y, keys = _read(source, split, backend)
            dx, dy, dkeys = _read(root, split, backend)
            assert dkeys == keys and torch.equal(dy, y) and torch.equal(dx, x), (split, backend)
    tx, ty, tkeys = _read(root, "train")
    dx, dy, dkeys = _read(root, "train", "dali")
    assert dkeys == tkeys == [f"train_{i:08d}" for i in range(6)] and torch.equal(dy, ty)
    torch.testing.assert_close(dx, tx, rtol=0, atol=1e-5)  # stored at model size: DALI equals PIL (test_dali.py)
    cfg = loader_cfg(root, "wds", batch_size=6)
    info = check_splits(cfg, {"data.train_split": "train", "data.val_split": "val", "data.test_split": "test"},
                        train="data.train_split")
    assert {s: v["count"] for s, v in info["splits"].items()} == {"train": 6, "val": 6, "test": 9}


def _bytes_read() -> int:
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def test_drawing_reads_the_labels_not_every_image(tmp_path):
    """Of a train split of 12 incompressible 192 KB images, a 1-shot draw reads the 3 it copies (and the tar
    headers and labels): well under half of the split's bytes (/proc/self/io's rchar counts every read)."""
    import numpy as np

    rng = np.random.default_rng(0)
    noise = [(f"s{i}", Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)), i % 3) for i in range(12)]
    write_dataset({"train": noise}, ["a", "b", "c"], tmp_path / "big")
    train = sum(p.stat().st_size for p in (tmp_path / "big").glob("train-*.tar"))
    assert train > 12 * 190_000
    start = _bytes_read()
    root = fewshot_root(tmp_path / "big", 1, 0, tmp_path / "draws")
    read = _bytes_read() - start
    copied = sum(len(s["png"]) for s in _members(root, "train").values())
    assert copied > 3 * 190_000 and read < train / 2, (read, copied, train)  # reading it all: > train


def test_a_draw_is_written_once_and_reused(source, tmp_path):
    root = fewshot_root(source, 2, 1, tmp_path)
    files = _files(root)
    assert fewshot_root(str(source), 2, 1, str(tmp_path)) == root and _files(root) == files  # not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK, "2shot_seed1"]  # no temporary left
    with pytest.raises(DataError, match=r"2shot_seed1: holds a draw with source_split='train', not 'val'"):
        fewshot_root(source, 2, 1, tmp_path, split="val")


def test_a_changed_source_is_refused_naming_the_directory_and_what_changed(source, tmp_path):
    import shutil

    user = tmp_path / "user"
    shutil.copytree(source, user)
    root = fewshot_root(user, 2, 0, tmp_path / "draws")
    (user / "classes.json").write_text(json.dumps(["a", "b", "z"]))
    with pytest.raises(DataError) as err:
        fewshot_root(user, 2, 0, tmp_path / "draws")
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{root}: its source {user.resolve()} changed") and \
        "(classes.json)" in line
    write_dataset({"train": [("x", Image.new("RGB", (SIZE, SIZE)), i % 3) for i in range(9)]}, ["a", "b", "z"], user,
                  overwrite=True)  # rewritten: other counts, other shards
    with pytest.raises(DataError, match=r"changed since this draw was made \(classes.json, manifest.json, "
                                        r"train-000000.tar and 4 more\)"):
        fewshot_root(user, 2, 0, tmp_path / "draws")


def test_a_class_with_too_few_images_is_named_and_nothing_is_written(source, tmp_path):
    with pytest.raises(DataError, match=r"\(train split\): class 'a': 5 training images, fewer than 6 shots$"):
        fewshot_root(source, 6, 0, tmp_path / "draws")
    assert not (tmp_path / "draws").exists()
    part = tmp_path / "part"  # a class of classes.json with no training image at all
    write_dataset({"train": [(f"s{i}", Image.new("RGB", (SIZE, SIZE)), i % 2) for i in range(6)]}, ["a", "b", "c"],
                  part)
    with pytest.raises(DataError, match=r"class 'c': 0 training images, fewer than 1 shots"):
        fewshot_root(part, 1, 0, tmp_path / "draws")


def test_the_shards_cli_draws_from_a_shard_directory(source, tmp_path, capsys):
    assert shards_cli([str(source), str(tmp_path / "fs"), "--protocol", "fewshot", "--shots", "2", "1",
                       "--seed", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["out_dir"] for line in lines] == [str(tmp_path / "fs" / f"{k}shot_seed3") for k in (1, 2)]
    assert lines[1]["counts"] == {"train": 6, "val": 6, "test": 9}
    assert dataset_info(tmp_path / "fs" / "1shot_seed3")["manifest"]["drawn"] == _expected_draw(source, 1, 3)
    assert shards_cli([str(source), str(tmp_path / "plain")]) == 2  # plain reads image trees, not shards
    assert "a shard directory; --protocol fewshot draws from one" in capsys.readouterr().err
    assert shards_cli([str(source), str(tmp_path / "fs"), "--protocol", "fewshot", "--overwrite"]) == 2
    assert capsys.readouterr().err.startswith("error: --overwrite: not used when SOURCE is a shard directory")


@pytest.mark.slow
def test_another_process_waits_for_the_writer_and_gets_the_same_draw(source, tmp_path):
    """While one process holds <out_dir>/.lock another writes nothing; then it finds the draw, and a draw
    made by a third process into another directory is the same images (the same tar bytes)."""
    import fcntl

    code = ("import sys; from vipamin_scale.data.fewshot import fewshot_root; "
            "print(fewshot_root(sys.argv[1], 2, 7, sys.argv[2]))")
    out = tmp_path / "shared"
    out.mkdir()
    with open(out / LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-c", code, str(source), str(out)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=cli_env())
        time.sleep(3)
        assert proc.poll() is None and sorted(p.name for p in out.iterdir()) == [LOCK]  # waiting, wrote nothing
        root = fewshot_root(source, 2, 7, tmp_path / "mine")  # meanwhile, this process in its own directory
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert stdout.strip() == str(out / "2shot_seed7")
    for name in ("train-000000.tar", "train-000000.idx"):
        assert (out / "2shot_seed7" / name).read_bytes() == (root / name).read_bytes()
    theirs, mine = dataset_info(out / "2shot_seed7")["manifest"], dataset_info(root)["manifest"]
    assert theirs == mine
