"""engines: the sharding engines against ddp at batch 64 (issue 24's target: >= 0.8x ddp's images/s), ViT-H/14,
VPT-Deep P=10, bf16, in a 1-rank process group so that they shard as at world N (per-block gathers, hooks,
casts; the bytes stay on the one GPU).

  ddp, ddp_bf16_stored          the reference (model.dtype fp32 under autocast / bf16)
  fsdp2, fsdp2_bf16_stored      fully_shard per block with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)
  zero3                         DeepSpeed ZeRO-3 with engine/deepspeed.py's frozen-backbone tuning (leaf blocks,
                                persistence d², prefetch / live / reuse in blocks); DeepSpeed holds the module in bf16
Each records images/s, peak memory and speed_vs_ddp (against ddp of the same model.dtype; zero3 against ddp_bf16_stored).
"""
from __future__ import annotations

from gpu_check.common import Record
from gpu_check.measure import (device_and_peak, engine_step, free_memory, one_rank_group, prompted_config,
                               time_steps)

VARIANTS = {  # key: (overrides, the ddp run it is compared with)
    "ddp": ({"model.dtype": "fp32"}, None),
    "ddp_bf16_stored": ({"model.dtype": "bf16"}, None),
    "fsdp2": ({"engine.name": "fsdp2", "model.dtype": "fp32"}, "ddp"),
    "fsdp2_bf16_stored": ({"engine.name": "fsdp2", "model.dtype": "bf16"}, "ddp_bf16_stored"),
    "zero3": ({"engine.name": "deepspeed", "engine.zero_stage": 3, "model.dtype": "bf16"}, "ddp_bf16_stored"),
}


def run(rec: Record, ctx: dict) -> None:
    import torch

    from vipamin_scale.models import build_model

    s = ctx["sizes"]
    device, dev_name, _peak, _reason = device_and_peak()
    rec.data.update(backend=one_rank_group(), world_size=1, device=dev_name, batch=s["batch"], img_size=s["img"],
                    model=f"{s['model']} (random weights) + VPT-Deep P=10", precision="bf16")
    cfg = prompted_config(s["model"], s["img"], s["batch"])
    torch.manual_seed(0)
    base = build_model(cfg, num_classes=100)
    for key, (overrides, _ref) in VARIANTS.items():
        def measure(overrides=overrides):
            step = engine_step(cfg, base, overrides)
            return time_steps(step, s["batch"], s["img"], device, s["warmup"], s["steps"])

        rec.item(key, measure)
        free_memory()
    for key, (_overrides, ref) in VARIANTS.items():
        a, b = rec.data.get(key) or {}, rec.data.get(ref) or {}
        if ref and a.get("images_per_s") and b.get("images_per_s"):
            a["speed_vs_ddp"] = a["images_per_s"] / b["images_per_s"]
    rec.data["target"] = "speed_vs_ddp >= 0.8 (fsdp2*, zero3)"
    rec.data["target_met"] = all((rec.data.get(k) or {}).get("speed_vs_ddp", 0) >= 0.8
                                 for k, (_o, ref) in VARIANTS.items() if ref)
    rec.save()
