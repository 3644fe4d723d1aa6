"""The tune itself: the rungs of a search, the edge rounds, the final runs, and their bookkeeping.

Layout of the run directory (the Hydra run dir; pass the same hydra.run.dir again to resume):
    trials/rung<i>/c<candidate>/          one training run per trial (result.json, metrics.jsonl, ...)
    trials/rung<i>/c<candidate>/draw<d>/  the same, one a draw, when a candidate trains on several draws
    trials/edge<e>/c<candidate>[/draw<d>]/  the candidates an edge round added (tune.extend_edges)
    final/seed<s>/                        the final runs
    inits/                                the trials' initial prompts, one file per distinct init (train.init_cache)
    tune.json, tune.md                    the rung table, the winner, the final mean ± sd (atomic)
    tune_val_vs_budget.png                val accuracy against budget, one line per candidate
A trial with a result.json (finished or failed) is never run again: re-running a killed tune skips
them, and trials cut short resume from their own checkpoints (train.resume=true). A trial directory
is reused only for the same trial under the same whole config (its run record, vipamin_scale/runs.py):
a re-run with a changed base config is refused (RunMismatch, exit 2).

Draws (`tune.select_draws` = D > 1, or `tune.draw_roots` given): each candidate trains once per draw
d = 0..D-1 with train.seed = init.seed = d and, when `tune.draw_roots` lists the draws' data
directories (few-shot draws of one task), data.root = draw_roots[d]; its score is the mean val
accuracy over the draws (halving.draw_score). With draw_roots, final seed s trains on draw s.

Edges (`tune.extend_edges` = N): after the search, when the winner sits at the smallest or largest
value of a log/range leaf (space.edges), that leaf is extended one grid step beyond (space.step_beyond)
with the winner's other values, the new candidate is trained at the full budget on the same draws,
and the winner is re-selected among every candidate scored at the full budget; at most N rounds. A
winner still at an edge afterwards (or at the edge of a list leaf, which has no step) is recorded in
tune.json's winner.at_edge and said in tune.md.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig

import vipamin_scale.runs as runs
import vipamin_scale.stats as stats
from vipamin_scale.config import ConfigError, validate
from vipamin_scale.tune.halving import draw_score, promote, rung_budgets
from vipamin_scale.tune.launchers import Launcher, Trial, make_launcher, trial_config
from vipamin_scale.tune.report import tune_document, write_summary
from vipamin_scale.tune.select import Selection
from vipamin_scale.tune.space import candidates, check_point, check_space, fmt_params

log = logging.getLogger(__name__)


@dataclass
class TuneResult:
    rungs: list[dict[str, Any]] = field(default_factory=list)
    winner: Optional[dict[str, Any]] = None
    final: Optional[dict[str, Any]] = None
    extensions: list[dict[str, Any]] = field(default_factory=list)  # the edge rounds (tune.extend_edges)
    winner_at_edge: list[dict[str, Any]] = field(default_factory=list)  # where the winner stayed at an edge

    def to_json(self) -> dict[str, Any]:
        return {"rungs": self.rungs, "winner": self.winner, "final": self.final, "extensions": self.extensions}


def val_score(result: Optional[dict[str, Any]]) -> Optional[float]:
    """Val accuracy at the end of the trial's budget (None: failed or not run)."""
    if not result or result.get("status", "ok") != "ok":
        return None
    acc = (result.get("final_eval") or {}).get("acc")
    return float(acc) if acc is not None else None


def _first_line(text: Optional[str]) -> Optional[str]:
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    return lines[0][:300] if lines else None


def draws(cfg: DictConfig) -> list[dict[str, Any]]:
    """The overrides of each selection draw: [{}] (the base config alone) unless tune.select_draws > 1 or
    tune.draw_roots is given; then draw d sets train.seed = init.seed = d (and data.root = draw_roots[d])."""
    roots = cfg.tune.draw_roots
    if cfg.tune.select_draws == 1 and roots is None:
        return [{}]
    return [{"train.seed": d, "init.seed": d, **({"data.root": str(roots[d])} if roots is not None else {})}
            for d in range(cfg.tune.select_draws)]


def check_draws(cfg: DictConfig) -> None:
    """tune.draw_roots names one data directory a draw and a final seed, before any training."""
    roots = cfg.tune.draw_roots
    if roots is None:
        return
    need = max(cfg.tune.select_draws, cfg.tune.final_seeds)
    if len(roots) < need:
        raise ConfigError(f"tune.draw_roots: {len(roots)} roots, but tune.select_draws={cfg.tune.select_draws} and "
                          f"tune.final_seeds={cfg.tune.final_seeds} need {need} (draw d and final seed d read root d)")


def run_tune(cfg: DictConfig, *, launcher: Optional[Launcher] = None, base_overrides: Sequence[str] = (),
             train_fn: Optional[Callable[[DictConfig], Any]] = None) -> TuneResult:
    """Search, then the final runs; writes tune.json, tune.md and the plot into train.out_dir, which
    this tune holds (runs.hold: a second tune into the same directory is refused)."""
    validate(cfg)
    check_draws(cfg)
    points = candidates(cfg.tune.space, cfg.tune.trials, cfg.tune.seed)
    check_space(cfg, points)
    import vipamin_scale.distributed as D

    D.init_from_env()  # under torchrun the ranks agree on the lock (and every inline trial is distributed)
    if cfg.train.init_cache is None:  # trials that differ only in what the initializer does not read share one init
        cfg = copy.deepcopy(cfg)
        cfg.train.init_cache = str(Path(cfg.train.out_dir).resolve() / "inits")
        base_overrides = [*base_overrides, f"train.init_cache={cfg.train.init_cache}"]
    with runs.hold(Path(cfg.train.out_dir)):
        return _search(cfg, points, launcher, base_overrides, train_fn)


def _search(cfg: DictConfig, points: list[dict[str, Any]], launcher: Optional[Launcher],
            base_overrides: Sequence[str], train_fn: Optional[Callable[[DictConfig], Any]]) -> TuneResult:
    tcfg = cfg.tune
    root = Path(cfg.train.out_dir)
    max_epochs = int(tcfg.max_epochs or cfg.train.epochs)
    final_split = tcfg.final_train_split or f"{cfg.data.train_split}+{cfg.data.val_split}"
    if launcher is None:
        launcher = make_launcher(cfg, base_overrides, train_fn)
    plan = rung_budgets(len(points), tcfg.eta, max_epochs, tcfg.min_epochs, tcfg.mode)
    log.info("tune: %d candidates, rungs (candidates, epochs) %s, %d draw(s), launcher %s", len(points), plan,
             len(draws(cfg)), type(launcher).__name__)
    result = TuneResult()

    def summarize() -> None:
        write_summary(root, tune_document(cfg, result, plan, final_split))

    alive = list(range(len(points)))
    t0 = time.perf_counter()
    for rung, (size, epochs) in enumerate(plan):
        assert len(alive) == size, (alive, size)
        entries = _train_candidates(launcher, cfg, root, f"rung{rung}", rung, alive, points, epochs)
        keep = size // tcfg.eta if rung + 1 < len(plan) else 1
        kept = promote([e["val_acc"] for e in entries], keep)
        for i, e in enumerate(entries):
            e["promoted"] = i in kept
        result.rungs.append({"rung": rung, "epochs": epochs, "trials": entries})
        summarize()
        if not kept:
            raise RuntimeError(f"tune: every trial of rung {rung} failed; see {root / 'tune.md'}")
        alive = [alive[i] for i in kept]
    best, score = _extend_edges(launcher, cfg, root, points, result, plan[-1][1], summarize)
    for rung in result.rungs[len(plan) - 1:]:  # at the full budget, "promoted" marks the one winner
        for t in rung["trials"]:
            t["promoted"] = t["candidate"] == best
    result.winner = {"candidate": best, "params": points[best], "val_acc": score, "at_edge": result.winner_at_edge}
    log.info("tune: winner %s (val acc %.4f) after %.0f s", fmt_params(points[best]), result.winner["val_acc"],
             time.perf_counter() - t0)
    if tcfg.final_seeds > 0:
        result.final = _final_runs(launcher, cfg, root, points[best], max_epochs, final_split)
    summarize()
    return result


def _train_candidates(launcher: Launcher, cfg: DictConfig, root: Path, tag: str, rung: int, cands: list[int],
                      points: list[dict[str, Any]], epochs: int) -> list[dict[str, Any]]:
    """Train the candidates (each on every draw) for `epochs` under trials/<tag>/, all as one launch;
    one entry a candidate: its score (halving.draw_score), status, first error, and its draws."""
    budget = {"train.epochs": epochs, "train.eval_every": epochs, "train.test_at_end": False,
              "train.eval_split": "val", "train.resume": True}
    ds = draws(cfg)
    trials: list[list[Trial]] = []
    for c in cands:
        name, where = f"{tag}/c{c:03d}", root / "trials" / tag / f"c{c:03d}"
        if len(ds) == 1 and not ds[0]:  # the base config alone: one trial in the candidate's directory
            trials.append([Trial(name, where, points[c], {**points[c], **budget}, rung=rung, candidate=c)])
        else:
            trials.append([Trial(f"{name}/draw{d}", where / f"draw{d}", points[c], {**points[c], **budget, **over},
                                 rung=rung, candidate=c, draw=d) for d, over in enumerate(ds)])
    _launch(launcher, [t for ts in trials for t in ts], cfg)
    entries = []
    for c, ts in zip(cands, trials):
        records = [runs.read_result(t.dir) or {} for t in ts]
        per_draw = [{"draw": t.draw, "dir": str(t.dir.relative_to(root)), "status": r.get("status", "ok"),
                     "val_acc": val_score(r), "error": _first_line(r.get("error"))} for t, r in zip(ts, records)]
        bad = next((d for d in per_draw if d["status"] != "ok" or d["error"]), None)
        status, error = ("ok", None) if bad is None else (bad["status"], bad["error"])
        if error and bad["draw"] is not None:
            error = f"draw {bad['draw']}: {error}"
        entry = {"candidate": c, "params": points[c], "dir": str((root / "trials" / tag / f"c{c:03d}").relative_to(root)),
                 "status": status, "val_acc": draw_score([d["val_acc"] for d in per_draw]), "error": error,
                 "promoted": False}
        if ts[0].draw is not None:
            entry["draws"] = per_draw
        entries.append(entry)
    return entries


def _extend_edges(launcher: Launcher, cfg: DictConfig, root: Path, points: list[dict[str, Any]],
                  result: TuneResult, epochs: int, summarize: Callable[[], None]) -> tuple[int, float]:
    """The edge rounds (module docstring, `tune.select.Selection`): returns the winner and its score among
    the candidates scored at the full budget (the last rung's and the rounds'). Appends the new candidates to
    `points`, their rungs to result.rungs and each round's steps to result.extensions."""
    last = result.rungs[-1]["trials"]
    sel = Selection(cfg.tune.space, cfg.tune.extend_edges, points=points, pool=[t["candidate"] for t in last],
                    check=lambda point: check_point(cfg, point))
    for t in last:
        sel.record(t["candidate"], t["val_acc"])
    while new := sel.advance():
        points[:] = sel.points
        result.extensions[:] = sel.extensions
        entries = _train_candidates(launcher, cfg, root, f"edge{sel.rounds}", len(result.rungs), new, points, epochs)
        for t in entries:
            sel.record(t["candidate"], t["val_acc"])
        result.rungs.append({"rung": len(result.rungs), "epochs": epochs, "extension": sel.rounds, "trials": entries})
        log.info("tune: edge round %d: %s; winner %s", sel.rounds, ", ".join(fmt_params(points[c]) for c in new),
                 fmt_params(points[sel.winner()]))
        summarize()
    result.extensions[:] = sel.extensions
    result.winner_at_edge = sel.at_edge()
    winner = sel.winner()
    return winner, sel.scores[winner]


def _final_runs(launcher: Launcher, cfg: DictConfig, root: Path, params: dict[str, Any], max_epochs: int,
                final_split: str) -> dict[str, Any]:
    """The winner trained on the final split with train.seed = init.seed = s (on draw s's data when
    tune.draw_roots is given) and tested; test accuracy mean ± sample sd over the seeds that finished."""
    roots = cfg.tune.draw_roots
    finals = []
    for s in range(cfg.tune.final_seeds):
        overrides = {**params, "train.epochs": max_epochs, "train.eval_every": max_epochs,
                     "train.test_at_end": True, "data.train_split": final_split, "train.seed": s,
                     "init.seed": s, "train.resume": True, **({"data.root": str(roots[s])} if roots is not None else {})}
        finals.append(Trial(f"final/seed{s}", root / "final" / f"seed{s}", params, overrides, seed=s))
    _launch(launcher, finals, cfg)
    final_runs = []
    for t in finals:
        r = runs.read_result(t.dir) or {}
        acc = (r.get("test") or {}).get("acc") if r.get("status", "ok") == "ok" else None
        final_runs.append({"seed": t.seed, "dir": str(t.dir.relative_to(root)), "status": r.get("status", "ok"),
                           "test_acc": acc, "error": _first_line(r.get("error"))})
    s = stats.summary([r["test_acc"] for r in final_runs])
    return {"train_split": final_split, "epochs": max_epochs, "runs": final_runs, "test_mean": s["mean"],
            "test_std": s["sd"], "n": s["n"]}


def _same_trial(trial: Trial) -> None:
    """A trial directory left by an earlier run must be the same trial (same space, same settings)."""
    path = trial.dir / "trial.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("overrides") != json.loads(json.dumps(trial.overrides)):
            raise ConfigError(f"tune.space: {trial.dir} holds a trial with other settings ({old.get('overrides')}); "
                              f"the space or budgets changed since: use a new hydra.run.dir")
    else:
        runs.write_json(path, trial.record())


def _launch(launcher: Launcher, trials: list[Trial], base: DictConfig) -> None:
    """Run the trials that have not ended. A trial directory is reused only for the very same trial:
    same overrides (trial.json) and the same whole config (its run record), else ConfigError/RunMismatch."""
    import vipamin_scale.distributed as D

    for t in trials:
        runs.check_same_run(t.dir, trial_config(base, t), what=f"tune: trial {t.name}")
    for t in trials:  # rank 0 checks (and records) the trial directories; the others wait for it
        if D.rank() == 0:
            t.dir.mkdir(parents=True, exist_ok=True)
            _same_trial(t)
    D.barrier()
    todo = [t for t in trials if not runs.has_ended(t.dir)]
    if len(todo) < len(trials):
        log.info("tune: %d of %d trials already ended; skipped", len(trials) - len(todo), len(trials))
    if todo:
        launcher.run(todo)


# ----------------------------------------------------------------------------- the CLI task


def tune_overrides_from_hydra() -> list[str]:
    """The tune command's own overrides minus tune.* and hydra.*: the base of every subprocess trial."""
    from hydra.core.hydra_config import HydraConfig

    task = list(HydraConfig.get().overrides.task)
    out = []
    for item in task:
        key = item.lstrip("+~").split("=", 1)[0]
        if key == "tune" or key.startswith(("tune.", "tune/", "hydra.", "hydra/")):
            continue
        out.append(item)
    return out


def check_splits(cfg: DictConfig) -> None:
    """Before any training: the search's and the final runs' splits exist in the data's manifest (of every
    draw's data root, tune.draw_roots), the data has 2+ classes and its training split one full batch
    (`data.check_splits`)."""
    from vipamin_scale.data import check_splits as check_data_splits

    validate(cfg)
    check_draws(cfg)
    final = cfg.tune.final_train_split or f"{cfg.data.train_split}+{cfg.data.val_split}"
    datas = [cfg.data]
    if cfg.tune.draw_roots is not None:
        datas = []
        for r in cfg.tune.draw_roots:
            data = copy.deepcopy(cfg.data)
            data.root = str(r)
            datas.append(data)
    for data in datas:
        check_data_splits(data, {"data.train_split": cfg.data.train_split, "data.val_split": cfg.data.val_split,
                                 "tune.final_train_split": final, "data.test_split": cfg.data.test_split},
                          train="data.train_split", limit=cfg.data.max_train_samples)


def main_task(cfg: DictConfig) -> TuneResult:
    """The `vipamin-scale tune` task (under Hydra)."""
    check_splits(cfg)
    base = tune_overrides_from_hydra() if cfg.tune.launcher not in ("inline", "packed") else []  # subprocess trials
    result = run_tune(cfg, base_overrides=base)
    final = result.final
    if final and final["test_mean"] is not None:
        spread = f" ± {final['test_std']:.4f}" if final["test_std"] is not None else ""
        log.info("tune: %s -> test acc %.4f%s over %d seeds", fmt_params(result.winner["params"]),
                 final["test_mean"], spread, final["n"])
    return result
