"""Packed trials on the CPU: runs per hour, one process per run against packs of K runs per process.

    python benchmarks/bench_pack.py [--runs 16] [--ks 4,8,16] [--epochs 2] [--workers 2] [--demo] [--out DIR]

The same N runs (a study's grid: train.lr x train.seed, VPT-Deep, 4-shot digits, batch 10, val + test
eval) are trained three ways, each with `--workers` processes at once (one torch thread each, as the
accuracy benchmark and `make demo` run their pools):
  - one process per run (each process imports, reads the backbone, builds its loaders: what a sweep of
    `vipamin-scale train` jobs pays per run);
  - packs of K (`vipamin_scale.train.train_pack`): N / K processes, each training K runs over one backbone.
Reported per layout: wall time, runs per hour, the gain over one process per run, peak RSS per process
and per run, and the largest difference of a run's val or test accuracy to its solo run (equal results: ~0).
Default: the tiny test backbone (`model=vit_test_d64`, 32 px), 8 steps, about 5 min on 2 busy cores;
`--demo`: the accuracy benchmark's 4-shot workload (the demo's DINOv2 ViT-S/14 at 112 px, batch 10, 80
steps), 8 runs solo against packs of 4, about 15 min on 2 idle cores. gpu-check's `packed` section runs the
same workload on a GPU (benchmarks/gpu_check/packed.py).
Writes bench_pack.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY = ["model=vit_test_d64", "model.pool=mean", "prompt.length=4"]
DEMO = ["model.img_size=112", "prompt.length=10"]
# 4-shot: 4 steps an epoch; val once at the end (train.eval_every = epochs) and test, as benchmarks/accuracy.py
COMMON = ["data=digits", "data.max_train_samples=40", "data.batch_size=10", "data.num_workers=0",
          "train.warmup_epochs=0.5", "train.log_every=4", "train.progress=false", "train.loggers=[jsonl]",
          "train.keep_last=1", "init=random"]


def grid(n: int) -> list[list[str]]:
    """n runs: lr in a geometric grid of 4, then train.seed."""
    lrs = [0.05, 0.1, 0.2, 0.5]
    return [[f"train.lr={lrs[i % 4]}", f"train.seed={i // 4}", f"init.seed={i // 4}"] for i in range(n)]


def train_one_pack(spec_path: str) -> None:
    """Child process: train the runs of SPEC ([[out_dir, override...], ...]) as one pack; write its peak RSS."""
    import resource

    import torch

    import vipamin_scale
    from vipamin_scale.train import train_pack

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    cfgs = [vipamin_scale.compose([*overrides, f"train.out_dir={out}"]) for out, *overrides in spec["runs"]]
    train_pack(cfgs)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    Path(spec["rss"]).write_text(json.dumps({"rss_mb": rss_mb, "gpu_peak_mb": gpu_mb}))


def run_layout(name: str, packs: list[list[tuple[str, list[str]]]], workers: int, out: Path) -> dict:
    """Every pack in its own process, `workers` at once; wall time and peak RSS per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    specs = []
    for i, pack in enumerate(packs):
        spec = out / f"{name}-pack{i}.json"
        spec.write_text(json.dumps({"runs": [[d, *o] for d, o in pack], "rss": str(out / f"{name}-pack{i}.rss.json")}))
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
    row = {"layout": name, "runs": n, "processes": len(packs), "wall_s": wall, "runs_per_hour": n * 3600 / wall,
           "peak_rss_mb_per_process": max(rss), "peak_rss_mb_per_run": max(r / len(p) for r, p in zip(rss, packs))}
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=None, help="default 16 (--demo: 8)")
    p.add_argument("--ks", default=None, help="default 4,8,16 (--demo: 4)")
    p.add_argument("--epochs", type=int, default=None, help="4 steps each; default 2 (--demo: 20, 80 steps)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--demo", action="store_true", help="the demo backbone at 112 px, 80 steps (~15 min on 2 idle cores)")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_pack"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        train_one_pack(a.child)
        return 0
    out = Path(a.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    a.runs = a.runs or (8 if a.demo else 16)
    epochs = a.epochs or (20 if a.demo else 2)
    base = [*(DEMO if a.demo else TINY), *COMMON, f"train.epochs={epochs}", f"train.eval_every={epochs}"]
    runs = grid(a.runs)
    ks = [int(k) for k in (a.ks or ("4" if a.demo else "4,8,16")).split(",")]
    rows = []
    solo = [[(str(out / "solo" / str(i)), [*base, *o])] for i, o in enumerate(runs)]
    rows.append(run_layout("solo", solo, a.workers, out))
    for k in ks:
        packs = [[(str(out / f"k{k}" / str(i)), [*base, *runs[i]]) for i in range(j, min(j + k, a.runs))]
                 for j in range(0, a.runs, k)]
        row = run_layout(f"k{k}", packs, a.workers, out)
        row["max_acc_diff"] = max_acc_diff(out / f"k{k}", out / "solo", range(a.runs))
        rows.append(row)
    for row in rows:
        row["gain"] = row["runs_per_hour"] / rows[0]["runs_per_hour"]
    record = {"workload": {"overrides": base, "runs": a.runs, "workers": a.workers, "cpus": os.cpu_count()}, "rows": rows}
    (out / "bench_pack.json").write_text(json.dumps(record, indent=2))
    print(f"{a.runs} runs ({' '.join(base)}), {a.workers} processes at once\n")
    print("| layout | processes | wall s | runs/hour | gain | peak RSS MB / process | / run | max acc diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        diff = f"{r['max_acc_diff']:.1e}" if "max_acc_diff" in r else "–"
        print(f"| {r['layout']} | {r['processes']} | {r['wall_s']:.0f} | {r['runs_per_hour']:.0f} | {r['gain']:.2f}x | "
              f"{r['peak_rss_mb_per_process']:.0f} | {r['peak_rss_mb_per_run']:.0f} | {diff} |")
    print(f"\n(written to {out / 'bench_pack.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
