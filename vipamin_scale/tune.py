"""`vipamin-scale tune`: choose hyper-parameters on val by successive halving, then retrain the
winner on train+val over several seeds and test it (the VTAB protocol, made budget-aware).

    vipamin-scale tune tune=lr init=vipamin hydra.run.dir=tunes/vipamin-lr
    vipamin-scale tune tune=vipamin +tune.space.prompt.length=[5,10,50] tune.launcher=local tune.workers=4
    vipamin-scale tune tune=vtab data=vtab_select data.root=/data/vtab/dtd       # a full grid (mode=grid)
    vipamin-scale report tunes/vipamin-lr                                         # the rung table and plot

The search space (`tune.space`) is nested like the config; each leaf is a list of values,
`{log: [lo, hi], num: n}`, `{range: [lo, hi], num: n}` or a fixed scalar. The candidates are the
grid's Cartesian product in declaration order (`tune.trials` samples that many of them, seeded).

Successive halving (`tune.mode=halving`, reduction factor eta): with n candidates there are
s = 1 + floor(log_eta n) rungs; rung i trains its candidates for max(min_epochs, round(R * eta^(i-s+1)))
epochs (R = tune.max_epochs, default train.epochs), ranks them by val accuracy at the end of that
budget and keeps the top floor(n_i / eta) for the next rung; ties go to the earlier candidate, a
failed trial ranks last and is never promoted. A promoted candidate trains again from scratch at
the larger budget (its schedule is the ordinary one of a run of that length), so every trial is an
ordinary training run under the configured engine. `tune.mode=grid` trains every candidate for R
epochs in one rung (VTAB's selection grid).

Then the winner trains for R epochs on `tune.final_train_split` (default `<train>+<val>`, the
union of the two splits; see vipamin_scale/data/wds.py) with train.seed = init.seed = 0..N-1,
N = tune.final_seeds, and is tested: test accuracy mean and sample std (n-1) over the seeds.

Layout of the run directory (the Hydra run dir; pass the same hydra.run.dir again to resume):
    trials/rung<i>/c<candidate>/   one training run per trial (result.json, metrics.jsonl, ...)
    final/seed<s>/                 the final runs
    tune.json, tune.md             the rung table, the winner, the final mean +- std (atomic)
    tune_val_vs_budget.png         val accuracy against budget, one line per candidate
A trial with a result.json (finished or failed) is never run again: re-running a killed tune
skips them, and trials cut short resume from their own checkpoints (train.resume=true). A trial
directory is reused only for the same trial under the same whole config (its run record,
vipamin_scale/runs.py): a re-run with a changed base config is refused (RunMismatch, exit 2).

Launchers (`tune.launcher`): `inline` runs the trials one after another in this process (under
torchrun, every rank runs the same loop: each trial is a distributed run); `local` runs each as
`vipamin-scale train` subprocess (`tune.workers` at once; `tune.command` replaces the command,
e.g. "launch/torchrun.sh train"); `slurm` submits each as a Slurm job through submitit
(`tune.slurm` holds submitit's parameters). Trials of one rung run concurrently under the last two.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import random
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from vipamin_scale.config import ConfigError, validate
import vipamin_scale.runs as runs
from vipamin_scale.paths import atomic_write_bytes

log = logging.getLogger(__name__)

_SPEC_KEYS = {"log", "range", "num"}


# ----------------------------------------------------------------------------- the search space


def _is_spec(node: Any) -> bool:
    return isinstance(node, Mapping) and bool(node) and set(node) <= _SPEC_KEYS and ("log" in node or "range" in node)


def _grid(key: str, spec: Mapping) -> list[Any]:
    kind = "log" if "log" in spec else "range"
    bounds, num = spec[kind], spec.get("num")
    if not isinstance(bounds, Sequence) or len(bounds) != 2 or not isinstance(num, int) or num < 1:
        raise ConfigError(f"tune.space.{key}: a {kind} grid is {{{kind}: [lo, hi], num: n}} with n >= 1; got {dict(spec)}")
    lo, hi = float(bounds[0]), float(bounds[1])
    if kind == "log" and (lo <= 0 or hi <= 0):
        raise ConfigError(f"tune.space.{key}: log bounds must be > 0; got [{lo}, {hi}]")
    if num == 1:
        return [lo]
    ts = [i / (num - 1) for i in range(num)]
    if kind == "log":
        values = [math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo))) for t in ts]
    else:
        values = [lo + t * (hi - lo) for t in ts]
    return [float(f"{v:.4g}") for v in values]  # readable run names; 4 digits is finer than any lr grid


def parse_space(space: Mapping[str, Any]) -> list[tuple[str, list[Any]]]:
    """Flatten the nested space into [(dotted field, values)], in declaration order."""
    out: list[tuple[str, list[Any]]] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and not _is_spec(node):
            if not node:
                raise ConfigError(f"tune.space.{prefix}: empty")
            for key, child in node.items():
                walk(child, f"{prefix}.{key}" if prefix else str(key))
            return
        if _is_spec(node):
            values = _grid(prefix, node)
        elif isinstance(node, (list, tuple)):
            values = list(node)
        else:
            values = [node]
        if not values:
            raise ConfigError(f"tune.space.{prefix}: no values")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"tune.space.{prefix}: repeated values {values}")
        out.append((prefix, values))

    if isinstance(space, DictConfig):
        space = OmegaConf.to_container(space, resolve=True)
    if not space:
        raise ConfigError("tune.space: empty; pick a preset (tune=lr) or add fields (+tune.space.train.lr=[0.01,0.1])")
    walk(space, "")
    return out


def candidates(space: Mapping[str, Any], trials: Optional[int] = None, seed: int = 0) -> list[dict[str, Any]]:
    """The grid's points, {dotted field: value}, in product order; `trials` of them sampled (seeded)
    without replacement, keeping product order, when given and smaller than the grid."""
    axes = parse_space(space)
    keys = [k for k, _ in axes]
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]
    if trials is not None and trials < len(points):
        keep = sorted(random.Random(f"vipamin_scale.tune/{seed}").sample(range(len(points)), trials))
        points = [points[i] for i in keep]
    return points


# ----------------------------------------------------------------------------- successive halving


def rung_budgets(n: int, eta: int, max_epochs: int, min_epochs: int = 1, mode: str = "halving") -> list[tuple[int, int]]:
    """[(candidates in the rung, epochs)] for n candidates: survivors floor(n_i / eta) while >= 1."""
    if mode == "grid" or n == 1:
        return [(n, max_epochs)]
    sizes = [n]
    while sizes[-1] // eta >= 1:
        sizes.append(sizes[-1] // eta)
    s = len(sizes)
    budgets = [max(min_epochs, min(max_epochs, round(max_epochs * eta ** (i - s + 1)))) for i in range(s)]
    return list(zip(sizes, budgets))


def promote(scores: Sequence[Optional[float]], keep: int) -> list[int]:
    """Positions of the `keep` best scores (None = failed, never kept); ties go to the earlier position."""
    order = sorted((i for i, s in enumerate(scores) if s is not None and not math.isnan(s)),
                   key=lambda i: (-scores[i], i))
    return sorted(order[:keep])


# ----------------------------------------------------------------------------- trials


@dataclass
class Trial:
    name: str  # "rung0/c003", "final/seed1": its directory under the run directory
    dir: Path
    params: dict[str, Any]  # the candidate's values
    overrides: dict[str, Any]  # everything set on the base config (params + budget, split, seed, ...)
    rung: Optional[int] = None
    candidate: Optional[int] = None
    seed: Optional[int] = None

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "overrides": self.overrides, "rung": self.rung,
                "candidate": self.candidate, "seed": self.seed}


def hydra_value(value: Any) -> str:
    """A value as a Hydra override literal."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if text and all(c.isalnum() or c in "_-./+:" for c in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def val_score(result: Optional[dict[str, Any]]) -> Optional[float]:
    """Val accuracy at the end of the trial's budget (None: failed or not run)."""
    if not result or result.get("status", "ok") != "ok":
        return None
    acc = (result.get("final_eval") or {}).get("acc")
    return float(acc) if acc is not None else None


def trial_config(base: DictConfig, trial: Trial) -> DictConfig:
    """The trial's whole config: the base config plus the trial's overrides, written into its directory."""
    cfg = copy.deepcopy(base)  # still the typed schema: a wrong type is an error here
    for key, value in trial.overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    cfg.train.out_dir = str(trial.dir)
    return cfg


class InlineLauncher:
    """Trials one after another in this process: `train_fn(cfg)` on the base config plus the trial's
    overrides (run_training by default; a stand-in for tests). An exception is recorded as a failed
    trial (result.json) and the search goes on; KeyboardInterrupt and SystemExit are not caught."""

    def __init__(self, base: DictConfig, train_fn: Optional[Callable[[DictConfig], Any]] = None):
        self.base = base
        if train_fn is None:
            from vipamin_scale.train import run_training as train_fn
        self.train_fn = train_fn

    def config(self, trial: Trial) -> DictConfig:
        return trial_config(self.base, trial)

    def run(self, trials: Sequence[Trial]) -> None:
        import vipamin_scale.distributed as D
        for trial in trials:  # each trial records itself (vipamin_scale.runs), which is what a report reads
            cfg = self.config(trial)
            log.info("tune: %s %s", trial.name, _fmt_params(trial.params))
            try:
                self.train_fn(cfg)
            except Exception as exc:  # recorded; the search goes on
                log.warning("tune: %s failed: %s: %s", trial.name, type(exc).__name__, exc)
                runs.record_exception(cfg, exc)
            D.barrier()


class LocalLauncher:
    """Each trial as its own `vipamin-scale train` process, `workers` at once; its output goes to
    `<trial>/trial.log`. A process that exits non-zero without a result.json is recorded as failed."""

    def __init__(self, base_overrides: Sequence[str], workers: int = 1, command: Optional[str] = None):
        self.base_overrides = list(base_overrides)
        self.workers = workers
        self.command = shlex.split(command) if command else [sys.executable, "-m", "vipamin_scale.cli", "train"]

    def argv(self, trial: Trial) -> list[str]:
        return [*self.command, *self.base_overrides, *(f"{k}={hydra_value(v)}" for k, v in trial.overrides.items()),
                f"hydra.run.dir={trial.dir}", "train.progress=false"]

    def _one(self, trial: Trial) -> None:
        trial.dir.mkdir(parents=True, exist_ok=True)
        log.info("tune: %s %s", trial.name, _fmt_params(trial.params))
        with open(trial.dir / "trial.log", "ab") as out:
            rc = subprocess.call(self.argv(trial), stdout=out, stderr=subprocess.STDOUT)
        if not runs.has_ended(trial.dir):
            runs.record_failure(trial.dir, f"exit code {rc} without result.json; see {trial.dir / 'trial.log'}: "
                                  f"{_last_line(trial.dir / 'trial.log')}")
        elif rc != 0:
            log.warning("tune: %s exited %d", trial.name, rc)

    def run(self, trials: Sequence[Trial]) -> None:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            list(pool.map(self._one, trials))


class SlurmLauncher(LocalLauncher):
    """Each trial as a Slurm job through submitit (parameters: tune.slurm, e.g. slurm_partition,
    timeout_min, gpus_per_node, cpus_per_task); submitit's logs under `<run dir>/.submitit/`."""

    def __init__(self, base_overrides: Sequence[str], folder: Path, parameters: Mapping[str, Any],
                 command: Optional[str] = None):
        super().__init__(base_overrides, 1, command)
        self.folder, self.parameters = Path(folder), dict(parameters)

    def run(self, trials: Sequence[Trial]) -> None:
        import submitit

        executor = submitit.AutoExecutor(folder=str(self.folder / "%j"))
        executor.update_parameters(**{"name": "vipamin-tune", **{k: v for k, v in self.parameters.items()
                                                                 if v is not None}})
        jobs = []
        for trial in trials:
            trial.dir.mkdir(parents=True, exist_ok=True)
            jobs.append((trial, executor.submit(submitit.helpers.CommandFunction(self.argv(trial), verbose=False))))
        for trial, job in jobs:
            try:
                job.result()
            except Exception as exc:  # the job failed; its result.json (if any) says why
                if not runs.has_ended(trial.dir):
                    runs.record_failure(trial.dir, f"slurm job {job.job_id}: {type(exc).__name__}: {str(exc).strip()[-500:]}")


def _first_line(text: Optional[str]) -> Optional[str]:
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    return lines[0][:300] if lines else None


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _fmt_params(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={hydra_value(v)}" for k, v in params.items())


# ----------------------------------------------------------------------------- the tune


@dataclass
class TuneResult:
    rungs: list[dict[str, Any]] = field(default_factory=list)
    winner: Optional[dict[str, Any]] = None
    final: Optional[dict[str, Any]] = None

    def to_json(self) -> dict[str, Any]:
        return {"rungs": self.rungs, "winner": self.winner, "final": self.final}


def _check_space(cfg: DictConfig, points: list[dict[str, Any]]) -> None:
    """Every field exists and every candidate validates, before any training."""
    for key in points[0]:
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"tune.space.{key}: no such config field")
    for point in points:
        trial_cfg = copy.deepcopy(cfg)
        for key, value in point.items():
            try:
                OmegaConf.update(trial_cfg, key, value, merge=False)
            except Exception as exc:
                raise ConfigError(f"tune.space.{key}: {value!r}: {str(exc).splitlines()[0]}") from None
        try:
            validate(trial_cfg)
        except ConfigError as exc:
            raise ConfigError(f"tune.space: candidate {_fmt_params(point)}: {exc}") from None


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


def run_tune(cfg: DictConfig, *, launcher: Any = None, base_overrides: Sequence[str] = (),
             train_fn: Optional[Callable[[DictConfig], Any]] = None) -> TuneResult:
    """Search, then the final runs; writes tune.json, tune.md and the plot into train.out_dir, which
    this tune holds (runs.hold: a second tune into the same directory is refused)."""
    validate(cfg)
    points = candidates(cfg.tune.space, cfg.tune.trials, cfg.tune.seed)
    _check_space(cfg, points)
    import vipamin_scale.distributed as D

    D.init_from_env()  # under torchrun the ranks agree on the lock (and every inline trial is distributed)
    with runs.hold(Path(cfg.train.out_dir)):
        return _search(cfg, points, launcher, base_overrides, train_fn)


def _search(cfg: DictConfig, points: list[dict[str, Any]], launcher: Any, base_overrides: Sequence[str],
            train_fn: Optional[Callable[[DictConfig], Any]]) -> TuneResult:
    import vipamin_scale.distributed as D

    tcfg = cfg.tune
    root = Path(cfg.train.out_dir)
    max_epochs = int(tcfg.max_epochs or cfg.train.epochs)
    final_split = tcfg.final_train_split or f"{cfg.data.train_split}+{cfg.data.val_split}"
    if launcher is None:
        launcher = make_launcher(cfg, base_overrides, train_fn)
    plan = rung_budgets(len(points), tcfg.eta, max_epochs, tcfg.min_epochs, tcfg.mode)
    log.info("tune: %d candidates, rungs (candidates, epochs) %s, launcher %s", len(points), plan,
             type(launcher).__name__)
    result = TuneResult()
    alive = list(range(len(points)))
    t0 = time.perf_counter()
    for rung, (size, epochs) in enumerate(plan):
        assert len(alive) == size, (alive, size)
        trials = []
        for c in alive:
            overrides = {**points[c], "train.epochs": epochs, "train.eval_every": epochs, "train.test_at_end": False,
                         "train.eval_split": "val", "train.resume": True}
            trials.append(Trial(f"rung{rung}/c{c:03d}", root / "trials" / f"rung{rung}" / f"c{c:03d}",
                                points[c], overrides, rung=rung, candidate=c))
        _launch(launcher, trials, cfg)
        records = [runs.read_result(t.dir) or {} for t in trials]
        scores = [val_score(r) for r in records]
        keep = size // tcfg.eta if rung + 1 < len(plan) else 1
        kept = promote(scores, keep)
        result.rungs.append({
            "rung": rung, "epochs": epochs,
            "trials": [{"candidate": t.candidate, "params": t.params, "dir": str(t.dir.relative_to(root)),
                        "status": r.get("status", "ok"), "val_acc": s, "error": _first_line(r.get("error")),
                        "promoted": i in kept}
                       for i, (t, r, s) in enumerate(zip(trials, records, scores))]})
        _write_summary(root, cfg, result, plan, final_split)
        if not kept:
            raise RuntimeError(f"tune: every trial of rung {rung} failed; see {root / 'tune.md'}")
        alive = [alive[i] for i in kept]
    best = alive[0]
    result.winner = {"candidate": best, "params": points[best],
                     "val_acc": next(t["val_acc"] for t in result.rungs[-1]["trials"] if t["candidate"] == best)}
    log.info("tune: winner %s (val acc %.4f) after %.0f s", _fmt_params(points[best]), result.winner["val_acc"],
             time.perf_counter() - t0)
    if tcfg.final_seeds > 0:
        finals = []
        for s in range(tcfg.final_seeds):
            overrides = {**points[best], "train.epochs": max_epochs, "train.eval_every": max_epochs,
                         "train.test_at_end": True, "data.train_split": final_split, "train.seed": s,
                         "init.seed": s, "train.resume": True}
            finals.append(Trial(f"final/seed{s}", root / "final" / f"seed{s}", points[best], overrides, seed=s))
        _launch(launcher, finals, cfg)
        final_runs = []
        for t in finals:
            r = runs.read_result(t.dir) or {}
            acc = (r.get("test") or {}).get("acc") if r.get("status", "ok") == "ok" else None
            final_runs.append({"seed": t.seed, "dir": str(t.dir.relative_to(root)), "status": r.get("status", "ok"),
                               "test_acc": acc, "error": _first_line(r.get("error"))})
        accs = [r["test_acc"] for r in final_runs if r["test_acc"] is not None]
        result.final = {"train_split": final_split, "epochs": max_epochs, "runs": final_runs,
                        "test_mean": sum(accs) / len(accs) if accs else None,
                        "test_std": sample_std(accs), "n": len(accs)}
    if D.rank() == 0:
        _write_summary(root, cfg, result, plan, final_split)
    return result


def _launch(launcher: Any, trials: list[Trial], base: DictConfig) -> None:
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


def sample_std(values: Sequence[float]) -> Optional[float]:
    """Sample standard deviation (n-1); 0 for one value, None for none."""
    if len(values) < 2:
        return 0.0 if values else None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def make_launcher(cfg: DictConfig, base_overrides: Sequence[str] = (),
                  train_fn: Optional[Callable[[DictConfig], Any]] = None) -> Any:
    tcfg = cfg.tune
    if tcfg.launcher == "inline":
        return InlineLauncher(cfg, train_fn)
    if tcfg.launcher == "local":
        return LocalLauncher(base_overrides, tcfg.workers, tcfg.command)
    return SlurmLauncher(base_overrides, Path(cfg.train.out_dir) / ".submitit",
                         OmegaConf.to_container(tcfg.slurm, resolve=True), tcfg.command)


# ----------------------------------------------------------------------------- summary


def _write_summary(root: Path, cfg: DictConfig, result: TuneResult, plan, final_split: str) -> None:
    import vipamin_scale.distributed as D

    if D.rank() != 0:
        return
    doc = {"space": OmegaConf.to_container(cfg.tune.space, resolve=True), "mode": cfg.tune.mode,
           "eta": cfg.tune.eta, "plan": [{"candidates": n, "epochs": e} for n, e in plan],
           "train_split": cfg.data.train_split, "val_split": cfg.data.val_split, "final_train_split": final_split,
           **result.to_json()}
    runs.write_json(root / "tune.json", doc, nan_as_null=True)
    atomic_write_bytes(root / "tune.md", tune_markdown(doc).encode())
    plot_tune(doc, root / "tune_val_vs_budget.png")


def _f(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4f}"


def tune_markdown(doc: Mapping[str, Any]) -> str:
    """The rung-by-rung table, the winner and the final mean +- std, from a tune.json document."""
    lines = [f"## Tuning ({doc['mode']}, eta {doc['eta']}): {doc['train_split']} -> {doc['val_split']}", "",
             "| rung | epochs | candidate | " + " | ".join(_param_keys(doc)) + " | val acc | status | promoted |",
             "|---|---|---|" + "---|" * len(_param_keys(doc)) + "---|---|---|"]
    for rung in doc["rungs"]:
        for t in sorted(rung["trials"], key=lambda t: (t["val_acc"] is None, -(t["val_acc"] or 0), t["candidate"])):
            values = " | ".join(hydra_value(t["params"].get(k)) for k in _param_keys(doc))
            status = t["status"] if not t.get("error") else f"{t['status']}: {t['error']}"
            lines.append(f"| {rung['rung']} | {rung['epochs']} | {t['candidate']} | {values} | {_f(t['val_acc'])} | "
                         f"{status.replace('|', '/')} | {'yes' if t['promoted'] else ''} |")
    if doc.get("winner"):
        w = doc["winner"]
        lines += ["", f"Winner: candidate {w['candidate']}, {_fmt_params(w['params'])} (val acc {_f(w['val_acc'])})."]
    final = doc.get("final")
    if final:
        lines += ["", f"Final: trained on {final['train_split']} for {final['epochs']} epochs, tested, "
                      f"{len(final['runs'])} seeds: test acc **{_f(final['test_mean'])} ± {_f(final['test_std'])}** "
                      f"(mean ± sample std over {final['n']} finished).", "",
                  "| seed | test acc | status |", "|---|---|---|"]
        for r in final["runs"]:
            lines.append(f"| {r['seed']} | {_f(r['test_acc'])} | {r['status']}{': ' + r['error'] if r.get('error') else ''} |")
    return "\n".join(lines) + "\n"


def _param_keys(doc: Mapping[str, Any]) -> list[str]:
    keys: list[str] = []
    for rung in doc["rungs"]:
        for t in rung["trials"]:
            keys += [k for k in t["params"] if k not in keys]
    return keys


def plot_tune(doc: Mapping[str, Any], path: Path) -> None:
    """Val accuracy against budget (epochs), one line per candidate across the rungs it reached."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    import io

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    lines: dict[int, list[tuple[int, float]]] = {}
    for rung in doc["rungs"]:
        for t in rung["trials"]:
            if t["val_acc"] is not None:
                lines.setdefault(t["candidate"], []).append((rung["epochs"], t["val_acc"]))
    winner = (doc.get("winner") or {}).get("candidate")
    for c, pts in sorted(lines.items()):
        xs, ys = zip(*pts)
        if c == winner:
            ax.plot(xs, ys, marker="o", color="C3", lw=2, zorder=3, label=f"winner (c{c})")
        else:
            ax.plot(xs, ys, marker=".", color="0.6", lw=1)
    ax.set_xscale("log", base=doc["eta"]) if len(doc["rungs"]) > 1 else None
    ax.set_xlabel("budget (epochs)")
    ax.set_ylabel("val accuracy")
    ax.set_title(f"successive halving, eta={doc['eta']}" if doc["mode"] == "halving" else "grid")
    ax.grid(alpha=0.3)
    if winner is not None and winner in lines:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


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
    """Before any training: the search's and the final runs' splits exist in the data's manifest, the data has
    2+ classes and its training split one full batch (`data.check_splits`)."""
    from vipamin_scale.data import check_splits as check_data_splits

    validate(cfg)
    final = cfg.tune.final_train_split or f"{cfg.data.train_split}+{cfg.data.val_split}"
    check_data_splits(cfg.data, {"data.train_split": cfg.data.train_split, "data.val_split": cfg.data.val_split,
                                 "tune.final_train_split": final, "data.test_split": cfg.data.test_split},
                      train="data.train_split", limit=cfg.data.max_train_samples)


def main_task(cfg: DictConfig) -> TuneResult:
    """The `vipamin-scale tune` task (under Hydra)."""
    check_splits(cfg)
    base = tune_overrides_from_hydra() if cfg.tune.launcher != "inline" else []
    result = run_tune(cfg, base_overrides=base)
    if result.final and result.final["test_mean"] is not None:
        log.info("tune: %s -> test acc %.4f ± %.4f over %d seeds", _fmt_params(result.winner["params"]),
                 result.final["test_mean"], result.final["test_std"], result.final["n"])
    return result
