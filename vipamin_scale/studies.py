"""Gather a sweep's runs into tables and plots: `vipamin-scale report SWEEP_DIR [--out DIR]`.

A sweep directory is what `vipamin-scale train -m ...` (Hydra multirun) leaves: one directory
per job (`hydra.sweep.subdir`, the job number by default), each holding `.hydra/overrides.yaml`,
`.hydra/config.yaml` (Hydra's) and the run's records (`vipamin_scale/runs.py`: run.json once it
starts, result.json once it ends, with `"status": "failed"` and the error when it failed). A tune's
directory holds its trials and final runs, each an ordinary run directory. Every run is reported:

  report.md    one markdown table (the swept overrides, status, accuracy, parameters, timings)
               and a list of the runs that failed or never finished; none is dropped
  report.csv   the same table, one row a run
  accuracy_vs_prompt_length.png   test accuracy (best val where no test ran) against prompt
               length, one line per init method, one panel each for shallow and deep prompts
  init_time_vs_prompt_length.png  initializer wall time against prompt length
  tune_val_vs_budget*.png         for each `vipamin-scale tune` directory found (its tune.json): val
               accuracy against budget; report.md gets its rung table, winner and final mean +- std
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
    its records (`vipamin_scale.runs`): a Hydra job's, a tune's trials and final runs, a benchmark's."""
    sweep_dir = Path(sweep_dir)
    dirs = [d for d in find_run_dirs(sweep_dir)
            if not (d / "tune.json").is_file()]  # a tune's own directory is not a run; its trials are
    found = []
    for d in sorted(dirs, key=_natural_key(sweep_dir)):
        status, result = run_status(d)
        name = str(d.relative_to(sweep_dir)) if d != sweep_dir else "."
        found.append(Run(d, name, status, run_overrides(d), result, run_config(d)))
    return found


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


def markdown(sweep_dir: Path, table: list[dict[str, Any]], plots: list[str], tunes: list[str] = ()) -> str:
    cols = [c for c in COLUMNS if c != "error"]
    lines = [f"# Sweep report: {sweep_dir}", ""]
    counts = {s: sum(r["status"] == s for r in table) for s in ("ok", "failed", "incomplete")}
    lines.append(f"{len(table)} runs: {counts['ok']} finished, {counts['failed']} failed, "
                 f"{counts['incomplete']} incomplete.")
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


def write_csv(table: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


# ----------------------------------------------------------------------------- plots


def _series(runs: list[Run], metric) -> dict[tuple[bool, str], list[tuple[int, float]]]:
    """(deep, method) -> sorted (prompt length, mean metric over runs sharing both) points."""
    points: dict[tuple[bool, str], dict[int, list[float]]] = {}
    for run in runs:
        value = metric(run)
        if run.status != "ok" or value is None or run.prompt_length is None or run.deep is None:
            continue
        if isinstance(value, float) and math.isnan(value):
            continue
        points.setdefault((run.deep, str(run.method)), {}).setdefault(run.prompt_length, []).append(value)
    return {k: sorted((p, sum(v) / len(v)) for p, v in by_len.items()) for k, by_len in points.items()}


def _plot(path: Path, series, ylabel: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, deep in zip(axes, (False, True)):
        drawn = False
        for (is_deep, method), pts in sorted(series.items()):
            if is_deep != deep:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=method)
            drawn = True
        ax.set_title(f"{'deep' if deep else 'shallow'} prompts")
        ax.set_xlabel("prompt length")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(title="init")
        else:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- entry points


def build_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write report.md, report.csv and the plots into `out_dir` (the sweep directory by default)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no such sweep directory: {sweep_dir}")
    out = Path(out_dir) if out_dir else sweep_dir
    runs = find_runs(sweep_dir)
    table = rows(runs)
    plots = []
    if runs:
        acc = _series(runs, Run.accuracy)
        has_test = any((r.result.get("test") or {}).get("acc") is not None for r in runs)
        _plot(out / "accuracy_vs_prompt_length.png", acc, "test accuracy" if has_test else "best val accuracy",
              "accuracy vs prompt length")
        init = _series(runs, lambda r: r.result.get("init_time_s"))
        _plot(out / "init_time_vs_prompt_length.png", init, "init time (s)", "initializer time vs prompt length")
        plots = ["accuracy_vs_prompt_length.png", "init_time_vs_prompt_length.png"]
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
    atomic_write_bytes(out / "report.csv", write_csv(table).encode())
    atomic_write_bytes(out / "report.md", markdown(sweep_dir, table, plots, tunes).encode())
    return {"runs": runs, "table": table, "report": out / "report.md", "csv": out / "report.csv",
            "plots": [out / p for p in plots]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vipamin-scale report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="a Hydra multirun directory (hydra.sweep.dir) or one run's directory")
    parser.add_argument("--out", default=None, help="where to write the report (default: the sweep directory)")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.sweep_dir, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not report["runs"]:
        print(f"error: no runs under {args.sweep_dir} (no run.json, result.json nor .hydra/overrides.yaml)", file=sys.stderr)
        return 2
    print(report["report"].read_text(), end="")
    print(f"wrote {report['report']}, {report['csv']}" + "".join(f", {p}" for p in report["plots"]))
    return 0
