"""train: `vipamin-scale train` runs (tiny model) under ddp, zero2, zero3 + activation checkpointing,
fp32 and bf16, against the CPU DDP fp32 loss curve."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Optional

from gpu_check.common import (REPO, TRAIN_ARGS, TRAIN_RUNS, Record, child_env, cli, compose_config, cuda, failure,
                              kill_tree, last_line)


def read_losses(run_dir: Path) -> tuple[list[float], Optional[float]]:
    """Train losses by step and the last eval loss, from the run's metrics.jsonl."""
    train, val = [], None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "train":
            train.append(float(rec["loss"]))
        elif "acc" in rec:
            val = float(rec["loss"])
    return train, val


def max_rel(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        return float("inf")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))



def run(rec: Record, ctx: dict) -> None:
    """The six runs one after another in this process (run_training on the composed config: one
    import of torch and DeepSpeed instead of six); on a GPU machine the CPU reference runs meanwhile
    as its own `vipamin-scale train` process, with no GPU visible."""
    import math

    from vipamin_scale import distributed as D
    from vipamin_scale.train import run_training

    work = ctx["work"] / "train"
    gpu = cuda()
    t0 = time.perf_counter()
    ref_name = "cpu_ddp_fp32" if gpu else "ddp_fp32"  # on a CPU-only machine the ddp_fp32 run is the reference
    reference = None
    if gpu:
        d = work / ref_name
        work.mkdir(parents=True, exist_ok=True)
        with open(work / "cpu_ref.log", "w") as log:
            reference = subprocess.Popen(cli("train", *TRAIN_ARGS, f"train.out_dir={d}", f"hydra.run.dir={d}"),
                                         env=child_env(CUDA_VISIBLE_DEVICES=""), cwd=REPO, stdout=log,
                                         stderr=subprocess.STDOUT)
    runs: dict[str, dict] = {}
    for engine, precision, ac in TRAIN_RUNS:
        name = f"{engine}_{precision}" + ("_ac" if ac else "")
        d = work / name

        def one(engine=engine, precision=precision, ac=ac, d=d):
            t = time.perf_counter()
            cfg = compose_config([*TRAIN_ARGS, f"engine={engine}", f"train.precision={precision}",
                                  f"engine.activation_checkpointing={str(ac).lower()}", f"train.out_dir={d}"])
            result = run_training(cfg)
            return {"seconds": round(time.perf_counter() - t, 2), "device": result.get("device"),
                    "val_acc": result["final_eval"].get("acc")}

        runs[name] = rec.item(name, one) or rec.data[name]
        D.barrier()
    if reference is not None:
        try:
            rc = reference.wait(timeout=max(1.0, ctx["cap"] - 15 - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            kill_tree(reference)
            rc = None
        runs[ref_name] = {"rc": rc} if rc == 0 else {
            "error": "timed out" if rc is None else last_line(work / "cpu_ref.log") or f"exit {rc}"}
        rec.data[ref_name] = runs[ref_name]
    curves = {}
    for name, r in runs.items():
        if "error" not in r:
            try:
                curves[name] = read_losses(work / name)
                r["losses"], r["val_loss"] = curves[name]
            except (OSError, ValueError, KeyError) as exc:
                r.update(failure(exc))
    tol_same = 1e-3 if gpu else 1e-4  # fp32 on one device: round-off (ZeRO reduces in another order)
    tol_cpu = 1e-2  # GPU vs CPU fp32: cuDNN's convolutions use TF32 by default
    tol_bf16 = 3e-2  # bf16 autocast (DDP) or a bf16 model (DeepSpeed) against fp32
    checks = {}
    for name, r in runs.items():
        if name not in curves:
            checks[name] = False
            continue
        losses, val = curves[name]
        ok = bool(losses) and all(math.isfinite(x) for x in losses) and val is not None and math.isfinite(val)
        if name != ref_name:
            engine, precision = name.split("_")[0], name.split("_")[1]
            if precision == "fp32":
                tol = tol_cpu if gpu and engine == "ddp" else tol_same
                against = ref_name if engine == "ddp" else "ddp_fp32"
            else:
                tol, against = tol_bf16, name.replace("bf16", "fp32")
            r["vs"], r["tol"] = against, tol
            r["max_rel_diff"] = max_rel(losses, curves[against][0]) if against in curves else None
            ok = ok and r["max_rel_diff"] is not None and r["max_rel_diff"] <= tol
        r["passed"] = ok
        checks[name] = ok
    rec.data.update(reference=ref_name, device="cuda" if gpu else "cpu",
                    passed=len(checks) == len(TRAIN_RUNS) + (1 if gpu else 0) and all(checks.values()))
    rec.save()

