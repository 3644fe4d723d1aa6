"""packed: packed trials on the GPU (issues 22 and 33), the accuracy benchmark's 4-shot workload: the demo
backbone's shape (DINOv2 ViT-S/14, random weights) at 112 px, VPT-Deep P=10, batch 10, 80 steps, val + test
eval. Runs per hour of the layout the benchmark used on one H200 (14 processes at once, one run each) against
packs of K = 1, 4, 8, 16, 32, 64 runs in one process (`train_pack`, benchmarks/bench_pack.py's child). Per layout,
timed in the real loop (loader -> device -> step, as `train_pack` runs it; the runs' result.json): the time of a
step (train_time_s / steps: the loader's next batch, the one copy to the device, forward, backward, the pack's
optimizer step and the loss checks), the images per second of all its runs together, peak GPU memory
(torch.cuda.max_memory_allocated) per process and per run, runs per hour and the gain over the 14 processes, and
the largest difference of a packed run's val or test accuracy to the same run in the 14-process layout.
Target: >= 5x the runs per hour. Then `pack_size=auto` for the workload: its K, how it was chosen, and the peak
memory of a pack of that K (its training steps and an eval batch; on a GPU against the 0.85 budget it was fitted to).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from gpu_check.common import Record, compose_config


def workload(smoke: bool) -> list[str]:
    from bench_pack import COMMON, DEMO, TINY

    if smoke:
        return [*TINY, *COMMON, "train.epochs=1"]
    return ["model.name=vit_small_patch14_dinov2", "model.checkpoint=null", *DEMO, *COMMON, "train.epochs=20",
            "train.eval_every=20"]  # val once at the end, then test


def step_figures(run_dirs: list[Path]) -> dict:
    """The real loop's step of a layout, from its runs' result.json: the median step time of its processes and
    the images per second of one process's runs together (a pack's runs share its steps)."""
    results = [json.loads((d / "result.json").read_text()) for d in run_dirs]
    step_s = statistics.median(r["train_time_s"] / r["steps"] for r in results)
    per_process = statistics.median(r["images_per_s"] * r.get("pack_size", 1) for r in results)
    return {"step_s": step_s, "images_per_s_per_process": per_process}


def run(rec: Record, ctx: dict) -> None:
    from bench_pack import grid, max_acc_diff, run_layout

    from vipamin_scale.data.digits import digits_root

    digits_root()  # built once here, not by 14 processes at once
    s, work = ctx["sizes"], ctx["work"]
    procs, ks = s["packed_procs"], s["packed_ks"]
    base = workload(ctx["smoke"])
    runs = grid(max([procs, *ks]))
    rec.data.update(workload=" ".join(base), solo_processes=procs, ks=ks, target="gain >= 5 (K runs in one process "
                    f"vs {procs} processes of one run each)")

    def solo_layout():
        dirs = [work / "solo" / str(i) for i in range(procs)]
        row = run_layout("solo", [[(str(d), [*base, *runs[i]])] for i, d in enumerate(dirs)], procs, work)
        return {**row, **step_figures(dirs)}

    solo = rec.item("solo", solo_layout)
    for k in ks:
        def pack(k=k):
            dirs = [work / f"k{k}" / str(i) for i in range(k)]
            row = run_layout(f"k{k}", [[(str(d), [*base, *runs[i]]) for i, d in enumerate(dirs)]], 1, work)
            row.update(step_figures(dirs))
            if solo:
                row["gain"] = row["runs_per_hour"] / solo["runs_per_hour"]
                row["max_acc_diff"] = max_acc_diff(work / f"k{k}", work / "solo", range(min(k, procs)))
            return row

        rec.item(f"k{k}", pack)
    rec.item("auto", lambda: auto_row(compose_config([*base, *runs[0], f"train.out_dir={work / 'auto' / 'run'}"]),
                                      work / "auto"))
    rec.save()


def auto_row(cfg, work: Path) -> dict:
    """`pack_size=auto` for the workload (pack_memory.auto_pack_size: its K and how it was chosen), then a pack of
    that K measured as auto measures (train.measure_pack_memory): its peak, and on a GPU the budget it was fitted to."""
    from gpu_check.common import cuda

    from vipamin_scale.pack_memory import MEMORY_FRACTION, auto_pack_size, measured_copies
    from vipamin_scale.train import measure_pack_memory

    k, how = auto_pack_size(cfg)
    train_peak, eval_peak = measure_pack_memory(measured_copies(cfg, k, work / f"k{k}"))
    row = {"k": k, "how": how, "train_peak_mb": train_peak / 2 ** 20, "eval_peak_mb": eval_peak / 2 ** 20,
           "peak_mb": max(train_peak, eval_peak) / 2 ** 20}
    if cuda():
        import torch

        row["budget_mb"] = MEMORY_FRACTION * torch.cuda.get_device_properties(0).total_memory / 2 ** 20
        row["within_budget"] = row["peak_mb"] <= row["budget_mb"]
    return row
