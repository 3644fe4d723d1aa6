"""Benchmark protocol builders: VTAB-1k splits (VPT's convention), few-shot draws, the CLI and the config presets."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vipamin_scale.config import default_config
from vipamin_scale.data import DataError, build_loader, dataset_info
from vipamin_scale.data.cli import main as shards_cli
from vipamin_scale.data.protocols import (FEWSHOT_SHOTS, VTAB_TASKS, fewshot_draw, fewshot_shards, read_source,
                                          vtab_positions, vtab_shards, vtab_task)

ZERO, ONE = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.new("RGB", (4, 4), (i * 40 % 256, 0, 0)).save(path)
        out.append(path)
    return out


def _labels(root: Path, split: str) -> Counter:
    cfg = default_config().data
    cfg.name, cfg.root, cfg.eval_batch_size = "shards", str(root), 500
    loader = build_loader(cfg, split, train=False, img_size=4, mean=ZERO, std=ONE)
    return Counter(y for _, labels, _ in loader for y in labels.tolist())


# ----------------------------------------------------------------------------------- VTAB-1k


def test_vtab_table():
    assert len(VTAB_TASKS) == 19 and len({t.name for t in VTAB_TASKS}) == 19
    assert Counter(t.group for t in VTAB_TASKS) == {"natural": 7, "specialized": 4, "structured": 8}
    assert {t.name: t.num_classes for t in VTAB_TASKS if t.name in ("cifar100", "dtd", "sun397", "smallnorb_azimuth")} \
        == {"cifar100": 100, "dtd": 47, "sun397": 397, "smallnorb_azimuth": 18}
    with pytest.raises(DataError, match="unknown"):
        vtab_task("imagenet")


def test_vtab_positions_follow_vpt():
    assert vtab_positions(50000) == {"train800": ("train", 0, 800), "val200": ("train", 45000, 45200), "n90": 45000}
    assert vtab_positions(1991)["val200"] == ("train", 1791, 1991)  # the smallest train list that fits
    assert vtab_positions(1500, 300)["val200"] == ("val", 0, 200)  # an official val split: its first 200
    with pytest.raises(DataError, match="90% point"):
        vtab_positions(1990)


def test_vtab_splits_from_csv(tmp_path):
    files = _images(tmp_path / "img", 5)
    rows = ["path,label,split"]
    rows += [f"img/{i % 5}.png,{i % 5},train" for i in range(2100)]
    rows += [f"img/{i % 5}.png,{i % 5},test" for i in range(30)]
    (tmp_path / "task.csv").write_text("\n".join(rows) + "\n")
    assert len(files) == 5
    manifest = vtab_shards(tmp_path / "task.csv", tmp_path / "out", maxcount=300)
    counts = {s: v["count"] for s, v in manifest["splits"].items()}
    assert counts == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 30}
    assert manifest["protocol"] == "vtab-1k" and manifest["order"] == "source" and manifest["n90"] == 1890
    row = {s: [int(sid.rsplit(":", 1)[1]) for sid in ids] for s, ids in manifest["drawn"].items()}
    assert row["train800"] == list(range(2, 802))  # CSV line numbers: the header is line 1
    assert row["val200"] == list(range(1892, 2092))  # 200 from the 90% point
    assert not set(row["train800"]) & set(row["val200"])  # disjoint
    assert _labels(tmp_path / "out", "train800val200") == _labels(tmp_path / "out", "train800") + \
        _labels(tmp_path / "out", "val200")
    assert (tmp_path / "out" / "train800-000000.idx").is_file()  # DALI index files come with the shards
    with pytest.raises(DataError, match="5 classes, but VTAB dtd has 47"):
        vtab_shards(tmp_path / "task.csv", tmp_path / "out2", task="dtd")


def test_vtab_lists_are_used_as_given(tmp_path):
    _images(tmp_path / "task" / "images", 4)
    lines = {"train800": [f"images/{i % 4}.png {i % 4}" for i in range(800)],
             "val200": [f"images/{i % 4}.png {(i + 1) % 4}" for i in range(200)],
             "test": [f"images/{i % 4}.png {i % 4}" for i in range(12)]}
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, ls in lines.items():
        (tmp_path / "task" / f"{split}.txt").write_text("\n".join(ls) + "\n")
    manifest = vtab_shards(tmp_path / "task", tmp_path / "out", task="eurosat", maxcount=1000)
    assert manifest["rule"] == "lists" and manifest["num_classes"] == 10
    assert {s: v["count"] for s, v in manifest["splits"].items()} == \
        {"train800": 800, "val200": 200, "train800val200": 1000, "test": 12}
    (tmp_path / "task" / "val200.txt").write_text("\n".join(lines["val200"][:199]) + "\n")
    with pytest.raises(DataError, match="800/200/1000"):
        vtab_shards(tmp_path / "task", tmp_path / "out2")


# ----------------------------------------------------------------------------------- few-shot


@pytest.fixture(scope="module")
def fgvc(tmp_path_factory) -> Path:
    """root/<split>/<class>/: train 3 classes x (20, 17, 16), val 2 per class, test 3 per class."""
    root = tmp_path_factory.mktemp("fgvc")
    for c, n in enumerate((20, 17, 16)):
        _images(root / "train" / f"bird{c}", n)
        _images(root / "val" / f"bird{c}", 2)
        _images(root / "test" / f"bird{c}", 3)
    return root


def test_fewshot_exactly_k_per_class_nested_and_seed_stable(fgvc, tmp_path):
    splits, classes, kind = read_source(fgvc)
    assert kind == "tree" and classes == ["bird0", "bird1", "bird2"] and len(splits["train"]) == 53
    draws = {k: fewshot_draw(splits["train"], k, seed=0) for k in FEWSHOT_SHOTS}
    for k, chosen in draws.items():
        assert Counter(c for _, _, c in chosen) == {"bird0": k, "bird1": k, "bird2": k}
        assert len({sid for sid, _, _ in chosen}) == 3 * k
    assert set(draws[1]) <= set(draws[2]) <= set(draws[4]) <= set(draws[8]) <= set(draws[16])  # nested
    assert fewshot_draw(splits["train"], 4, seed=0) == draws[4]  # seed-stable
    assert fewshot_draw(splits["train"], 4, seed=1) != draws[4]
    with pytest.raises(DataError, match="'bird2': 16 training images, fewer than 17 shots"):
        fewshot_draw(splits["train"], 17, seed=0)
    made = fewshot_shards(fgvc, tmp_path / "out", shots=(2, 4), seed=0)
    assert sorted(made) == [2, 4]
    root = tmp_path / "out" / "4shot_seed0"
    info = dataset_info(root)
    assert {s: v["count"] for s, v in info["splits"].items()} == {"train": 12, "val": 6, "test": 9}
    assert info["manifest"]["shots"] == 4 and info["manifest"]["seed"] == 0
    assert info["manifest"]["drawn"] == [sid for sid, _, _ in draws[4]]
    assert _labels(root, "train") == {0: 4, 1: 4, 2: 4}


def test_cli_protocols(fgvc, tmp_path, capsys):
    assert shards_cli([str(fgvc), str(tmp_path / "fs"), "--protocol", "fewshot", "--shots", "1", "--seed", "3"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert out["counts"] == {"train": 3, "val": 6, "test": 9} and out["out_dir"].endswith("1shot_seed3")
    assert shards_cli([str(fgvc), str(tmp_path / "vt"), "--protocol", "vtab"]) == 2
    assert "need >= 800 train and >= 200 val images; the source has 53 and 6" in capsys.readouterr().err  # one line


def test_config_presets_select_and_final():
    from hydra import compose, initialize_config_dir

    from vipamin_scale.config import CONFIG_DIR, register, validate

    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        select = compose("config", overrides=["data=vtab_select", "data.root=/shards/dtd"])
        final = compose("config", overrides=["data=vtab_final", "data.root=/shards/dtd", "data.backend=dali"])
    for cfg in (select, final):
        validate(cfg)
        assert cfg.data.name == "shards" and cfg.data.root == "/shards/dtd"
    assert (select.data.train_split, select.data.val_split, select.train.eval_split, select.train.test_at_end) == \
        ("train800", "val200", "val", False)
    assert (final.data.train_split, final.data.test_split, final.train.eval_split) == ("train800val200", "test", "test")
