"""Packed trials on the CPU: runs per hour, ops per step and memory per run of packs of K runs.

    python benchmarks/bench_pack.py [--runs 16] [--ks 4,8,16] [--epochs 2] [--workers 2] [--repeats 3] [--demo]
    python benchmarks/bench_pack.py --ops [--ops-ks 1,4,16,64]            # aten ops per training step
    python benchmarks/bench_pack.py --memory [--lengths 10,100] [--memory-k 4]   # peak memory per run of a step
    ... [--package-root DIR --label NAME]    measure the vipamin_scale package under DIR (e.g. an older commit:
                                             mkdir DIR && git archive <commit> | tar -x -C DIR) instead of this one

Layouts (default, `--demo`). The same N runs (a study's grid: train.lr x train.seed, VPT-Deep, 4-shot digits,
batch 10, val + test eval) are trained as one process per run and as packs of K (`train_pack`: N / K processes,
each K runs over one backbone), `--workers` processes at once; each process gets `workers / (processes running
at once)` torch threads, so every layout can use the whole machine (a layout of one process, e.g. 16 runs in a
pack of 16, gets every core). The layouts alternate (solo, k4, k16, solo, k4, k16, ...) for `--repeats` rounds;
each round's gain is the packed layout's runs/hour over the solo layout's of the same round; the table gives the
median and the spread (min-max) over the rounds. Also: peak RSS per process and per run, and the largest
difference of a run's val or test accuracy to its solo run (0: the same results).
Default: the tiny test backbone (`model=vit_test_d64`, 32 px), 8 steps; `--demo`: the accuracy benchmark's 4-shot
workload (the demo's DINOv2 ViT-S/14 at 112 px, batch 10, 80 steps). gpu-check's `packed` section runs the demo
workload on a GPU (benchmarks/gpu_check/packed.py).

`--ops`: the aten ops one training step dispatches (`train_pack`'s own `PackTrainer.train_step`: the batch to the
device, forward, losses, backward, optimizer step), counted with a TorchDispatchMode at the 3rd step, for packs of
K runs of the tiny backbone (b = 2 images per run, P = 4, deep): in all, and outside the backbone (the same step
with the backbone's blocks replaced by identities: what grows with K if anything does).

`--memory`: the CPU allocator's peak during one training step (the 3rd; the profiler's memory events, summed
in time order), per run, for a pack of `--memory-k` runs and for one run alone, at P = 10 and 100, on the demo
backbone's shape (ViT-S/14 at 112 px, random weights, b = 10 per run).

Each mode prints a Markdown table and writes its JSON (`--json`, default under benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

TINY = ["model=vit_test_d64", "model.pool=mean", "prompt.length=4"]
DEMO = ["model.img_size=112", "prompt.length=10"]
# 4-shot: 4 steps an epoch; val once at the end (train.eval_every = epochs) and test, as benchmarks/accuracy.py
COMMON = ["data=digits", "data.max_train_samples=40", "data.batch_size=10", "data.num_workers=0",
          "train.warmup_epochs=0.5", "train.log_every=4", "train.progress=false", "train.loggers=[jsonl]",
          "train.keep_last=1", "init=random"]
# --ops / --memory: steps of the real loop, no eval (the step is what is measured)
STEPS = ["data=digits", "data.num_workers=0", "train.epochs=1", "train.warmup_epochs=0.5", "train.log_every=1",
         "train.progress=false", "train.loggers=[jsonl]", "train.keep_last=1", "train.test_at_end=false", "init=random"]
MEASURED_STEP = 3  # the step measured: moments and caches exist, as in every later step


def grid(n: int) -> list[list[str]]:
    """n runs: lr in a geometric grid of 4, then train.seed."""
    lrs = [0.05, 0.1, 0.2, 0.5]
    return [[f"train.lr={lrs[i % 4]}", f"train.seed={i // 4}", f"init.seed={i // 4}"] for i in range(n)]


# ----------------------------------------------------------------------------- instruments


def _instruments():
    """This checkout's vipamin_scale/profiling.py, loaded by path: --package-root may put an older package (one
    without it) first on sys.path, and the instruments must be the same whatever is measured."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vipamin_scale_profiling", REPO / "vipamin_scale" / "profiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_profiling = _instruments()
count_ops, allocator_peak = _profiling.count_ops, _profiling.allocator_peak


@contextmanager
def measured_step(measure: Callable[[Callable[[], Any]], tuple[Any, Any]], *, blocks: bool = True) -> Iterator[list]:
    """While active, `train_pack`'s step number MEASURED_STEP of each pack is run under `measure` (`count_ops`,
    `allocator_peak`) and its figure appended to the yielded list; evaluation is skipped (not the step); with
    `blocks=False` the backbone's blocks are identities. Patches the package's own loop (any version of it)."""
    import importlib

    import torch.nn as nn

    T = importlib.import_module("vipamin_scale.train")  # the module (the package's `train` is the API function)

    figures: list = []
    real_step, real_eval, real_backbone = T.PackTrainer.train_step, T.PackTrainer.evaluate, T.load_backbone
    calls = {}

    def step(self, batches, live):
        calls[id(self)] = calls.get(id(self), 0) + 1
        if calls[id(self)] != MEASURED_STEP:
            return real_step(self, batches, live)
        figure, out = measure(lambda: real_step(self, batches, live))
        figures.append(figure)
        return out

    def backbone(cfg):
        bb = real_backbone(cfg)
        if not blocks:
            bb.blocks = nn.Sequential(*[nn.Identity() for _ in bb.blocks])
        return bb

    T.PackTrainer.train_step, T.PackTrainer.evaluate, T.load_backbone = step, lambda self, loaders: {}, backbone
    try:
        yield figures
    finally:
        T.PackTrainer.train_step, T.PackTrainer.evaluate, T.load_backbone = real_step, real_eval, real_backbone


def pack_cfgs(out: Path, k: int, overrides: list[str]) -> list:
    """k runs that may share a pack (train.lr differs), reading one loader (the same train.seed)."""
    import vipamin_scale

    return [vipamin_scale.compose([*overrides, f"train.lr={0.01 * (i + 1)}", f"train.out_dir={out / f'r{i}'}"])
            for i in range(k)]


def ops_table(ks: list[int], out: Path) -> list[dict[str, Any]]:
    import torch

    from vipamin_scale.train import train_pack

    torch.set_num_threads(1)
    rows = []
    for k in ks:
        base = [*TINY, *STEPS, "data.batch_size=2", f"data.max_train_samples={2 * (MEASURED_STEP + 1)}"]
        row: dict[str, Any] = {"K": k}
        for name, blocks in (("ops", True), ("ops_outside_backbone", False)):
            ops: list = []
            with measured_step(lambda fn: count_ops(fn, record=ops), blocks=blocks) as figures:
                train_pack(pack_cfgs(out / f"k{k}-{name}", k, base))
            row[name] = figures[0]
            row[name.replace("ops", "kernels")] = sum(1 for *_, view in ops if not view)  # ops that are not views
        rows.append(row)
    return rows


def memory_table(lengths: list[int], k: int, out: Path) -> list[dict[str, Any]]:
    import torch

    from vipamin_scale.train import train_pack

    torch.set_num_threads(2)
    rows = []
    for length in lengths:
        base = ["model.name=vit_small_patch14_dinov2", "model.checkpoint=null", "model.img_size=112",
                f"prompt.length={length}", *STEPS, "data.batch_size=10", f"data.max_train_samples={10 * (MEASURED_STEP + 1)}"]
        row: dict[str, Any] = {"P": length, "K": k}
        for name, runs in (("solo", 1), ("pack", k)):
            with measured_step(allocator_peak) as figures:
                train_pack(pack_cfgs(out / f"P{length}-{name}", runs, base))
            row[f"{name}_peak_mib_per_run"] = figures[0] / runs / 2 ** 20
        row["pack_over_solo"] = row["pack_peak_mib_per_run"] / row["solo_peak_mib_per_run"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- layouts (runs per hour)


def train_one_pack(spec_path: str) -> None:
    """Child process: train the runs of SPEC ([[out_dir, override...], ...]) as one pack; write its peak RSS."""
    import resource

    import torch

    import vipamin_scale
    from vipamin_scale.train import train_pack

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec.get("threads", 1))
    cfgs = [vipamin_scale.compose([*overrides, f"train.out_dir={out}"]) for out, *overrides in spec["runs"]]
    train_pack(cfgs)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    Path(spec["rss"]).write_text(json.dumps({"rss_mb": rss_mb, "gpu_peak_mb": gpu_mb}))


def run_layout(name: str, packs: list[list[tuple[str, list[str]]]], workers: int, out: Path,
               package_root: Path = REPO) -> dict:
    """Every pack in its own process, `workers` at once, each with workers / (processes at once) torch threads;
    wall time and peak RSS per process."""
    threads = max(1, workers // min(workers, len(packs)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(package_root)}
    specs = []
    for i, pack in enumerate(packs):
        spec = out / f"{name}-pack{i}.json"
        spec.write_text(json.dumps({"runs": [[d, *o] for d, o in pack], "rss": str(out / f"{name}-pack{i}.rss.json"),
                                    "threads": threads}))
        specs.append(spec)
    t0 = time.perf_counter()
    pending, running = list(specs), []
    while pending or running:
        while pending and len(running) < workers:
            spec = pending.pop(0)
            running.append(subprocess.Popen([sys.executable, __file__, "--child", str(spec)], env=env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        time.sleep(0.2)
        for proc in list(running):
            if proc.poll() is not None:
                running.remove(proc)
                if proc.returncode != 0:
                    raise RuntimeError(f"{name}: a child failed:\n{proc.stderr.read().decode()[-3000:]}")
    wall = time.perf_counter() - t0
    peaks = [json.loads((out / f"{name}-pack{i}.rss.json").read_text()) for i in range(len(packs))]
    rss = [p["rss_mb"] for p in peaks]
    n = sum(len(p) for p in packs)
    row = {"layout": name, "runs": n, "processes": len(packs), "threads": threads, "wall_s": wall,
           "runs_per_hour": n * 3600 / wall, "peak_rss_mb_per_process": max(rss),
           "peak_rss_mb_per_run": max(r / len(p) for r, p in zip(rss, packs))}
    if peaks[0].get("gpu_peak_mb") is not None:  # torch.cuda.max_memory_allocated of each process
        row["gpu_peak_mb_per_process"] = max(p["gpu_peak_mb"] for p in peaks)
        row["gpu_peak_mb_per_run"] = max(p["gpu_peak_mb"] / len(pk) for p, pk in zip(peaks, packs))
    return row


def max_acc_diff(a: Path, b: Path, runs) -> float:
    """The largest |val acc or test acc difference| between run i under `a` and under `b`."""
    def accs(run: Path) -> tuple[float, float]:
        result = json.loads((run / "result.json").read_text())
        return result["final_eval"]["acc"], result["test"]["acc"]

    return max(abs(x - y) for i in runs for x, y in zip(accs(a / str(i)), accs(b / str(i))))


def layouts(base: list[str], n: int, ks: list[int], workers: int, repeats: int, out: Path,
            package_root: Path) -> list[dict[str, Any]]:
    """Every layout once per round, alternated (solo, k..., solo, k..., ...): one row per (round, layout)."""
    runs = grid(n)
    rows = []
    for r in range(repeats):
        for name in ["solo", *(f"k{k}" for k in ks)]:
            k = 1 if name == "solo" else int(name[1:])
            where = out / f"round{r}" / name
            where.mkdir(parents=True)
            packs = [[(str(where / str(i)), [*base, *runs[i]]) for i in range(j, min(j + k, n))] for j in range(0, n, k)]
            row = {"round": r, **run_layout(name, packs, workers, where, package_root)}
            if name != "solo":
                row["max_acc_diff"] = max_acc_diff(where, out / f"round{r}" / "solo", range(n))
            rows.append(row)
            print(f"  round {r} {name}: {row['wall_s']:.0f} s", flush=True)
    for row in rows:
        solo = next(s for s in rows if s["round"] == row["round"] and s["layout"] == "solo")
        row["gain"] = row["runs_per_hour"] / solo["runs_per_hour"]
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layout: the median and range over the rounds of wall time, runs/hour and gain."""
    out = []
    for name in dict.fromkeys(r["layout"] for r in rows):
        mine = [r for r in rows if r["layout"] == name]
        summary = {"layout": name, "rounds": len(mine), "processes": mine[0]["processes"], "threads": mine[0]["threads"],
                   "peak_rss_mb_per_process": max(r["peak_rss_mb_per_process"] for r in mine),
                   "peak_rss_mb_per_run": max(r["peak_rss_mb_per_run"] for r in mine)}
        for key in ("wall_s", "runs_per_hour", "gain"):
            values = [r[key] for r in mine]
            summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        if "max_acc_diff" in mine[0]:
            summary["max_acc_diff"] = max(r["max_acc_diff"] for r in mine)
        out.append(summary)
    return out


def _med(v: dict[str, float], fmt: str) -> str:
    return f"{v['median']:{fmt}} ({v['min']:{fmt}}–{v['max']:{fmt}})"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=None, help="default 16")
    p.add_argument("--ks", default=None, help="default 4,8,16 (--demo: 4,16)")
    p.add_argument("--epochs", type=int, default=None, help="4 steps each; default 2 (--demo: 20, 80 steps)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="rounds of alternated layouts (>= 3 for a median)")
    p.add_argument("--demo", action="store_true", help="the demo backbone at 112 px, 80 steps")
    p.add_argument("--ops", action="store_true", help="aten ops per training step against K")
    p.add_argument("--ops-ks", default="1,4,16,64")
    p.add_argument("--memory", action="store_true", help="peak memory per run of a training step, pack against solo")
    p.add_argument("--lengths", default="10,100")
    p.add_argument("--memory-k", type=int, default=4)
    p.add_argument("--package-root", default=str(REPO), help="the directory holding the vipamin_scale package measured")
    p.add_argument("--label", default="this checkout", help="what --package-root holds (recorded)")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_pack"), help="work directory (emptied first)")
    p.add_argument("--json", default=None, help="where the JSON goes (default: benchmarks/results/bench_pack*.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.memory and os.environ.get("KINETO_LOG_LEVEL") is None:  # the profiler's start/stop lines: read at process start
        args = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, __file__, *args], {**os.environ, "KINETO_LOG_LEVEL": "5"})
    sys.path.insert(0, a.package_root)  # before vipamin_scale is imported
    if a.child:
        train_one_pack(a.child)
        return 0
    out = Path(a.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    import vipamin_scale

    from vipamin_scale.paths import portable

    where = {"package": portable(str(Path(vipamin_scale.__file__).parent), {"": REPO}), "label": a.label,
             "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    if a.ops:
        rows = ops_table([int(k) for k in a.ops_ks.split(",")], out)
        record, name = {**where, "workload": [*TINY, *STEPS, "data.batch_size=2"], "rows": rows}, "bench_pack_ops.json"
        print(f"aten ops per training step ({a.label}; tiny backbone, b = 2 per run, P = 4 deep)\n")
        print("| K | aten ops per step | of which kernels (not views) | ops outside the backbone | kernels outside |\n"
              "|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['K']} | {r['ops']} | {r['kernels']} | {r['ops_outside_backbone']} | {r['kernels_outside_backbone']} |")
    elif a.memory:
        rows = memory_table([int(x) for x in a.lengths.split(",")], a.memory_k, out)
        record, name = {**where, "rows": rows}, "bench_pack_memory.json"
        print(f"peak CPU allocator MiB per run during one training step ({a.label}; ViT-S/14 at 112 px, b = 10)\n")
        print("| P | solo | pack of K | pack / solo |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['P']} | {r['solo_peak_mib_per_run']:.0f} | {r['pack_peak_mib_per_run']:.0f} (K={r['K']}) | "
                  f"{r['pack_over_solo']:.2f} |")
    else:
        n = a.runs or 16
        epochs = a.epochs or (20 if a.demo else 2)
        base = [*(DEMO if a.demo else TINY), *COMMON, f"train.epochs={epochs}", f"train.eval_every={epochs}"]
        ks = [int(k) for k in (a.ks or ("4,16" if a.demo else "4,8,16")).split(",")]
        rows = layouts(base, n, ks, a.workers, a.repeats, out, Path(a.package_root))
        summary = summarize(rows)
        record = {**where, "workload": {"overrides": base, "runs": n, "workers": a.workers, "repeats": a.repeats},
                  "load_average_at_end": os.getloadavg(), "summary": summary, "rows": rows}
        name = "bench_pack_demo.json" if a.demo else "bench_pack.json"
        print(f"\n{n} runs ({' '.join(base)}), {a.workers} processes at once, {a.repeats} alternated rounds: "
              f"median (min–max)\n")
        print("| layout | processes | threads each | wall s | runs/hour | gain | peak RSS MB / process | / run | "
              "max acc diff |\n|---|---|---|---|---|---|---|---|---|")
        for r in summary:
            diff = f"{r['max_acc_diff']:.1e}" if "max_acc_diff" in r else "–"
            print(f"| {r['layout']} | {r['processes']} | {r['threads']} | {_med(r['wall_s'], '.0f')} | "
                  f"{_med(r['runs_per_hour'], '.0f')} | {_med(r['gain'], '.2f')}x | {r['peak_rss_mb_per_process']:.0f} | "
                  f"{r['peak_rss_mb_per_run']:.0f} | {diff} |")
    path = Path(a.json) if a.json else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n(written to {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
