"""`make demo`: a cut of study=accuracy at its recorded selection, 3 paired draws, the paired difference with its
interval, a progress line at least every 30 s."""
from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO, cli, cli_env
from omegaconf import OmegaConf

from vipamin_scale import runs
from vipamin_scale.demo import load_preset
from vipamin_scale.stats import paired
from vipamin_scale.study.execute import Progress


def test_progress_lines_say_what_runs_and_when_it_ends(tmp_path, monkeypatch):
    """No silent minutes: a line when a phase starts and as each pack ends, and at least every `every_s`
    between (the heartbeat), each with runs done of total, the packs running and an ETA; status.json alike."""
    lines = []
    p = Progress(tmp_path, every_s=0.2, echo=lines.append)

    class Cfg:  # what Progress reads of a run config
        def __init__(self, length, epochs=6):
            self.prompt = type("p", (), {"length": length})
            self.data = type("d", (), {"max_train_samples": 10, "name": "shards", "root": None, "batch_size": 10,
                                       "train_split": "train"})
            self.train = type("t", (), {"epochs": epochs})

    import vipamin_scale.study.protocol as P

    monkeypatch.setattr(P, "train_count", lambda data: 10)  # the runs' data is not read here
    p.working("selection of the linear probe's C (full/P10)", "features and fits, in this process")
    assert lines[-1].startswith("study: selection of the linear probe's C (full/P10): features and fits, in this "
                                "process (0:00); elapsed 0:0")  # minutes outside the packs are named, not "none"
    assert json.loads((tmp_path / "status.json").read_text())["running"][0]["pack"].startswith("features and fits")
    p.begin("selection", [Cfg(10), Cfg(10), Cfg(50, epochs=120)], reused=1)  # 6 + 6 steps, then 120
    p.planned([[0, 1], [2]], workers=1)
    assert lines[-1].startswith("study: selection: 1/4 runs done (1 reused); running: none")
    p.start()
    import time

    time.sleep(0.5)
    assert any("running: P10 x 2 runs (0:00)" in line for line in lines), lines
    p.done(0, [{}, {}])
    assert lines[-1].startswith("study: selection: 3/4 runs done (1 reused); running: P50 x 1 run (0:00)")
    assert "ETA ~" in lines[-1]  # the steps per second of the pack that ended, over the steps left
    first = p.state()["eta_s"]
    time.sleep(1.2)
    assert p.state()["eta_s"] < first  # it falls while the pack runs, not only when one ends
    p.close("finished", runs_total=4)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["phase"] == "finished" and status["runs_done"] == status["runs_total"] == 4


@pytest.mark.slow
def test_demo_runs_paired_draws_at_the_recorded_selection(tmp_path):
    """On the tiny model (the recorded lrs, another backbone: said in a warning line and in the table's text)."""
    out = tmp_path / "demo"
    proc = subprocess.run(cli("demo", "model=vit_test_d64", "model.pool=mean", f"hydra.run.dir={out}"), cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "selected on another backbone or data" in said and "its settings may not suit this one" in proc.stdout
    doc = json.loads((out / "study.json").read_text())
    lrs = {c["method"]: c["selected"]["params"]["train.lr"] for c in load_preset()["cells"]}
    accs = {}
    for c in doc["cells"]:
        assert c["n"] == 3 and c["selected"]["params"] == {"train.lr": lrs[c["method"]]}
        for d, r in enumerate(c["runs"]):
            result = runs.read_result(out / r["dir"])
            accs[(c["method"], d)] = result["test"]["acc"]
            assert result["test"]["count"] == 500 and r["test"] == result["test"]["acc"]
    for d in range(3):  # a draw is the same images for every method, another draw other images
        roots = {OmegaConf.load(out / c["runs"][d]["dir"] / "config.resolved.yaml").data.root for c in doc["cells"]}
        assert len(roots) == 1 and f"4shot_seed{d}" in roots.pop()
    for method in ("VIPAMIN", "VPT random"):
        row = ", ".join(f"{100 * accs[(method, d)]:.1f}" for d in range(3))
        assert f"(n=3: {row})" in proc.stdout
    p = paired([accs[("VIPAMIN", d)] for d in range(3)], [accs[("VPT random", d)] for d in range(3)])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("- VIPAMIN − VPT random"))
    assert f"{100 * p['mean']:+.1f} pt" in line and f"[{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}]" in line
    assert ("not resolved" in line) == (not p["resolved"])
    assert "study: final runs: 0/6 runs done" in proc.stdout  # the progress lines
