"""benchmarks/accuracy.py --quick end to end: every method tuned, 2 seeds, a well-formed table and plot."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

from benchmarks_support import load_accuracy_module


@pytest.mark.slow
def test_quick_accuracy_benchmark_end_to_end(tmp_path):
    out = tmp_path / "accuracy.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "accuracy.py"), "--quick", "--work",
                           str(tmp_path / "work"), "--out", str(out)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    bench = load_accuracy_module()
    assert list(doc["methods"]) == list(bench.METHODS) and doc["regimes"] == ["full", "1shot", "4shot"]
    for name, m in doc["methods"].items():
        assert m["lr"] in doc["args"]["lrs"]
        for regime in doc["regimes"]:
            cell = m["results"][regime]
            assert cell["n"] == 2, (name, regime, cell)  # every run finished
            assert 0.0 <= cell["mean"] <= 1.0 and cell["std"] >= 0.0
            assert abs(cell["mean"] - sum(cell["runs"]) / 2) < 1e-12
        rungs = m["tune"]["rungs"]  # grid: the 3 lrs at the full budget, the best val wins
        assert [len(r["trials"]) for r in rungs] == [3]
        best = max(rungs[0]["trials"], key=lambda t: (t["val_acc"], -t["candidate"]))
        assert m["lr"] == best["params"]["train.lr"]
    # the printed table: a header, a rule, one row per method, each cell "mean ± std"
    printed = proc.stdout.splitlines()
    start = printed.index("| method | full | 1shot | 4shot | tuned lr |")
    lines = [ln for ln in printed[start:] if ln.startswith("|")]
    assert lines[0] == "| method | full | 1shot | 4shot | tuned lr |" and len(lines) == 2 + len(bench.METHODS)
    for line in lines[2:]:
        assert len(re.findall(r"\d+\.\d ± \d+\.\d", line)) == 3, line
    assert out.with_suffix(".png").stat().st_size > 10_000
    proxy = doc["proxy"]
    assert len(proxy["cells"]) == 4 and set(proxy["spearman"]) >= {"entropy_norm (higher better)"}
    # the RESULTS.md section is built from the same document (quick mode never writes the repo's file)
    section = bench.results_section(doc, "accuracy.png")
    assert section.startswith(bench.BEGIN) and section.endswith(bench.END) and "| VIPAMIN corrected |" in section


def test_spearman_matches_scipy_with_ties():
    import random

    from scipy.stats import spearmanr

    bench = load_accuracy_module()
    rng = random.Random(0)
    for _ in range(20):
        x = [rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(9)]
        y = [rng.random() for _ in range(9)]
        assert abs(bench.spearman(x, y) - spearmanr(x, y).statistic) < 1e-12
