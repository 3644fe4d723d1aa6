"""Prompt-length study, converged and paired: test accuracy against the prompt length P per method, each
method at its own lr selected per P, with 95 % intervals and paired differences against VPT random.

    python benchmarks/prompt_length_study.py            # the full protocol (a GPU machine: device_studies.sh)
    python benchmarks/prompt_length_study.py --quick     # tiny random ViT, 2 lengths, 2 draws (make test)
    python benchmarks/prompt_length_study.py --lengths 1 10 50 --methods "VPT random" VIPAMIN --draws 4
                                                         # a cut version: the section's heading says what was cut

Protocol (the defaults; every number is a flag; the backbone, schedules, selection, gate and workers
are benchmarks/accuracy.py's, by its own code):
* backbone: the demo's DINOv2 ViT-S/14 at 112 px, frozen, CLS pooling, VPT-Deep, P in {1, 5, 10, 20, 50, 100}.
* methods: VPT random, VIPAMIN (the project's default), SPT rand, BPT (the `prompt=bpt` preset).
* regimes: 4 shots per class, `--draws` (10) paired draws d (same images, train.seed = init.seed = d for
  every method); and the full 1000 training images, one draw, `--seeds` (3) seeds s (train.seed = init.seed = s).
  The full-data regime covers every (P, method) unless `--full-lengths` / `--full-methods` name fewer (a
  cut: the gate's cell, VPT random at `--gate-length`, is always among them; the tables say "not run").
  Val (297) and test (500) whole.
* selection: per (regime, P, method) the lr by `vipamin-scale tune` (grid over `--lr-grid`, every point at
  the full budget) on val, by the mean over draws 0..`--select-draws`-1 (3) at 4 shots (one draw on the
  full data), a winner at an end of the grid extending it and re-selecting at most `--extend-edges`
  times (`tune.select_draws`, `tune.extend_edges`); each rung trains as a pack. Never on test.
* the gate: VPT random at P = `--gate-length` (10) on the full data (seed 0, its selected lr) must reach
  the converged linear probe's test accuracy (benchmarks/accuracy.py's probe and rule), else no table
  is written (exit 1; --no-gate writes it marked UNDERTRAINED).
* final runs: trained as packs (one pack per (regime, P, method), cut to fill `--workers` processes),
  each tested once. Reported: mean, sd and 95 % t-interval per cell (n per cell), paired differences
  against VPT random per P with their half-widths (`vipamin_scale.stats`), the selected lr per P and
  whether it stayed at an edge.
* the cost of P: after the final runs, one worker alone trains one solo 4-shot run per (P, method)
  (draw 0, its selected lr) and records its init time, training time per step (`result.json`) and, on
  a GPU, the peak memory allocated; each against P with its ratio to the smallest P.
`--render` rewrites the plot and the section from --out's JSON without training anything.
Everything is written under --work and a finished run is reused (a re-run resumes); a --work of another
protocol is refused (--fresh starts over). Writes benchmarks/results/prompt_length[_quick].json and .png
and, not with --quick, the marked prompt-length section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import accuracy as bench  # noqa: E402  (benchmarks/accuracy.py: the protocol's code, shared)
from vipamin_scale import runs  # noqa: E402
from vipamin_scale.paths import atomic_write_bytes, portable, write_marked_section  # noqa: E402
from vipamin_scale.stats import interval, paired, summary  # noqa: E402

log = logging.getLogger("prompt_length_study")

RANDOM, LINEAR = bench.RANDOM, bench.LINEAR
METHODS = (RANDOM, bench.DEFAULT, "SPT rand", "BPT")
FEW, FULL = "few-shot", "full"  # the two regimes (--shots images per class; the full training set)
BEGIN, END = "<!-- prompt-length:begin -->", "<!-- prompt-length:end -->"
PROTOCOL_KEYS = ("model", "checkpoint", "img_size", "pool", "lengths", "methods", "shots", "draws", "seeds", "full",
                 "batch", "epochs", "min_steps", "full_epochs", "lr_grid", "select_draws", "extend_edges",
                 "weight_decay", "calib", "gate_length", "full_lengths", "full_methods")


def at_length(a: argparse.Namespace, length: int) -> argparse.Namespace:
    """The protocol at prompt length `length` (what accuracy.py's run_cfg reads as --prompt-length)."""
    return argparse.Namespace(**{**vars(a), "prompt_length": length})


def full_cells(a: argparse.Namespace) -> list[tuple[int, str]]:
    """The (P, method) cells of the full-data regime (--full-lengths x --full-methods; the gate's among them)."""
    return [(length, m) for length in sorted(a.full_lengths, reverse=True) for m in a.methods if m in a.full_methods]


def run_dir(work: Path, regime: str, length: int, method: str, *parts: Any) -> str:
    return str(work.joinpath(regime, f"P{length}", bench.slug(method), *map(str, parts)))


# ----------------------------------------------------------------------------- the cost of P


def job_cost(a: argparse.Namespace, specs: list[tuple[int, str, str, float, str]]) -> list[dict[str, Any]]:
    """One solo run per spec (length, method, 4-shot draw-0 root, lr, out), one after another in this
    worker: {init_time_s, step_s (training time per optimizer step), peak_mib (None on a CPU)}, kept in
    the run's cost.json (a re-run reuses it; a run cut before writing it is trained again from scratch)."""
    import shutil

    import torch

    from vipamin_scale.train import train_pack

    out = []
    for length, method, root, lr, path in specs:
        record = Path(path) / "cost.json"
        if record.is_file():
            out.append(json.loads(record.read_text()))
            continue
        shutil.rmtree(path, ignore_errors=True)  # a measurement, not a result: a cut one starts over
        cfg = bench.run_cfg(at_length(a, length), Path(root), method)
        cfg.train.out_dir, cfg.train.lr, cfg.train.seed, cfg.init.seed = path, lr, 0, 0
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            result = train_pack([cfg])[0]
        except Exception as exc:  # the cost row says failed; the study goes on
            log.warning("%s failed: %s: %s", path, type(exc).__name__, exc)
            result = None
        ok = result is not None and result.get("status", "ok") == "ok" and result.get("steps")
        cost = {"init_time_s": result["init_time_s"] if ok else None,
                "step_s": result["train_time_s"] / result["steps"] if ok else None,
                "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if ok and cuda else None}
        if ok:
            runs.write_json(record, cost)
        out.append(cost)
    return out


# ----------------------------------------------------------------------------- the study


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    a = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("vipamin_scale").setLevel(logging.WARNING)
    logging.getLogger("vipamin_scale.pool").setLevel(logging.INFO)
    t0 = time.perf_counter()
    if a.render:
        return render(a)
    bench.check_protocol(a, {k: getattr(a, k) for k in PROTOCOL_KEYS})
    work = Path(a.work)
    k = a.shots
    roots = bench.fewshot_roots(work / "data", [k], a.draws)
    few_roots = [str(roots[(k, d)]) for d in range(a.draws)]
    order = sorted(a.lengths, reverse=True)  # the longest prompts (the slowest runs) first

    # 1. selection on val: per (regime, P, method), and the probe's C on the full data
    jobs = [(bench.job_tune, a, None, LINEAR, True, "")]
    keys: list = [("probe",)]
    cells = [(FULL, length, m) for length, m in full_cells(a)] + [(FEW, length, m) for length in order
                                                                  for m in a.methods]
    for regime, length, m in cells:  # the full-data selections (the heaviest jobs) first
        jobs.append((bench.job_tune, at_length(a, length), None if regime == FULL else few_roots[:a.select_draws],
                     m, regime == FULL, run_dir(work, "tune", length, m, regime)))
        keys.append((regime, length, m))
    log.info("selection: %d jobs over %d workers", len(jobs), a.workers)
    selected = dict(zip(keys, bench.run_jobs(a, jobs)))
    log.info("selection done (%.1f min)", (time.perf_counter() - t0) / 60)

    # 2. the final runs, as packs, and the probe's test
    groups = []
    for length in order:
        for m in a.methods:
            for regime, n in ((FEW, a.draws), (FULL, a.seeds)):
                if (regime, length, m) not in selected:  # a full-data cell the run leaves out
                    continue
                lr = selected[(regime, length, m)]["value"]
                specs = [(few_roots[d] if regime == FEW else None, m, regime == FULL, lr, d,
                          run_dir(work, "final", length, m, regime, lr, f"{'draw' if regime == FEW else 'seed'}{d}"))
                         for d in range(n)]
                groups.append((at_length(a, length), [(regime, length, m, d) for d in range(n)], specs))
    jobs, fkeys = bench.pack_jobs(groups, a.workers)
    jobs.append((bench.job_final, a, None, LINEAR, True, selected[("probe",)]["value"], 0, ""))
    fkeys.append([("probe",)])
    log.info("final runs: %d jobs over %d workers", len(jobs), a.workers)
    acc: dict[tuple, Optional[float]] = {}
    for key, got in zip(fkeys, bench.run_jobs(a, jobs)):
        acc.update(zip(key, got) if isinstance(got, list) else [(key[0], got)])

    # 3. the cost of P: solo runs, one worker alone
    cost_specs = [(length, m, few_roots[0], selected[(FEW, length, m)]["value"],
                   run_dir(work, "cost", length, m, selected[(FEW, length, m)]["value"]))
                  for length in sorted(a.lengths) for m in a.methods if selected[(FEW, length, m)]["value"] is not None]
    costs = dict(zip([(s[0], s[1]) for s in cost_specs],
                     bench.run_jobs(argparse.Namespace(workers=1), [(job_cost, a, cost_specs)])[0]))

    gate = bench.gate_record(a, selected[("probe",)], acc[("probe",)], selected[(FULL, a.gate_length, RANDOM)],
                             acc[(FULL, a.gate_length, RANDOM, 0)])
    doc = record(a, argv, selected, acc, costs, gate, t0)
    out = Path(a.out)
    print(bench.gate_text(gate))
    if not gate["passed"] and not a.no_gate:
        runs.write_json(out, portable(doc, bench.places(a)), nan_as_null=True)
        print(f"undertrained: VPT random at P = {a.gate_length} does not reach the converged linear probe on the full "
              f"training set; no table is written (the figures are in {out})")
        raise SystemExit(1)
    png = publish(a, doc, out, write_json=True)
    print(f"wrote {out}, {png}" + ("" if a.quick else f", {a.results_md}") + f" in {doc['minutes']:.1f} min")
    return doc


def publish(a: argparse.Namespace, doc: dict[str, Any], out: Path, write_json: bool) -> Path:
    """The plot beside `out`, the JSON (write_json), the section printed and, not with --quick, written
    into RESULTS.md; returns the plot's path."""
    png = out.with_suffix(".png")
    plot(doc, png)
    if write_json:
        runs.write_json(out, portable(doc, bench.places(a)), nan_as_null=True)
    section = results_section(doc, os.path.relpath(png, Path(a.results_md).parent))
    print(section)
    if not a.quick:
        write_marked_section(Path(a.results_md), BEGIN, END, section)
    return png


def render(a: argparse.Namespace) -> dict[str, Any]:
    """--render: the plot and the RESULTS.md section (not with --quick) rewritten from --out's JSON, as the
    run that wrote it would write them now; nothing is trained."""
    out = Path(a.out)
    try:
        doc = json.loads(out.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: --render: {out}: {type(exc).__name__}: {exc}") from None
    png = publish(a, doc, out, write_json=False)
    print(f"rewrote {png}" + ("" if a.quick else f", {a.results_md}") + f" from {out}")
    return doc


def record(a: argparse.Namespace, argv: Optional[list[str]], selected: dict, acc: dict, costs: dict,
           gate: dict[str, Any], t0: float) -> dict[str, Any]:
    """The study's JSON: per regime, P and method the selection, the summary and the pairing with VPT random."""
    few_s = bench.schedule(10 * a.shots, a.batch, a.epochs, a.min_steps)
    full_s = bench.schedule(a.full, 32, a.full_epochs, 0)
    doc: dict[str, Any] = {
        "machine": bench.machine(), "note": a.note, "lengths": sorted(a.lengths), "methods": list(a.methods),
        "command": bench.command_line("prompt_length_study.py", argv),
        "cut": cut_from_full(a), "args": vars(a), "gate": gate,
        "regimes": {FEW: {"n": a.draws, "what": f"{a.shots} images per class, {a.draws} paired draws",
                          "schedule": few_s},
                    FULL: {"n": a.seeds, "what": f"the full {a.full} training images, one draw, {a.seeds} "
                                                 f"seed{'s' if a.seeds != 1 else ''}",
                           "schedule": full_s, "cells": [[length, m] for length, m in sorted(full_cells(a))]}},
        "cells": {}, "cost": {},
    }
    for regime, n in ((FEW, a.draws), (FULL, a.seeds)):
        cells = doc["cells"][regime] = {}
        for length in sorted(a.lengths):
            row = cells[str(length)] = {}
            for m in a.methods:
                if (regime, length, m) not in selected:  # left out (--full-lengths, --full-methods)
                    continue
                row[m] = {"selected": selected[(regime, length, m)],
                          "results": summary([acc.get((regime, length, m, d)) for d in range(n)])}
            for m in a.methods:
                if m != RANDOM and m in row and RANDOM in row:
                    row[m]["paired"] = paired(row[m]["results"]["runs"], row[RANDOM]["results"]["runs"])
    for (length, m), c in costs.items():
        doc["cost"].setdefault(str(length), {})[m] = c
    doc["minutes"] = (time.perf_counter() - t0) / 60
    return doc


def cut_from_full(a: argparse.Namespace) -> dict[str, list]:
    """{flag: [the full protocol's value, this run's]} for every protocol setting that differs (empty: the
    full protocol)."""
    return bench.cut_from(parse([]), a, PROTOCOL_KEYS)


# ----------------------------------------------------------------------------- output


def pct(x: Optional[float], signed: bool = False) -> str:
    return bench.pct(x, signed)


def accuracy_markdown(doc: dict[str, Any], regime: str) -> str:
    """Rows P, a column per method: mean ± 95 % half-width (n)."""
    methods = doc["methods"]
    lines = ["| P | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for length, row in doc["cells"][regime].items():
        cells = []
        for m in methods:
            if m not in row:
                cells.append("not run")
                continue
            c = row[m]["results"]
            lo, hi = interval(c)
            cells.append("failed" if c["mean"] is None else
                         f"{pct(c['mean'])} ± {pct(None if lo is None else (hi - lo) / 2)} (n={c['n']})")
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_markdown(doc: dict[str, Any], regime: str) -> str:
    """Rows P, a column per method: the paired difference against VPT random, mean ± half-width [interval]."""
    methods = [m for m in doc["methods"] if m != RANDOM]
    lines = ["| P | " + " | ".join(f"{m} − {RANDOM}" for m in methods) + " |", "|---|" + "---|" * len(methods)]
    for length, row in doc["cells"][regime].items():
        cells = []
        for m in methods:
            p = row.get(m, {}).get("paired")
            if p is None or p["mean"] is None:
                cells.append("–")
                continue
            text = (f"{pct(p['mean'], True)} ± {pct(bench.half(p))} [{pct(p['lo'], True)}, {pct(p['hi'], True)}] "
                    f"(n={p['n']})")
            cells.append(f"**{text}**" if p["resolved"] else text)
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def selected_markdown(doc: dict[str, Any]) -> str:
    """Rows P, a column per (method, regime): the selected lr and where it stayed at an edge."""
    cols = [(m, r) for m in doc["methods"] for r in doc["cells"]]
    lines = ["| P | " + " | ".join(f"{m}, {r}" for m, r in cols) + " |", "|---|" + "---|" * len(cols)]
    for length in map(str, doc["lengths"]):
        lines.append(f"| {length} | " + " | ".join(bench.selected_text(doc["cells"][r][length][m]["selected"])
                                                  if m in doc["cells"][r][length] else "not run" for m, r in cols)
                     + " |")
    return "\n".join(lines)


def cost_markdown(doc: dict[str, Any]) -> str:
    """Rows P: per method the training time per step, the init time and the peak memory, with the ratio
    of each to the smallest P's."""
    methods = doc["methods"]
    first = str(doc["lengths"][0])
    base = doc["cost"].get(first, {})

    def cell(c: Optional[dict], key: str, scale: float, unit: str, m: str) -> str:
        v = (c or {}).get(key)
        if v is None:
            return "–"
        b = (base.get(m) or {}).get(key)
        shown = f"{v * scale:.{1 if unit != 'MiB' else 0}f} {unit}"
        return shown + (f" (×{v / b:.2f})" if b and b * scale >= 0.05 else "")  # no ratio of values below the display

    head = [f"{m}: {what}" for m in methods for what in ("step", "init", "peak")]
    lines = ["| P | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for length in map(str, doc["lengths"]):
        row = doc["cost"].get(length, {})
        cells = []
        for m in methods:
            c = row.get(m)
            cells += [cell(c, "step_s", 1000, "ms", m), cell(c, "init_time_s", 1, "s", m),
                      cell(c, "peak_mib", 1, "MiB", m)]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gate_only(doc: dict[str, Any]) -> bool:
    """Whether the full-data regime ran only the gate's cell (VPT random at the gate's P)."""
    return [[int(p), m] for p, m in doc["regimes"][FULL].get("cells", [])] == [[doc["args"]["gate_length"], RANDOM]]


def results_section(doc: dict[str, Any], png: str) -> str:
    heading = "## Prompt-length study: converged, paired (`benchmarks/prompt_length_study.py`)"
    if doc["cut"]:
        heading += " — CUT VERSION (not the full protocol)"
    if not doc["gate"]["passed"]:
        heading += " — UNDERTRAINED (the gate failed; written with --no-gate)"
    a = doc["args"]
    lines = [BEGIN, heading, "", f"Command: `{doc['command']}` ({doc['minutes']:.0f} min, {doc['machine']}).", ""]
    if doc["cut"]:
        lines += ["Cut from the full protocol (flag: full → this run): "
                  + "; ".join(f"{k}: {full} → {this}" for k, (full, this) in doc["cut"].items()) + ".", ""]
    few, full = doc["regimes"][FEW], doc["regimes"][FULL]
    lines += [f"{a['model']} at {a['img_size']} px, frozen, {a['pool']} pooling, VPT-Deep, P ∈ {doc['lengths']}; "
              f"digits, val 297 and test 500 whole. {FEW}: {few['what']} ({few['schedule']['steps']} steps of batch "
              f"{few['schedule']['batch']}); {FULL}: {full['what']} ({full['schedule']['steps']} steps of batch "
              f"{full['schedule']['batch']}). Each method's lr selected per (regime, P) on val by the mean over "
              f"{a['select_draws']} draws ({FEW}; one on the full data) over {a['lr_grid'][2]} log-spaced lrs from "
              f"{a['lr_grid'][0]:g} to {a['lr_grid'][1]:g} (× batch/256), extending at an edge at most "
              f"{a['extend_edges']} times." + (f" {doc['note']}" if doc.get("note") else ""), "",
              bench.gate_text(doc["gate"]).replace("VPT random (", f"VPT random at P = {a['gate_length']} ("), ""]
    for regime in (FEW, FULL):
        if regime == FULL and gate_only(doc):
            lines += [f"{FULL}: only the gate's cell was run (`--full-lengths`, `--full-methods`): VPT random at P = "
                      f"{a['gate_length']}, its figure in the gate's line above.", ""]
            continue
        n = doc['regimes'][regime]['n']
        lines += [f"Test accuracy (%), {regime}: mean ± 95 % half-width (t, over the {n} "
                  f"{'draws' if regime == FEW else 'seeds' if n != 1 else 'seed'}), n per cell.", "",
                  accuracy_markdown(doc, regime), ""]
        if any(m != RANDOM and m in row for row in doc["cells"][regime].values() for m in doc["methods"]):
            lines += [f"Paired difference against {RANDOM}, {regime} (points; mean ± 95 % half-width [interval]; "
                      "**bold**: the interval excludes 0).", "", paired_markdown(doc, regime), ""]
    lines += ["Selected lr (base, × batch/256) per P; \"high/low edge\": it stayed at the end of the lrs tried "
              "after the edge rounds.", "", selected_markdown(doc), "",
              "The cost of P (solo few-shot runs, draw 0, one worker alone): training time per optimizer step, init "
              "time (the initializer's capture and math), peak memory allocated on the GPU (– on a CPU); in "
              "brackets the ratio to the smallest P. A layer attends over N + P tokens (N = 65 for the demo backbone at "
              "112 px: 64 patches + CLS).", "",
              cost_markdown(doc), "", f"![accuracy against P]({png})", "", END]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Test accuracy against P (log axis) per method with 95 % intervals (one panel per regime; the full-data
    one only when it ran more than the gate's cell), the paired differences against VPT random with theirs,
    and the training time per step against P."""
    import io

    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    regimes = [FEW] + ([] if gate_only(doc) else [FULL])
    fig = Figure(figsize=(4.7 * (len(regimes) + 2), 4.5))
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, len(regimes) + 2))
    color = {m: colormaps["tab10"](i) for i, m in enumerate(doc["methods"])}

    def bars(ax, points, i, label):  # points: [(P, mean, lo, hi)] in fractions
        if points:
            xs = [p * (1 + 0.03 * (i - 1.5)) for p, *_ in points]
            ys = [100 * y for _, y, _, _ in points]
            err = [[0.0 if lo is None else 100 * (y - lo) for _, y, lo, _ in points],
                   [0.0 if hi is None else 100 * (hi - y) for _, y, _, hi in points]]
            ax.errorbar(xs, ys, yerr=err, marker="o", ms=3.5, capsize=2, lw=1.2, label=label, color=color[label])

    for ax, regime in zip(axes, regimes):
        for i, m in enumerate(doc["methods"]):
            pts = []
            for length, row in doc["cells"][regime].items():
                c = row.get(m, {}).get("results")
                if c is not None and c["mean"] is not None:
                    pts.append((int(length), c["mean"], *interval(c)))
            bars(ax, pts, i, m)
        ax.set_ylabel("test accuracy, % (mean, 95 % interval)")
        ax.set_title(doc["regimes"][regime]["what"], fontsize=9)
    ax = axes[len(regimes)]
    for i, m in enumerate(doc["methods"]):
        pts = [(int(length), p["mean"], p["lo"], p["hi"]) for length, row in doc["cells"][FEW].items()
               if (p := row.get(m, {}).get("paired")) and p["mean"] is not None]
        bars(ax, pts, i, m)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_ylabel(f"method − {RANDOM}, points (paired mean, 95 % interval)")
    ax.set_title(f"paired difference, {doc['regimes'][FEW]['what']}", fontsize=9)
    for i, m in enumerate(doc["methods"]):
        pts = [(int(p), 1000 * c[m]["step_s"]) for p, c in doc["cost"].items() if (c.get(m) or {}).get("step_s")]
        if pts:
            axes[-1].plot(*zip(*sorted(pts)), marker="o", ms=3.5, label=m, color=color[m])
    axes[-1].set_ylabel("training time per step, ms (solo, few-shot)")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(doc["lengths"])
        ax.set_xticklabels([str(p) for p in doc["lengths"]])
        ax.set_xlabel("prompt length P (per layer)")
    fig.suptitle(f"{doc['args']['model']} @ {doc['args']['img_size']} px, VPT-Deep" + (" (cut)" if doc["cut"] else ""),
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- arguments


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random ViT, 2 lengths, 2 draws: a smoke run")
    ap.add_argument("--render", action="store_true",
                    help="rewrite the plot and the RESULTS.md section from --out's JSON (after a change of the "
                         "tables' code); trains nothing")
    bench.add_protocol_args(ap)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1, 5, 10, 20, 50, 100])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD")
    ap.add_argument("--shots", type=int, default=4, help="images per class of the few-shot regime")
    ap.add_argument("--draws", type=int, default=10, help="paired few-shot draws per cell")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the full-data runs per cell")
    ap.add_argument("--gate-length", type=int, default=10, help="P of the gate's VPT random (one of --lengths)")
    ap.add_argument("--full-lengths", type=int, nargs="+", default=None,
                    help="the P of the full-data regime (default: --lengths; must hold --gate-length)")
    ap.add_argument("--full-methods", nargs="+", default=None, metavar="METHOD",
                    help=f"the methods of the full-data regime (default: --methods; must hold {RANDOM!r})")
    ap.add_argument("--work", default=None, help="run directory (default .cache/prompt_length[_quick])")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/prompt_length[_quick].json)")
    if ap.parse_known_args(argv)[0].quick:  # --quick changes the defaults; a flag given still wins
        ap.set_defaults(model="vit_test_d64", checkpoint=None, img_size=32, pool="mean", lengths=[1, 4], gate_length=4,
                        methods=[RANDOM, bench.DEFAULT], shots=1, draws=2, seeds=2, epochs=1, min_steps=2, full=60,
                        full_epochs=1, lr_grid=[0.5, 5.0, 2], select_draws=2, extend_edges=1, calib=10)
    args = ap.parse_args(argv)
    bench.check_protocol_args(ap, args, args.draws)
    bad = [m for m in args.methods if m not in bench.all_methods() and m not in bench.PRESETS]
    if bad or RANDOM not in args.methods:
        ap.error(f"--methods: {RANDOM!r} (the baseline) and others of {list(METHODS)} or benchmarks/accuracy.py's; "
                 f"got {args.methods}")
    if args.gate_length not in args.lengths:
        ap.error(f"--gate-length: must be one of --lengths {args.lengths}; got {args.gate_length}")
    if args.seeds < 1 or min(args.lengths) < 1:
        ap.error(f"--seeds and --lengths: at least 1; got {args.seeds} and {args.lengths}")
    args.full_lengths = sorted(args.lengths if args.full_lengths is None else args.full_lengths)
    args.full_methods = list(args.methods if args.full_methods is None else args.full_methods)
    if args.gate_length not in args.full_lengths or not set(args.full_lengths) <= set(args.lengths):
        ap.error(f"--full-lengths: a subset of --lengths {args.lengths} holding --gate-length {args.gate_length}; "
                 f"got {args.full_lengths}")
    if RANDOM not in args.full_methods or not set(args.full_methods) <= set(args.methods):
        ap.error(f"--full-methods: a subset of --methods {args.methods} holding {RANDOM!r} (the gate's); "
                 f"got {args.full_methods}")
    args.prompt_length = args.gate_length  # what accuracy.py's run_cfg reads for the linear probe (no prompts)
    suffix = "_quick" if args.quick else ""
    args.work = args.work or str(REPO / ".cache" / f"prompt_length{suffix}")
    args.out = args.out or str(REPO / "benchmarks" / "results" / f"prompt_length{suffix}.json")
    return args


if __name__ == "__main__":
    main()
