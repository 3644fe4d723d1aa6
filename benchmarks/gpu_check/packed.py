"""packed: packed trials on the GPU (issue 22 item 7), the accuracy benchmark's 4-shot workload: the demo
backbone's shape (DINOv2 ViT-S/14, random weights) at 112 px, VPT-Deep P=10, batch 10, 80 steps, val + test
eval. Runs per hour of the layout the benchmark used on one H200 (14 processes at once, one run each)
against packs of K = 4, 8, 16, 32, 64 runs in one process (`train_pack`, benchmarks/bench_pack.py's child);
peak GPU memory (torch.cuda.max_memory_allocated) per process and per run; the largest difference of a
packed run's val or test accuracy to the same run in the 14-process layout. Target: >= 5x the runs per hour.
"""
from __future__ import annotations

from gpu_check.common import Record


def workload(smoke: bool) -> list[str]:
    from bench_pack import COMMON, DEMO, TINY

    if smoke:
        return [*TINY, *COMMON, "train.epochs=1"]
    return ["model.name=vit_small_patch14_dinov2", "model.checkpoint=null", *DEMO, *COMMON, "train.epochs=20",
            "train.eval_every=20"]  # val once at the end, then test


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
    solo = rec.item("solo", lambda: run_layout(
        "solo", [[(str(work / "solo" / str(i)), [*base, *runs[i]])] for i in range(procs)], procs, work))
    for k in ks:
        def pack(k=k):
            row = run_layout(f"k{k}", [[(str(work / f"k{k}" / str(i)), [*base, *runs[i]]) for i in range(k)]], 1, work)
            if solo:
                row["gain"] = row["runs_per_hour"] / solo["runs_per_hour"]
                row["max_acc_diff"] = max_acc_diff(work / f"k{k}", work / "solo", range(min(k, procs)))
            return row

        rec.item(f"k{k}", pack)
    rec.save()
