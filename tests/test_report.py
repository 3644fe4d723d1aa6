"""`vipamin-scale report`: a sweep directory's runs gathered into a table, a CSV and plots."""
from __future__ import annotations

import csv
import json
import subprocess

import pytest
import yaml
from conftest import TINY, cli, cli_env

from vipamin_scale.studies import build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _job(root, num, overrides, result=None, deep=True):
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    length = int(next(o for o in overrides if o.startswith("prompt.length=")).split("=")[1])
    method = next(o for o in overrides if o.startswith("init=")).split("=")[1]
    config = {"prompt": {"length": length, "deep": deep}, "init": {"method": method},
              "train": {"out_dir": "${hydra:runtime.output_dir}"}}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if result is not None:
        (job / "result.json").write_text(json.dumps(result))
    return job


def _ok(method, length, deep, acc, init_time):
    return {"method": method, "prompt_length": length, "deep": deep, "best_val": {"acc": acc - 0.01, "epoch": 2},
            "test": {"acc": acc, "count": 500}, "trainable_params": 100 + length, "init_time_s": init_time,
            "train_time_s": 2.0, "images_per_s": 128.0}


def test_report_of_a_synthetic_sweep_lists_every_run(tmp_path):
    sweep = tmp_path / "sweep"
    num = 0
    for deep in (False, True):
        for method in ("random", "vipamin"):
            for length in (1, 4):
                if (deep, method, length) == (True, "vipamin", 4):
                    result = {"status": "failed", "error": "RuntimeError: boom\nsecond line", "method": method,
                              "prompt_length": length, "deep": deep}
                else:
                    result = _ok(method, length, deep, 0.5 + 0.01 * length + (0.1 if method == "vipamin" else 0),
                                 0.5 * length if method == "vipamin" else 0.0)
                prompt = "deep" if deep else "shallow"
                _job(sweep, num, ["model=vit_test_d64", f"prompt={prompt}", f"prompt.length={length}",
                                  f"init={method}"], result, deep=deep)
                num += 1
    _job(sweep, num, ["model=vit_test_d64", "prompt=deep", "prompt.length=8", "init=random"], None)  # killed
    (sweep / "multirun.yaml").write_text("hydra: {}\n")

    proc = subprocess.run(cli("report", str(sweep)), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    with open(sweep / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == [str(i) for i in range(9)]
    assert [r["status"] for r in table] == ["ok"] * 7 + ["failed", "incomplete"]
    assert table[0]["overrides"] == "prompt=shallow prompt.length=1 init=random"  # only what the sweep varied
    assert table[3]["method"] == "vipamin" and table[3]["prompt_length"] == "4" and table[3]["deep"] == "False"
    assert float(table[3]["test_acc"]) == 0.5 + 0.04 + 0.1 and table[3]["trainable_params"] == "104"
    assert table[7]["error"] == "RuntimeError: boom" and table[7]["test_acc"] == ""
    assert table[8]["prompt_length"] == "8" and table[8]["method"] == "random"  # from .hydra/config.yaml

    md = (sweep / "report.md").read_text()
    assert "9 runs: 7 finished, 1 failed, 1 incomplete." in md
    assert "| 3 | ok | prompt=shallow prompt.length=4 init=vipamin | vipamin | 4 | shallow | 0.6300 | 2 | 0.6400 |" in md
    failed = md.split("## Failed or incomplete runs")[1]
    assert "`7` (failed) prompt=deep prompt.length=4 init=vipamin: RuntimeError: boom" in failed
    assert "`8` (incomplete)" in failed and "no result.json" in failed
    for name in ("accuracy_vs_prompt_length.png", "init_time_vs_prompt_length.png"):
        data = (sweep / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        assert f"]({name})" in md
    assert "report.md" in proc.stdout


def test_report_errors_on_a_missing_or_empty_directory(tmp_path):
    proc = subprocess.run(cli("report", str(tmp_path / "nope")), env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no such sweep directory")
    proc = subprocess.run(cli("report", str(tmp_path)), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no runs under" in proc.stderr


@pytest.mark.slow
def test_real_multirun_on_the_tiny_model_gives_a_report(tmp_path, digits_root):
    """Hydra multirun, 4 jobs in one process: 2 train, 2 fail validation; all 4 are reported."""
    sweep = tmp_path / "multirun"
    args = [*TINY, "train.epochs=1", "init=vipamin", "init.num_images=64", "init.k=2", "prompt.length=1,4",
            "init.lam=0.5,1.5", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cli("train", "-m", *args), env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-4000:]  # the invalid jobs' ConfigError
    for job in range(4):
        run = sweep / str(job)
        assert (run / ".hydra" / "overrides.yaml").is_file()
        result = json.loads((run / "result.json").read_text())
        lam = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())[-1]
        if lam == "init.lam=1.5":
            assert result["status"] == "failed" and "init.lam: must lie in [0, 1]" in result["error"]
        else:
            assert lam == "init.lam=0.5" and "status" not in result and result["test"]["count"] == 500
            assert (run / "config.resolved.yaml").is_file() and (run / "metrics.jsonl").is_file()
            assert result["init_time_s"] > 0 and result["images_per_s"] > 0

    report = build_report(sweep)
    assert [r["status"] for r in report["table"]] == ["ok", "failed", "ok", "failed"]
    assert [r["overrides"] for r in report["table"]] == [
        "prompt.length=1 init.lam=0.5", "prompt.length=1 init.lam=1.5",
        "prompt.length=4 init.lam=0.5", "prompt.length=4 init.lam=1.5"]
    assert [r["trainable_params"] for r in report["table"]] == [2 * 1 * 64 + 2 * 64 + 650, None, 2 * 4 * 64 + 2 * 64 + 650, None]
    assert all(p.stat().st_size > 10_000 for p in report["plots"])
    assert "4 runs: 2 finished, 2 failed, 0 incomplete." in report["report"].read_text()
