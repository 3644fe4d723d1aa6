"""step: issue 24's first target, the training step of ViT-H/14, VPT-Deep P=10, bf16, batch 64 (ddp, one GPU),
against the bare timm + torch loop (target: >= 1.4x its images/s, >= 45 % MFU).

Variants: the bare loop (fp32 weights under bf16 autocast); our step with the backbone in fp32 under autocast
(model.dtype=fp32, the 2026-11 step); with the backbone stored in bf16 (model.dtype=bf16, no autocast); each
of ours with train.compile=true too (compile time recorded: the first warm-up steps). --smoke skips compile
(on a CPU it takes minutes at any size that matters; tests/test_gpu_paths.py checks it there).
"""
from __future__ import annotations

import time

from gpu_check.common import Record, sync
from gpu_check.measure import (bare_step, count_flops_per_image, device_and_peak, engine_step, free_memory, inputs,
                               prompted_config, time_steps, with_mfu)

VARIANTS = {  # key: model.dtype, train.compile
    "autocast": ("fp32", False), "bf16_stored": ("bf16", False),
    "autocast_compiled": ("fp32", True), "bf16_stored_compiled": ("bf16", True)}


def run(rec: Record, ctx: dict) -> None:
    import torch

    from vipamin_scale.models import build_model

    s = ctx["sizes"]
    device, dev_name, peak, reason = device_and_peak()
    cfg = prompted_config(s["model"], s["img"], s["batch"])
    torch.manual_seed(0)
    base = build_model(cfg, num_classes=100)
    rec.data.update(model=f"{s['model']} (random weights) + VPT-Deep P=10", img_size=s["img"], batch=s["batch"],
                    device=dev_name, engine="ddp (world 1)", precision="bf16")
    counted = rec.item("model_flops", lambda: {"flops_per_image": count_flops_per_image(
        bare_step(base, device), s["img"], device)[0]})
    flops = (counted or {}).get("flops_per_image")
    free_memory()
    rec.item("bare", lambda: with_mfu(time_steps(bare_step(base, device), s["batch"], s["img"], device, s["warmup"],
                                                 s["steps"]), flops, peak, reason))
    free_memory()
    for key, (dtype, compiled) in VARIANTS.items():
        if compiled and not s["compile"]:
            rec.data[key] = {"skipped": "--smoke: no compile on the CPU (tests/test_gpu_paths.py checks it)"}
            continue

        def measure(dtype=dtype, compiled=compiled):
            step = engine_step(cfg, base, {"model.dtype": dtype, "train.compile": compiled})
            t = time.perf_counter()
            step(*inputs(s["batch"], s["img"], device))  # the first step (compiles when train.compile)
            sync()
            first_s = time.perf_counter() - t
            out = with_mfu(time_steps(step, s["batch"], s["img"], device, s["warmup"], s["steps"]), flops, peak, reason)
            out.update(first_step_s=first_s, model_dtype=dtype, compile=compiled)
            return out

        rec.item(key, measure)
        free_memory()
        torch._dynamo.reset()
    bare = (rec.data.get("bare") or {}).get("images_per_s")
    for key in VARIANTS:
        r = rec.data.get(key) or {}
        if bare and r.get("images_per_s"):
            r["speed_vs_bare"] = r["images_per_s"] / bare
    best = max((k for k in VARIANTS if (rec.data.get(k) or {}).get("speed_vs_bare")),
               key=lambda k: rec.data[k]["speed_vs_bare"], default=None)
    rec.data.update(best=best, target="speed_vs_bare >= 1.4 and mfu >= 0.45",
                    target_met=bool(best and rec.data[best]["speed_vs_bare"] >= 1.4
                                    and (rec.data[best].get("mfu") or 0) >= 0.45))
    rec.save()
