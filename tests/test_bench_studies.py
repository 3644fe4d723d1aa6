"""The benchmarks that are study presets (benchmarks/accuracy.py, prompt_length_study.py): the record copied with
paths relative to its work directory, the plots, the marked RESULTS.md section; a gate reused only from a study
that ran the same gate; the digits' draws shared by every method and nested across k."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, cli_env

from vipamin_scale import compose, runs
from vipamin_scale.config import ConfigError
from vipamin_scale.study import protocol as P
from vipamin_scale.study.run import Study, gate_from, gate_protocol


@pytest.mark.slow
def test_the_accuracy_benchmark_is_its_study_and_a_section(tmp_path):
    work, out, md = tmp_path / "work", tmp_path / "acc.json", tmp_path / "RESULTS.md"
    md.write_text("# Benchmarks\n\nkept above\n")
    preset = (REPO / "benchmarks" / "results" / "demo_preset.json").read_bytes()
    cmd = [sys.executable, str(REPO / "benchmarks" / "accuracy.py"), "study=accuracy_quick", "--work", str(work),
           "--out", str(out), "--results-md", str(md)]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads(out.read_text())
    study = json.loads((work / "study.json").read_text())
    assert record["cells"] == json.loads(json.dumps(study["cells"]).replace(str(work.resolve()), "WORK"))
    assert not re.search(r"(/tmp/|/root/|/work/)[A-Za-z0-9_.-]", out.read_text())
    probe = [c for c in record["cells"] if c["method"] == "linear probe" and c["regime"] == P.FEW]
    assert [c["shots"] for c in probe] == [1, 2]  # a row of the few-shot tables
    for c in probe:
        Cs = [t["params"]["C"] for t in c["selected"]["trials"]]
        assert Cs[:4] == [0.01, 0.1, 1.0, 10.0] and len(Cs) <= 5  # the grid, then at most one edge round
    assert {(p["baseline"], p["method"]) for p in record["paired"]} >= {("VPT random", "VIPAMIN"),
                                                                       ("VIPAMIN", "VPT random")}
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nkept above\n") and "<!-- accuracy:begin -->" in text
    assert "— CUT VERSION" in text and "Command: `python benchmarks/accuracy.py study=accuracy_quick" in text
    assert "Half-width of the 95 % interval of VIPAMIN − VPT random against the target" in text
    for png in ("acc_accuracy.png", "acc_paired.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG") and f"](results/{png})" in text
    assert (REPO / "benchmarks" / "results" / "demo_preset.json").read_bytes() == preset  # a cut writes none

    md.write_text("# Benchmarks\n")  # --render: the same section from the record, nothing trained
    proc = subprocess.run([*cmd, "--render"], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert md.read_text().split("<!-- accuracy:begin -->")[1].split("Command:")[1].split("\n", 1)[1] == \
        text.split("<!-- accuracy:begin -->")[1].split("Command:")[1].split("\n", 1)[1]


def test_a_gate_is_reused_only_from_a_study_that_ran_the_same_gate(tmp_path):
    """study.gate_from: the prompt-length cut's gate serves the accuracy cut (the same backbone, data, full-data
    schedule, grid, probe and P); anything else is one error line naming what differs, before any run."""
    gate = {"n": 1000, "epochs": 5, "steps": 155, "length": 10, "method": "VPT random", "probe_C": 1.0,
            "probe_test": 0.938, "prompt_params": {"train.lr": 0.05}, "prompt_test": 0.95, "passed": True}
    source = compose(["study=prompt_length_digits", "hydra.run.dir=/tmp/unused"])
    path = tmp_path / "study.json"
    runs.write_json(path, {"gate": gate, "gate_protocol": gate_protocol(source), "cells": []})
    cfg = compose(["study=accuracy_digits", f"study.gate_from={path}", "hydra.run.dir=/tmp/unused"])
    got = gate_from(cfg)
    assert {k: v for k, v in got.items() if k != "from"} == gate and got["from"] == str(path)
    assert not any(c.regime == P.FULL for c in P.cells(cfg))  # its gate's cells are not trained again
    for change, what in (("study.full_epochs=10", "full_epochs: 5 -> 10"), ("study.gate_length=50", "length: 10 -> 50"),
                         ("study.extend_edges=2", "extend_edges: 1 -> 2"), ("model.img_size=224", "img_size: 112 -> 224")):
        with pytest.raises(ConfigError) as exc:
            gate_from(compose(["study=accuracy_digits", f"study.gate_from={path}", change, "study.lengths=[10,50]",
                               "hydra.run.dir=/tmp/unused"]))
        assert str(exc.value).startswith(f"study.gate_from: {path}: its gate ran another protocol") and \
            what in str(exc.value), str(exc.value)
    runs.write_json(tmp_path / "bad.json", {"cells": []})
    with pytest.raises(ConfigError, match="not a study's record with a gate"):
        gate_from(compose(["study=accuracy_digits", f"study.gate_from={tmp_path / 'bad.json'}",
                           "hydra.run.dir=/tmp/unused"]))


def test_digits_draws_are_shared_by_every_method_and_nested(tmp_path):
    cfg = compose(["study=accuracy_quick", f"hydra.run.dir={tmp_path / 's'}"])
    study = Study(cfg)
    study.draw_roots()
    drawn = {key: json.loads((root / "manifest.json").read_text())["drawn"] for key, root in study.roots.items()}
    assert set(drawn[(1, 0)]) <= set(drawn[(2, 0)]) and drawn[(2, 0)] != drawn[(2, 1)]
    cells = [c for c in study.cells if c.regime == P.FEW and c.shots == 2 and c.length is not None]
    made = [study.run_config(c, {"train.lr": 0.5}, 1)[0] for c in cells]
    assert len({m.data.root for m in made}) == 1 and {m.train.seed for m in made} == {m.init.seed for m in made} == {1}
    by = {c.method: m for c, m in zip(cells, made)}
    assert by["VIPAMIN"].init.method == "vipamin" and by["BPT"].prompt.kind == "bpt" and by["BPT"].prompt.length == 4
    assert all(m.data.batch_size == 10 and m.train.epochs == 2 and m.init.num_images == 20 for m in made)


def test_schedules():
    assert P.schedule(10, 10, 20, 60, 0.1) == {"batch": 10, "epochs": 60, "steps": 60, "warmup_epochs": 6.0}
    assert P.schedule(80, 10, 20, 60, 0.1) == {"batch": 10, "epochs": 20, "steps": 160, "warmup_epochs": 2.0}
    assert P.schedule(1000, 32, 5, 0, 0.1) == {"batch": 32, "epochs": 5, "steps": 155, "warmup_epochs": 0.5}


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
