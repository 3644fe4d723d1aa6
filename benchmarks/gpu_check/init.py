"""init: the sharded initializer on the device: torchrun at 2 ranks, a 1-rank group, the capture on the GPU."""
from __future__ import annotations

import time
from pathlib import Path

from gpu_check.common import INIT_ARGS, Record, child_env, compose_config, cuda, run_all, torchrun


def _prompts(path: Path):
    from vipamin_scale.models.prompted import read_prompts_file

    return read_prompts_file(path)["prompts"].double()  # its digest checked


def device_prompts(cfg, device) -> "torch.Tensor":
    """VIPAMIN's prompts with the capture pass on `device` (what `init_size` times at size): the
    run_init pieces (Calibration, capture_layer_stats, reduce_means, vipamin_row), world size 1."""
    import torch

    from vipamin_scale.init.capture import CaptureSpec, capture_layer_stats
    from vipamin_scale.init.random import xavier_prompts
    from vipamin_scale.init.run import Calibration, vipamin_row
    from vipamin_scale.init.sharded import reduce_means
    from vipamin_scale.models import build_model

    model = build_model(cfg, num_classes=1).to(device)
    L_p, P, d = model.prompt_shape
    R = xavier_prompts(L_p, P, d, model.patch_size, cfg.init.seed)  # (L_p, P, d) float64
    batches = iter(Calibration(cfg, model))  # on the model's device
    sums = capture_layer_stats(model, batches, R.float().to(device),
                               CaptureSpec(layers=list(range(L_p)), match=True, attn_out=True))
    _, means = reduce_means(sums)
    return torch.stack([vipamin_row(cfg.init, model, means, R, {}, l)["prompts"] for l in range(L_p)])


def run(rec: Record, ctx: dict) -> None:
    """`vipamin-scale init` under torchrun at 2 ranks (NCCL on the one GPU, else gloo, recorded)
    and the capture on the GPU, each against run_init at world size 1 in this process (no
    process group: the CPU reference)."""
    import torch

    from vipamin_scale.init.run import read_prompts_metadata, run_init

    work = ctx["work"] / "init"
    work.mkdir(parents=True, exist_ok=True)
    gpu = cuda()
    t0 = time.perf_counter()

    def launch(backend: str) -> dict:
        cmd = torchrun(2, "init", *INIT_ARGS, f"out={work / f'w2_{backend}.safetensors'}",
                       f"hydra.run.dir={work / f'w2_{backend}_run'}")
        return {f"w2_{backend}": (cmd, child_env(VIPAMIN_SCALE_DIST_BACKEND=backend))}

    ref_path = work / "reference.safetensors"
    ref = rec.item("reference", lambda: {
        "B": run_init(compose_config([*INIT_ARGS, f"out={ref_path}"]), ref_path)["meta"]["B"], "device": "cpu",
        "world_size": 1})
    left = ctx["cap"] - 15 - (time.perf_counter() - t0)
    runs = run_all(launch("nccl" if gpu else "gloo"), work / "logs", left / 2 if gpu else left)
    if gpu and runs["w2_nccl"]["rc"] != 0:  # NCCL refuses two ranks on one GPU: gloo (with the GPU), recorded
        runs.update(run_all(launch("gloo"), work / "logs", ctx["cap"] - 15 - (time.perf_counter() - t0)))
    rec.data["runs"] = runs
    b = torch.zeros(0)
    if ref is not None:
        b = _prompts(ref_path)
    used = None
    for name, r in runs.items():
        if r["rc"] != 0 or ref is None:
            continue
        a = _prompts(work / f"{name}.safetensors")
        r["rel_max_diff"] = float((a - b).abs().max() / b.abs().max())
        r["world_size"] = read_prompts_metadata(work / f"{name}.safetensors")["world_size"]
        r["passed"] = r["rel_max_diff"] <= 1e-5 and r["world_size"] == 2
        used = used or (name.split("_")[1] if r["passed"] else None)
    rec.save()

    def on_device():
        device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        a = device_prompts(compose_config(INIT_ARGS), device)
        diff = float((a - b).abs().max() / b.abs().max())
        tol = 1e-2 if gpu else 1e-6  # cuDNN's TF32 convolution (the patch embedding) on a GPU
        return {"device": str(device), "rel_max_diff": diff, "tol": tol, "passed": diff <= tol}

    def world1_group():
        """run_init inside a 1-rank process group (NCCL with a GPU: every all-reduce takes the CPU
        statistics through the GPU and back); `vipamin-scale init` at world size 1 makes no group."""
        import torch.distributed as dist

        backend = "nccl" if gpu else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=torch.device("cuda", 0) if backend == "nccl" else None)
        try:
            path = work / f"w1_{backend}.safetensors"
            run_init(compose_config([*INIT_ARGS, f"out={path}"]), path)
        finally:
            dist.destroy_process_group()
        diff = float((_prompts(path) - b).abs().max() / b.abs().max())
        return {"backend": backend, "rel_max_diff": diff, "passed": diff <= 1e-5}

    w1 = rec.item("world1_group", world1_group) if ref is not None else None
    dev = rec.item("capture_on_device", on_device) if ref is not None else None
    rec.data.update(backend_world2=used, passed=used is not None and bool(dev and dev["passed"])
                    and bool(w1 and w1["passed"]))
    rec.save()

