"""`vipamin-scale study`: selection over draws with edge rounds, paired final runs, the gate, the tables; resumable
and exact (a SIGKILLed study re-run gives the same tables), a changed protocol refused; `report --paired` on a
study pairs methods at their own selected settings."""
from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess

import pytest
from conftest import REPO, cli, cli_env, torchrun
from omegaconf import OmegaConf
from test_report import _ok

from vipamin_scale import compose, runs
from vipamin_scale.config import ConfigError
from vipamin_scale.stats import paired, summary
from vipamin_scale.study import protocol as P
from vipamin_scale.studies import build_report
from vipamin_scale.tune.select import Selection

QUICK = ["study=prompt_length_quick"]


def _study(run_dir, *extra, env=None, timeout=900):
    return subprocess.run(cli("study", *QUICK, *extra, f"hydra.run.dir={run_dir}"), cwd=REPO, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def _tables(doc):
    """What a study concluded, without its timings: per cell the selection's scores, every run's val and test."""
    return [{"key": c["key"], "selected": c["selected"].get("params"),
             "trials": [(t["params"], t["val_acc"], t["val_by_draw"]) for t in c["selected"].get("trials", [])],
             "runs": [(r["dir"], r["fingerprint"], r["val"], r["test"]) for r in c["runs"]], "results": c["results"]}
            for c in doc["cells"]] + [doc["paired"], {k: v for k, v in (doc["gate"] or {}).items() if k != "from"}]


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """One uninterrupted quick study (P 1/4, VPT random and VIPAMIN, 2 one-shot draws, 2 seeds on 60 images)."""
    out = tmp_path_factory.mktemp("study") / "s"
    proc = _study(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc, json.loads((out / "study.json").read_text())


@pytest.mark.slow
def test_a_study_selects_over_draws_pairs_the_finals_and_gates(quick_study):
    out, proc, doc = quick_study
    cfg = compose([*QUICK, f"hydra.run.dir={out}"])
    assert [c["key"] for c in doc["cells"]] == [c.key for c in P.cells(cfg)]
    for c in doc["cells"]:
        sel, res = c["selected"], c["results"]
        if c["length"] is None:  # the gate's probe: its C over the grid 0.01..10, then an edge round
            assert [t["params"]["C"] for t in sel["trials"]][:4] == [0.01, 0.1, 1.0, 10.0]
            continue
        draws = 2 if c["regime"] == P.FEW else 1
        tried = [t["params"]["train.lr"] for t in sel["trials"]]
        assert tried[:2] == [0.5, 5.0], tried
        for t in sel["trials"]:  # a candidate's score: its mean val accuracy over the selection draws
            assert len(t["val_by_draw"]) == draws and len(t["dirs"]) == draws
            if None not in t["val_by_draw"]:
                assert t["val_acc"] == pytest.approx(sum(t["val_by_draw"]) / draws)
        scores = [t["val_acc"] if t["val_acc"] is not None else -1 for t in sel["trials"]]
        best = sel["trials"][scores.index(max(scores))]  # ties: the earlier candidate
        assert sel["params"] == best["params"]
        if best["params"]["train.lr"] in (0.5, 5.0):  # a winner at the grid's edge was extended one step beyond
            assert len(tried) == 3 and tried[2] == (0.05 if best["params"]["train.lr"] == 0.5 else 50.0)
        assert res["n"] == c["n"] == 2 and res == summary([r["test"] for r in c["runs"]])
        for d, r in enumerate(c["runs"][:draws]):  # the selection's runs at the winner ARE the final runs
            assert r["dir"] == best["dirs"][d] and r["val"] == best["val_by_draw"][d]
        for r in c["runs"]:
            ident = runs.read_run(out / r["dir"])
            assert r["fingerprint"] == ident["fingerprint"] and r["test"] == runs.read_result(out / r["dir"])["test"]["acc"]
    by = {(c["regime"], c["length"], c["method"]): c for c in doc["cells"]}
    for p in doc["paired"]:  # each method at its own selected lr, paired by draw
        m, b = by[(p["regime"], p["length"], p["method"])], by[(p["regime"], p["length"], p["baseline"])]
        want = paired(m["results"]["runs"], b["results"]["runs"])
        assert {k: p[k] for k in want} == want
    g = doc["gate"]
    gate = by[(P.FULL, 4, "VPT random")]
    assert g["prompt_test"] == gate["results"]["runs"][0] and g["prompt_params"] == gate["selected"]["params"]
    assert g["probe_test"] == by[(P.FULL, None, "linear probe")]["results"]["runs"][0]
    assert g["passed"] == (g["prompt_test"] >= g["probe_test"])
    assert set(doc["cut"]) >= {"study.lengths", "study.draws", "study.min_steps"}  # a cut of study=prompt_length
    md = (out / "study.md").read_text()
    assert md.startswith("# Study `prompt_length` — CUT VERSION") and "| P | VIPAMIN − VPT random |" in md
    assert "What the paired differences resolve:" in md and "The cost of P" in md
    assert [(c["length"], c["method"]) for c in doc["cost"]] == [(1, "VIPAMIN"), (1, "VPT random"), (4, "VIPAMIN"),
                                                                 (4, "VPT random")]
    assert all(c["step_s"] > 0 and c["peak_mib"] is None for c in doc["cost"])  # no GPU here
    for png in ("study_accuracy.png", "study_paired.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG") and (out / png).stat().st_size > 10_000
    assert "study: selection: " in proc.stdout and "runs done" in proc.stdout and "ETA" in proc.stdout
    assert "study: selection of the linear probe's C (full/" in proc.stdout  # the probe's minutes are named
    assert "Tables, plots, the other baselines and every run:" in proc.stdout

    # report --paired on the study: its final runs, each method at its own lr, the same pairs as study.md
    report = build_report(out, paired="init=random")
    few = {r["prompt_length"]: r for r in report["paired"] if "regime=1-shot" in r["group"]}
    for length in (1, 4):
        p = next(p for p in doc["paired"] if p["regime"] == P.FEW and p["length"] == length)
        assert few[length]["n"] == p["n"] and few[length]["mean"] == pytest.approx(p["mean"], abs=1e-12)
    status = subprocess.run(cli("study", "--status", str(out)), env=cli_env(), capture_output=True, text=True,
                            timeout=120)
    assert status.returncode == 0 and "study finished" in status.stdout and "runs done" in status.stdout


@pytest.mark.slow
def test_a_study_rerun_reuses_every_run_and_a_killed_one_resumes_to_the_same_tables(quick_study, tmp_path):
    out, _, doc = quick_study
    again = _study(out)  # the same command again: nothing is trained, the same tables
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0/0 runs done" not in again.stdout and " reused)" in again.stdout
    assert _tables(json.loads((out / "study.json").read_text())) == _tables(doc)

    # study.workers=2, every process SIGKILLing itself at a run's step 2 (its first pack's last step): the worker
    # processes die mid-pack; the study's process says so and takes their packs over (no wait for a result that
    # never comes), dying there too; the command again ends the study with the uninterrupted study's tables
    killed = tmp_path / "k"
    proc = _study(killed, "study.workers=2", env=cli_env(VIPAMIN_SCALE_KILL_AT_STEP="2"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "a pack worker process died; this process takes over its packs" in proc.stdout + proc.stderr
    status = subprocess.run(cli("study", "--status", str(killed)), env=cli_env(), capture_output=True, text=True,
                            timeout=120)
    assert status.returncode == 0 and "study stopped" in status.stdout, status.stdout
    resumed = _study(killed, "study.workers=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    theirs = _tables(json.loads((killed / "study.json").read_text()))
    assert theirs == _tables(doc)


@pytest.mark.slow
def test_a_changed_protocol_is_one_line_and_more_draws_reuse_the_runs(quick_study, tmp_path):
    out, _, doc = quick_study
    other = tmp_path / "s"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("run.lock"))
    proc = _study(other, "study.min_steps=3", "study.methods.VIPAMIN.init=vipamin_paper")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: study: {other} holds a study of another protocol"), err
    assert "study.min_steps: 2 -> 3" in err[0] and "(method VIPAMIN) init.orth_scale: match -> raw" in err[0]
    assert json.loads((other / "study.json").read_text()) == json.loads((out / "study.json").read_text())

    more = _study(other, "study.draws=[3]", "study.cost=false")  # one more draw: only its runs train
    assert more.returncode == 0, more.stderr[-3000:]
    new = json.loads((other / "study.json").read_text())
    for old_c, new_c in zip(doc["cells"], new["cells"]):
        if old_c["regime"] == P.FEW:
            assert new_c["runs"][:2] == old_c["runs"] and len(new_c["runs"]) == 3
    assert "16/20 runs done (16 reused)" in more.stdout  # the final runs: 16 of the 20 were there


def test_study_config_errors_are_one_line_naming_the_field():
    base = compose([*QUICK, "hydra.run.dir=/tmp/unused"])
    for overrides, says in (
            ({"study.methods": {"A": {"init": "nope"}}}, "study.methods.A.init: no such option 'nope'"),
            ({"study.methods": {"A": {"init.kk": 2}}}, "study.methods.A.init.kk: no such config field"),
            ({"study.methods": {"A": {"study.lengths": [2]}}}, "study.methods.A.study.lengths: a method changes"),
            ({"study.baselines": ["B"]}, "study.baselines: names of study.methods"),
            ({"study.draws": [2, 3]}, "study.draws: one count per study.shots"),
            ({"study.select_draws": 3}, "study.select_draws: at most the fewest draws"),
            ({"study.gate_length": 7}, "study.gate_length: one of study.lengths"),
            ({"study.full_methods": ["Z"]}, "study.full_methods: a subset of")):
        cfg = copy.deepcopy(base)
        for key, value in overrides.items():
            OmegaConf.update(cfg, key, value, merge=False)
        with pytest.raises(ConfigError) as exc:
            P.check(cfg)
        assert str(exc.value).startswith(says), str(exc.value)


def test_methods_apply_their_group_presets_then_their_fields():
    cfg = compose(["study=accuracy", "init.k=4", "hydra.run.dir=/tmp/unused"])
    ms = P.methods(cfg)
    paper = P.apply_method(P.base_config(cfg), ms["VIPAMIN paper"])
    assert (paper.init.method, paper.init.orth_scale, paper.init.official_compat, paper.init.k) == (
        "vipamin", "raw", False, 4)  # the preset's fields over the run config's (init.k=4 kept: the preset names none)
    vip = P.apply_method(P.base_config(cfg), ms["VIPAMIN"])
    assert vip.init.k == 8  # init=vipamin names k: the method's own settings win
    bpt = P.apply_method(P.base_config(cfg), ms["BPT whiten Σ=tokens"])
    assert (bpt.prompt.kind, bpt.prompt.bpt, bpt.init.bpt_sigma) == ("bpt", "whiten_fixed", "tokens")
    assert ms["linear probe"].probe and P.cut(cfg) == {}  # the preset itself is no cut
    assert P.slug("BPT whiten Σ=tokens") == "bpt_whiten_sigma_tokens"


def test_the_demo_is_a_cut_of_the_accuracy_study_reusing_its_selection():
    from vipamin_scale.demo import load_preset
    from vipamin_scale.study.run import selected_from

    cfg = compose(["study=demo", "hydra.run.dir=/tmp/unused"])
    chosen, given = selected_from(cfg)
    assert chosen == {c["key"]: c["selected"]["params"] for c in load_preset()["cells"]} and not given["subject_differs"]
    assert set(P.cut(cfg)) == {"study.baselines", "study.draws", "study.gate", "study.methods", "study.shots",
                               "study.space"}
    tiny = compose(["study=demo", "model=vit_test_d64", "hydra.run.dir=/tmp/unused"])
    assert selected_from(tiny)[1]["subject_differs"]  # another backbone: reused, said
    with pytest.raises(ConfigError, match="selected under another protocol .*study.min_steps: 60 -> 61"):
        selected_from(compose(["study=demo", "study.min_steps=61", "hydra.run.dir=/tmp/unused"]))
    recorded = json.loads((REPO / "benchmarks" / "results" / "demo_preset.json").read_text())
    assert load_preset() == recorded  # the package's copy is the benchmark's record


def test_selection_ties_go_to_the_earlier_candidate_and_edges_extend_once_per_round():
    sel = Selection({"train": {"lr": {"log": [0.1, 1.0], "num": 2}}}, extend_edges=2)
    assert [p["train.lr"] for p in sel.points] == [0.1, 1.0] and sel.pending() == [0, 1]
    sel.record(0, 0.5)
    sel.record(1, 0.5)
    assert sel.winner() == 0  # a tie: the earlier candidate
    assert [sel.points[c]["train.lr"] for c in sel.advance()] == [0.01]  # at the low edge: one step beyond
    sel.record(2, 0.6)
    assert [sel.points[c]["train.lr"] for c in sel.advance()] == [0.001]
    sel.record(3, None)  # failed: never a winner
    assert sel.advance() == [] and sel.winner() == 2
    assert sel.at_edge() == []  # 0.01 is inside the values tried (0.001 failed but was tried)
    sel = Selection({"train": {"lr": [0.1, 1.0]}}, extend_edges=2)  # a list leaf has no step: reported, not extended
    sel.record(0, 0.2)
    sel.record(1, 0.9)
    assert sel.advance() == [] and sel.at_edge()[0]["why"] == "a list leaf has no grid step"


def test_report_pairs_each_method_at_its_own_selected_lr(tmp_path):
    """A study's final runs: VIPAMIN at lr 0.5 and VPT random at lr 0.1, three draws each (runs.OVERRIDES); the
    lr each method selected for itself does not split the pairs. The same lrs swept for both methods do."""
    accs = {("random", 0.1): [0.50, 0.60, 0.55], ("vipamin", 0.5): [0.60, 0.64, 0.65]}
    study = tmp_path / "study"
    cells = {}
    for (init, lr), values in accs.items():
        cells[init] = []
        for d, acc in enumerate(values):
            rel = f"runs/4shot/P10/{init}/lr{lr}/draw{d}"
            (study / rel).mkdir(parents=True)
            runs.write_overrides(study / rel, ["regime=4-shot", f"init={init}", "prompt.length=10", f"train.lr={lr}",
                                               f"train.seed={d}", f"init.seed={d}"])
            runs.write_json(study / rel / "result.json", _ok(init, 10, True, acc, 0.1))
            cells[init].append({"dir": rel})
    runs.write_json(study / "study.json", {"cells": [{"runs": r} for r in cells.values()]})
    rows = build_report(study, paired="init=random")["paired"]
    assert [(r["versus"], r["n"]) for r in rows] == [("init=vipamin", 3)]
    assert rows[0]["diffs"] == pytest.approx([0.10, 0.04, 0.10])

    sweep = tmp_path / "sweep"  # an lr grid for both methods: lr is a condition, paired lr by lr
    for (init, lr) in [("random", 0.1), ("random", 0.5), ("vipamin", 0.1), ("vipamin", 0.5)]:
        for d in range(3):
            run = sweep / f"{init}_{lr}_{d}"
            run.mkdir(parents=True)
            runs.write_overrides(run, [f"init={init}", f"train.lr={lr}", f"train.seed={d}"])
            runs.write_json(run / "result.json", _ok(init, 10, True, 0.5 + d / 10 + (init == "vipamin") / 20, 0.1))
    rows = build_report(sweep, paired="init=random")["paired"]
    assert sorted(r["group"] for r in rows) == ["train.lr=0.1", "train.lr=0.5"]
    assert all(r["n"] == 3 and r["mean"] == pytest.approx(0.05) for r in rows)


@pytest.mark.slow
def test_two_torchrun_workers_claim_the_packs_never_the_same_run_and_give_the_same_tables(quick_study, tmp_path):
    """Under torchrun (2 ranks, gloo, no process group) each rank is a worker: both plan the same rounds, claim packs
    (at most pack_size=auto's K, 4 on a CPU, recorded) through the run directories' locks and meet at each round's
    barrier; worker 0 writes the record. Every run is
    trained once (one attempt, one line per step in its metrics), by one of the two workers, both of which
    trained; the tables equal the one-process study's."""
    out, _, doc = quick_study
    run = tmp_path / "t2"
    proc = subprocess.run(torchrun(2, "study", *QUICK, "study.cost=false", "study.pack_size=auto",
                                   f"hydra.run.dir={run}"), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((run / "study.json").read_text())
    assert _tables(two) == _tables(doc)
    assert two["pack_sizes"]["selection"]["k"] == 4 and "the CPU default" in two["pack_sizes"]["selection"]["how"][0]
    assert proc.stdout.count("Test accuracy (%), few-shot") == 1  # the leader's summary only
    trainers = set()
    for record in (run / "runs").rglob("run.json"):
        attempts = json.loads(record.read_text())["attempts"]
        assert len(attempts) == 1, (record, attempts)
        trainers.add(attempts[0]["pid"])
        keys = [(e["event"], e.get("step")) for e in map(json.loads, (record.parent / "metrics.jsonl").read_text()
                                                         .splitlines())]
        assert len(keys) == len(set(keys)), record.parent  # no step logged twice: no two trainers
    assert len(trainers) == 2
    assert not list(run.rglob("run.lock"))


@pytest.mark.slow
def test_workers_sigkilled_mid_pack_restart_and_resume_to_the_same_tables(quick_study, tmp_path):
    """Both torchrun workers SIGKILLed at their first pack's last step (before any result): torchrun restarts them
    (--max-restarts=1), they take over their stale claims, resume the runs from their checkpoints, and the study
    ends with the uninterrupted study's tables; the killed runs record two attempts."""
    out, _, doc = quick_study
    run = tmp_path / "k2"
    proc = subprocess.run(torchrun(2, "study", *QUICK, "study.cost=false", f"hydra.run.dir={run}", max_restarts=1),
                          cwd=REPO, env=cli_env(VIPAMIN_SCALE_KILL_AT_STEP="2"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "taking over the stale lock" in proc.stderr
    assert _tables(json.loads((run / "study.json").read_text())) == _tables(doc)
    attempts = [len(json.loads(r.read_text())["attempts"]) for r in (run / "runs").rglob("run.json")]
    assert 2 in attempts and set(attempts) <= {1, 2}


def test_the_top_level_study_presets_are_the_protocols_on_vit_l_and_h(tmp_path):
    """configs/study/ (the top-level tree, on Hydra's search path): a preset's protocol on a big backbone in bf16,
    no cut of it; a method's group found over both trees."""
    cfg = compose(["study=vith_prompt_length", f"data.root={tmp_path}", "hydra.run.dir=/tmp/unused"])
    assert (cfg.model.name, cfg.model.dtype, cfg.train.precision, cfg.data.name) == (
        "vit_huge_patch14_224", "bf16", "bf16", "shards")
    assert cfg.study.name == "prompt_length" and P.cut(cfg) == {} and cfg.study.workers == 8
    assert len(P.cells(cfg)) == len(compose(["study=prompt_length", "hydra.run.dir=/tmp/unused"]).study.lengths) * 4 * 2 + 1
    acc = compose(["study=vith_accuracy", f"data.root={tmp_path}", "hydra.run.dir=/tmp/unused"])
    assert acc.study.name == "accuracy" and P.cut(acc) == {} and acc.model.name == "vit_huge_patch14_224"


@pytest.mark.slow
def test_a_study_on_shards_draws_the_same_images_for_every_method_and_rerun(tmp_path, digits_root):
    """data=shards: draw d of k shots is k images per class of the user's train split (data/fewshot.py), written
    once under the study, read by every method; a re-run reads the same draws; the user's shards untouched."""
    import hashlib

    def digest(root):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}

    before = digest(digits_root)
    args = ["data=shards", f"data.root={digits_root}", "study.lengths=[1]", "study.full_seeds=0", "study.gate=false",
            "study.cost=false"]
    out = tmp_path / "s"
    proc = _study(out, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "study.json").read_text())
    drawn = {}
    for d in range(2):
        roots = {OmegaConf.load(out / c["runs"][d]["dir"] / "config.resolved.yaml").data.root for c in doc["cells"]}
        assert len(roots) == 1  # every method reads draw d's directory
        root = roots.pop()
        assert root == str(out / "data" / f"1shot_seed{d}")
        manifest = json.loads((out / "data" / f"1shot_seed{d}" / "manifest.json").read_text())
        assert manifest["splits"]["train"]["count"] == 10 and len(manifest["drawn"]) == 10
        drawn[d] = manifest["drawn"]
    assert drawn[0] != drawn[1]
    again = _study(out, *args)
    assert again.returncode == 0 and " reused)" in again.stdout, again.stderr[-2000:]
    assert {d: json.loads((out / "data" / f"1shot_seed{d}" / "manifest.json").read_text())["drawn"]
            for d in range(2)} == drawn
    assert digest(digits_root) == before
