"""Gather a sweep's runs into tables and plots: `vipamin-scale report SWEEP_DIR [--out DIR]`.

A sweep directory is what `vipamin-scale train -m ...` (Hydra multirun) leaves: one directory
per job (`hydra.sweep.subdir`, the job number by default), each holding `.hydra/overrides.yaml`,
`.hydra/config.yaml` (Hydra's) and the run's records (`vipamin_scale/runs.py`: run.json once it
starts, result.json once it ends, with `"status": "failed"` and the error when it failed). A tune's
directory holds its trials and final runs, each an ordinary run directory. Every run is reported:

  report.md    one markdown table (the swept overrides, status, accuracy, parameters, timings)
               and a list of the runs that failed or never finished; none is dropped; above them,
               one row per group of runs differing only in their seeds: mean ± sd, the 95 %
               interval and n (`summary`; what counts as a seed: `replicate_keys`)
  report.csv   the per-run table, one row a run
  accuracy_vs_prompt_length.png   test accuracy (best val where no test ran) against prompt
               length, mean ± sd with n per point, one line per group (every swept override but the
               seeds and prompt.length), one panel each for shallow and deep prompts
  init_time_vs_prompt_length.png  initializer wall time against prompt length, the same way
  tune_val_vs_budget*.png         for each `vipamin-scale tune` directory found (its tune.json): val
               accuracy against budget; report.md gets its rung table, winner and final mean +- std

With `--paired KEY=VALUE` (e.g. `--paired init=random`), paired differences against that baseline
(`paired_differences`): every other value of KEY minus the baseline, draw by draw (matched by the seeds
and what follows them), in each group of the other swept fields, with mean, 95 % t-interval, n and
whether the interval excludes 0: a section of report.md, report_paired.csv (one row a group),
paired_vs / paired_diff columns in report.csv (each run against its matched baseline run), and
paired_diff_vs_prompt_length.png (the differences against prompt length, 95 % intervals as bars).
A field that each value of KEY sets for itself (`own_settings`: a study's lr, selected per method) does not
split the groups: each value is paired with the baseline at its own settings. A study's runs
(`vipamin-scale study`) carry their regime, method, P, point and draw (`runs.OVERRIDES`), so
`report STUDY_DIR --paired init=random` pairs its methods as study.md does.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import vipamin_scale.stats as stats
from vipamin_scale.paths import atomic_write_bytes
from vipamin_scale.runs import find_run_dirs, run_config, run_overrides, run_status

COLUMNS = ("run", "status", "overrides", "method", "prompt_length", "deep", "best_val_acc", "best_val_epoch",
           "test_acc", "trainable_params", "init_time_s", "train_time_s", "images_per_s", "error")


# ----------------------------------------------------------------------------- gathering


@dataclass
class Run:
    path: Path  # the job's output directory
    name: str  # relative to the sweep directory
    status: str  # ok | failed | incomplete
    overrides: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # runs.run_config: Hydra's (unresolved) or ours

    def value(self, dotted: str) -> Any:
        """A field of the run's config (`runs.run_config`); None if absent."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    @property
    def method(self) -> Optional[str]:
        return self.result.get("method") or self.value("init.method")

    @property
    def prompt_length(self) -> Optional[int]:
        value = self.result.get("prompt_length", self.value("prompt.length"))
        return int(value) if value is not None else None

    @property
    def deep(self) -> Optional[bool]:
        value = self.result.get("deep", self.value("prompt.deep"))
        return bool(value) if value is not None else None

    def accuracy(self) -> Optional[float]:
        """Test accuracy, else the best per-epoch eval accuracy; None when the run has neither."""
        test = self.result.get("test") or {}
        if test.get("acc") is not None:
            return float(test["acc"])
        best = self.result.get("best_val") or {}
        return float(best["acc"]) if best.get("acc") is not None and best["acc"] >= 0 else None


def find_runs(sweep_dir: Path) -> list[Run]:
    """Every run directory under `sweep_dir` (itself included when it is a single run), read through
    its records (`vipamin_scale.runs`): a Hydra job's, a tune's trials and final runs, a benchmark's. A study's
    directory (study.json): its final runs, each method's at its own selected point (`study_runs`)."""
    sweep_dir = Path(sweep_dir)
    dirs = study_runs(sweep_dir)
    if dirs is None:
        dirs = [d for d in find_run_dirs(sweep_dir)
                if not ((d / "tune.json").is_file() or (d / "study.json").is_file())]  # a tune's or study's own
    found = []                                                                         # directory is not a run
    for d in sorted(dirs, key=_natural_key(sweep_dir)):
        status, result = run_status(d)
        name = str(d.relative_to(sweep_dir)) if d != sweep_dir else "."
        found.append(Run(d, name, status, run_overrides(d), result, run_config(d)))
    return found


def study_runs(root: Path) -> Optional[list[Path]]:
    """The final runs a study's record lists (its cells' runs; the selection's other trials and the cost runs
    left out), or None when `root` holds no study.json."""
    path = Path(root) / "study.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        return sorted({Path(root) / r["dir"] for c in doc["cells"] for r in c["runs"] if r.get("dir")})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PairingError(f"{path}: not a study's record ({type(exc).__name__}: {exc})") from None


def _natural_key(root: Path):
    def key(path: Path):
        rel = path.relative_to(root).parts
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in rel]
    return key


def swept_overrides(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between runs (or that some runs lack): what the sweep varied."""
    values: dict[str, set] = {}
    for run in runs:
        for item in run.overrides:
            key, _, value = item.partition("=")
            values.setdefault(key, set()).add(value)
    keys = [k for k, v in values.items()
            if len(v) > 1 or any(k not in {o.partition("=")[0] for o in r.overrides} for r in runs)]
    return keys if len(runs) > 1 else []


# ----------------------------------------------------------------------------- the table


def rows(runs: list[Run]) -> list[dict[str, Any]]:
    keys = swept_overrides(runs)
    out = []
    for run in runs:
        given = dict(o.partition("=")[::2] for o in run.overrides)
        r = run.result
        best = r.get("best_val") or {}
        out.append({
            "run": run.name, "status": run.status,
            "overrides": " ".join(f"{k}={given[k]}" for k in keys if k in given),
            "method": run.method, "prompt_length": run.prompt_length, "deep": run.deep,
            "best_val_acc": best.get("acc") if best.get("acc", -1) >= 0 else None,
            "best_val_epoch": best.get("epoch") if best.get("epoch", -1) >= 0 else None,
            "test_acc": (r.get("test") or {}).get("acc"),
            "trainable_params": r.get("trainable_params"), "init_time_s": r.get("init_time_s"),
            "train_time_s": r.get("train_time_s"), "images_per_s": r.get("images_per_s"),
            "error": (r.get("error") or "").splitlines()[0][:200] if r.get("error") else "",
        })
    return out


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "deep" if value else "shallow"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value).replace("|", "\\|")


def _pm(mean: Optional[float], sd: Optional[float], digits: int) -> str:
    if mean is None:
        return ""
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def summary_markdown(groups: list[dict[str, Any]], replicates: list[str]) -> list[str]:
    """The `summary` rows as a markdown section: one row a group, mean ± sd, 95 % interval and n."""
    averaged = ", ".join(f"`{k}`" for k in replicates) or "nothing (no seed was swept)"
    lines = ["## Mean ± sd over seeds", "",
             f"One row per group of runs that differ only in {averaged}. acc: test accuracy (best val where no "
             "test ran), mean ± sample sd (n-1) over the n finished runs of the group (of `runs`); "
             "95 % CI: the t interval of the mean. init time in seconds (none for runs that read a "
             "prompts file: `vipamin-scale init` timed itself in that file).", "",
             "| group | deep | prompt_length | n | runs | acc mean ± sd | acc 95 % CI | init time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in groups:
        ci = row["acc_ci95"]
        interval = f"[{row['acc_mean'] - ci:.4f}, {row['acc_mean'] + ci:.4f}]" if ci is not None else ""
        lines.append(f"| {_cell(row['group']) or _cell(row['line'])} | {_cell(row['deep'])} | "
                     f"{_cell(row['prompt_length'])} | {row['n']} | {row['runs']} | "
                     f"{_pm(row['acc_mean'], row['acc_sd'], 4)} | {interval} | "
                     f"{_pm(row['init_time_mean'], row['init_time_sd'], 2)} |")
    return lines


def markdown(sweep_dir: Path, table: list[dict[str, Any]], plots: list[str], tunes: list[str] = (),
             groups: list[dict[str, Any]] = (), replicates: list[str] = (), paired: list[str] = ()) -> str:
    cols = [c for c in COLUMNS if c != "error"]
    lines = [f"# Sweep report: {sweep_dir}", ""]
    counts = {s: sum(r["status"] == s for r in table) for s in ("ok", "failed", "incomplete")}
    lines.append(f"{len(table)} runs: {counts['ok']} finished, {counts['failed']} failed, "
                 f"{counts['incomplete']} incomplete.")
    if groups:
        lines += [""] + summary_markdown(groups, replicates) + ([""] + list(paired) if paired else []) + ["", "## Runs"]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in table:
        lines.append("| " + " | ".join(_cell(row[c]) for c in cols) + " |")
    bad = [r for r in table if r["status"] != "ok"]
    lines += ["", "## Failed or incomplete runs", ""]
    if bad:
        for row in bad:
            why = row["error"] or "no result.json (still running, killed or preempted)"
            lines.append(f"- `{row['run']}` ({row['status']}) {row['overrides']}: {why}")
    else:
        lines.append("none")
    for section in tunes:
        lines += ["", section.rstrip("\n")]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_csv(table: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in table:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    return buf.getvalue()


# ----------------------------------------------------------------------------- plots


def _given(run: Run) -> dict[str, str]:
    return dict(o.partition("=")[::2] for o in run.overrides)


def _is_seed(key: str) -> bool:
    return key.lstrip("+~").rsplit(".", 1)[-1] == "seed"


def _inside_run(value: str, run: Run) -> bool:
    path = Path(value)
    return path.is_absolute() and path.resolve().is_relative_to(run.path.resolve())


def replicate_keys(runs: list[Run]) -> tuple[list[str], list[str]]:
    """Split the swept overrides into (factors, replicates). Replicates are averaged over, factors group:
      * seeds: every key whose last part is `seed` (init.seed, train.seed, +data.seed, ...);
      * a run's own files: a key whose value is, in every run, an absolute path inside that run's
        directory (prompt.init_file=$RUN/prompts.safetensors, as slurm/*.sh pass it);
      * a key that follows the seeds (e.g. data.root=.../4shot_seed<s>, one few-shot draw per seed):
        the same seeds give the same value in every run, and some seeds repeat across runs (so the
        key is not a factor that merely happens to change with them).
    Every other swept override is a factor."""
    factors, seeds, own, follows = _replicate_parts(runs)
    return factors, seeds + own + follows


def _replicate_parts(runs: list[Run]) -> tuple[list[str], list[str], list[str], list[str]]:
    """(factors, seeds, own files, keys that follow the seeds): `replicate_keys`, its replicates by kind."""
    keys = swept_overrides(runs)
    given = [_given(r) for r in runs]
    seeds = [k for k in keys if _is_seed(k)]
    own = [k for k in keys if k not in seeds and all(k not in g or _inside_run(g[k], r) for g, r in zip(given, runs))]
    tuples = [tuple(g.get(k) for k in seeds) for g in given]
    follows = []
    if seeds and len(set(tuples)) < len(tuples):
        for key in keys:
            if key in seeds or key in own:
                continue
            seen: dict[tuple, Optional[str]] = {}
            if all(seen.setdefault(t, g.get(key)) == g.get(key) for t, g in zip(tuples, given)):
                follows.append(key)
    replicates = seeds + own + follows
    return [k for k in keys if k not in replicates], seeds, own, follows


def summary(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per group of runs that differ only in their replicates (`replicate_keys`), and in
    (deep, prompt length): accuracy (`Run.accuracy`) and init time as mean, sample sd (n-1), the 95 %
    t interval's half width, over the n finished runs with a value; `runs` counts the group's runs of
    any status. Init time leaves out runs that read their prompts from a file (method "file", as
    slurm/*.sh train): the initializer ran in another process. `line` is the group without
    prompt.length: the plots' line label."""
    factors, _ = replicate_keys(runs)
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        given = _given(run)
        key = (tuple(f"{k}={given[k]}" for k in factors if k in given), run.deep, run.prompt_length)
        groups.setdefault(key, []).append(run)
    out = []
    for (group, deep, length), members in groups.items():
        ok = [r for r in members if r.status == "ok"]
        accs = [a for a in (r.accuracy() for r in ok) if a is not None and not math.isnan(a)]
        times = [float(t) for t in (r.result.get("init_time_s") for r in ok if r.result.get("method") != "file")
                 if t is not None and not math.isnan(t)]  # a run that read a prompts file timed the reading
        line = " ".join(g for g in group if g.partition("=")[0].lstrip("+~") != "prompt.length")
        acc, time = stats.summary(accs), stats.summary(times)
        out.append({"group": " ".join(group), "line": line or str(members[0].method), "deep": deep,
                    "prompt_length": length, "n": acc["n"], "runs": len(members), "acc_mean": acc["mean"],
                    "acc_sd": acc["sd"], "acc_ci95": stats.half_width(acc["sd"], acc["n"]), "acc": accs,
                    "init_time_mean": time["mean"], "init_time_sd": time["sd"], "init_time_n": time["n"]})
    return sorted(out, key=lambda r: (r["deep"] is None, bool(r["deep"]), r["line"], r["prompt_length"] is None,
                                      r["prompt_length"] or 0))


class PairingError(ValueError):
    """`report --paired`: the baseline names no swept factor, or a draw is ambiguous (one error line)."""


def paired_differences(runs: list[Run], baseline: str) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Paired differences against `baseline` ("KEY=VALUE", a swept factor such as init=random).

    Cells are the groups of `summary` without KEY: every other factor, deep, prompt length. Within a
    cell, each run with KEY=v (v not the baseline) is matched to the baseline's run of the same draw:
    the same values of the seeds and of the keys that follow them (`replicate_keys`; a run's own files
    are not a draw). Only finished runs with an accuracy pair; two finished runs of one draw in one
    cell (and one KEY value) are ambiguous: PairingError. Returns (one row per cell and v: n, mean
    difference, sample sd, 95 % t-interval lo/hi, resolved = the interval excludes 0, the differences
    by draw; {run name: {"paired_vs": baseline run, "paired_diff": its difference}}); v - baseline."""
    key, sep, value = baseline.partition("=")
    factors, seeds, _, follows = _replicate_parts(runs)
    bare = {f.lstrip("+~"): f for f in factors}
    if not sep or key.lstrip("+~") not in bare:
        raise PairingError(f"--paired {baseline}: give KEY=VALUE with KEY a swept factor; the swept factors here: "
                           f"{', '.join(factors) or 'none'}")
    key = bare[key.lstrip("+~")]
    if not any(_given(r).get(key) == value for r in runs):
        values = sorted({str(_given(r).get(key)) for r in runs})
        raise PairingError(f"--paired {baseline}: no run has {key}={value}; its values: {', '.join(values)}")
    draw_keys = seeds + follows
    own = own_settings(runs, factors, key)
    cells: dict[tuple, dict[str, dict[tuple, Run]]] = {}
    for run in runs:
        acc = run.accuracy() if run.status == "ok" else None
        if acc is None or math.isnan(acc):
            continue
        given = _given(run)
        cell = (tuple(f"{k}={given[k]}" for k in factors if k != key and k not in own and k in given), run.deep,
                run.prompt_length)
        draw = tuple(given.get(k) for k in draw_keys)
        side = cells.setdefault(cell, {}).setdefault(str(given.get(key)), {})
        if draw in side:
            raise PairingError(f"--paired: runs {side[draw].name} and {run.name} are the same draw "
                               f"({', '.join(f'{k}={v}' for k, v in zip(draw_keys, draw)) or 'no seed swept'}) "
                               f"of one group; report one of them")
        side[draw] = run
    rows, per_run = [], {}
    for (group, deep, length), sides in cells.items():
        base = sides.get(value, {})
        for v, side in sides.items():
            if v == value:
                continue
            draws = sorted((d for d in side if d in base), key=_draw_order)
            for d in draws:
                per_run[side[d].name] = {"paired_vs": base[d].name,
                                         "paired_diff": side[d].accuracy() - base[d].accuracy()}
            p = stats.paired([side[d].accuracy() for d in draws], [base[d].accuracy() for d in draws])
            rows.append({"versus": f"{key}={v}", "baseline": f"{key}={value}", "group": " ".join(group), "deep": deep,
                         "prompt_length": length, "n": p["n"], "mean": p["mean"], "sd": p["sd"], "lo": p["lo"],
                         "hi": p["hi"], "resolved": p["resolved"],
                         "draws": [", ".join(f"{k}={x}" for k, x in zip(draw_keys, d)) for d in draws],
                         "diffs": p["runs"]})
    rows.sort(key=lambda r: (r["versus"], r["group"], r["deep"] is None, bool(r["deep"]), r["prompt_length"] is None,
                             r["prompt_length"] or 0))
    return rows, per_run


def own_settings(runs: list[Run], factors: list[str], key: str) -> list[str]:
    """The factors that are a value of KEY's own setting rather than a condition: in every group of runs with
    the same KEY value and the same other factors, they take one value, and that value changes with KEY in some
    group (a study's lr, selected per method and cell). They do not split the pairing's cells, so each value of
    KEY is paired with the baseline at its own settings. A factor swept for every KEY value (an lr grid run for
    both methods) takes several values in a group and stays a condition."""
    out = []
    given = [_given(r) for r in runs]
    for f in factors:
        if f == key:
            continue
        rest = [k for k in factors if k not in (f, key)]
        by_group: dict[tuple, set] = {}
        by_rest: dict[tuple, set] = {}
        for g in given:
            by_group.setdefault((g.get(key), *(g.get(k) for k in rest)), set()).add(g.get(f))
            by_rest.setdefault(tuple(g.get(k) for k in rest), set()).add(g.get(f))
        if all(len(v) == 1 for v in by_group.values()) and any(len(v) > 1 for v in by_rest.values()):
            out.append(f)
    return out


def _draw_order(draw: tuple) -> tuple:
    return tuple((0, int(x), "") if x is not None and x.isdigit() else (1, 0, str(x)) for x in draw)


PAIRED_COLUMNS = ("versus", "baseline", "group", "deep", "prompt_length", "n", "mean", "sd", "lo", "hi", "resolved")


def paired_markdown(rows: list[dict[str, Any]], baseline: str, draw_keys: list[str]) -> list[str]:
    """The paired rows as a markdown section: mean difference, 95 % t-interval, n, whether it excludes 0."""
    matched = ", ".join(f"`{k}`" for k in draw_keys) or "nothing (no seed was swept: one pair a cell)"
    lines = [f"## Paired differences against {baseline}", "",
             f"Each row: test accuracy (best val where no test ran) of the group minus that of {baseline}, draw by "
             f"draw (runs matched by {matched}), over the n draws where both finished: mean, 95 % t-interval, "
             "and whether the interval excludes 0 (resolved).", "",
             "| versus | group | deep | prompt_length | n | mean diff | 95 % CI | excludes 0 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f"[{r['lo']:+.4f}, {r['hi']:+.4f}]" if r["lo"] is not None else ""
        mean = f"{r['mean']:+.4f}" if r["mean"] is not None else ""
        lines.append(f"| {_cell(r['versus'])} | {_cell(r['group'])} | {_cell(r['deep'])} | {_cell(r['prompt_length'])} | "
                     f"{r['n']} | {mean} | {ci} | {'yes' if r['resolved'] else 'no'} |")
    return lines


def _paired_series(rows: list[dict[str, Any]]) -> dict[tuple[bool, str], list[tuple[int, float, float, int]]]:
    """(deep, versus + group) -> (prompt length, mean difference, 95 % half width (0 below two pairs), n)."""
    series: dict[tuple[bool, str], list[tuple[int, float, float, int]]] = {}
    for r in rows:
        if r["mean"] is None or r["prompt_length"] is None or r["deep"] is None:
            continue
        line = " ".join(x for x in (r["versus"], *(g for g in r["group"].split() if
                                                   g.partition("=")[0].lstrip("+~") != "prompt.length")) if x)
        half = (r["hi"] - r["mean"]) if r["hi"] is not None else 0.0
        series.setdefault((r["deep"], line), []).append((r["prompt_length"], r["mean"], half, r["n"]))
    return {k: sorted(v) for k, v in series.items()}


def _series(groups: list[dict[str, Any]], metric: str) -> dict[tuple[bool, str], list[tuple[int, float, float, int]]]:
    """(deep, line) -> (prompt length, mean, sd (0 below two values), n) points, by prompt length."""
    series: dict[tuple[bool, str], list[tuple[int, float, float, int]]] = {}
    for row in groups:
        n = row["n"] if metric == "acc" else row["init_time_n"]
        if row[f"{metric}_mean"] is None or row["prompt_length"] is None or row["deep"] is None:
            continue
        series.setdefault((row["deep"], row["line"]), []).append(
            (row["prompt_length"], row[f"{metric}_mean"], row[f"{metric}_sd"] or 0.0, n))
    return {k: sorted(v) for k, v in series.items()}


def _plot(path: Path, series, ylabel: str, title: str, bars: str = "mean ± sd over seeds", zero: bool = False) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    lengths = sorted({p[0] for pts in series.values() for p in pts})
    for ax, deep in zip(axes, (False, True)):
        drawn = False
        if lengths and lengths[0] > 0 and lengths[-1] >= 10 * lengths[0]:  # 1, 5, 10, 20, 50: log-spaced
            ax.set_xscale("log")
            ax.set_xticks(lengths, [str(p) for p in lengths])
            ax.minorticks_off()
        for (is_deep, line), pts in sorted(series.items()):
            if is_deep != deep:
                continue
            xs, ys, sds, ns = zip(*pts)
            bars = ax.errorbar(xs, ys, yerr=sds, marker="o", capsize=3, label=line)
            for x, y, n in zip(xs, ys, ns):
                ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color=bars[0].get_color())
            drawn = True
        if zero:
            ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_title(f"{'deep' if deep else 'shallow'} prompts")
        ax.set_xlabel("prompt length")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(f"{title} ({bars}, n a point)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- entry points


def build_report(sweep_dir: str | Path, out_dir: str | Path | None = None, paired: Optional[str] = None) -> dict[str, Any]:
    """Write report.md, report.csv and the plots into `out_dir` (the sweep directory by default); with
    `paired` ("init=random"), the paired differences against that baseline too (`paired_differences`:
    a report.md section, report_paired.csv, paired_diff_vs_prompt_length.png, and each run's difference
    against its matched baseline run in report.csv's paired_vs / paired_diff columns)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no such sweep directory: {sweep_dir}")
    out = Path(out_dir) if out_dir else sweep_dir
    runs = find_runs(sweep_dir)
    table = rows(runs)
    groups = summary(runs)
    pairs, per_run, paired_md = [], {}, []
    if paired is not None and runs:  # before anything is written: a bad baseline is one error line
        pairs, per_run = paired_differences(runs, paired)
        _, seeds, _, follows = _replicate_parts(runs)
        paired_md = paired_markdown(pairs, paired, seeds + follows)
        for row in table:
            row.update(per_run.get(row["run"], {}))
    plots = []
    if runs:
        has_test = any((r.result.get("test") or {}).get("acc") is not None for r in runs)
        _plot(out / "accuracy_vs_prompt_length.png", _series(groups, "acc"),
              "test accuracy" if has_test else "best val accuracy", "accuracy vs prompt length")
        _plot(out / "init_time_vs_prompt_length.png", _series(groups, "init_time"), "init time (s)",
              "initializer time vs prompt length")
        plots = ["accuracy_vs_prompt_length.png", "init_time_vs_prompt_length.png"]
        if paired is not None:  # runs exist: pairs were computed above
            _plot(out / "paired_diff_vs_prompt_length.png", _paired_series(pairs), f"accuracy − {paired}",
                  f"paired difference against {paired} vs prompt length", bars="mean and 95 % t-interval", zero=True)
            plots.append("paired_diff_vs_prompt_length.png")
    tunes = []
    for path in sorted(sweep_dir.rglob("tune.json"), key=_natural_key(sweep_dir)):  # `vipamin-scale tune` runs
        from vipamin_scale.tune import plot_tune, tune_markdown

        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            tunes.append(f"## Tuning: {path}\n\nunreadable: {exc}\n")
            continue
        rel = path.parent.relative_to(sweep_dir)
        name = "tune_val_vs_budget.png" if rel == Path(".") else f"tune_val_vs_budget.{'.'.join(rel.parts)}.png"
        plot_tune(doc, out / name)
        where = "" if rel == Path(".") else f" `{rel}`"
        tunes.append(tune_markdown(doc).replace("## Tuning", f"## Tuning{where}", 1) + f"\n![{name}]({name})\n")
    columns = COLUMNS + (("paired_vs", "paired_diff") if paired is not None else ())
    atomic_write_bytes(out / "report.csv", write_csv(table, columns).encode())
    csvs = [out / "report.csv"]
    if paired is not None:
        atomic_write_bytes(out / "report_paired.csv", write_csv(pairs, PAIRED_COLUMNS).encode())
        csvs.append(out / "report_paired.csv")
    md = markdown(sweep_dir, table, plots, tunes, groups, replicate_keys(runs)[1], paired_md)
    atomic_write_bytes(out / "report.md", md.encode())
    return {"runs": runs, "table": table, "summary": groups, "paired": pairs, "report": out / "report.md",
            "csv": out / "report.csv", "csvs": csvs, "plots": [out / p for p in plots]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vipamin-scale report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="a Hydra multirun directory (hydra.sweep.dir) or one run's directory")
    parser.add_argument("--out", default=None, help="where to write the report (default: the sweep directory)")
    parser.add_argument("--paired", default=None, metavar="KEY=VALUE",
                        help="paired differences of every other value of a swept factor against this one "
                             "(e.g. init=random), matched by seed/draw, with 95 %% t-intervals")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.sweep_dir, args.out, args.paired)
    except (FileNotFoundError, PairingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not report["runs"]:
        print(f"error: no runs under {args.sweep_dir} (no run.json, result.json nor .hydra/overrides.yaml)", file=sys.stderr)
        return 2
    print(report["report"].read_text(), end="")
    print(f"wrote {report['report']}" + "".join(f", {p}" for p in report["csvs"] + report["plots"]))
    return 0
