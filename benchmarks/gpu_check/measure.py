"""Timing a training step: the bare timm + torch reference step, random inputs on the device, median
step time, the largest batch that fits, model FLOPs per image (shared by throughput and the newer sections)."""
from __future__ import annotations

import copy
import gc
import os
import time
from pathlib import Path
from typing import Any

from gpu_check.common import sync


def bare_prompted_step(backbone, prompts, head, opt, activation_checkpointing: bool, dtype):
    """A bare timm + torch training step with VPT-Deep prompts: the same math as PromptedViT with
    CLS pooling (cat CLS, prompts of the layer, patches; replace the prompts before each block;
    final norm, CLS token, head), written from timm's modules directly."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    device_type = prompts.device.type

    def step(images, labels):
        with torch.autocast(device_type, dtype=dtype):
            x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(images))))
            B, P = x.shape[0], prompts.shape[1]
            x = torch.cat([x[:, :1], prompts[0].expand(B, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
            for layer, block in enumerate(backbone.blocks):
                if layer > 0:
                    x = torch.cat([x[:, :1], prompts[layer].expand(B, -1, -1).to(x.dtype), x[:, 1 + P:]], dim=1)
                x = checkpoint(block, x, use_reentrant=False) if activation_checkpointing else block(x)
            logits = head(backbone.norm(x)[:, 0])
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def inputs(batch: int, img: int, device):
    """A random batch made on the device (a host-side randn of a large batch would take seconds)."""
    import torch

    torch.manual_seed(batch)
    return (torch.empty(batch, 3, img, img, device=device).normal_(),
            torch.randint(0, 100, (batch,), device=device))


def time_steps(step, batch: int, img: int, device, warmup: int, steps: int) -> dict[str, Any]:
    import torch

    x, y = inputs(batch, img, device)
    free_memory()
    for _ in range(warmup):
        step(x, y)
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step(x, y)
        sync()
        times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
    return {"batch": batch, "step_s": med, "images_per_s": batch / med, "peak_mem_gib": peak,
            "loss": float(loss.detach()), "step_s_all": times}


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def largest_batch(step, img: int, device, start: int, limit: int, cap_s: float) -> dict[str, Any]:
    """The largest batch whose step runs: doubling from `start`, then bisection between the last
    batch that ran and the first that ran out of memory (to 1/8 of the former), until `limit`
    or `cap_s` seconds (a probe is not started when its predicted time, from the last one, would
    pass the cap). OOM is caught and the allocator's cache emptied after each failure."""
    t_end = time.perf_counter() + cap_s

    def no_time(next_b: int) -> bool:
        predicted = (step_s or 0.0) * next_b / max(ok, 1)
        return time.perf_counter() + predicted > t_end

    def fits(b: int) -> tuple[bool, float]:
        x = y = None
        try:
            x, y = inputs(b, img, device)
            t = time.perf_counter()
            step(x, y)
            sync()
            return True, time.perf_counter() - t
        except Exception as exc:  # OOM only; anything else is a failure of the section's item
            if not is_oom(exc):
                raise
            return False, 0.0
        finally:
            del x, y
            free_memory()

    ok, bad, b, step_s, stopped = 0, None, start, None, "limit"
    while b <= limit:
        if no_time(b):
            stopped = "time"
            break
        fit, s = fits(b)
        if not fit:
            bad, stopped = b, "oom"
            break
        ok, step_s, b = b, s, b * 2
    while bad is not None and bad - ok > max(1, ok // 8):
        mid = (ok + bad) // 2
        if no_time(mid):
            stopped = "time"
            break
        fit, s = fits(mid)
        if fit:
            ok, step_s = mid, s
        else:
            bad = mid
    return {"largest_batch": ok, "first_oom": bad, "stopped_by": stopped, "step_s_at_largest": step_s,
            "images_per_s_at_largest": ok / step_s if step_s else None}


def count_flops_per_image(step, img: int, device, batch: int = 2) -> tuple[float, dict]:
    """Model FLOPs of one training step per image: torch's FlopCounterMode over a step at `batch`,
    with SDPA's math backend (its matmuls are counted on every device; the fused kernels do the
    same products)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x, y = inputs(batch, img, device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step(x, y)
    by_op = {str(k): v / batch for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops() / batch, by_op



def synthetic_shards(root: Path, n: int) -> Path:
    """`n` JPEGs of ImageNet-like sizes (bench_data.make_images) written as train shards."""
    from bench_data import make_images

    from vipamin_scale.data.shards import write_dataset

    write_dataset({"train": make_images(n)}, [str(c) for c in range(10)], root, maxcount=128, verify=False)
    return root



def device_and_peak() -> tuple["torch.device", str, Any, Any]:
    """(device, its name, peak bf16 FLOP/s or None, why None): the one GPU, else the CPU."""
    import torch

    from gpu_check.common import cuda, peak_bf16

    device = torch.device("cuda", 0) if cuda() else torch.device("cpu")
    name = torch.cuda.get_device_name(0) if cuda() else "cpu"
    return (device, name, *peak_bf16(name))


def prompted_config(model: str, img: int, batch: int, **overrides):
    """The config of a timing model: `model` with random weights, VPT-Deep P=10, train.precision=bf16."""
    from vipamin_scale.config import default_config

    return default_config(model__name=model, model__img_size=img, model__checkpoint=None, prompt__length=10,
                          prompt__deep=True, train__precision="bf16", data__batch_size=batch, **overrides)


def bare_step(base, device, activation_checkpointing: bool = False):
    """The bare timm + torch step (`bare_prompted_step`, fp32 weights under bf16 autocast) on a copy of `base`."""
    import torch

    m = copy.deepcopy(base).to(device)
    prompts = torch.nn.Parameter(m.prompt().detach().clone())
    opt = torch.optim.AdamW([prompts, *m.head.parameters()], lr=1e-3)
    return bare_prompted_step(m.backbone, prompts, m.head, opt, activation_checkpointing, torch.bfloat16)


def engine_step(cfg, base, overrides: dict[str, Any], host_sync: bool = False):
    """Our step: a copy of `base` through the engine `cfg` + `overrides` (dotted fields) builds, as the train loop
    calls it (forward, loss, backward, step). `host_sync`: read the loss on the host every step, as the loop of
    2026-11 does (`loss.item()`), instead of leaving it on the device."""
    from omegaconf import OmegaConf

    from vipamin_scale.engine import build_engine
    from vipamin_scale.models.prompted import cross_entropy

    c = copy.deepcopy(cfg)
    for key, value in overrides.items():
        OmegaConf.update(c, key, value, merge=False)
    eng = build_engine(c, copy.deepcopy(base), total_steps=10 ** 6, warmup_steps=0, lr=1e-3)
    eng.model.train()

    def step(images, labels):
        loss = cross_entropy(eng.forward(images), labels)
        eng.backward(loss)
        eng.step()
        if host_sync:
            loss.item()
        return loss
    return step


def with_mfu(out: dict[str, Any], flops_per_image: Any, peak: Any, reason: Any) -> dict[str, Any]:
    """`out` (a `time_steps` result) with its MFU: model FLOPs x images/s / the device's peak (None without one)."""
    if flops_per_image and peak:
        out["mfu"] = flops_per_image * out["images_per_s"] / peak
    else:
        out["mfu"], out["mfu_note"] = None, reason or "model FLOPs not counted"
    return out


def one_rank_group():
    """A 1-rank process group (NCCL on the GPU, gloo on the CPU) so that fsdp2 and ZeRO-3 shard at world 1
    as they would at world N (their per-block gathers, hooks and casts run; the bytes stay local)."""
    import torch
    import torch.distributed as dist

    from gpu_check.common import cuda

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        os.environ.setdefault(key, value)  # what torchrun sets; DeepSpeed reads LOCAL_RANK
    if not dist.is_initialized():
        backend = "nccl" if cuda() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=torch.device("cuda", 0) if backend == "nccl" else None)
    return dist.get_backend()
