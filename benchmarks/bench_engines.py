"""Step time and peak memory per engine and activation-checkpointing setting (not a test).

    .venv/bin/python benchmarks/bench_engines.py [--img-size 224] [--batch 4] [--steps 4] [--warmup 1]
    .venv/bin/python benchmarks/bench_engines.py --world 2    # sharding: every engine on 2 gloo ranks

A ViT-B/16-shaped backbone (timm `vit_base_patch16_224`, random weights: speed does not depend
on them), deep prompts (P=10) and a 10-class head, on CPU. Every configuration runs in its own
process (so its peak RSS is its own) on the same random batch: a bare timm + torch loop (the same
PromptedViT module, `loss.backward()`, torch AdamW — no engine), then DDP-engine (1 process: the
plain loop behind the engine interface), DeepSpeed ZeRO 1/2/3 and fairscale, each with and without
activation checkpointing. One process each (world size 1, a 1-rank gloo group for DeepSpeed):
this measures the engines' own overhead and activation checkpointing's cost, not sharding gains.
`--world N` runs the engines that shard (DDP as the reference, ZeRO-3, fairscale, FSDP2) under
torchrun on N gloo ranks, `--batch` images per rank: the step time and the peak RSS are rank 0's
(the frozen backbone is what ZeRO-3 and FSDP2 split). Prints a markdown table; writes
benchmarks/results/engines.json (engines_world<N>.json with --world).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = [("bare", False), ("ddp", False), ("ddp", True), ("zero1", False), ("zero2", False), ("zero3", False),
           ("zero3", True), ("fairscale", False), ("fairscale", True)]
# fsdp2 only at world > 1 (at world 1 it is the plain module, the ddp row)
WORLD_CONFIGS = [("ddp", False), ("zero3", False), ("fairscale", False), ("fsdp2", False), ("fsdp2", True)]


def _child(engine: str, ac: bool, img_size: int, batch: int, steps: int, warmup: int) -> dict:
    import timm
    import torch

    sys.path.insert(0, str(REPO))
    from vipamin_scale import distributed as D
    from vipamin_scale.config import default_config
    from vipamin_scale.engine import ENGINES
    from vipamin_scale.engine.base import adamw
    from vipamin_scale.models.prompted import PromptedViT, cross_entropy

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        D.init_from_env()  # gloo on CPU
    torch.manual_seed(0)
    backbone = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=img_size)
    model = PromptedViT(backbone, num_classes=10, prompt_length=10, deep=True)
    images = torch.randn(batch, 3, img_size, img_size)
    labels = torch.randint(0, 10, (batch,))
    total = warmup + steps
    if engine == "bare":
        opt = adamw(model, 1e-3, 1e-4)
        model.train()

        def step():
            loss = cross_entropy(model(images), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        if engine.startswith("zero"):
            cfg = default_config(engine__name="deepspeed", engine__zero_stage=int(engine[-1]),
                                 engine__activation_checkpointing=ac, data__batch_size=batch)
            eng = ENGINES["deepspeed"](model, cfg, lr=1e-3, total_steps=total, warmup_steps=0)
        else:
            cfg = default_config(engine__name=engine, engine__activation_checkpointing=ac, train__weight_decay=1e-4)
            eng = ENGINES[engine](model, cfg, lr=1e-3, total_steps=total, warmup_steps=0, device=torch.device("cpu"))
        eng.model.train()

        def step():
            loss = cross_entropy(eng.forward(images), labels)
            eng.backward(loss)
            eng.step()
            return loss
    times = []
    for i in range(total):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    times = times[warmup:]
    return {"engine": engine, "activation_checkpointing": ac, "step_s": sorted(times)[len(times) // 2],
            "param_mib": _resident_param_bytes(model) / 2**20,
            "step_s_all": times, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "final_loss": float(loss)}


def _resident_param_bytes(model) -> int:
    """Bytes of the model's parameters this rank keeps between steps: its ZeRO-3 partition
    (`ds_tensor`), its FSDP2 shard (`DTensor.to_local()`), else the whole parameter."""
    total = 0
    for p in model.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--world", type=int, default=1, help="ranks (torchrun, gloo); > 1: the sharding engines only")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/engines.json (engines_world<N>.json)")
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "AC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = _child(args.child[0], args.child[1] == "1", args.img_size, args.batch, args.steps, args.warmup)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result, allow_nan=False))
        return
    sys.path.insert(0, str(REPO))
    from vipamin_scale.launch import command as torchrun

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    rows = []
    for engine, ac in CONFIGS if args.world == 1 else WORLD_CONFIGS:
        child = ["--child", engine, "1" if ac else "0", "--img-size", str(args.img_size), "--batch", str(args.batch),
                 "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd = torchrun(args.world, *child, script=__file__) if args.world > 1 else [sys.executable, __file__, *child]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            rows.append({"engine": engine, "activation_checkpointing": ac, "error": proc.stderr.strip()[-2000:]})
            print(f"{engine} ac={ac}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        print(f"{engine} ac={ac}: {rows[-1]['step_s']:.3f} s/step, {rows[-1]['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    ref_name = "bare" if args.world == 1 else "ddp"
    bare = next(r for r in rows if r["engine"] == ref_name and "error" not in r)
    for r in rows:
        if "error" not in r:
            r["time_vs_bare"] = r["step_s"] / bare["step_s"]
            r["rss_vs_bare"] = r["peak_rss_mib"] / bare["peak_rss_mib"]
    print(f"\nViT-B/16 shape, img {args.img_size}, batch {args.batch} per rank, world {args.world}, deep prompts "
          f"P=10, CPU, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, median of {args.steps} steps (rank 0)\n")
    print(f"| engine | act. ckpt | step s | x {ref_name} | peak RSS MiB | x {ref_name} | weights MiB/rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | {r['activation_checkpointing']} | failed | | | | |")
        else:
            print(f"| {r['engine']} | {r['activation_checkpointing']} | {r['step_s']:.3f} | {r['time_vs_bare']:.2f} "
                  f"| {r['peak_rss_mib']:.0f} | {r['rss_vs_bare']:.2f} | {r['param_mib']:.0f} |")
    default = "engines.json" if args.world == 1 else f"engines_world{args.world}.json"
    out = Path(args.out or REPO / "benchmarks" / "results" / default)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": "vit_base_patch16_224 (random) + deep prompts P=10", "img_size": args.img_size,
            "world_size": args.world, "reference": ref_name,
            "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "device": "cpu",
            "omp_num_threads": env["OMP_NUM_THREADS"], "cpu_count": os.cpu_count(), "python": platform.python_version()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, allow_nan=False))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
