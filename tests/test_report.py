"""`vipamin-scale report`: a sweep directory's runs gathered into a table, a CSV and plots."""
from __future__ import annotations

import csv
import json
import subprocess

import pytest
import yaml
from conftest import TINY, cli, cli_env

from vipamin_scale.studies import PairingError, build_report
from vipamin_scale.studies import main as studies_main

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


def test_seeds_are_averaged_and_every_other_swept_override_is_a_line(tmp_path):
    """Two inits x 2 prompt lengths x 3 seeds, as slurm/prompt_length_sweep.sh leaves them (seed overrides,
    one few-shot draw a seed in data.root, the run's own prompts file, method "file"): four groups of n = 3,
    mean ± sample sd, the same numbers in report.md; the inits are two lines, not one averaged."""
    sweep = tmp_path / "sweep"
    accs = {("vipamin", 1): [0.50, 0.60, 0.70], ("vipamin", 5): [0.80, 0.80, 0.83],
            ("vipamin_paper", 1): [0.40, 0.44, 0.45], ("vipamin_paper", 5): [0.90, 0.91, 0.95]}
    num = 0
    for (init, length), values in accs.items():
        for seed, acc in enumerate(values):
            job = sweep / str(num)
            overrides = ["model=dinov2_s14_demo", f"data.root=/data/fewshot/4shot_seed{seed}", f"prompt.length={length}",
                         f"init={init}", f"prompt.init_file={job}/prompts.safetensors", f"init.seed={seed}",
                         f"train.seed={seed}"]
            result = None if (init, length, seed) == ("vipamin", 5, 2) else {**_ok("file", length, True, acc, 0.1 * seed)}
            _job(sweep, num, overrides, result)
            num += 1
    _job(sweep, num, ["model=dinov2_s14_demo", "data.root=/data/fewshot/4shot_seed2", "prompt.length=5",
                      "init=vipamin", f"prompt.init_file={sweep / str(num)}/prompts.safetensors", "init.seed=2",
                      "train.seed=2"], _ok("file", 5, True, 0.83, 0.2))  # the killed one's rerun, seed 2

    report = build_report(sweep)
    stats = report["summary"]
    assert [(r["group"], r["prompt_length"], r["n"], r["runs"]) for r in stats] == [
        ("prompt.length=1 init=vipamin", 1, 3, 3), ("prompt.length=5 init=vipamin", 5, 3, 4),
        ("prompt.length=1 init=vipamin_paper", 1, 3, 3), ("prompt.length=5 init=vipamin_paper", 5, 3, 3)]
    assert [r["line"] for r in stats] == ["init=vipamin"] * 2 + ["init=vipamin_paper"] * 2
    for row in stats:
        values = accs[(row["line"].split("=")[1], row["prompt_length"])]
        mean = sum(values) / 3
        sd = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5
        assert abs(row["acc_mean"] - mean) < 1e-12 and abs(row["acc_sd"] - sd) < 1e-12, row
        assert abs(row["acc_ci95"] - 4.302652729911275 * sd / 3 ** 0.5) < 1e-9
    assert abs(stats[0]["acc_sd"] - 0.1) < 1e-12
    assert all(r["init_time_mean"] is None for r in stats)  # method "file": the init ran elsewhere

    md = report["report"].read_text()
    assert "differ only in `init.seed`, `train.seed`, `prompt.init_file`, `data.root`." in md
    assert "| prompt.length=1 init=vipamin | deep | 1 | 3 | 3 | 0.6000 ± 0.1000 | [0.3516, 0.8484] |  |" in md
    assert "| prompt.length=5 init=vipamin | deep | 5 | 3 | 4 | 0.8100 ± 0.0173 |" in md
    assert "| prompt.length=1 init=vipamin_paper | deep | 1 | 3 | 3 | 0.4300 ± 0.0265 |" in md
    assert md.index("## Mean ± sd over seeds") < md.index("## Runs") < md.index("## Failed or incomplete runs")
    assert "13 runs: 12 finished, 0 failed, 1 incomplete." in md
    assert (sweep / "accuracy_vs_prompt_length.png").read_bytes().startswith(PNG_MAGIC)


def test_a_factor_that_changes_with_the_seed_in_every_run_is_not_averaged(tmp_path):
    """Seeds that never repeat give no evidence that a key follows them: init=a (seed 0), init=b (seed 1) stay apart."""
    sweep = tmp_path / "sweep"
    for num, (init, seed) in enumerate((("random", 0), ("vipamin", 1))):
        _job(sweep, num, ["prompt.length=4", f"init={init}", f"train.seed={seed}"], _ok(init, 4, True, 0.5 + num / 10, 0.0))
    stats = build_report(sweep)["summary"]
    assert [(r["line"], r["n"], r["acc_sd"]) for r in stats] == [("init=random", 1, None), ("init=vipamin", 1, None)]
    assert stats[0]["init_time_mean"] == 0.0 and stats[0]["init_time_sd"] is None
    assert "| init=random | deep | 4 | 1 | 1 | 0.5000 |  | 0.00 |" in build_report(sweep)["report"].read_text()


def test_paired_differences_against_a_baseline_with_exact_numbers(tmp_path, capsys):
    """`report --paired init=random`: 3 inits x 2 prompt lengths x 3 seeds, written in scrambled order (one
    few-shot draw a seed in data.root, the run's own prompts file, as slurm/*.sh leave them); spt's seed 2
    failed. Each init minus random, matched by seed, per prompt length: mean, 95 % t-interval, n."""
    sweep = tmp_path / "sweep"
    accs = {("random", 1): [0.50, 0.60, 0.55], ("vipamin", 1): [0.60, 0.64, 0.65], ("spt", 1): [0.55, 0.58, None],
            ("random", 5): [0.70, 0.72, 0.74], ("vipamin", 5): [0.80, 0.83, 0.84], ("spt", 5): [0.70, 0.70, 0.70]}
    cells = [(init, length, seed) for (init, length) in accs for seed in range(3)]
    names = {}
    for num, (init, length, seed) in enumerate(sorted(cells, key=lambda c: (c[2] * 7 + c[1] + len(c[0])) % 5)):
        acc = accs[(init, length)][seed]
        result = ({"status": "failed", "error": "RuntimeError: loss is nan", "method": init} if acc is None
                  else _ok(init, length, True, acc, 0.1))
        job = sweep / str(num)
        _job(sweep, num, ["model=dinov2_s14_demo", f"data.root=/data/fewshot/4shot_seed{seed}",
                          f"prompt.length={length}", f"init={init}", f"prompt.init_file={job}/prompts.safetensors",
                          f"init.seed={seed}", f"train.seed={seed}"], result)
        names[(init, length, seed)] = str(num)

    report = build_report(sweep, paired="init=random")
    rows = [(r["versus"], r["group"], r["prompt_length"], r["n"]) for r in report["paired"]]
    assert rows == [("init=spt", "prompt.length=1", 1, 2), ("init=spt", "prompt.length=5", 5, 3),
                    ("init=vipamin", "prompt.length=1", 1, 3), ("init=vipamin", "prompt.length=5", 5, 3)]
    t = {2: 4.302652729911275, 1: 12.706204736174698}  # Student's t, 0.975 quantile, by degrees of freedom
    for r in report["paired"]:
        init, length = r["versus"].split("=")[1], r["prompt_length"]
        d = [a - b for a, b in zip(accs[(init, length)], accs[("random", length)]) if a is not None]
        mean = sum(d) / len(d)
        sd = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5
        half = t[len(d) - 1] * sd / len(d) ** 0.5
        assert r["diffs"] == pytest.approx(d, abs=1e-12) and abs(r["mean"] - mean) < 1e-12
        assert abs(r["lo"] - (mean - half)) < 1e-9 and abs(r["hi"] - (mean + half)) < 1e-9, r
        assert r["resolved"] == (mean - half > 0 or mean + half < 0)
    by = {(r["versus"], r["prompt_length"]): r for r in report["paired"]}
    assert by[("init=vipamin", 5)]["resolved"] and not by[("init=vipamin", 1)]["resolved"]
    assert by[("init=spt", 5)]["sd"] is not None and abs(by[("init=spt", 5)]["mean"] + 0.02) < 1e-12

    md = report["report"].read_text()
    assert "## Paired differences against init=random" in md
    assert "matched by `init.seed`, `train.seed`, `data.root`" in md
    assert "| init=vipamin | prompt.length=5 | deep | 5 | 3 | +0.1033 | [+0.0890, +0.1177] | yes |" in md
    assert "| init=vipamin | prompt.length=1 | deep | 1 | 3 | +0.0800 | [-0.0061, +0.1661] | no |" in md
    assert "| init=spt | prompt.length=1 | deep | 1 | 2 | +0.0150 | [-0.4297, +0.4597] | no |" in md
    with open(sweep / "report.csv") as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    vip = table[names[("vipamin", 1, 0)]]
    assert vip["paired_vs"] == names[("random", 1, 0)] and abs(float(vip["paired_diff"]) - 0.10) < 1e-12
    assert table[names[("random", 1, 0)]]["paired_diff"] == "" and table[names[("spt", 1, 2)]]["paired_diff"] == ""
    with open(sweep / "report_paired.csv") as f:
        paired = list(csv.DictReader(f))
    assert [(r["versus"], r["prompt_length"], r["n"], r["resolved"]) for r in paired][-1] == ("init=vipamin", "5", "3", "True")
    assert (sweep / "paired_diff_vs_prompt_length.png").read_bytes().startswith(PNG_MAGIC)
    assert "](paired_diff_vs_prompt_length.png)" in md

    # a baseline that is no swept factor, or no run's value: one error line, exit 2, nothing rewritten
    before = (sweep / "report.md").read_bytes()
    for bad, says in (("init=bpt", "no run has init=bpt; its values: random, spt, vipamin"),
                      ("train.lr=0.1", "KEY a swept factor; the swept factors here: prompt.length, init"),
                      ("init", "give KEY=VALUE")):
        assert studies_main([str(sweep), "--paired", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --paired {bad}: ") and says in err[0], err
    # two finished runs of one draw in one group: ambiguous, named
    extra = _job(sweep, len(cells), ["model=dinov2_s14_demo", "data.root=/data/fewshot/4shot_seed0", "prompt.length=1",
                                     "init=vipamin", f"prompt.init_file={sweep / str(len(cells))}/prompts.safetensors",
                                     "init.seed=0", "train.seed=0"], _ok("vipamin", 1, True, 0.9, 0.1))
    with pytest.raises(PairingError, match=f"runs .* and {extra.name} are the same draw"):
        build_report(sweep, paired="init=random")
    assert (sweep / "report.md").read_bytes() == before


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
