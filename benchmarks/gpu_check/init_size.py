"""init_size: VIPAMIN-Deep at ViT-H/14, B = 256: the capture pass against a plain forward, the math."""
from __future__ import annotations

import time

from gpu_check.common import Record, cuda, sync
from gpu_check.measure import free_memory, synthetic_shards


def run(rec: Record, ctx: dict) -> None:
    import torch

    from vipamin_scale.config import default_config
    from vipamin_scale.init.capture import CaptureSpec, capture_layer_stats
    from vipamin_scale.init.random import xavier_prompts
    from vipamin_scale.init.run import Calibration, vipamin_row
    from vipamin_scale.init.sharded import reduce_means
    from vipamin_scale.models import build_model

    s = ctx["sizes"]
    device = torch.device("cuda", 0) if cuda() else torch.device("cpu")
    t = time.perf_counter()
    root = synthetic_shards(ctx["work"] / "init_size_shards", s["init_B"])
    shards_s = time.perf_counter() - t
    cfg = default_config(model__name=s["model"], model__img_size=s["img"], model__checkpoint=None, data__name="shards",
                         data__root=str(root), data__max_train_samples=None,
                         prompt__length=10, prompt__deep=True, init__method="vipamin", init__num_images=s["init_B"],
                         init__batch_size=s["init_batch"])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=1).to(device)
    L_p, P, d = model.prompt_shape
    t = time.perf_counter()
    calib = Calibration(cfg, model)
    batches = list(calib)  # on the model's device
    sync()
    rec.data.update(model=f"{s['model']} (random weights), VIPAMIN-Deep P={P}", B=calib.B, batch=s["init_batch"],
                    device=str(device), shards_s=round(shards_s, 2), load_s=time.perf_counter() - t)
    rec.save()
    R = xavier_prompts(L_p, P, d, model.patch_size, cfg.init.seed)  # (L_p, P, d) float64

    def timed(fn):
        free_memory()
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
        return out, time.perf_counter() - t, peak

    @torch.no_grad()
    def plain():
        model.eval()
        for x in batches:
            model.backbone.forward_features(x)

    _, rec.data["forward_s"], rec.data["forward_peak_mem_gib"] = timed(plain)
    rec.save()
    rows = list(range(L_p))
    spec = CaptureSpec(layers=rows, match=True, attn_out=True)
    sums, rec.data["capture_s"], rec.data["capture_peak_mem_gib"] = timed(
        lambda: capture_layer_stats(model, batches, R.float().to(device), spec))
    rec.data["capture_vs_forward"] = rec.data["capture_s"] / rec.data["forward_s"]
    rec.save()
    t = time.perf_counter()
    _B, means = reduce_means(sums)
    rec.data["reduce_s"] = time.perf_counter() - t
    t = time.perf_counter()
    prompts = torch.stack([vipamin_row(cfg.init, model, means, R, {}, l)["prompts"] for l in rows])
    rec.data.update(math_s=time.perf_counter() - t, math_device="cpu (float64)",
                    prompts_finite=bool(torch.isfinite(prompts).all()), prompt_shape=list(prompts.shape))
    rec.save()

    def on_device():
        """The math on the run's device (what run_init does since issue 24): CUDA's float64 on a GPU, after one
        warm-up layer (cuSOLVER's start); the prompts against the CPU's."""
        vipamin_row(cfg.init, model, means, R, {}, 0, device=device)
        sync()
        t = time.perf_counter()
        on_dev = torch.stack([vipamin_row(cfg.init, model, means, R, {}, l, device=device)["prompts"] for l in rows])
        seconds = time.perf_counter() - t
        diff = float((on_dev - prompts).abs().max())
        return {"device": str(device), "math_s": seconds, "max_abs_diff_vs_cpu": diff, "tol": 1e-10,
                "passed": diff <= 1e-10, "math_vs_capture": seconds / rec.data["capture_s"],
                "target": "math_vs_capture <= 0.25"}

    rec.item("math_on_device", on_device)

