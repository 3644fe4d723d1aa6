"""Data checked before compute, and data errors at the CLI as one line (exit 2, no traceback).

Every case drives `vipamin-scale` as a user would: a missing or misspelt split, a batch larger than the
training split, a dataset of one class, an empty class folder, a corrupt image, a truncated or missing
shard.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, TINY, cli, cli_env, free_port
from PIL import Image

from vipamin_scale import runs
from vipamin_scale.cli import main
from vipamin_scale.config import ConfigError
from vipamin_scale.data import DataError, check_splits, make_shards
from vipamin_scale.data.shards import write_dataset
from vipamin_scale.data.wds import plan_slot
from data_support import loader_cfg

PER_CLASS = {"train": 8, "val": 2, "test": 2}  # x 3 classes: train 24, val 6, test 6
# TINY without its data fields: the runs here read their own shards.
RUN = [a for a in TINY if not a.startswith("data")] + [
    "data=shards", "data.batch_size=8", "data.eval_batch_size=8", "train.epochs=1", "init.method=random"]


def _tree(root: Path, classes=("a", "b", "c"), per_class=PER_CLASS) -> Path:
    for split, n in per_class.items():
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 12), (40 + 80 * c, 9 * i, 3)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checks_shards")
    make_shards(_tree(tmp_path_factory.mktemp("checks_src")), out, maxcount=8)  # train: 3 shards of 8
    return out


@dataclass
class Done:
    returncode: int
    stderr: str


@pytest.fixture
def run_cli(capfd):
    """`vipamin-scale ARGS` as a user runs it: in this process (`cli.main`, what the console script calls;
    saves a Python start per case), or as a subprocess with subprocess=True. An exception that escapes
    main() is a traceback for the user: the test fails with it."""
    def run(*args: str, subprocess_: bool = False) -> Done:
        if subprocess_:
            proc = subprocess.run(cli(*args), env=cli_env(), capture_output=True, text=True, timeout=600)
            return Done(proc.returncode, proc.stderr)
        capfd.readouterr()
        code = main(list(args))
        return Done(code, capfd.readouterr().err)
    return run


def _user_error(done: Done) -> str:
    """The one `error:` line a user's mistake must end with (exit 2, no traceback); returned for checks."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), done.stderr[-3000:]
    return last


def _train(run_cli, root: Path, run: Path, *overrides: str, subprocess_: bool = False) -> Done:
    return run_cli("train", *RUN, f"data.root={root}", f"hydra.run.dir={run}", *overrides, subprocess_=subprocess_)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------- before compute


@pytest.mark.parametrize("overrides, says", [
    (["data.test_split=tset"], "error: data.test_split: {manifest}: no split 'tset'; it has ['test', 'train', 'val']"),
    (["train.eval_split=test", "data.test_split=tset", "train.test_at_end=false"], "error: data.test_split: "),
    (["data.train_split=train+vla"], "error: data.train_split: {manifest}: no split 'vla' (in 'train+vla')"),
    (["data.batch_size=32"], "error: data.batch_size: 32 is more than data.train_split='train' holds (24 samples"),
    (["data.max_train_samples=6"], "error: data.batch_size: 8 is more than data.train_split='train' holds "
                                   "(6 samples with data.max_train_samples=6"),
], ids=["test_split", "eval_split", "train_union", "batch", "max_train_samples"])
def test_run_config_checked_against_the_data_before_training(run_cli, shards, tmp_path, overrides, says):
    run = tmp_path / "run"
    line = _user_error(_train(run_cli, shards, run, *overrides, subprocess_=overrides == ["data.test_split=tset"]))
    assert line.startswith(says.format(manifest=shards / "manifest.json")), line
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()  # nothing trained


def test_splits_the_run_does_not_read_are_not_required(run_cli, shards, tmp_path):
    run = tmp_path / "run"
    proc = _train(run_cli, shards, run, "data.test_split=tset", "train.test_at_end=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "result.json").is_file()


def test_one_class_dataset(run_cli, tmp_path):
    src = tmp_path / "src"
    _tree(src, classes=("only",))
    line = _user_error(run_cli("shards", str(src), str(tmp_path / "out")))
    assert line == f"error: {src}: 1 class ('only'); a classification dataset needs at least 2"
    assert not (tmp_path / "out" / "manifest.json").exists()
    (tmp_path / "one.csv").write_text("".join(f"{f.relative_to(tmp_path)},only\n" for f in sorted(src.rglob("*.png"))))
    line = _user_error(run_cli("shards", str(tmp_path / "one.csv"), str(tmp_path / "out")))
    assert line == f"error: {tmp_path / 'one.csv'}: 1 class ('only'); a classification dataset needs at least 2"
    # shards of one class written some other way: the run refuses them before any compute
    out = tmp_path / "one"
    write_dataset({"train": [(f"s{i}", Image.new("RGB", (8, 8)), 0) for i in range(16)]}, ["only"], out)
    line = _user_error(_train(run_cli, out, tmp_path / "run"))
    assert line == f"error: data.root: {out / 'classes.json'} lists 1 class ['only']; a classification run needs at least 2"


@pytest.mark.parametrize("layout", ["class", "split/class", "fewshot"])
def test_empty_class_folder_is_an_error(run_cli, tmp_path, layout):
    src = tmp_path / "src"
    if layout == "class":
        _tree(tmp_path / "tmp", per_class={"x": 5})
        (tmp_path / "tmp" / "x").rename(src)
        empty = src / "d"
    else:
        _tree(src)
        empty = src / ("val" if layout == "split/class" else "train") / "d"
    empty.mkdir()
    (empty / "readme.txt").write_text("not an image")
    (src / ("" if layout == "class" else "train") / ".hidden").mkdir()  # hidden folders are no classes
    protocol = ["--protocol", "fewshot", "--shots", "1"] if layout == "fewshot" else []
    line = _user_error(run_cli("shards", str(src), str(tmp_path / "out"), *protocol))
    assert line == f"error: {empty}: class folder holds no image files (.jpg/.jpeg/.png/...); remove it or add images"
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_check_splits_direct(shards, tmp_path):
    cfg = loader_cfg(shards, "wds", batch_size=8)
    info = check_splits(cfg, {"data.train_split": "train+val", "data.test_split": "test"}, train="data.train_split",
                        limit=3)  # 3 of train + all 6 of val = 9 >= 8
    assert info["num_classes"] == 3
    with pytest.raises(ConfigError, match=r"^data\.batch_size: 8 .* \(7 samples with data\.max_train_samples=1, "):
        check_splits(cfg, {"data.train_split": "train+val"}, train="data.train_split", limit=1)
    with pytest.raises(ConfigError, match=r"^tune\.final_train_split: .*no split 'x'"):
        check_splits(cfg, {"data.train_split": "train", "tune.final_train_split": "train+x"})
    root = _copy(shards, tmp_path / "noshard")
    (root / "test-000000.tar").unlink()
    with pytest.raises(DataError, match=r"^data\.test_split: .*test-000000\.tar: shard file missing"):
        check_splits(loader_cfg(root, "wds"), {"data.train_split": "train", "data.test_split": "test"})
    check_splits(loader_cfg(root, "wds", on_error="skip"), {"data.test_split": "test"})  # skip: left to the loader


# ----------------------------------------------------------------------------------- bad data, one line


def test_missing_shard_one_line_before_compute(run_cli, shards, tmp_path):
    root = _copy(shards, tmp_path / "data")
    (root / "train-000001.tar").unlink()
    run = tmp_path / "run"
    line = _user_error(_train(run_cli, root, run))
    assert line == f"error: data.train_split: {root / 'train-000001.tar'}: shard file missing (listed in " \
                   f"{root / 'manifest.json'})"
    assert not (run / "checkpoints").exists()
    # init reads the training split too
    line = _user_error(run_cli("init", *RUN, "init.method=vipamin", f"data.root={root}", f"out={tmp_path / 'p.safetensors'}",
                            f"hydra.run.dir={tmp_path / 'init'}"))
    assert "train-000001.tar: shard file missing" in line and not (tmp_path / "p.safetensors").exists()


def test_truncated_shard_one_line(run_cli, shards, tmp_path):
    root = _copy(shards, tmp_path / "data")
    shard = root / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    line = _user_error(_train(run_cli, root, tmp_path / "run"))
    assert line.startswith(f"error: {shard}: unreadable at key train_000000") or \
        line.startswith(f"error: {shard}: ends before key train_000000"), line


def test_corrupt_image_one_line(run_cli, tmp_path):
    samples = [(f"s{i}", Image.new("RGB", (8, 8), (20 * i, 0, 0)), i % 2) for i in range(16)]
    samples[5] = ("s5", (b"\x89PNG\r\n\x1a\n garbage", "png"), 1)
    root = tmp_path / "data"
    write_dataset({"train": samples, "val": samples[:4]}, ["a", "b"], root, shuffle=False, verify=False)
    line = _user_error(_train(run_cli, root, tmp_path / "run", "train.test_at_end=false"))
    assert line.startswith(f"error: {root / 'train-000000.tar'}: key train_00000005: cannot decode the png image"), line


@pytest.mark.slow  # one torchrun launch at 2 ranks (~25 s on 2 cores)
def test_corrupt_sample_on_one_rank_names_that_rank_under_torchrun(tmp_path):
    """A sample only rank 1 decodes is corrupt: rank 1's line is the root cause everywhere. The launcher
    (launch/torchrun.sh) exits 2 as for one process, torchrun's summary names rank 1 with its line, rank 0
    stops with one line naming rank 1 (no gloo traceback), and the run's record holds rank 1's error."""
    first = plan_slot([16], batch_size=8, train=True, world_size=2, rank=1, num_workers=0, worker=0, seed=0,
                      epoch=0, shuffle_buffer=1000).batches[0][0][1]  # rank 1's first sample
    samples = [(f"s{i}", Image.new("RGB", (8, 8), (15 * i, 0, 0)), i % 2) for i in range(16)]
    samples[first] = (f"s{first}", (b"\x89PNG\r\n\x1a\n garbage", "png"), 1)
    root, run = tmp_path / "data", tmp_path / "run"
    write_dataset({"train": samples, "val": samples[:4]}, ["a", "b"], root, shuffle=False, verify=False)
    env = cli_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    done = subprocess.run([str(REPO / "launch" / "torchrun.sh"), "train", *RUN, f"data.root={root}",
                           "train.test_at_end=false", f"hydra.run.dir={run}"], env=env, capture_output=True,
                          text=True, timeout=300)  # a hang (a collective's 600 s timeout) fails here
    out = done.stdout + done.stderr
    root_line = f"{root / 'train-000000.tar'}: key train_{first:08d}: cannot decode the png image"
    assert done.returncode == 2, out[-4000:]
    assert f"error: {root_line}" in out, out[-4000:]
    assert f"error: stopped because rank 1 failed: {root_line}" in out, out[-4000:]  # rank 0, one line
    assert "Connection closed" not in out and "Traceback" not in out, out[-4000:]
    summary = out[out.index("Root Cause"):]  # torchrun's summary: the first failure is rank 1's, with its line
    assert "rank      : 1 (local_rank: 1)" in summary and root_line in summary, summary
    assert "cannot decode the png image" in runs.run_status(run)[1]["error"]
