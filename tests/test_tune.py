"""`vipamin-scale tune`: successive halving, the planted-objective search, failures, resume, the CLI."""
from __future__ import annotations

import json
import math
import random
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, TINY, cli, cli_env, torchrun
from vipamin_scale.config import ConfigError, default_config
from vipamin_scale.paths import atomic_write_bytes
from vipamin_scale.tune import candidates, parse_space, promote, rung_budgets, run_tune


# ----------------------------------------------------------------------------- pure pieces


def test_space_grids_in_declaration_order():
    space = {"train": {"lr": {"log": [0.001, 0.1], "num": 3}, "weight_decay": [0.0, 0.01]},
             "init": {"lam": {"range": [0.0, 1.0], "num": 3}, "k": 8}}
    axes = parse_space(space)
    assert axes == [("train.lr", [0.001, 0.01, 0.1]), ("train.weight_decay", [0.0, 0.01]),
                    ("init.lam", [0.0, 0.5, 1.0]), ("init.k", [8])]
    points = candidates(space)
    assert len(points) == 3 * 2 * 3
    assert points[0] == {"train.lr": 0.001, "train.weight_decay": 0.0, "init.lam": 0.0, "init.k": 8}
    assert points[1]["init.lam"] == 0.5 and points[3]["train.weight_decay"] == 0.01  # last axis fastest
    sampled = candidates(space, trials=5, seed=3)
    assert len(sampled) == 5 and sampled == candidates(space, trials=5, seed=3)
    assert all(p in points for p in sampled) and sampled != candidates(space, trials=5, seed=4)


@pytest.mark.parametrize("space, field", [({}, "tune.space"), ({"train": {"lr": []}}, "tune.space.train.lr"),
                                          ({"train": {"lr": {"log": [0, 1], "num": 3}}}, "tune.space.train.lr"),
                                          ({"train": {"lr": [0.1, 0.1]}}, "tune.space.train.lr")])
def test_bad_space_names_the_field(space, field):
    with pytest.raises(ConfigError, match=f"^{field.replace('.', '[.]')}"):
        parse_space(space)


def test_rung_budgets():
    assert rung_budgets(27, 3, 27) == [(27, 1), (9, 3), (3, 9), (1, 27)]
    assert rung_budgets(9, 3, 10) == [(9, 1), (3, 3), (1, 10)]
    assert rung_budgets(5, 3, 6) == [(5, 2), (1, 6)]
    assert rung_budgets(2, 3, 6) == [(2, 6)]  # fewer candidates than eta: one rung
    assert rung_budgets(27, 3, 4, min_epochs=1) == [(27, 1), (9, 1), (3, 1), (1, 4)]
    assert rung_budgets(12, 3, 9, mode="grid") == [(12, 9)]


def test_promote_keeps_exactly_the_top_fraction_deterministically():
    rng = random.Random(0)
    for n in (3, 9, 10, 27, 28):
        scores = [rng.random() for _ in range(n)]
        kept = promote(scores, n // 3)
        assert len(kept) == n // 3
        assert sorted(kept) == kept
        assert min(scores[i] for i in kept) >= max(s for i, s in enumerate(scores) if i not in kept)
        assert promote(scores, n // 3) == kept
    assert promote([0.5, 0.9, 0.5, 0.5], 2) == [0, 1]  # a tie goes to the earlier candidate
    assert promote([None, 0.1, float("nan"), 0.2], 3) == [1, 3]  # failed trials are never promoted


# ----------------------------------------------------------------------------- with a stand-in trial


def planted(lr: float, lam: float) -> float:
    """Val accuracy peaks at lr = 0.03, lam = 0.6."""
    return 0.9 - 0.08 * (math.log10(lr) - math.log10(0.03)) ** 2 - 0.3 * (lam - 0.6) ** 2


class StandIn:
    """A trial whose val (and test) accuracy is `planted` plus noise that shrinks with the budget,
    written as run_training writes result.json. Calls are counted; some can fail or interrupt."""

    def __init__(self, fail=lambda cfg: False, interrupt_after: int | None = None):
        self.calls: list[str] = []
        self.fail, self.interrupt_after = fail, interrupt_after

    def __call__(self, cfg):
        if self.interrupt_after is not None and len(self.calls) == self.interrupt_after:
            raise KeyboardInterrupt  # the process is killed mid-search
        self.calls.append(cfg.train.out_dir)
        if self.fail(cfg):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        noise = random.Random(f"{cfg.train.lr}/{cfg.init.lam}/{cfg.train.seed}/{cfg.train.epochs}").gauss(0, 1)
        acc = planted(cfg.train.lr, cfg.init.lam) + 0.02 * noise / cfg.train.epochs
        result = {"best_val": {"acc": acc, "epoch": cfg.train.epochs - 1}, "final_eval": {"acc": acc},
                  "method": cfg.init.method, "prompt_length": cfg.prompt.length, "deep": cfg.prompt.deep,
                  "train_split": cfg.data.train_split, "seed": cfg.train.seed}
        if cfg.train.test_at_end:
            result["test"] = {"acc": acc - 0.01}
        atomic_write_bytes(Path(cfg.train.out_dir) / "result.json", json.dumps(result).encode())


def tune_cfg(tmp_path: Path, **extra):
    overrides = {"train__out_dir": str(tmp_path), "train__epochs": 27, "init__method": "vipamin",
                 "tune__space": {"train": {"lr": {"log": [0.001, 1.0], "num": 7}},
                                 "init": {"lam": {"range": [0.0, 1.0], "num": 6}}}}
    overrides.update(extra)
    return default_config(**overrides)


def test_planted_optimum_found_within_one_grid_step(tmp_path):
    fn = StandIn()
    result = run_tune(tune_cfg(tmp_path), train_fn=fn)
    # 42 candidates, eta 3: 42 -> 14 -> 4 -> 1 at 1, 3, 9, 27 epochs; then 3 final seeds
    assert [(len(r["trials"]), r["epochs"]) for r in result.rungs] == [(42, 1), (14, 3), (4, 9), (1, 27)]
    assert len(fn.calls) == 42 + 14 + 4 + 1 + 3
    for r, nxt in zip(result.rungs, result.rungs[1:]):
        promoted = sorted(t["candidate"] for t in r["trials"] if t["promoted"])
        assert promoted == sorted(t["candidate"] for t in nxt["trials"])
        assert len(promoted) == len(r["trials"]) // 3
    best = result.winner["params"]
    step_lr = 0.5  # the log10 grid step of 7 values over 3 decades
    assert abs(math.log10(best["train.lr"]) - math.log10(0.03)) <= step_lr + 1e-9
    assert abs(best["init.lam"] - 0.6) <= 0.2 + 1e-9
    final = result.final
    assert final["train_split"] == "train+val" and [r["seed"] for r in final["runs"]] == [0, 1, 2]
    seen = [json.loads((tmp_path / r["dir"] / "result.json").read_text()) for r in final["runs"]]
    assert [s["train_split"] for s in seen] == ["train+val"] * 3 and [s["seed"] for s in seen] == [0, 1, 2]
    accs = [s["test"]["acc"] for s in seen]
    assert final["test_mean"] == pytest.approx(sum(accs) / 3)
    mean = sum(accs) / 3
    assert final["test_std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs) / 2))
    doc = json.loads((tmp_path / "tune.json").read_text())
    assert doc["winner"]["params"] == best
    md = (tmp_path / "tune.md").read_text()
    assert "Winner: candidate" in md and "± " in md
    assert (tmp_path / "tune_val_vs_budget.png").stat().st_size > 1000
    # deterministic: the same search in a fresh directory picks the same winner through the same rungs
    again = run_tune(tune_cfg(tmp_path / "again"), train_fn=StandIn())
    assert again.rungs == result.rungs and again.winner == result.winner


def test_failed_trial_is_recorded_and_the_search_finishes(tmp_path):
    bad_lr = 0.03162  # the best lr: its trials fail, so the search must settle elsewhere
    fn = StandIn(fail=lambda cfg: cfg.train.lr == bad_lr)
    result = run_tune(tune_cfg(tmp_path, tune__final_seeds=1), train_fn=fn)
    failed = [t for t in result.rungs[0]["trials"] if t["status"] == "failed"]
    assert len(failed) == 6 and all(t["params"]["train.lr"] == bad_lr for t in failed)
    assert all("illegal memory access" in t["error"] and not t["promoted"] for t in failed)
    assert result.winner["params"]["train.lr"] != bad_lr
    assert "failed: RuntimeError: CUDA error" in (tmp_path / "tune.md").read_text()
    record = json.loads((tmp_path / failed[0]["dir"] / "result.json").read_text())
    assert record["status"] == "failed" and "Traceback" in record["traceback"]


def test_killed_tune_resumes_and_skips_finished_trials(tmp_path):
    first = StandIn(interrupt_after=20)
    with pytest.raises(KeyboardInterrupt):
        run_tune(tune_cfg(tmp_path), train_fn=first)
    assert len(first.calls) == 20
    second = StandIn()
    result = run_tune(tune_cfg(tmp_path), train_fn=second)
    assert not set(first.calls) & set(second.calls)  # nothing that finished ran again
    assert len(first.calls) + len(second.calls) == 42 + 14 + 4 + 1 + 3
    reference = run_tune(tune_cfg(tmp_path / "ref"), train_fn=StandIn())
    assert result.winner == reference.winner and result.final["test_mean"] == reference.final["test_mean"]
    # a re-run with another space in the same directory is refused before any training
    changed = tune_cfg(tmp_path, tune__space={"train": {"lr": [0.5, 0.1]}, "init": {"lam": [0.1, 0.5]}})
    third = StandIn()
    with pytest.raises(ConfigError, match="^tune.space: .*other settings"):
        run_tune(changed, train_fn=third)
    assert third.calls == []


def test_grid_mode_is_the_vtab_selection_protocol(tmp_path):
    """mode=grid (vipamin_scale/configs/tune/vtab.yaml): every candidate at the full budget on train -> val, the best
    retrained on the given final split over the seeds, mean +- std on test."""
    fn = StandIn()
    cfg = tune_cfg(tmp_path, tune__mode="grid", tune__final_train_split="train800val200",
                   tune__space={"train": {"lr": [0.003, 0.03, 0.3]}, "init": {"lam": [0.2, 0.6]}},
                   data__train_split="train800", data__val_split="val200")
    result = run_tune(cfg, train_fn=fn)
    assert len(result.rungs) == 1 and result.rungs[0]["epochs"] == 27 and len(result.rungs[0]["trials"]) == 6
    best = max(result.rungs[0]["trials"], key=lambda t: t["val_acc"])
    assert result.winner["params"] == best["params"] == {"train.lr": 0.03, "init.lam": 0.6}
    finals = [json.loads((tmp_path / r["dir"] / "result.json").read_text()) for r in result.final["runs"]]
    assert [f["train_split"] for f in finals] == ["train800val200"] * 3


def test_space_checked_before_any_training(tmp_path):
    fn = StandIn()
    with pytest.raises(ConfigError, match="^tune.space.train.lrr: no such config field"):
        run_tune(tune_cfg(tmp_path, tune__space={"train": {"lrr": [0.1]}}), train_fn=fn)
    with pytest.raises(ConfigError, match="init.lam: must lie in"):
        run_tune(tune_cfg(tmp_path, tune__space={"init": {"lam": [0.5, 1.5]}}), train_fn=fn)
    assert fn.calls == []


# ----------------------------------------------------------------------------- selection over draws, edges


class Scored:
    """A trial whose val accuracy is `score(lr, lam, draw)`, draw = train.seed; records what each trial saw."""

    def __init__(self, score):
        self.score, self.seen = score, []

    def __call__(self, cfg):
        self.seen.append((cfg.train.lr, cfg.train.seed, cfg.init.seed, cfg.data.root, cfg.train.out_dir))
        acc = self.score(cfg.train.lr, cfg.init.lam, cfg.train.seed)
        atomic_write_bytes(Path(cfg.train.out_dir) / "result.json",
                           json.dumps({"final_eval": {"acc": acc}, "test": {"acc": acc}}).encode())


def collapsing(lr, lam, draw):
    """lr 0.1 is best on draw 0 and collapses to chance on draws 1 and 2; lr 0.03 is steady."""
    table = {0.01: [0.50, 0.50, 0.50], 0.03: [0.70, 0.72, 0.71], 0.1: [0.80, 0.10, 0.12]}
    return table[lr][draw]


def test_mean_over_draws_picks_what_a_single_draw_would_not(tmp_path):
    space = {"train": {"lr": [0.01, 0.03, 0.1]}}
    one = run_tune(tune_cfg(tmp_path / "one", tune__mode="grid", tune__space=space, tune__final_seeds=0),
                   train_fn=Scored(collapsing))
    assert one.winner["params"] == {"train.lr": 0.1}  # draw 0 alone: the lr that collapses elsewhere
    fn = Scored(collapsing)
    roots = [str(tmp_path / f"4shot_seed{d}") for d in range(3)]
    cfg = tune_cfg(tmp_path / "three", tune__mode="grid", tune__space=space, tune__final_seeds=2,
                   tune__select_draws=3, tune__draw_roots=roots)
    three = run_tune(cfg, train_fn=fn)
    assert three.winner["params"] == {"train.lr": 0.03} and three.winner["val_acc"] == pytest.approx(0.71)
    scores = {t["params"]["train.lr"]: t["val_acc"] for t in three.rungs[0]["trials"]}
    assert scores == pytest.approx({0.01: 0.5, 0.03: 0.71, 0.1: 0.34})
    trial = next(t for t in three.rungs[0]["trials"] if t["params"]["train.lr"] == 0.1)
    assert [(d["draw"], d["dir"], d["val_acc"]) for d in trial["draws"]] == [
        (0, "trials/rung0/c002/draw0", 0.8), (1, "trials/rung0/c002/draw1", 0.1), (2, "trials/rung0/c002/draw2", 0.12)]
    # draw d: train.seed = init.seed = d on draw d's data; final seed s on draw s's data
    searched = sorted((lr, s, i, r) for lr, s, i, r, _ in fn.seen[:9])
    assert searched == sorted((lr, d, d, roots[d]) for lr in (0.01, 0.03, 0.1) for d in range(3))
    assert [(lr, s, r) for lr, s, _, r, _ in fn.seen[9:]] == [(0.03, 0, roots[0]), (0.03, 1, roots[1])]
    md = (tmp_path / "three" / "tune.md").read_text()
    assert "mean over 3 draws" in md and "| 0.3400 | 0.8000 / 0.1000 / 0.1200 |" in md
    # fewer roots than draws: refused before any training, naming the field
    short = tune_cfg(tmp_path / "short", tune__select_draws=3, tune__draw_roots=roots[:2], tune__final_seeds=0)
    with pytest.raises(ConfigError, match="^tune.draw_roots: 2 roots"):
        run_tune(short, train_fn=fn)


def test_a_failed_draw_fails_its_candidate(tmp_path):
    def score(lr, lam, draw):
        if lr == 0.1 and draw == 1:
            raise FloatingPointError("loss is nan at step 3")
        return collapsing(lr, lam, 0)

    def fn(cfg):
        try:
            Scored(score)(cfg)
        except FloatingPointError as exc:
            raise RuntimeError(str(exc)) from None

    result = run_tune(tune_cfg(tmp_path, tune__mode="grid", tune__space={"train": {"lr": [0.03, 0.1]}},
                               tune__final_seeds=0, tune__select_draws=2), train_fn=fn)
    bad = result.rungs[0]["trials"][1]
    assert bad["val_acc"] is None and bad["status"] == "failed" and bad["error"].startswith("draw 1: RuntimeError")
    assert result.winner["params"] == {"train.lr": 0.03}


def peaked(at):
    """Val accuracy peaking at lr = `at` (log scale), whatever the draw."""
    return lambda lr, lam, draw: 0.9 - 0.1 * (math.log10(lr) - math.log10(at)) ** 2


def test_edge_extension_extends_reselects_and_stops_at_the_limit(tmp_path):
    space = {"train": {"lr": {"log": [0.01, 0.1], "num": 2}}}
    # the optimum (lr 1) lies one step beyond the grid: round 1 adds lr 1 and it wins; round 2 adds 10, which
    # loses, and the winner is inside the extended grid
    fn = Scored(peaked(1.0))
    result = run_tune(tune_cfg(tmp_path / "a", tune__mode="grid", tune__space=space, tune__final_seeds=0,
                               tune__extend_edges=2), train_fn=fn)
    assert [lr for lr, *_ in fn.seen] == [0.01, 0.1, 1.0, 10.0]
    assert [(x["round"], x["field"], x["side"], x["value"], x["candidate"]) for x in result.extensions] == [
        (1, "train.lr", "high", 1.0, 2), (2, "train.lr", "high", 10.0, 3)]
    assert result.winner["params"] == {"train.lr": 1.0} and result.winner["at_edge"] == []
    assert [r.get("extension") for r in result.rungs] == [None, 1, 2]
    assert [t["dir"] for t in result.rungs[1]["trials"]] == ["trials/edge1/c002"]
    assert [t["promoted"] for r in result.rungs for t in r["trials"]] == [False, False, True, False]
    # the optimum far beyond: the limit stops the search, and the winner is recorded at the edge
    fn = Scored(peaked(100.0))
    result = run_tune(tune_cfg(tmp_path / "b", tune__mode="grid", tune__space=space, tune__final_seeds=0,
                               tune__extend_edges=1), train_fn=fn)
    assert [lr for lr, *_ in fn.seen] == [0.01, 0.1, 1.0]
    assert result.winner["params"] == {"train.lr": 1.0}
    assert result.winner["at_edge"] == [{"field": "train.lr", "side": "high", "value": 1.0,
                                         "why": "tune.extend_edges=1 rounds"}]
    md = (tmp_path / "b" / "tune.md").read_text()
    assert "At an edge: `train.lr` = 1.0 is the highest value tried (tune.extend_edges=1 rounds)" in md
    assert "Edge round 1: the winner sat at the high edge of `train.lr`; extended to 1.0 (candidate 2)." in md
    assert json.loads((tmp_path / "b" / "tune.json").read_text())["winner"]["at_edge"][0]["side"] == "high"
    # no extension (the default): the edge is still said; the low edge extends downwards
    result = run_tune(tune_cfg(tmp_path / "c", tune__mode="grid", tune__space=space, tune__final_seeds=0),
                      train_fn=Scored(peaked(1e-4)))
    assert result.winner["at_edge"][0]["side"] == "low" and result.extensions == []
    fn = Scored(peaked(1e-4))
    result = run_tune(tune_cfg(tmp_path / "d", tune__mode="grid", tune__space=space, tune__final_seeds=0,
                               tune__extend_edges=1), train_fn=fn)
    assert [lr for lr, *_ in fn.seen] == [0.01, 0.1, 0.001]


def test_an_edge_at_the_fields_bound_is_not_extended(tmp_path):
    """init.lam's grid ends at 1, the field's bound: the step beyond is refused and said; the winner stays at it."""
    fn = Scored(lambda lr, lam, draw: lam)
    space = {"train": {"lr": [0.03]}, "init": {"lam": {"range": [0.5, 1.0], "num": 2}}}
    result = run_tune(tune_cfg(tmp_path, tune__mode="grid", tune__space=space, tune__final_seeds=0,
                               tune__extend_edges=2), train_fn=fn)
    assert len(fn.seen) == 2 and result.extensions[0]["candidate"] is None
    assert result.extensions[0]["value"] == 1.5 and "init.lam: must lie in [0, 1]" in result.extensions[0]["refused"]
    edge = result.winner["at_edge"]
    assert [(e["field"], e["side"]) for e in edge] == [("init.lam", "high")] and "init.lam: must lie in" in edge[0]["why"]


# ----------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_tune_cli_inline_kill_resume_and_report(tmp_path):
    """Real training runs (tiny ViT) in one process; a SIGKILL inside the second rung, then a re-run."""
    out = tmp_path / "tune"
    args = cli("tune", *TINY, "init=vipamin", "init.num_images=64", "init.k=2", "+tune.space.train.lr=[0.05,0.5,2.0]",
               "tune.max_epochs=3", "tune.final_seeds=2", f"hydra.run.dir={out}")
    # rung 0: 3 trials x 1 epoch (8 steps each); rung 1: 1 trial x 3 epochs -> killed at its step 12
    killed = subprocess.run(args, cwd=REPO, env=cli_env(VIPAMIN_SCALE_KILL_AT_STEP="12"), capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    rung0 = sorted((out / "trials" / "rung0").glob("c*/result.json"))
    assert len(rung0) == 3
    stamps = {p: p.stat().st_mtime_ns for p in rung0}
    rung1 = list((out / "trials" / "rung1").iterdir())
    assert len(rung1) == 1 and not (rung1[0] / "result.json").exists()
    assert list((rung1[0] / "checkpoints").glob("ckpt-*.safetensors"))  # the cut trial left its checkpoint
    done = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in rung0} == stamps  # finished trials were not run again
    assert "resumed from" in done.stdout + done.stderr
    doc = json.loads((out / "tune.json").read_text())
    assert doc["final"]["n"] == 2 and 0.0 <= doc["final"]["test_mean"] <= 1.0
    final0 = json.loads((out / "final" / "seed0" / "result.json").read_text())
    assert final0["steps"] == 3 * ((256 + 297) // 32)  # trained on train (256) + val (297)
    report = subprocess.run(cli("report", str(out)), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr
    text = (out / "report.md").read_text()
    assert "## Tuning (halving, eta 3)" in text and "Final: trained on train+val" in text
    assert "| rung0/c000 |" in text or "trials/rung0/c000" in text
    # the same tune with a changed base config: refused before any training, naming the fields
    before = (out / "tune.json").read_bytes()
    changed = subprocess.run([*args, "prompt.length=8", "model.pool=cls"], cwd=REPO, env=cli_env(),
                             capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2, changed.stderr[-3000:]
    line = changed.stderr.strip().splitlines()[-1]
    assert line.startswith("error: tune: trial rung0/c000: ") and "model.pool: mean -> cls" in line
    assert "prompt.length: 4 -> 8" in line and (out / "tune.json").read_bytes() == before


@pytest.mark.slow
def test_tune_cli_local_launcher_runs_trials_as_processes(tmp_path):
    out = tmp_path / "tune"
    args = cli("tune", *TINY, "+tune.space.train.lr=[0.05,2.0]", "+tune.space.train.weight_decay=[0.0]",
               "tune.max_epochs=1", "tune.final_seeds=1", "tune.launcher=local", "tune.workers=2",
               f"hydra.run.dir={out}")
    done = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((out / "tune.json").read_text())
    assert [len(r["trials"]) for r in doc["rungs"]] == [2]
    for t in doc["rungs"][0]["trials"]:
        trial = out / t["dir"]
        saved = OmegaConf.load(trial / ".hydra" / "config.yaml")  # an ordinary Hydra job of `train`
        assert saved.model.name == "vit_test_d64" and saved.train.lr == t["params"]["train.lr"]
        assert saved.train.init_cache == str(out.resolve() / "inits")  # the trials share their inits
        assert (trial / "trial.log").is_file() and t["val_acc"] is not None
    final = OmegaConf.load(out / "final" / "seed0" / ".hydra" / "config.yaml")
    assert final.data.train_split == "train+val" and final.train.epochs == 1


@pytest.mark.slow
def test_tune_cli_bad_final_split_stops_before_any_trial(tmp_path):
    out = tmp_path / "tune"
    args = cli("tune", *TINY, "+tune.space.train.lr=[0.05,0.5]", "tune.final_train_split=train+tset",
               f"hydra.run.dir={out}")
    done = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "error: tune.final_train_split: " in done.stderr and "no split 'tset'" in done.stderr
    assert not (out / "trials").exists()


@pytest.mark.slow
def test_tune_inline_under_torchrun_with_deepspeed(tmp_path):
    """Under torchrun every rank runs the same search; each trial is a 2-rank ZeRO-2 run."""
    out = tmp_path / "tune"
    args = torchrun(2, "tune", *TINY, "engine=zero2", "data.batch_size=64", "data.max_train_samples=128",
                    "+tune.space.train.lr=[0.05,2.0]",
                    "tune.max_epochs=1", "tune.final_seeds=1", f"hydra.run.dir={out}")
    done = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    doc = json.loads((out / "tune.json").read_text())
    assert [t["status"] for t in doc["rungs"][0]["trials"]] == ["ok", "ok"]
    trial = json.loads((out / doc["rungs"][0]["trials"][0]["dir"] / "result.json").read_text())
    assert trial["world_size"] == 2 and trial["steps"] == 128 // (2 * 32)
    final = json.loads((out / "final" / "seed0" / "result.json").read_text())
    assert final["world_size"] == 2 and final["test"]["count"] == 500


@pytest.mark.slow
def test_packed_launcher_gives_the_inline_winner_and_scores(tmp_path):
    """tune.launcher=packed: a rung's 6 trials (3 candidates x 2 draws) trained as one pack, the diverging
    candidate's runs failing alone; the same statuses, val scores (1e-5) and winner as inline."""
    import vipamin_scale

    done = {}
    for launcher in ("inline", "packed"):
        cfg = vipamin_scale.compose([*TINY, "data.max_train_samples=64", "+tune.space.train.lr=[0.05,0.5,1e30]",
                                     "tune.mode=grid", "tune.max_epochs=1", "tune.select_draws=2", "tune.final_seeds=0",
                                     f"tune.launcher={launcher}", f"train.out_dir={tmp_path / launcher}"])
        done[launcher] = run_tune(cfg)
    inline, packed = (done[k].rungs[0]["trials"] for k in ("inline", "packed"))
    assert [t["status"] for t in packed] == [t["status"] for t in inline] == ["ok", "ok", "failed"]
    assert "loss is nan" in packed[2]["error"]
    for a, b in zip(inline[:2], packed[:2]):  # a candidate's val score: the mean over its 2 draws
        assert a["params"] == b["params"] and abs(a["val_acc"] - b["val_acc"]) <= 1e-5, (a, b)
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "packed").glob("trials/rung0/c*/draw*/result.json"))]
    assert [r.get("pack_size") for r in results[:4]] == [6] * 4 and len(results) == 6
    assert done["packed"].winner["params"] == done["inline"].winner["params"]


@pytest.mark.slow
def test_a_tunes_trials_compute_each_init_once(tmp_path, monkeypatch):
    """VIPAMIN over 3 lrs x 2 draws (tune.launcher=packed): 2 captures, one a draw (train.seed = init.seed = d), not
    6; the final runs (another split: other inits) compute theirs; every trial's run.json names the file of its init
    in <tune dir>/inits, the tune's train.init_cache."""
    import vipamin_scale
    import vipamin_scale.init.run as init_run

    calls = []
    real = init_run.capture_layer_stats
    monkeypatch.setattr(init_run, "capture_layer_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "tune"
    cfg = vipamin_scale.compose([*TINY, "data.max_train_samples=64", "init=vipamin", "init.num_images=32", "init.k=2",
                                 "+tune.space.train.lr=[0.05,0.2,0.5]", "tune.mode=grid", "tune.max_epochs=1",
                                 "tune.select_draws=2", "tune.final_seeds=1", "tune.launcher=packed",
                                 f"train.out_dir={out}"])
    run_tune(cfg)
    assert len(calls) == 2 + 1
    files = {json.loads(p.read_text())["init"]["file"] for p in out.glob("trials/rung0/c*/draw*/run.json")}
    assert len(files) == 2 and all(Path(f).parent == out.resolve() / "inits" for f in files)
    assert len(list((out / "inits").glob("*.safetensors"))) == 3
