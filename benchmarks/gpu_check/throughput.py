"""throughput: ViT-H/14, VPT-Deep P=10, bf16: our step through the engines against a bare timm loop."""
from __future__ import annotations

import time

from gpu_check.common import Record, failure
from gpu_check.measure import (bare_step, count_flops_per_image, device_and_peak, engine_step, free_memory,
                               largest_batch, prompted_config, time_steps, with_mfu)


def run(rec: Record, ctx: dict) -> None:
    import torch

    from vipamin_scale.models import build_model

    s = ctx["sizes"]
    device, dev_name, peak, reason = device_and_peak()
    cfg = prompted_config(s["model"], s["img"], s["batch"])
    t = time.perf_counter()
    torch.manual_seed(0)
    base = build_model(cfg, num_classes=100)  # random weights: speed and memory do not depend on them
    rec.data.update(model=f"{s['model']} (random weights) + VPT-Deep P=10, frozen backbone, 100 classes",
                    img_size=s["img"], precision="bf16", device=dev_name, batch=s["batch"],
                    build_s=round(time.perf_counter() - t, 1), peak_bf16_flops=peak, peak_note=reason,
                    prompt_shape=list(base.prompt_shape),
                    precision_note="bare and ddp: fp32 weights under bf16 autocast; zero3: DeepSpeed holds the "
                                   "module in bf16 (fp32 master copy of the trainable parameters)")
    rec.save()

    def bare(ac: bool):
        return bare_step(base, device, ac)

    def ours(engine: str, ac: bool):
        over = {"engine.activation_checkpointing": ac}
        if engine == "zero3":
            over.update({"engine.name": "deepspeed", "engine.zero_stage": 3})
        return engine_step(cfg, base, over)

    def flops():
        step = bare(False)
        per_image, by_op = count_flops_per_image(step, s["img"], device)
        return {"flops_per_image": per_image, "by_op": by_op,
                "note": "forward + backward to the prompts' inputs (frozen weights get no gradient)"}

    counted = rec.item("model_flops", flops)
    free_memory()
    variants = [("bare", False), ("bare", True), ("ddp", False), ("ddp", True), ("zero3", False), ("zero3", True)]
    for kind, ac in variants:  # DeepSpeed last: it starts a process group
        key = f"{kind}{'_ac' if ac else ''}"

        def measure(kind=kind, ac=ac):
            step = bare(ac) if kind == "bare" else ours(kind, ac)
            out = {"step": "bare timm + torch" if kind == "bare" else f"PromptedViT via Engine ({kind})",
                   "activation_checkpointing": ac}
            out.update(time_steps(step, s["batch"], s["img"], device, s["warmup"], s["steps"]))
            with_mfu(out, (counted or {}).get("flops_per_image"), peak, reason)
            rec.data[key] = out
            rec.save()
            try:
                out.update(largest_batch(step, s["img"], device, s["search_start"], s["search_limit"],
                                         s["search_cap_s"]))
            except Exception as exc:  # e.g. an engine left inconsistent by an OOM: keep the timing above
                out["largest_batch_error"] = failure(exc)
            if out.get("images_per_s_at_largest") and counted and peak:
                out["mfu_at_largest"] = counted["flops_per_image"] * out["images_per_s_at_largest"] / peak
            return out

        rec.item(key, measure)
        free_memory()
    for key in ("bare_ac", "ddp", "ddp_ac", "zero3", "zero3_ac"):
        ref = "bare_ac" if key.endswith("_ac") else "bare"
        a, b = rec.data.get(key) or {}, rec.data.get(ref) or {}
        if a.get("images_per_s") and b.get("images_per_s"):
            a["speed_vs_" + ref] = a["images_per_s"] / b["images_per_s"]
    rec.save()

