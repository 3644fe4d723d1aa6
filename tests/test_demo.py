"""`make demo`: the benchmark's preset, 3 paired draws, the paired difference with its interval."""
from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO, cli, cli_env
from omegaconf import OmegaConf

from vipamin_scale import demo, runs
from vipamin_scale.stats import paired


def test_the_packaged_preset_is_the_benchmarks_record():
    """The demo reads the preset the accuracy benchmark wrote (benchmarks/results/demo_preset.json)."""
    recorded = json.loads((REPO / "benchmarks" / "results" / "demo_preset.json").read_text())
    assert demo.load_preset() == recorded
    assert set(recorded["lr"]) == set(recorded["overrides"]) >= set(demo.METHODS)


def test_a_line_as_each_run_ends(capsys):
    """No silent minutes: the pool reports each job as it ends, and the demo prints one line per run."""
    from vipamin_scale.pool import run_in_processes

    jobs = [("VIPAMIN", 0, None), ("VPT random", 0, None), ("VIPAMIN", 1, None)]
    results = run_in_processes(lambda x: x, [(0.5,), (None,), (0.25,)], 1, on_done=demo._progress(jobs))
    assert results == [0.5, None, 0.25]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "demo: VIPAMIN draw 0: test acc 50.0 %", "demo: VPT random draw 0: test acc –", "demo: VIPAMIN draw 1: test acc 25.0 %"]
    assert [line.split("elapsed, ")[1] for line in lines] == ["2 runs left)", "1 runs left)", "0 runs left)"]
    assert demo.progress_line("VIPAMIN", 2, 0.123, 125.4, 3) == \
        "demo: VIPAMIN draw 2: test acc 12.3 % (2:05 elapsed, 3 runs left)"


@pytest.mark.slow
def test_demo_runs_paired_draws_at_the_preset(tmp_path):
    """On the tiny model (the preset's schedule and lrs, another backbone: said in a warning line)."""
    out = tmp_path / "demo"
    proc = subprocess.run(cli("demo", "model=vit_test_d64", "model.pool=mean", f"hydra.run.dir={out}"), cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the preset's learning rates were selected for another backbone" in proc.stdout + proc.stderr
    preset = demo.load_preset()
    accs = {}
    for method in demo.METHODS:
        for d in range(demo.DRAWS):
            run = out / demo._slug(method) / f"draw{d}"
            result = runs.read_result(run)
            accs[(method, d)] = result["final_eval"]["acc"]
            assert result["final_eval"]["count"] == 500  # the one evaluation is on test
            assert f"demo: {method} draw {d}: test acc {100 * accs[(method, d)]:.1f} % (" in proc.stdout
    assert proc.stdout.count(" runs left)") == len(demo.METHODS) * demo.DRAWS and "0 runs left)" in proc.stdout
    for d in range(demo.DRAWS):  # a draw is the same images for every method, another draw other images
        roots = {OmegaConf.load(out / demo._slug(m) / f"draw{d}" / "config.resolved.yaml").data.root
                 for m in demo.METHODS}
        assert len(roots) == 1 and f"{preset['shots']}shot_seed{d}" in roots.pop()
    table = (out / "demo_results.md").read_text()
    assert table.strip() in proc.stdout
    for method in demo.METHODS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        assert f"| {preset['lr'][method]:g} |" in row
        cells = [f"{100 * accs[(method, d)]:.1f}" for d in range(demo.DRAWS)]
        assert all(c in row for c in cells), (row, cells)
    for method in demo.METHODS:
        if method == demo.VIPAMIN:
            continue
        p = paired([accs[(demo.VIPAMIN, d)] for d in range(3)], [accs[(method, d)] for d in range(3)])
        line = next(ln for ln in table.splitlines() if ln.startswith(f"{demo.VIPAMIN} − {method}:"))
        assert f"{100 * p['mean']:+.1f} pt" in line
        if p["lo"] is not None:
            assert f"[{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}]" in line
            assert ("NOT resolved" in line) == (not p["resolved"])
