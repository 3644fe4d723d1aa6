"""A tune's summary, from its tune.json document: the rung table and winner as Markdown (tune.md, and
`vipamin-scale report`'s Tuning section) and the val-against-budget plot."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

import vipamin_scale.runs as runs
from vipamin_scale.paths import atomic_write_bytes
from vipamin_scale.tune.space import fmt_params, hydra_value


def tune_document(cfg: DictConfig, result: Any, plan, final_split: str) -> dict[str, Any]:
    """tune.json: the settings that shaped the search, then the result (`TuneResult.to_json`)."""
    return {"space": OmegaConf.to_container(cfg.tune.space, resolve=True), "mode": cfg.tune.mode,
            "eta": cfg.tune.eta, "plan": [{"candidates": n, "epochs": e} for n, e in plan],
            "train_split": cfg.data.train_split, "val_split": cfg.data.val_split, "final_train_split": final_split,
            "select_draws": cfg.tune.select_draws, "draw_roots": _draw_roots(cfg),
            "extend_edges": cfg.tune.extend_edges, **result.to_json()}


def _draw_roots(cfg: DictConfig) -> Optional[list[str]]:
    roots = cfg.tune.draw_roots
    return None if roots is None else [str(r) for r in roots]


def write_summary(root: Path, doc: Mapping[str, Any]) -> None:
    """tune.json, tune.md and tune_val_vs_budget.png into the tune's directory (rank 0 only; atomic)."""
    import vipamin_scale.distributed as D

    if D.rank() != 0:
        return
    runs.write_json(root / "tune.json", doc, nan_as_null=True)
    atomic_write_bytes(root / "tune.md", tune_markdown(doc).encode())
    plot_tune(doc, root / "tune_val_vs_budget.png")


def _f(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4f}"


def _rung_label(rung: Mapping[str, Any]) -> str:
    return f"{rung['rung']} (edge +{rung['extension']})" if rung.get("extension") else str(rung["rung"])


def tune_markdown(doc: Mapping[str, Any]) -> str:
    """The rung-by-rung table, the winner (and whether it sits at an edge of its grid) and the final
    mean ± sd, from a tune.json document."""
    keys = _param_keys(doc)
    draws = int(doc.get("select_draws") or 1)
    by_draw = draws > 1 or bool(doc.get("draw_roots"))
    lines = [f"## Tuning ({doc['mode']}, eta {doc['eta']}): {doc['train_split']} -> {doc['val_split']}", ""]
    if by_draw:
        data = ", data.root = tune.draw_roots[d]" if doc.get("draw_roots") else ""
        lines += [f"A candidate's val acc is its mean over {draws} draws (draw d: train.seed = init.seed = d{data}); "
                  "a failed draw fails the candidate.", ""]
    lines += ["| rung | epochs | candidate | " + " | ".join(keys) + " | val acc |"
              + (" val acc by draw |" if by_draw else "") + " status | promoted |",
              "|---|---|---|" + "---|" * len(keys) + "---|" + ("---|" if by_draw else "") + "---|---|"]
    for rung in doc["rungs"]:
        for t in sorted(rung["trials"], key=lambda t: (t["val_acc"] is None, -(t["val_acc"] or 0), t["candidate"])):
            values = " | ".join(hydra_value(t["params"].get(k)) for k in keys)
            status = t["status"] if not t.get("error") else f"{t['status']}: {t['error']}"
            per_draw = (" " + " / ".join(_f(d["val_acc"]) or "–" for d in t.get("draws", [])) + " |") if by_draw else ""
            lines.append(f"| {_rung_label(rung)} | {rung['epochs']} | {t['candidate']} | {values} | {_f(t['val_acc'])} |"
                         f"{per_draw} {status.replace('|', '/')} | {'yes' if t['promoted'] else ''} |")
    for ext in doc.get("extensions") or []:
        what = (f"extended to {hydra_value(ext['value'])} (candidate {ext['candidate']})" if ext.get("candidate") is not None
                else f"not extended: {ext['refused']}")
        lines += ["", f"Edge round {ext['round']}: the winner sat at the {ext['side']} edge of `{ext['field']}`; {what}."]
    if doc.get("winner"):
        w = doc["winner"]
        lines += ["", f"Winner: candidate {w['candidate']}, {fmt_params(w['params'])} (val acc {_f(w['val_acc'])})."]
        for edge in w.get("at_edge") or []:
            lines.append(f"At an edge: `{edge['field']}` = {hydra_value(edge['value'])} is the {edge['side']}est value "
                         f"tried ({edge['why']}): the optimum may lie beyond it.")
    final = doc.get("final")
    if final:
        spread = f" ± {_f(final['test_std'])}" if final.get("test_std") is not None else ""
        lines += ["", f"Final: trained on {final['train_split']} for {final['epochs']} epochs, tested, "
                      f"{len(final['runs'])} seeds: test acc **{_f(final['test_mean'])}{spread}** "
                      f"(mean ± sample sd over {final['n']} finished).", "",
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
    ax.set_xscale("log", base=doc["eta"]) if len({r["epochs"] for r in doc["rungs"]}) > 1 else None
    ax.set_xlabel("budget (epochs)")
    ax.set_ylabel("val accuracy" + (f" (mean over {doc['select_draws']} draws)" if (doc.get("select_draws") or 1) > 1
                                    else ""))
    ax.set_title(f"successive halving, eta={doc['eta']}" if doc["mode"] == "halving" else "grid")
    ax.grid(alpha=0.3)
    if winner is not None and winner in lines:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
