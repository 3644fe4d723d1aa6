"""fewshot: the few-shot step, the demo backbone's shape (DINOv2 ViT-S/14, random weights) at 112 px, batch 10,
VPT-Deep P=10 (issue 24's target: >= 3x today's steps/s). A step this small is bound by launches and host
syncs, not FLOPs.

  today                 fp32, the loss read on the host every step (the 2026-11 loop: loss.item())
  fp32_no_sync          fp32, the loss left on the device
  autocast / bf16_stored / bf16_stored_compiled   bf16 under autocast, stored in bf16, and compiled blocks
Each: steps/s and speed_vs_today. (The loop's own syncs are issue 24's item 1; this times the engine's step.)
"""
from __future__ import annotations

import time

from gpu_check.common import Record, sync
from gpu_check.measure import device_and_peak, engine_step, free_memory, inputs, prompted_config

VARIANTS = {  # key: (overrides, host sync every step)
    "today": ({"train.precision": "fp32"}, True),
    "fp32_no_sync": ({"train.precision": "fp32"}, False),
    "autocast": ({}, False),
    "bf16_stored": ({"model.dtype": "bf16"}, False),
    "bf16_stored_compiled": ({"model.dtype": "bf16", "train.compile": True}, False),
}


def run(rec: Record, ctx: dict) -> None:
    import torch

    from vipamin_scale.models import build_model

    s = ctx["sizes"]
    device, dev_name, _peak, _reason = device_and_peak()
    img, batch = s["fewshot_img"], s["fewshot_batch"]
    cfg = prompted_config(s["fewshot_model"], img, batch)
    torch.manual_seed(0)
    base = build_model(cfg, num_classes=100)  # measure.inputs draws labels in [0, 100)
    rec.data.update(model=f"{s['fewshot_model']} (random weights) + VPT-Deep P=10", img_size=img, batch=batch,
                    device=dev_name, engine="ddp (world 1)")
    for key, (overrides, host_sync) in VARIANTS.items():
        if overrides.get("train.compile") and not s["compile"]:
            rec.data[key] = {"skipped": "--smoke: no compile on the CPU (tests/test_gpu_paths.py checks it)"}
            continue

        def measure(overrides=overrides, host_sync=host_sync):
            step = engine_step(cfg, base, overrides, host_sync=host_sync)
            x, y = inputs(batch, img, device)
            for _ in range(s["fewshot_warmup"]):
                step(x, y)
            sync()
            t = time.perf_counter()  # one sync at the end: a per-step sync would time every variant as `today`
            for _ in range(s["fewshot_steps"]):
                step(x, y)
            sync()
            seconds = time.perf_counter() - t
            return {"steps": s["fewshot_steps"], "seconds": seconds, "steps_per_s": s["fewshot_steps"] / seconds}

        rec.item(key, measure)
        free_memory()
    today = (rec.data.get("today") or {}).get("steps_per_s")
    for key in VARIANTS:
        r = rec.data.get(key) or {}
        if today and r.get("steps_per_s"):
            r["speed_vs_today"] = r["steps_per_s"] / today
    rec.data["target"] = "speed_vs_today >= 3"
    rec.save()
