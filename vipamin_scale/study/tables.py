"""A study's figures as tables, plots and words, from its record alone (pure: `run.record` makes the record).

    paired_records(doc)     every method against every baseline, per (regime, k, P), paired by draw
    gate_record(doc, cfg)   the gate: the baseline on the full data against the converged linear probe
    markdown(doc)           study.md: what ran, the gate, per cell mean ± 95 % half-width and n, the paired
                            differences with their intervals, what is resolved and what is not, the selected
                            settings, the cost of P
    publish(doc, dir)       study.json, study.md, study_accuracy.png (accuracy against P per regime, 95 %
                            bands) and study_paired.png (the paired differences against P), all atomic

Every number is a mean over draws with its 95 % t-interval (`vipamin_scale.stats`, the one place for them);
"resolved" only when a paired difference's interval excludes 0, and an unresolved one says the range of
differences it still allows.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

import vipamin_scale.runs as runs
import vipamin_scale.stats as stats
from vipamin_scale.config import UserError
from vipamin_scale.paths import atomic_write_bytes
from vipamin_scale.study.protocol import FEW, FULL, gate_length


class GateFailed(UserError):
    """The study's schedule did not let its baseline reach the converged linear probe on the full data: no
    table is trusted (exit 1; study.require_gate=false writes them headed UNDERTRAINED)."""

    exit_code = 1

    def __init__(self, doc: dict[str, Any]):
        self.doc = doc
        super().__init__(f"study: undertrained: {gate_text(doc['gate'])} No table is written but study.json "
                         f"(study.require_gate=false writes them, headed UNDERTRAINED)")


def pct(x: Optional[float], signed: bool = False) -> str:
    return "–" if x is None else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}")


def half(p: dict[str, Any]) -> Optional[float]:
    """The 95 % half-width of a summary or paired record; None below two values."""
    if "lo" in p:
        return None if p["lo"] is None else (p["hi"] - p["lo"]) / 2
    return stats.half_width(p["sd"], p["n"])


# ----------------------------------------------------------------------------- the records


def _cells(doc: dict[str, Any], **where: Any) -> list[dict[str, Any]]:
    return [c for c in doc["cells"] if all(c[k] == v for k, v in where.items())]


def paired_records(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each method minus each baseline, draw by draw (the draws both finished), per (regime, k, P); the probe
    (no P) against the baseline at every P of its regime. Each method at its own selected settings."""
    out = []
    for base in doc["baselines"]:
        for b in _cells(doc, method=base):
            if b["length"] is None:
                continue
            for m in doc["cells"]:
                if (m["method"] == base or m["regime"] != b["regime"] or m["shots"] != b["shots"]
                        or m["length"] not in (b["length"], None)):
                    continue
                if min(m["n"], b["n"]) < 2:  # one seed (the gate's cell): no pairing to speak of
                    continue
                p = stats.paired(m["results"]["runs"], b["results"]["runs"])
                out.append({"baseline": base, "method": m["method"], "regime": b["regime"], "shots": b["shots"],
                            "length": b["length"], **p})
    return out


def gate_record(doc: dict[str, Any], cfg: DictConfig) -> Optional[dict[str, Any]]:
    """The gate (study.gate): the first baseline at the gate's P on the full data, seed 0, against the linear
    probe fitted on the same images; passed when the prompt run reaches the probe's test accuracy."""
    length, method = gate_length(cfg), doc["baselines"][0]
    prompt = _cells(doc, regime=FULL, length=length, method=method)
    probe = [c for c in doc["cells"] if c["regime"] == FULL and c["length"] is None]
    if not prompt or not probe:
        return None
    prompt, probe = prompt[0], probe[0]
    sched = doc["schedules"].get("full", {})
    prompt_test, probe_test = prompt["results"]["runs"][0], probe["results"]["runs"][0]
    return {"n": sched.get("n"), "epochs": sched.get("epochs"), "steps": sched.get("steps"), "length": length,
            "method": method, "probe_C": (probe["selected"].get("params") or {}).get("C"),
            "probe_trials": probe["selected"].get("trials"), "probe_test": probe_test,
            "prompt_params": prompt["selected"].get("params"), "prompt_trials": prompt["selected"].get("trials"),
            "prompt_test": prompt_test,
            "passed": prompt_test is not None and probe_test is not None and prompt_test >= probe_test}


def gate_text(g: Optional[dict[str, Any]]) -> str:
    if g is None:
        return "No gate (study.gate=false)."
    verdict = "passed" if g["passed"] else "FAILED: undertrained"
    params = ", ".join(f"{k.rsplit('.', 1)[-1]} {v:g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]} {v}"
                       for k, v in (g.get("prompt_params") or {}).items()) or "as given"
    C = "–" if g.get("probe_C") is None else f"{g['probe_C']:g}"
    return (f"Gate ({verdict}): on the full {g['n']} training images the converged linear probe (C = {C}, selected "
            f"on val) reaches {pct(g['probe_test'])} % test; {g['method']} at P = {g['length']} ({g['epochs']} epochs, "
            f"{g['steps']} steps, {params} selected on val) reaches {pct(g['prompt_test'])} %."
            + (f" Measured by {g['from']} (study.gate_from: the same gate protocol)." if g.get("from") else ""))


# ----------------------------------------------------------------------------- markdown


def _where(doc: dict[str, Any], regime: str, shots: Optional[int], length: Optional[int],
           with_regime: bool = False) -> str:
    """A row's label: only what varies (the k when there are several, the P when there are several); the
    regime too when asked (a line that stands alone)."""
    parts = []
    if regime == FEW and (len(doc["shots"]) > 1 or with_regime):
        parts.append(f"{shots}-shot")
    if regime == FULL and with_regime:
        parts.append("full data")
    if length is not None and (len(doc["lengths"]) > 1 or with_regime):
        parts.append(f"P={length}")
    return ", ".join(parts) or (f"{shots}-shot" if regime == FEW else "full data")


def _row_head(doc: dict[str, Any], regime: str) -> str:
    """The rows' header: what the labels vary."""
    parts = (["k"] if regime == FEW and len(doc["shots"]) > 1 else []) + (["P"] if len(doc["lengths"]) > 1 else [])
    return ", ".join(parts)


def _rows(doc: dict[str, Any], regime: str) -> list[tuple[Optional[int], int]]:
    """(k, P) of the regime's rows, in order."""
    seen = []
    for c in doc["cells"]:
        if c["regime"] == regime and c["length"] is not None and (c["shots"], c["length"]) not in seen:
            seen.append((c["shots"], c["length"]))
    return seen


def _cell_text(c: Optional[dict[str, Any]], per_draw: bool = False) -> str:
    """mean ± half-width (n); with `per_draw`, every draw's value too (a failed one: –)."""
    if c is None:
        return "not run"
    r = c["results"]
    if r["mean"] is None:
        return "failed"
    draws = f": {', '.join(pct(x) for x in r['runs'])}" if per_draw else ""
    return f"{pct(r['mean'])} ± {pct(half(r))} (n={r['n']}{draws})"


def accuracy_markdown(doc: dict[str, Any], regime: str, per_draw: bool = False) -> str:
    """Rows (k, P), a column per method: test accuracy mean ± 95 % half-width (n; with `per_draw`, each draw's)."""
    methods = [m for m in doc["methods"] if _cells(doc, regime=regime, method=m)]
    lines = [f"| {_row_head(doc, regime)} | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for shots, length in _rows(doc, regime):
        cells = []
        for m in methods:
            found = [c for c in _cells(doc, regime=regime, shots=shots, method=m) if c["length"] in (length, None)]
            cells.append(_cell_text(found[0] if found else None, per_draw))
        lines.append(f"| {_where(doc, regime, shots, length)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diff_text(p: dict[str, Any]) -> str:
    if p["mean"] is None:
        return "–"
    text = f"{pct(p['mean'], True)} ± {pct(half(p))} [{pct(p['lo'], True)}, {pct(p['hi'], True)}] (n={p['n']})"
    return f"**{text}**" if p["resolved"] else text


def paired_markdown(doc: dict[str, Any], regime: str, base: str) -> str:
    """Rows (k, P), a column per method: its paired difference against `base`."""
    recs = [p for p in doc["paired"] if p["baseline"] == base and p["regime"] == regime]
    methods = [m for m in doc["methods"] if any(p["method"] == m for p in recs)]
    if not methods:
        return ""
    lines = [f"| {_row_head(doc, regime)} | " + " | ".join(f"{m} − {base}" for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for shots, length in _rows(doc, regime):
        row = []
        for m in methods:
            found = [p for p in recs if p["method"] == m and p["shots"] == shots and p["length"] == length]
            row.append(_diff_text(found[0]) if found else "–")
        lines.append(f"| {_where(doc, regime, shots, length)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def reading(doc: dict[str, Any], baselines: Optional[list[str]] = None) -> list[str]:
    """What the paired differences resolve (against `baselines`, default all), one line each: resolved (the
    interval excludes 0: which method is higher), or not (the differences the interval still allows), or too
    few draws."""
    out = []
    for p in doc["paired"]:
        if baselines is not None and p["baseline"] not in baselines:
            continue
        where = _where(doc, p["regime"], p["shots"], p["length"], with_regime=True)
        what = f"{p['method']} − {p['baseline']}, {where}"
        if p["lo"] is None:
            out.append(f"- {what}: {pct(p['mean'], True)} pt over {p['n']} paired draw(s): too few for an interval.")
        elif p["resolved"]:
            higher = p["method"] if p["mean"] > 0 else p["baseline"]
            out.append(f"- {what}: {pct(p['mean'], True)} pt [{pct(p['lo'], True)}, {pct(p['hi'], True)}], n = {p['n']}: "
                       f"resolved, {higher} is higher.")
        else:
            out.append(f"- {what}: {pct(p['mean'], True)} pt [{pct(p['lo'], True)}, {pct(p['hi'], True)}], n = {p['n']}: "
                       f"not resolved; a difference beyond that interval (a gain over {pct(p['hi'], True)} pt or a "
                       f"loss past {pct(p['lo'], True)} pt) is excluded at 95 %.")
    return out


def _point_text(sel: dict[str, Any]) -> str:
    params = sel.get("params")
    if params is None:
        return "failed"
    if not params:
        return "as given"
    text = ", ".join(f"{k.rsplit('.', 1)[-1]} {v:g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]} {v}"
                     for k, v in params.items())
    edges = "".join(f" ({e['side']} edge)" for e in sel.get("at_edge") or [])
    return text + edges + (" (given)" if sel.get("given") else "")


def selected_markdown(doc: dict[str, Any]) -> str:
    """Rows (regime, k, P), a column per method: the selected point and where it stayed at an edge."""
    methods = list(doc["methods"])
    lines = ["| cell | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for regime in (FEW, FULL):
        for shots, length in _rows(doc, regime):
            row = []
            for m in methods:
                found = [c for c in _cells(doc, regime=regime, shots=shots, method=m) if c["length"] in (length, None)]
                row.append(_point_text(found[0]["selected"]) if found else "–")
            label = _where(doc, regime, shots, length, with_regime=True)
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def cost_markdown(doc: dict[str, Any]) -> str:
    """Rows P, per method: time per step, init time and peak memory, with the ratio to the smallest P's."""
    if not doc["cost"]:
        return ""
    methods = [m for m in doc["methods"] if any(c["method"] == m for c in doc["cost"])]
    lengths = sorted({c["length"] for c in doc["cost"]})
    by = {(c["length"], c["method"]): c for c in doc["cost"]}

    def cell(c: Optional[dict], key: str, scale: float, unit: str, m: str) -> str:
        v = (c or {}).get(key)
        if v is None:
            return "–"
        b = (by.get((lengths[0], m)) or {}).get(key)
        shown = f"{v * scale:.{1 if unit != 'MiB' else 0}f} {unit}"
        return shown + (f" (×{v / b:.2f})" if b and b * scale >= 0.05 else "")  # no ratio of values below the display

    head = [f"{m}: {what}" for m in methods for what in ("step", "init", "peak")]
    lines = ["| P | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for length in lengths:
        cells = []
        for m in methods:
            c = by.get((length, m))
            cells += [cell(c, "step_s", 1000, "ms", m), cell(c, "init_time_s", 1, "s", m),
                      cell(c, "peak_mib", 1, "MiB", m)]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def protocol_text(doc: dict[str, Any]) -> str:
    """One paragraph: the backbone, the data, the regimes and their schedules, the selection."""
    s, sub = doc["study"], doc["subject"]
    data = "the embedded digits" if sub["data"] == "digits" else f"the shards in {sub['data_root']}"
    regimes = []
    for name, sched in doc["schedules"].items():
        n = (doc["shots"].get(name.split("-")[0]) if name != "full" else s["full_seeds"] or 1)
        what = "paired draws" if name != "full" else "seeds"
        regimes.append(f"{name}: {sched['n']} training images, {sched['steps']} optimizer steps of batch "
                       f"{sched['batch']} ({sched['epochs']} epochs), {n} {what}")
    sel = ("each method's settings selected per cell on val (" + ", ".join(
        f"{k}" for k in _space_fields(s["space"])) + f") by the mean over {s['select_draws']} draws (one on the full "
        f"data), extending at an edge at most {s['extend_edges']} times; never on test"
        if s["space"] else "each method at its given settings" + (f" (selected by {s['selected_from']})"
                                                                 if s.get("selected_from") else ""))
    return (f"{sub['model']} at {sub['img_size']} px ({sub['checkpoint'] or sub['pretrained'] or 'random weights'}), "
            f"frozen, {sub['pool']} pooling, {'deep' if sub['deep'] else 'shallow'} prompts, P ∈ {doc['lengths']}; "
            f"{data}, its splits {sub['val_split']} (val) and {sub['test_split']} (test) whole. "
            + "; ".join(regimes)
            + f". {sel[0].upper() + sel[1:]}. Draw d: the same images and train.seed = init.seed = d for every "
              f"method and P." + (f" {doc['note']}" if doc.get("note") else ""))


def _space_fields(space: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, node in space.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(node, dict) and not ({"log", "range"} & set(node)):
            out += _space_fields(node, name)
        else:
            out.append(name)
    return out


def markdown(doc: dict[str, Any]) -> str:
    name = doc.get("name")
    heading = f"# Study `{name}`" if name else "# Study"
    if doc["cut"]:
        heading += " — CUT VERSION (not the preset's protocol)"
    gate = doc.get("gate")
    if gate is not None and not gate["passed"]:
        heading += " — UNDERTRAINED (the gate failed)"
    lines = [heading, "", protocol_text(doc), ""]
    if doc["cut"]:
        lines += ["Cut from the preset (field: preset → this study): "
                  + "; ".join(f"{k}: {a} → {b}" for k, (a, b) in doc["cut"].items()) + ".", ""]
    if doc.get("selected_from"):
        lines += [selected_from_text(doc["selected_from"]), ""]
    if gate is not None or doc["study"]["gate"]:
        lines += [gate_text(gate), ""]
    for regime in (FEW, FULL):
        if not _rows(doc, regime):
            continue
        n_what = "draws" if regime == FEW else "seeds"
        lines += [f"Test accuracy (%), {regime}: mean ± 95 % half-width (t, over the {n_what}), n per cell.", "",
                  accuracy_markdown(doc, regime), ""]
        for base in doc["baselines"]:
            table = paired_markdown(doc, regime, base)
            if table:
                lines += [f"Paired difference against {base}, {regime} (points; mean ± 95 % half-width [interval], "
                          "each method at its own selected settings, paired by draw; **bold**: the interval "
                          "excludes 0).", "", table, ""]
    said = reading(doc)
    if said:
        lines += ["What the paired differences resolve:", "", *said, ""]
    lines += ["Selected settings per cell (\"high/low edge\": the winner stayed at the end of what was tried after "
              "the edge rounds).", "", selected_markdown(doc), ""]
    cost = cost_markdown(doc)
    if cost:
        lines += ["The cost of P (a solo few-shot run per P and method, draw 0): training time per optimizer step, "
                  "init time (the initializer's capture and math), peak memory allocated on the GPU (– on a CPU); "
                  "in brackets the ratio to the smallest P.", "", cost, ""]
    lines += ["![accuracy against P](study_accuracy.png)", "", "![paired differences](study_paired.png)", ""]
    return "\n".join(lines)


def summary_text(doc: dict[str, Any], root: Path) -> str:
    """What `vipamin-scale study` (and the demo) prints at its end: the gate, each regime's accuracy table (each
    draw's value where there are at most 5), what the paired differences resolve, and where the rest is."""
    lines = [protocol_text(doc), ""]
    if doc.get("selected_from"):
        lines += [selected_from_text(doc["selected_from"]), ""]
    if doc.get("gate") is not None or doc["study"]["gate"]:
        lines += [gate_text(doc.get("gate")), ""]
    for regime in (FEW, FULL):
        if _rows(doc, regime):
            few = max((c["n"] for c in doc["cells"] if c["regime"] == regime), default=0) <= 5
            lines += [f"Test accuracy (%), {regime}: mean ± 95 % half-width (n" + ("; each draw" if few else "") + ")",
                      "", accuracy_markdown(doc, regime, per_draw=few), ""]
    lines += reading(doc, doc["baselines"][:1]) + ["", f"Tables, plots, the other baselines and every run: "
                                                        f"{Path(root) / 'study.md'}"]
    return "\n".join(lines)


def selected_from_text(given: dict[str, Any]) -> str:
    """The line saying where a study's settings were selected, and on what other backbone or data."""
    text = f"Settings selected by {given['path']} (study.selected_from), not selected again here."
    if given.get("subject_differs"):
        text += (" That selection ran on another backbone or data (" + "; ".join(given["subject_differs"])
                 + "): its settings may not suit this one.")
    return text


# ----------------------------------------------------------------------------- plots


def _bars(ax, points, i, label, color) -> None:
    """points: [(x, mean, lo, hi)] in fractions; drawn in %, with the 95 % interval as a band."""
    if not points:
        return
    xs = [x * (1 + 0.03 * (i - 1.5)) for x, *_ in points]
    ys = [100 * y for _, y, _, _ in points]
    lo = [100 * (y if a is None else a) for _, y, a, _ in points]
    hi = [100 * (y if b is None else b) for _, y, _, b in points]
    ax.plot(xs, ys, marker="o", ms=3.5, lw=1.2, label=label, color=color)
    ax.fill_between(xs, lo, hi, alpha=0.15, color=color, lw=0)


def _figure(n: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8 * n, 4.3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n)
    return fig, list(axes) if n > 1 else [axes]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def _panels(doc: dict[str, Any]) -> list[tuple[str, Optional[int]]]:
    panels = [(FEW, k) for k in map(int, doc["shots"])]
    return panels + ([(FULL, None)] if _rows(doc, FULL) else [])


def _axis(ax, doc: dict[str, Any], ylabel: str) -> None:
    ax.grid(alpha=0.3)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(doc["lengths"])
    ax.set_xticklabels([str(p) for p in doc["lengths"]])
    ax.set_xlabel("prompt length P (per layer)")
    ax.set_ylabel(ylabel)


def plot_accuracy(doc: dict[str, Any], path: Path) -> None:
    """Test accuracy against P per method, one panel per regime, the 95 % interval as a band (the probe: flat)."""
    from matplotlib import colormaps

    panels = _panels(doc)
    fig, axes = _figure(len(panels))
    for ax, (regime, k) in zip(axes, panels):
        for i, m in enumerate(doc["methods"]):
            pts = []
            for c in _cells(doc, regime=regime, shots=k, method=m):
                r = c["results"]
                if r["mean"] is None:
                    continue
                lo, hi = stats.interval(r)
                xs = [c["length"]] if c["length"] is not None else [min(doc["lengths"]), max(doc["lengths"])]
                pts += [(x, r["mean"], lo, hi) for x in xs]
            _bars(ax, sorted(pts), i, m, colormaps["tab10"](i % 10))
        _axis(ax, doc, "test accuracy, % (mean, 95 % interval)")
        ax.set_title(f"{k}-shot" if regime == FEW else "full data", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{doc['subject']['model']} @ {doc['subject']['img_size']} px" + (" (cut)" if doc["cut"] else ""),
                 fontsize=10)
    _save(fig, path)


def plot_paired(doc: dict[str, Any], path: Path) -> None:
    """Each method − the first baseline against P, per regime, with 95 % intervals."""
    from matplotlib import colormaps

    panels = _panels(doc)
    fig, axes = _figure(len(panels))
    base = doc["baselines"][0]
    for ax, (regime, k) in zip(axes, panels):
        for i, m in enumerate(doc["methods"]):
            pts = [(p["length"], p["mean"], p["lo"], p["hi"]) for p in doc["paired"]
                   if p["baseline"] == base and p["method"] == m and p["regime"] == regime and p["shots"] == k
                   and p["mean"] is not None]
            _bars(ax, sorted(pts), i, m, colormaps["tab10"](i % 10))
        ax.axhline(0.0, color="k", lw=0.8)
        _axis(ax, doc, f"method − {base}, points (paired, 95 % interval)")
        ax.set_title(f"{k}-shot" if regime == FEW else "full data", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save(fig, path)


def publish(doc: dict[str, Any], root: Path) -> None:
    """study.json always; study.md and the plots unless the gate failed and study.require_gate holds."""
    runs.write_json(Path(root) / "study.json", doc, nan_as_null=True)
    gate = doc.get("gate")
    if gate is not None and not gate["passed"] and doc["study"]["require_gate"]:
        return
    atomic_write_bytes(Path(root) / "study.md", markdown(doc).encode())
    plot_accuracy(doc, Path(root) / "study_accuracy.png")
    plot_paired(doc, Path(root) / "study_paired.png")
