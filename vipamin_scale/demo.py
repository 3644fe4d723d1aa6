"""`make demo`: what the accuracy benchmark measured, in a few minutes.

VIPAMIN's default initialization against VPT's random prompts on the demo backbone with 4 digit images per class, each method at the learning rate the accuracy
benchmark selected for it on val (the recorded preset `demo_preset.json`, written by
benchmarks/accuracy.py; not re-tuned here), over 3 paired draws: within a draw every method trains
on the same images with the same seed, and the methods that start from random prompts start from
the same random tensor. Prints test accuracy per draw, mean ± sd, and VIPAMIN's paired difference
against each other method with its 95 % interval, saying whether the interval excludes 0.

The runs are ordinary training runs under `<run dir>/<method>/draw<d>/`, trained as packs
(`packs.plan_packs`, `train.train_pack`: the runs of one worker side by side over one backbone, each
equal to its solo run) in two worker processes (one torch thread each); a line is printed as each run
ends (`progress_line`; the runs of a pack end together), and the table is written beside them as
demo_results.md.
"""
from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from vipamin_scale.paths import atomic_write_bytes
from vipamin_scale.pool import run_in_processes

log = logging.getLogger(__name__)

DRAWS = 3
WORKERS = 2
VIPAMIN = "VIPAMIN"
# What the demo trains. The preset holds SPT kmeans's selected lr too, but 3 methods x 3 draws take ~11 min
# on 2 cores (one 112 px run: ~2 min), over the demo's 8; 2 methods take ~6.5.
METHODS = (VIPAMIN, "VPT random")


def load_preset() -> dict[str, Any]:
    """The recorded preset (package data; benchmarks/results/demo_preset.json is its source)."""
    return json.loads(resources.files("vipamin_scale").joinpath("demo_preset.json").read_text())


def demo_configs(cfg: DictConfig, preset: dict[str, Any], roots: dict[tuple[int, int], Path]) -> list[tuple]:
    """(method, draw, config) of every run: the composed config with the preset's schedule and lr."""
    k = int(preset["shots"])
    out = []
    for d in range(DRAWS):
        for method in METHODS:
            overrides = preset["overrides"][method]
            run = OmegaConf.merge(cfg, {
                "data": {"name": "shards", "root": str(roots[(k, d)]), "max_train_samples": None,
                         "batch_size": preset["batch"], "num_workers": 0},
                "train": {"epochs": preset["epochs"], "warmup_epochs": preset["warmup_epochs"],
                          "weight_decay": preset["weight_decay"], "lr": preset["lr"][method], "seed": d,
                          "eval_every": preset["epochs"], "eval_split": "test", "test_at_end": False,
                          "progress": False, "keep_last": 1, "loggers": ["jsonl"],
                          "out_dir": str(Path(cfg.train.out_dir) / _slug(method) / f"draw{d}")},
                "init": {"seed": d, "num_images": preset["calib"]},
                "prompt": {"length": preset["prompt_length"], "deep": True}})
            for key, value in overrides.items():
                OmegaConf.update(run, key, value, merge=False)
            out.append((method, d, run))
    return out


def _slug(name: str) -> str:
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def _train_pack(cfgs: list[DictConfig]) -> list[Optional[float]]:
    """One worker's pack: each run's final eval accuracy (a failed run: a UserError naming it)."""
    import torch

    from vipamin_scale.config import UserError
    from vipamin_scale.train import train_pack

    torch.set_num_threads(1)
    results = train_pack(cfgs)
    for cfg, result in zip(cfgs, results):
        if result.get("status") == "failed":
            raise UserError(f"demo: the run in {cfg.train.out_dir} failed: {result.get('error')}")
    return [(r.get("final_eval") or {}).get("acc") for r in results]


def train_in_packs(cfgs: list[DictConfig], workers: int,
                   on_done: Optional[Callable[[int, Optional[float]], None]] = None) -> list[Optional[float]]:
    """Every run's final eval accuracy, in order: the runs cut into `workers` packs, one per worker process;
    `on_done(i, acc)` is called for each run `i` as its pack ends."""
    import math

    from vipamin_scale.packs import plan_packs

    plan = plan_packs(cfgs, pack_size=math.ceil(len(cfgs) / max(workers, 1)))
    accs: list[Optional[float]] = [None] * len(cfgs)

    def pack_done(p: int, got: list[Optional[float]]) -> None:
        for i, acc in zip(plan[p], got):
            accs[i] = acc
            if on_done is not None:
                on_done(i, acc)

    run_in_processes(_train_pack, [([cfgs[i] for i in p],) for p in plan], workers, on_done=pack_done)
    return accs


def progress_line(method: str, draw: int, acc: Optional[float], elapsed_s: float, left: int) -> str:
    """The line printed as a run ends: its method, draw and test accuracy, time since the demo began,
    runs left."""
    shown = "–" if acc is None else f"{100 * acc:.1f} %"
    minutes, seconds = divmod(int(round(elapsed_s)), 60)
    return f"demo: {method} draw {draw}: test acc {shown} ({minutes}:{seconds:02d} elapsed, {left} runs left)"


def _progress(jobs: list[tuple]) -> Callable[[int, Any], None]:
    """`on_done` for the runs of `jobs` ((method, draw, config), ...): prints `progress_line` as each ends."""
    start, done = time.monotonic(), []

    def on_done(i: int, acc: Optional[float]) -> None:
        done.append(i)
        method, draw, _ = jobs[i]
        print(progress_line(method, draw, acc, time.monotonic() - start, len(jobs) - len(done)), flush=True)
    return on_done


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    from vipamin_scale.data.digits import digits_fewshot
    from vipamin_scale.stats import paired, summary

    preset = load_preset()
    if cfg.data.name != "digits":
        from vipamin_scale.config import ConfigError

        raise ConfigError("demo: runs on the embedded digits (data=digits); the accuracy benchmark's preset was "
                          "selected there")
    mismatch = [f"model.{key}: preset {want!r}, here {cfg.model[key]!r}"
                for key, want in (("name", preset["model"]), ("img_size", preset["img_size"]),
                                  ("checkpoint", preset["checkpoint"])) if cfg.model[key] != want]
    if mismatch:
        log.warning("demo: the preset's learning rates were selected for another backbone (%s)", "; ".join(mismatch))
    roots = digits_fewshot([int(preset["shots"])], DRAWS)
    jobs = demo_configs(cfg, preset, roots)
    methods = list(METHODS)
    log.info("demo: %d methods x %d draws at %d images per class, %d workers", len(methods), DRAWS, preset["shots"],
             WORKERS)
    results = train_in_packs([c for _, _, c in jobs], WORKERS, on_done=_progress(jobs))
    accs = dict(zip([(m, d) for m, d, _ in jobs], results))
    rows = {m: summary([accs[(m, d)] for d in range(DRAWS)]) for m in methods}
    diffs = {m: paired(rows[VIPAMIN]["runs"], rows[m]["runs"]) for m in methods if m != VIPAMIN}
    table = format_table(cfg, preset, rows, diffs)
    print(table)
    atomic_write_bytes(Path(cfg.train.out_dir) / "demo_results.md", (table + "\n").encode())
    return {"rows": rows, "paired": diffs}


def format_table(cfg: DictConfig, preset: dict[str, Any], rows: dict[str, dict], diffs: dict[str, dict]) -> str:
    def pct(x: Optional[float], signed: bool = False) -> str:
        return "–" if x is None else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}")

    k = preset["shots"]
    lines = [f"{cfg.model.name} @ {cfg.model.img_size}px, VPT-Deep P={preset['prompt_length']}, {k} digit images "
             f"per class, {DRAWS} paired draws, {preset['epochs']} epochs of batch {preset['batch']}; each method at "
             f"the lr the accuracy benchmark selected on val (vipamin_scale/demo_preset.json; "
             "benchmarks/RESULTS.md, Accuracy)", "",
             "| init | lr | " + " | ".join(f"draw {d}" for d in range(DRAWS)) + " | test acc % (mean ± sd) |",
             "|---|---|" + "---|" * DRAWS + "---|"]
    for m, s in rows.items():
        lines.append(f"| {m} | {preset['lr'][m]:g} | " + " | ".join(pct(x) for x in s["runs"])
                     + f" | {pct(s['mean'])} ± {pct(s['sd'])} |")
    lines.append("")
    for m, p in diffs.items():
        if p["lo"] is None:
            lines.append(f"{VIPAMIN} − {m}: {pct(p['mean'], True)} pt over {p['n']} draw(s): too few for an interval.")
            continue
        verdict = ("resolved: the interval excludes 0" if p["resolved"] else
                   "NOT resolved: the interval contains 0, so these draws do not say which is better")
        lines.append(f"{VIPAMIN} − {m}: {pct(p['mean'], True)} pt, 95 % interval [{pct(p['lo'], True)}, "
                     f"{pct(p['hi'], True)}] over {p['n']} paired draws ({verdict}).")
    return "\n".join(lines)
