"""Uneven packs on the CPU: 2 workers claiming packs against 1 worker and against the round-robin of before.

    python benchmarks/bench_study.py [--runs 8] [--lengths 1,100] [--samples 320] [--epochs 8] [--repeats 3]
                                     [--layouts 1-worker,claiming,round-robin,rr-balanced] [--threads 1]
                                     [--commit REV]
    python benchmarks/bench_study.py --quick      # a smoke run (~40 s): 1 run per length, 1 epoch, 1 round of
                                                  # the first 3 layouts, in this process, no warm-up

The runs: a study round's uneven mix on the tiny test backbone (vit_test_d64: depth 2, width 64, 32 px, patch 8,
so 16 patch tokens + the class token), `--runs` runs at each prompt length of `--lengths` (VPT-Deep; a sample of
P = 100 has 117 tokens, one of P = 1 18), each run its own lr, digits (`data.max_train_samples` `--samples`,
batch 32: 10 steps an epoch), `--epochs` epochs, val once at the end and test, `train.progress=false`. The same
configs (`vipamin_scale.compose`) are trained by every layout, each time into fresh run directories:

    1-worker     `run_packed(cfgs, workers=1)`: one process trains every pack of the plan (one per prompt length),
                 costliest first, with `--threads` torch threads (default 1: the worker count is what differs;
                 see below for 2)
    claiming     `run_packed(cfgs, workers=2)`: two spawned processes (one torch thread each) claim the packs of
                 the plan balanced over 2 workers (each pack at most a worker's share of the cost, `run_cost`)
    round-robin  the layout before the claiming change (20406e1^), as the packed Hydra launcher had it under
                 torchrun at its default pack_size=null: each compatible group one pack, no balancing, worker r
                 trains packs r, r + 2, ... statically (two processes of `vipamin_scale.pool.run_in_processes`,
                 one torch thread each, each looping `train_pack` over its fixed list). The plan is
                 `plan_packs(cfgs, pack_size=None, workers=1)`: one pack per compatible group, i.e. a P = 1 pack
                 and a P = 100 pack, as the old `plan_packs(cfgs, None)` cut them; the old one listed the groups
                 in first-appearance order and this one costliest first, which only swaps which worker gets which
                 pack. (The old in-process path, `workers=2` without torchrun, handed the same two packs to a pool
                 of two: the same assignment.) `pack_size=ceil(n/2)` would not be the old layout: it splits the
                 groups, which the old launcher did only when told a pack_size.
    rr-balanced  the claiming layout's balanced plan handed out round-robin, `plan_packs(cfgs, workers=2)[r::2]`,
                 statically, as round-robin: what the balanced plan gives without the claiming

The balanced plan here: `run_cost` counts a 224-px ViT/14's 256 patch tokens, so it rates a P = 100 run 1.39x
a P = 1 run (356 / 257 tokens), not the tiny ViT's ~6.5x (117 / 18). The P = 100 group (8 x 356) is more than a
worker's share (half of 8 x 257 + 8 x 356) and is cut into two packs of 4, the P = 1 group is one pack of 8 and
comes first: the first worker to finish it takes the second P = 100 pack.

Each layout runs in a fresh Python process of its own (this script with --child), so none inherits another's
imports, data caches or torch state; the figure is the wall time of the layout's call in that process (the
spawned workers' start-up included; the `import torch, vipamin_scale` every layout's process does first, not).
The layouts alternate (1-worker, claiming, round-robin, rr-balanced, 1-worker, ...) for `--repeats` rounds,
after one untimed warm-up run (the digits shards built, the files in the page cache). A round's ratios are its
layouts' wall times over its own claiming layout's; the table gives the medians and ranges (min–max) over the
rounds, and per layout (medians): when the first run began (run.json's attempt record, whole seconds: the
spawned workers' start-up), each worker process's finish time (its runs' last result.json mtime, the worker
known by run.json's pid; an idle worker shows as an early finish), the CPU seconds of the call (the layout's
process and its joined workers, getrusage) and the cores used, CPU s / wall s: what the machine gave the layout
(2 at most here; less while other sessions' processes run).

Per-run equality: every run's final val and test accuracy and loss in every layout and round, compared exactly
(==) with round 0's claiming layout. Where the trainers run one torch thread (every layout at the default
--threads 1) they must be bit-equal; a trainer with 2 threads sums in another order, so there the accuracies
must be equal and the losses may differ in the last digits. Each layout must also be bit-equal across its own
rounds. The exit status is 1 when any of that fails.

On `--threads 2` (torch's default on this 2-core machine): with another session's process on one of the cores,
a lone process of 2 threads trained the same pack ~2x slower than at 1 thread (its threads wait for each other
at every op), so a 2-thread 1-worker baseline measures the machine's sharing, not the workers; it is not the
default.

`--commit REV`: the package measured is an export of REV (`git archive` into OUT/package), not the working tree
(which other work may be changing meanwhile); the JSON records which. `--quick` trains its layouts in this
process (a smoke run of the code paths; its figures are not a measurement).

Prints a Markdown table and writes benchmarks/results/bench_study.json (`--json`; `--quick`: a file under --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

LAYOUTS = ["1-worker", "claiming", "round-robin", "rr-balanced"]
WORKERS = 2
BASE = ["model=vit_test_d64", "model.pool=mean", "data=digits", "data.batch_size=32", "data.eval_batch_size=128",
        "data.num_workers=0", "train.warmup_epochs=0.5", "train.log_every=1000", "train.progress=false",
        "train.loggers=[jsonl]", "train.keep_last=1", "init=random"]
KEYS = ("val_acc", "val_loss", "test_acc", "test_loss", "status")  # compared exactly across layouts and rounds
LRS = [0.05, 0.1, 0.2, 0.5, 1.0, 0.02, 0.3, 0.7]


def workload(runs: int, lengths: list[int], samples: int, epochs: int) -> list[list[str]]:
    """The overrides of every run (no out_dir): for each prompt length, `runs` runs of different lrs."""
    common = [*BASE, f"data.max_train_samples={samples}", f"train.epochs={epochs}", f"train.eval_every={epochs}"]
    return [[*common, f"prompt.length={p}", f"train.lr={LRS[i % len(LRS)]}", f"train.seed={i // len(LRS)}"]
            for p in lengths for i in range(runs)]


def run_name(overrides: list[str]) -> str:
    kv = dict(o.split("=", 1) for o in overrides)
    return f"P{kv['prompt.length']}-lr{kv['train.lr']}-s{kv['train.seed']}"


# ----------------------------------------------------------------------------- the child: one layout


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _train_list(packs: list[list[Any]]) -> int:
    """A round-robin worker: its fixed packs, one after the other."""
    from vipamin_scale.train import train_pack

    for cfgs in packs:
        train_pack(cfgs)
    return os.getpid()


def _cpu_s() -> float:
    """User + system CPU seconds of this process and of its children that have been waited for."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def child(spec_path: str) -> None:
    """Train the spec's runs in the spec's layout; write the call's wall time and the plan to spec['timing']."""
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, spec["root"])  # before vipamin_scale is imported (the spawned workers get this sys.path)
    import torch

    import vipamin_scale
    from vipamin_scale.packs import plan_packs, run_packed
    from vipamin_scale.pool import run_in_processes

    assert Path(vipamin_scale.__file__).resolve().is_relative_to(Path(spec["root"]).resolve()), vipamin_scale.__file__
    cfgs = [vipamin_scale.compose([*overrides, f"train.out_dir={out}"]) for out, overrides in spec["runs"]]
    layout = spec["layout"]
    torch.set_num_threads(spec["threads"])  # the 1-worker layout's trainer; spawned workers set their own 1
    threads = torch.get_num_threads()
    cpu0, t0, started = _cpu_s(), time.perf_counter(), time.time()
    if layout == "1-worker":
        plan = plan_packs(cfgs, None, 1)
        run_packed(cfgs, workers=1)
    elif layout == "claiming":
        plan = plan_packs(cfgs, None, WORKERS)
        run_packed(cfgs, workers=WORKERS)
    elif layout in ("round-robin", "rr-balanced"):
        plan = plan_packs(cfgs, None, 1 if layout == "round-robin" else WORKERS)
        lists = [[[cfgs[i] for i in pack] for pack in plan[r::WORKERS]] for r in range(WORKERS)]
        run_in_processes(_train_list, [(packs,) for packs in lists], WORKERS, initializer=_one_thread)
    else:
        raise SystemExit(f"unknown layout {layout}")
    wall = time.perf_counter() - t0
    cpu = _cpu_s() - cpu0  # this process's and its (joined) workers' CPU time during the call
    Path(spec["timing"]).write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "started": started,
                                                "threads_here": threads, "plan": plan}))


# ----------------------------------------------------------------------------- the parent


def read_run(out: Path) -> dict[str, Any]:
    result = json.loads((out / "result.json").read_text())
    run = json.loads((out / "run.json").read_text())
    return {"val_acc": result["final_eval"]["acc"], "val_loss": result["final_eval"]["loss"],
            "test_acc": result["test"]["acc"], "test_loss": result["test"]["loss"],
            "status": result.get("status", "ok"), "pid": run["attempts"][-1]["pid"],
            "began": datetime.datetime.fromisoformat(run["attempts"][-1]["started"]).timestamp(),
            "ended": (out / "result.json").stat().st_mtime}


def run_layout(layout: str, names: list[str], overrides: list[list[str]], where: Path, threads: int,
               root: Path = REPO, inline: bool = False) -> dict[str, Any]:
    """One layout in a fresh process (`threads`: OMP_NUM_THREADS there; spawned workers set 1; the package
    imported from `root`); its row."""
    where.mkdir(parents=True)
    load = os.getloadavg()[0]
    spec = where / "spec.json"
    spec.write_text(json.dumps({"layout": layout, "timing": str(where / "timing.json"), "root": str(root),
                                "threads": threads,
                                "runs": [[str(where / n), o] for n, o in zip(names, overrides)]}))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    if inline:  # --quick: a smoke run, in this process (no fresh process per layout)
        child(str(spec))
    else:
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        if proc.returncode != 0:
            raise RuntimeError(f"{layout}: the layout's process failed:\n{proc.stderr.decode()[-4000:]}")
    process_wall = time.perf_counter() - t0
    timing = json.loads((where / "timing.json").read_text())
    per_run = {n: read_run(where / n) for n in names}
    workers: dict[int, dict[str, Any]] = {}
    for n, r in per_run.items():
        w = workers.setdefault(r["pid"], {"runs": 0, "finished_s": 0.0, "began_s": math.inf})
        w["runs"] += 1
        w["finished_s"] = max(w["finished_s"], r["ended"] - timing["started"])
        w["began_s"] = min(w["began_s"], r["began"] - timing["started"])  # run.json: whole seconds
    finish = sorted(w["finished_s"] for w in workers.values())
    return {"layout": layout, "wall_s": timing["wall_s"], "process_wall_s": process_wall, "load_average_1min": load,
            "cpu_s": timing["cpu_s"], "cores_used": timing["cpu_s"] / timing["wall_s"],
            "first_run_began_s": max(0.0, min(w["began_s"] for w in workers.values())),
            "threads_in_layout_process": timing["threads_here"],
            "plan": [[names[i] for i in pack] for pack in timing["plan"]],
            "worker_processes": len(workers), "worker_finish_s": finish,
            "worker_runs": [w["runs"] for w in sorted(workers.values(), key=lambda w: w["finished_s"])],
            "runs": {n: {k: r[k] for k in KEYS} for n, r in per_run.items()}}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(v: dict[str, float], f: str) -> str:
    return f"{v['median']:{f}} ({v['min']:{f}}–{v['max']:{f}})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=None, help="runs at each prompt length (default 8; --quick 2)")
    p.add_argument("--lengths", default="1,100", help="prompt lengths (VPT-Deep)")
    p.add_argument("--samples", type=int, default=None, help="data.max_train_samples (default 320; --quick 32)")
    p.add_argument("--epochs", type=int, default=None, help="default 8 (--quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="alternated rounds (default 3; --quick 1)")
    p.add_argument("--layouts", default=None, help=f"which, in this order each round (default {','.join(LAYOUTS)}; "
                                                   f"--quick: {','.join(LAYOUTS[:3])})")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the 1-worker layout's trainer")
    p.add_argument("--quick", action="store_true", help="a smoke run well under a minute")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_study"), help="work directory (emptied first)")
    p.add_argument("--json", default=None, help="default benchmarks/results/bench_study.json (--quick: under --out)")
    p.add_argument("--commit", default=None,
                   help="measure the package of this commit (git archive into OUT/package), not the working tree's")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child)
        return 0
    q = a.quick
    n = a.runs or (1 if q else 8)
    samples = a.samples or (32 if q else 320)
    epochs = a.epochs or (1 if q else 8)
    repeats = a.repeats or (1 if q else 3)
    lengths = [int(x) for x in a.lengths.split(",")]
    layouts = (a.layouts or ",".join(LAYOUTS[:3] if q else LAYOUTS)).split(",")
    if "claiming" not in layouts or set(layouts) - set(LAYOUTS):
        p.error(f"--layouts: some of {', '.join(LAYOUTS)}, claiming among them (the ratios' reference)")
    out = Path(a.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    package = {"root": "the working tree", "commit": _git("rev-parse", "HEAD"),
               "dirty": bool(_git("status", "--porcelain", "--", "vipamin_scale", "hydra_plugins"))}
    root = REPO
    if a.commit:
        root = out / "package"
        root.mkdir()
        sha = _git("rev-parse", a.commit)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
        package = {"root": f"git archive {sha}", "commit": sha, "dirty": False}
    cores = os.cpu_count() or 1
    threads = a.threads
    overrides = workload(n, lengths, samples, epochs)
    names = [run_name(o) for o in overrides]
    record: dict[str, Any] = {
        "machine": {"cpus": cores, "cpu": _cpu_name(), "load_average_at_start": os.getloadavg()},
        "workload": {"runs": len(names), "per_length": n, "lengths": lengths, "samples": samples, "epochs": epochs,
                     "overrides": overrides[0][:-3] + ["prompt.length / train.lr / train.seed: per run"],
                     "names": names},
        "package": package, "repeats": repeats, "workers": WORKERS, "layouts": layouts,
        "threads_1_worker": threads}
    t_all = time.perf_counter()
    print(f"{len(names)} runs ({n} at each P in {lengths}), {samples} samples, {epochs} epochs; "
          f"{repeats} rounds of {', '.join(layouts)}", flush=True)
    if not q:
        warm = run_layout("1-worker", names[:1], overrides[:1], out / "warmup", threads, root)  # untimed
        print(f"  warm-up (1 run): {warm['wall_s']:.1f} s", flush=True)
    rows = []
    for r in range(repeats):
        for layout in layouts:
            row = {"round": r, **run_layout(layout, names, overrides, out / f"round{r}" / layout, threads, root, q)}
            rows.append(row)
            print(f"  round {r} {layout}: {row['wall_s']:.1f} s, {row['cores_used']:.2f} cores (workers finish at "
                  f"{', '.join(f'{s:.0f}' for s in row['worker_finish_s'])} s; packs "
                  f"{[len(pk) for pk in row['plan']]}; load average {row['load_average_1min']:.1f} before)", flush=True)
    reference = next(x for x in rows if x["layout"] == "claiming")["runs"]  # round 0's claiming layout
    for row in rows:
        row["trainer_threads"] = threads if row["layout"] == "1-worker" else 1
        mine, ref = row["runs"], reference
        row["runs_differing"] = sorted(nm for nm in names if any(mine[nm][k] != ref[nm][k] for k in KEYS))
        row["acc_differing"] = sorted(nm for nm in names if any(mine[nm][k] != ref[nm][k]
                                                                for k in ("val_acc", "test_acc", "status")))
        row["max_loss_diff"] = max(abs(mine[nm][k] - ref[nm][k]) for nm in names for k in ("val_loss", "test_loss"))
        own = next(x for x in rows if x["layout"] == row["layout"])["runs"]  # its own layout's round 0
        row["equal_to_own_round0"] = all(mine[nm][k] == own[nm][k] for nm in names for k in KEYS)
        claim = next(x for x in rows if x["round"] == row["round"] and x["layout"] == "claiming")
        row["over_claiming"] = row["wall_s"] / claim["wall_s"]
    summary = []
    for layout in layouts:
        mine = [x for x in rows if x["layout"] == layout]
        summary.append({"layout": layout, "rounds": len(mine), "packs": [len(pk) for pk in mine[0]["plan"]],
                        "worker_processes": mine[0]["worker_processes"],
                        "wall_s": spread([x["wall_s"] for x in mine]),
                        "cpu_s": spread([x["cpu_s"] for x in mine]),
                        "cores_used": spread([x["cores_used"] for x in mine]),
                        "first_run_began_s": spread([x["first_run_began_s"] for x in mine]),
                        "over_claiming": spread([x["over_claiming"] for x in mine]),
                        "worker_finish_s": [spread([x["worker_finish_s"][k] for x in mine])
                                            for k in range(len(mine[0]["worker_finish_s"]))],
                        "trainer_threads": mine[0]["trainer_threads"],
                        "runs_differing": sorted({nm for x in mine for nm in x["runs_differing"]}),
                        "acc_differing": sorted({nm for x in mine for nm in x["acc_differing"]}),
                        "max_loss_diff": max(x["max_loss_diff"] for x in mine),
                        "equal_across_rounds": all(x["equal_to_own_round0"] for x in mine)})
    # Bit-equal expected where the trainers run with the reference's torch threads (1); another thread count
    # sums in another order (float), so there the accuracies must agree and the losses may differ in the last digits.
    broken = [x for x in rows if x["acc_differing"] or (x["trainer_threads"] == 1 and x["runs_differing"])
              or not x["equal_to_own_round0"]]
    record.update(summary=summary, rows=rows, total_s=time.perf_counter() - t_all,
                  load_average_at_end=os.getloadavg(), reference="round 0's claiming layout",
                  all_runs_bit_equal=all(not x["runs_differing"] for x in rows),
                  all_accuracies_equal=all(not x["acc_differing"] for x in rows), unexpected=len(broken))
    print(f"\n{len(names)} runs (P in {lengths}, {n} lrs each), {repeats} alternated rounds; wall s and ratio to the "
          f"same round's claiming layout: median (min–max)\n")
    print("| layout | packs (runs each) | processes x torch threads | wall s | / claiming | first run begins at s | "
          "workers finish at s | CPU s | cores used | per-run results vs claiming round 0 |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        k = len(names)
        if not s["runs_differing"]:
            diff = f"bit-equal, {k}/{k} runs"
        elif not s["acc_differing"]:
            diff = (f"accuracies equal {k}/{k}; losses differ in {len(s['runs_differing'])} runs "
                    f"(max {s['max_loss_diff']:.1e})")
        else:
            diff = f"ACCURACY DIFFERS in {len(s['acc_differing'])} runs"
        diff += "" if s["equal_across_rounds"] else "; NOT equal across its rounds"
        finish = " / ".join(f"{w['median']:.0f}" for w in s["worker_finish_s"])
        print(f"| {s['layout']} | {s['packs']} | {s['worker_processes']} x {s['trainer_threads']} | "
              f"{fmt(s['wall_s'], '.1f')} | {fmt(s['over_claiming'], '.2f')} | "
              f"{s['first_run_began_s']['median']:.0f} | {finish} | {s['cpu_s']['median']:.0f} | "
              f"{fmt(s['cores_used'], '.2f')} | {diff} |")
    print(f"\nper-run results (val and test accuracy and loss): bit-equal in every layout and round: "
          f"{record['all_runs_bit_equal']}; accuracies equal: {record['all_accuracies_equal']}; unexpected "
          f"differences (accuracy, or a 1-thread layout not bit-equal, or a layout unequal across rounds): "
          f"{record['unexpected']}; total {record['total_s']:.0f} s")
    path = Path(a.json) if a.json else (out / "bench_study.json" if q else RESULTS / "bench_study.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"(written to {path})")
    return 1 if broken else 0


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
