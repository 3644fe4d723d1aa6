"""benchmarks/accuracy.py: the paired design end to end (--quick), its statistics, its refusals."""
from __future__ import annotations

import json
import math
import re
import subprocess

import pytest
from conftest import REPO, cli_env

from benchmarks_support import load_accuracy_module, run_quick
from vipamin_scale.tune import parse_space


@pytest.mark.slow
def test_quick_accuracy_benchmark_end_to_end(tmp_path):
    out = tmp_path / "accuracy.json"
    cmd, proc = run_quick("accuracy.py", tmp_path, out, timeout=1200)
    doc = json.loads(out.read_text())
    bench = load_accuracy_module()
    assert list(doc["methods"]) == list(bench.METHODS) and doc["shots"] == [1, 2] and doc["draws"] == [3, 3]
    lr_lo, lr_hi, num = doc["args"]["lr_grid"]
    lrs = parse_space({"lr": {"log": [lr_lo, lr_hi], "num": num}})[0][1]
    assert doc["args"]["select_draws"] == 2 and doc["args"]["extend_edges"] == 1
    for name, m in doc["methods"].items():
        for k in ("1", "2"):
            sel = m["selected"][k]
            tried = [t.get("lr", t.get("C")) for t in sel["trials"]]
            if name == bench.LINEAR:  # the grid, then one more C past the end its winner sat at (if it did)
                grid = sel["trials"][:len(bench.LINEAR_CS)]
                assert tried[:len(grid)] == list(bench.LINEAR_CS)
                first = max(grid, key=lambda t: (t["val_acc"], -t["C"]))["C"]
                assert tried[len(grid):] == ([first * 10] if first == max(bench.LINEAR_CS) else
                                             [first / 10] if first == min(bench.LINEAR_CS) else [])
                edge = ["high"] if sel["value"] == max(tried) else ["low"] if sel["value"] == min(tried) else []
                assert sel["at_edge"] == edge
            else:  # every grid point tried on val, then the one edge round (a 2-point grid: the winner is at an end)
                assert tried[:2] == lrs and len(tried) == 3 and tried[2] in (lr_lo / 10, lr_hi * 10), tried
                edge = ["high"] if sel["value"] == max(tried) else ["low"] if sel["value"] == min(tried) else []
                assert sel["at_edge"] == edge
            for t in sel["trials"]:  # the score is the mean over draws 0 and 1 (None: a draw failed)
                by_draw = t["val_by_draw"]
                assert len(by_draw) == 2 and t["val_acc"] == (None if None in by_draw else pytest.approx(sum(by_draw) / 2))
            best = max(sel["trials"], key=lambda t: -1 if t["val_acc"] is None else t["val_acc"])
            assert sel["value"] in tried and next(t["val_acc"] for t in sel["trials"]
                                                  if t.get("lr", t.get("C")) == sel["value"]) == best["val_acc"]
            cell = m["results"][k]
            assert cell["n"] == 3, (name, k, cell)  # every draw finished
            assert abs(cell["mean"] - sum(cell["runs"]) / 3) < 1e-12 and 0 <= cell["mean"] <= 1
        for ref in (bench.RANDOM, bench.DEFAULT):
            if ref == name:
                continue
            for k in ("1", "2"):  # the paired difference is over the same draws, with a t interval
                p = m["paired"][ref][k]
                d = [x - y for x, y in zip(m["results"][k]["runs"], doc["methods"][ref]["results"][k]["runs"])]
                assert p["n"] == 3 and abs(p["mean"] - sum(d) / 3) < 1e-12
                if p["sd"] > 0:
                    from scipy import stats

                    lo, hi = stats.t.interval(0.95, 2, loc=p["mean"], scale=p["sd"] / math.sqrt(3))
                    assert abs(p["lo"] - lo) < 1e-12 and abs(p["hi"] - hi) < 1e-12
                    assert p["resolved"] == (lo > 0 or hi < 0)
    # the paired design: within a draw every prompt method saw the same training images
    g = doc["gate"]
    assert g["passed"] == (g["random_test"] >= g["probe_test"]) and doc["verdict"] == ("ok" if g["passed"]
                                                                                       else "undertrained")
    printed = proc.stdout.splitlines()
    header = "| method | 1-shot | 2-shot | selected (per k) |"
    rows = [ln for ln in printed[printed.index(header):] if ln.startswith("|")][:2 + len(bench.METHODS)]
    assert len(rows) == 2 + len(bench.METHODS)
    for line in rows[2:]:
        assert len(re.findall(r"\d+\.\d ± \d+\.\d", line)) == 2, line
    assert out.with_suffix(".png").stat().st_size > 10_000
    preset = json.loads((tmp_path / "demo_preset.json").read_text())
    assert preset["shots"] == 2 and set(preset["lr"]) == set(bench.DEMO_METHODS)
    assert all(preset["lr"][m] == doc["methods"][m]["selected"]["2"]["value"] for m in bench.DEMO_METHODS)
    section = bench.results_section(doc, "accuracy.png")
    assert section.startswith(bench.BEGIN) and section.endswith(bench.END)
    assert ("UNDERTRAINED" in section) == (not g["passed"]) and "| VIPAMIN paper |" in section
    assert "CUT VERSION" in section and doc["cut"]["shots"] == [[1, 2, 4, 8], [1, 2]]  # --quick is a cut
    # a second run reuses every finished run (here with the first run's gate: --gate-from), and refuses a
    # changed protocol
    again = subprocess.run(cmd + ["--gate-from", str(out)], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    redo = json.loads(out.read_text())
    assert redo["methods"] == doc["methods"] and redo["gate"]["from"].endswith("accuracy.json")
    assert {k: v for k, v in redo["gate"].items() if k != "from"} == g
    changed = subprocess.run(cmd + ["--epochs", "3"], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                             timeout=120)
    assert changed.returncode == 1 and "holds runs of another protocol (epochs: 2 -> 3)" in changed.stderr
    # more draws in the same --work: the first three of each method are reused as they were, one is added
    more = subprocess.run(cmd + ["--gate-from", str(out), "--shots", "2", "--draws", "4", "--methods", bench.RANDOM,
                                 bench.DEFAULT], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-2000:]
    assert "reusing 6 of 8 finished prompt runs" in bench.results_section(json.loads(out.read_text()), "x")
    for m in (bench.RANDOM, bench.DEFAULT):
        runs4 = json.loads(out.read_text())["methods"][m]["results"]["2"]
        assert runs4["n"] == 4 and runs4["runs"][:3] == doc["methods"][m]["results"]["2"]["runs"]


@pytest.mark.parametrize("curve, extend, tried, value, at_edge", [
    ({0.01: .5, 0.1: .6, 1.0: .7, 10.0: .6}, 2, [0.01, 0.1, 1.0, 10.0], 1.0, []),  # inside the grid: no round
    ({10.0: .7, 100.0: .8, 1000.0: .75}, 2, [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0], 100.0, []),  # found past it
    ({10.0: .7, 100.0: .8, 1000.0: .9}, 2, [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0], 1000.0, ["high"]),  # still rising
    ({10.0: .7, 100.0: .8}, 0, [0.01, 0.1, 1.0, 10.0], 10.0, ["high"]),  # no rounds asked for
    ({0.01: .8, 0.001: .7}, 1, [0.01, 0.1, 1.0, 10.0, 0.001], 0.01, []),  # the low end, beaten below
    ({0.01: .8, 0.1: .8}, 0, [0.01, 0.1, 1.0, 10.0], 0.01, ["low"]),  # a tie: the stronger regularization
])
def test_the_probes_C_is_selected_as_the_lr_is_edge_rounds_included(curve, extend, tried, value, at_edge):
    """The linear probe's C: mean val accuracy over the draws, a winner at an end of the Cs tried extends
    them x10 that way and re-selects, at most `extend` times; where it stayed at an end is said."""
    from types import SimpleNamespace

    bench = load_accuracy_module()
    probe = object.__new__(bench.LinearProbe)
    probe.fit = lambda cfg, C: C
    probe.score = lambda cfg, C, split: curve.get(C, 0.5) + cfg.offset  # two draws, the mean is the curve
    cfgs = [SimpleNamespace(data=SimpleNamespace(val_split="val"), offset=o) for o in (-0.1, 0.1)]
    C, trials, edge = probe.select(cfgs, extend)
    assert [t["C"] for t in trials] == pytest.approx(tried) and C == pytest.approx(value) and edge == at_edge
    assert all(t["val_acc"] == pytest.approx(curve.get(t["C"], 0.5)) for t in trials)


def test_draws_are_shared_and_nested(tmp_path):
    """Within a draw every method reads the same shard directory; draws differ; k-shot draws nest."""
    bench = load_accuracy_module()
    roots = bench.fewshot_roots(tmp_path, [1, 2], 2)
    drawn = {key: json.loads((root / "manifest.json").read_text())["drawn"] for key, root in roots.items()}
    assert set(drawn[(1, 0)]) <= set(drawn[(2, 0)]) and drawn[(2, 0)] != drawn[(2, 1)]
    a = bench.parse(["--quick"])
    cfgs = [bench.run_cfg(a, roots[(2, 1)], m) for m in ("VPT random", "VIPAMIN", "BPT whiten Σ=tokens")]
    assert len({c.data.root for c in cfgs}) == 1 and cfgs[2].init.bpt_sigma == "tokens"
    assert cfgs[1].init.method == "vipamin" and cfgs[1].init.orth_scale == "match"


def test_schedule_and_paired_interval():
    bench = load_accuracy_module()
    assert bench.schedule(10, 10, 20, 60) == {"batch": 10, "epochs": 60, "steps": 60, "warmup_epochs": 6.0}
    assert bench.schedule(80, 10, 20, 60) == {"batch": 10, "epochs": 20, "steps": 160, "warmup_epochs": 2.0}
    p = bench.paired([0.5, 0.6, 0.7, None], [0.4, 0.45, 0.5, 0.9])  # a failed draw is left out of the pair
    assert p["n"] == 3 and abs(p["mean"] - 0.15) < 1e-12 and p["resolved"]
    assert not bench.paired([0.5, 0.4], [0.4, 0.5])["resolved"]


def test_the_benchmarks_init_presets_are_the_packaged_ones():
    """VIPAMIN, vipamin_paper and vipamin_official in the benchmark are the YAML presets `init=...` picks."""
    from omegaconf import OmegaConf

    from vipamin_scale.config import CONFIG_DIR, default_config

    bench = load_accuracy_module()
    for name, overrides in (("vipamin", bench.VIPAMIN), ("vipamin_paper", bench.VIPAMIN_PAPER),
                            ("vipamin_official", bench.VIPAMIN_OFFICIAL)):
        preset = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "init" / f"{name}.yaml"))
        cfg = bench.run_cfg(bench.parse(["--quick"]), None, "VIPAMIN", full=True)  # the schema's values beneath
        for key, value in preset.items():
            want = overrides.get(f"init.{key}", cfg.init[key])
            assert want == value, (name, key, want, value)
        schema = default_config().init  # what the preset leaves to the schema, the benchmark sets alike
        for key, value in overrides.items():
            assert preset.get(key[len("init."):], schema[key[len("init."):]]) == value, (name, key)


def test_committed_results_name_no_directory_of_their_machine():
    """The writers pass their records through `paths.portable`; the committed ones hold its form."""
    from vipamin_scale.paths import portable

    assert portable({"cmd": "x.py --work /tmp/w --out /root/o/a.json see https://h.org/a/b 1/2",
                     "logs": ["/tmp/w/a/b.log", "/repo/runs/x"]}, {"WORK": "/tmp/w", "": "/repo"}) == \
        {"cmd": "x.py --work WORK --out …/a.json see https://h.org/a/b 1/2", "logs": ["WORK/a/b.log", "runs/x"]}
    files = [*(REPO / "benchmarks" / "results").glob("*.*"), *(REPO / "vipamin_scale").glob("*.json")]
    found = {f.name for f in files if f.suffix in (".json", ".csv", ".md")
             and re.search(r"(/tmp/|/root/|/work/|/home/)[A-Za-z0-9_.-]", f.read_text())}
    assert not found, found


def test_a_gate_is_reused_only_from_a_study_that_ran_the_same_gate(tmp_path):
    """--gate-from: another study's gate (prompt_length_study.py's JSON, its P = --gate-length) is reused
    when the backbone, full-data schedule, lr grid and P agree; anything else is one error line naming
    what differs, before any run."""
    bench = load_accuracy_module()
    a = bench.parse(["--shots", "4", "--draws", "20"])
    gate = {"n": 1000, "epochs": 5, "steps": 155, "probe_C": 1.0, "probe_trials": [], "probe_test": 0.938,
            "random_lr": 0.05, "random_trials": [], "random_test": 0.95, "passed": True}
    args = {**{k: getattr(a, k) for k in bench.GATE_KEYS}, "gate_length": 10, "prompt_length": 10}
    study = tmp_path / "prompt_length.json"
    study.write_text(json.dumps({"args": args, "gate": gate}))
    got = bench.gate_from(str(study), a)
    assert {k: v for k, v in got.items() if k != "from"} == gate and got["from"].endswith("prompt_length.json")
    assert "Measured by" in bench.gate_text(got)
    for change, what in (({"full_epochs": 5}, "full_epochs: 5 -> 10"), ({"gate_length": 50}, "P: 50 -> 10"),
                         ({"lr_grid": [0.05, 0.5, 3]}, "lr_grid: [0.05, 0.5, 3] -> [0.05, 1.6, 4]")):
        other = tmp_path / "other.json"
        other.write_text(json.dumps({"args": {**args, **change}, "gate": gate}))
        with pytest.raises(SystemExit) as exc:
            bench.gate_from(str(other), a)
        assert str(exc.value).startswith(f"error: --gate-from {other}: its gate ran another protocol") and what in str(
            exc.value)
    (tmp_path / "bad.json").write_text(json.dumps({"args": args, "gate": {"passed": True}}))
    with pytest.raises(SystemExit, match="lacks"):
        bench.gate_from(str(tmp_path / "bad.json"), a)
    with pytest.raises(SystemExit, match="not a study's JSON"):
        bench.gate_from(str(tmp_path / "missing.json"), a)
    cut = bench.cut_from(bench.parse([]), a, bench.CUT_KEYS)
    assert cut == {"shots": [[1, 2, 4, 8], [4]], "draws": [[5, 5, 20, 20], [20]]}
    # a cut run never replaces the demo's preset unless told where to write one; the full protocol does
    assert bench.preset_path(a) is None
    assert bench.preset_path(bench.parse([])) == bench.REPO / "benchmarks" / "results" / "demo_preset.json"
    assert bench.preset_path(bench.parse(["--shots", "4", "--preset-out", str(tmp_path / "p.json")])) == tmp_path / "p.json"
