"""GPU readiness in one prepared run: correctness on CUDA, throughput against the device's limit,
the initializer at size, the loaders. Writes benchmarks/results/gpu.json and the gpu-check section
of benchmarks/RESULTS.md.

    make gpu-check                                    # on a GPU machine, at most ~8 minutes (one H200)
    python benchmarks/gpu_check.py [--budget-s 470]   # the same
    python benchmarks/gpu_check.py --smoke [--out DIR]  # the same code paths on CPU, tiny sizes (< 3 min):
                                                      # DIR/gpu.json, DIR/RESULTS.md (default: a new tmp dir)

Without a GPU and without --smoke: one line saying so, exit 2.

Sections, in this order, each in its own process (killed at its time cap, so one hang cannot eat
the budget; a failure is recorded with its one-line message and where it happened, and the next
section runs). gpu.json and RESULTS.md are rewritten after every section, so a run killed from
outside still leaves what it measured.

  env         device, driver, torch / CUDA / cuDNN / NCCL, DeepSpeed, DALI, timm versions.
  train       `vipamin-scale train` (the CLI, tiny model, a few steps) under engine=ddp, zero2 and
              zero3 with activation checkpointing, each in fp32 and bf16, all at once; every loss
              finite, fp32 loss curves equal to the CPU DDP fp32 run's, bf16 close to fp32's.
  init        the sharded initializer (VIPAMIN-Deep, tiny model): run_init without a process group
              (the CPU reference); run_init in a 1-rank NCCL group (CPU statistics all-reduced
              through the GPU); `vipamin-scale init` under torchrun at 2 processes on the one GPU
              (NCCL, and gloo when NCCL refuses 2 ranks on one device: recorded); the capture
              pass on the GPU. Prompts equal to the reference.
  dali        the DALI loader (`mixed` decode on the GPU; CPU decode in --smoke) against the
              webdataset loader on the same shards: eval keys equal in order, train keys equal
              as sets; the largest pixel difference is recorded.
  throughput  ViT-H/14 at 224 px, VPT-Deep P=10, frozen backbone, bf16: our step (PromptedViT
              through our Engine: DDP, DeepSpeed ZeRO-3 at world 1) and a bare timm + torch loop
              doing the same math, in one process, with and without activation checkpointing:
              images/s at one batch, MFU, peak CUDA memory, and the largest batch that fits.
              MFU = model FLOPs (forward + backward to the prompts' inputs, counted with
              torch.utils.flop_counter on the bare step; recomputation not counted) x images/s /
              the device's peak dense bf16 FLOP/s (PEAK_BF16; an unknown device gets MFU null).
  init_size   ViT-H/14 VIPAMIN-Deep with B=256 calibration images (synthetic JPEG shards): the
              capture pass on the GPU against the same images' plain forward, the math, peak memory.
  data        images/s at 224 px: DALI `mixed`, DALI CPU, webdataset + PIL (benchmarks/bench_data.py).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "benchmarks"))

from vipamin_scale.launch import command as torchrun  # noqa: E402
from vipamin_scale.paths import atomic_write_bytes, portable, write_marked_section  # noqa: E402

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
RESULTS_JSON = REPO / "benchmarks" / "results" / "gpu.json"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"

# Peak dense (no sparsity) bf16 tensor FLOP/s by device name (substring of torch's name), from the
# vendors' data sheets. A device not listed gets MFU null with the reason.
PEAK_BF16 = {"H200": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.5e12, "A100": 312e12,
             "L40S": 362.05e12, "B200": 2250e12}

# name: (time cap on a GPU, time cap in --smoke), seconds. The GPU caps keep one hang from eating
# the device's minutes; the smoke caps only stop a hang (a shared 2-core machine is slow).
SECTIONS: dict[str, tuple[float, float]] = {
    "env": (45, 120), "train": (150, 300), "init": (120, 300), "dali": (60, 180), "throughput": (180, 300),
    "init_size": (100, 180), "data": (75, 180)}
BUDGET_S = {"gpu": 470.0, "smoke": 1200.0}  # the whole run (--budget-s)
CORRECTNESS = ("train", "init", "dali")  # sections whose result carries `passed`


def sizes(smoke: bool) -> dict[str, Any]:
    """Every size the sections use: the real ones, or the smoke run's tiny ones."""
    if smoke:
        return dict(model="vit_test_d64", img=32, batch=2, search_start=2, search_limit=4, search_cap_s=10,
                    warmup=1, steps=2, init_B=16, init_batch=8, data_images=32, data_batch=8, data_threads=1,
                    data_epochs=2)
    return dict(model="vit_huge_patch14_224", img=224, batch=64, search_start=64, search_limit=8192,
                search_cap_s=20, warmup=2, steps=5, init_B=256, init_batch=32, data_images=512, data_batch=64,
                data_threads=8, data_epochs=3)


# TINY correctness runs: the test suite's tiny ViT on the digits, 4 steps, then the val split.
TRAIN_ARGS = ["model=vit_test_d64", "model.pool=mean", "data=digits", "data.max_train_samples=64",
              "data.batch_size=16", "data.eval_batch_size=128", "train.epochs=1", "train.lr=0.5",
              "train.warmup_epochs=0", "train.log_every=1", "train.progress=false", "prompt.length=4",
              "train.test_at_end=false"]
TRAIN_RUNS = [("ddp", "fp32", False), ("ddp", "bf16", False), ("zero2", "fp32", False), ("zero2", "bf16", False),
              ("zero3", "fp32", True), ("zero3", "bf16", True)]
INIT_ARGS = ["model=vit_test_d64", "data=digits", "prompt.length=4", "init=vipamin", "init.num_images=64",
             "init.batch_size=16", "init.k=2"]


# ----------------------------------------------------------------------------- small helpers


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def where(exc: BaseException) -> str:
    """The innermost frame of the traceback in this repository (else the innermost): file:line in function."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if str(REPO) in f.filename] or frames
    if not ours:
        return ""
    f = ours[-1]
    return f"{os.path.relpath(f.filename, REPO) if str(REPO) in f.filename else f.filename}:{f.lineno} in {f.name}"


def failure(exc: BaseException) -> dict[str, str]:
    return {"error": one_line(exc), "where": where(exc)}


def write_json(path: Path, doc: dict) -> None:
    atomic_write_bytes(path, (json.dumps(doc, indent=2, default=str) + "\n").encode())


def last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.is_file() else []
    return lines[-1][:500] if lines else ""


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)) if cuda() else "1")
    env.update(extra)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vipamin_scale.cli", *args]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every descendant (torchrun starts its workers in sessions of their own,
    so a process group does not reach them): the tree is read before anything is killed."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [*family]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.kill()
    proc.wait()


def run_all(cmds: dict[str, tuple[list[str], dict]], logs: Path, timeout: float) -> dict[str, dict]:
    """Run the commands at once (logged to logs/<name>.log); kill what is still running at
    `timeout`. Returns {name: {rc, seconds, log, error?}}."""
    logs.mkdir(parents=True, exist_ok=True)
    procs, out = {}, {}
    t0 = time.perf_counter()
    for name, (cmd, env) in cmds.items():
        log = logs / f"{name}.log"
        with open(log, "w") as f:
            procs[name] = (subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT), log)
    for name, (proc, log) in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            rc = None
        out[name] = {"rc": rc, "seconds": round(time.perf_counter() - t0, 2), "log": str(log)}
        if rc != 0:
            out[name]["error"] = f"timed out after {timeout:.0f} s" if rc is None else (last_line(log) or f"exit {rc}")
    return out


class Record:
    """A section's result dict, written atomically to its file after every item (a killed section
    leaves what it had)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {}

    def save(self) -> None:
        write_json(self.path, self.data)

    def item(self, key: str, fn: Callable[[], Any]) -> Any:
        """`data[key] = fn()`, or the failure it met; saved either way. Returns the value (None on failure)."""
        try:
            value = fn()
        except Exception as exc:  # recorded; the section goes on with its next item
            self.data[key] = failure(exc)
            traceback.print_exc()
            value = None
        else:
            self.data[key] = value
        self.save()
        return value


# ----------------------------------------------------------------------------- sections


def section_env(rec: Record, ctx: dict) -> None:
    import importlib.metadata as md

    import torch

    def version(*dists: str) -> Optional[str]:
        for d in dists:
            try:
                return f"{d} {md.version(d)}"
            except md.PackageNotFoundError:
                continue
        return None

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                            "cpu_count": os.cpu_count(), "deepspeed": version("deepspeed"), "timm": version("timm"),
                            "dali": version("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"),
                            "webdataset": version("webdataset"), "smoke": ctx["smoke"]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                    capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2 ** 30, 1),
                    cudnn=torch.backends.cudnn.version(), nccl=_nccl_version())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["driver"] = None
            info["driver_error"] = one_line(exc)
    else:
        info.update(device="cpu", driver=None)
    peak, reason = peak_bf16(info["device"])
    info.update(peak_bf16_flops=peak, peak_note=reason)
    rec.data.update(info)
    rec.save()


def _nccl_version() -> Optional[str]:
    import torch

    try:
        v = torch.cuda.nccl.version()
    except Exception as exc:  # a build without NCCL
        return f"unavailable ({one_line(exc)})"
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def peak_bf16(device: str) -> tuple[Optional[float], Optional[str]]:
    for key, value in PEAK_BF16.items():
        if key in device:
            return value, None
    return None, f"no peak bf16 FLOP/s known for device {device!r} (gpu_check.PEAK_BF16)"


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


def compose_config(overrides: list[str]):
    """The config `vipamin-scale train <overrides>` would run with (`vipamin_scale.compose`)."""
    from vipamin_scale import compose

    return compose(overrides)


def section_train(rec: Record, ctx: dict) -> None:
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


def _prompts(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))["prompts"].double()


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


def section_init(rec: Record, ctx: dict) -> None:
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


def section_dali(rec: Record, ctx: dict) -> None:
    import torch

    from vipamin_scale.config import default_config
    from vipamin_scale.data import build_loader
    from vipamin_scale.data.digits import digits_root

    root = digits_root()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

    def loader(backend: str, split: str, train: bool):
        # wds: no worker processes (with workers, the eval batches come worker block by worker block,
        # a different order than one stream); DALI: 2 CPU threads
        cfg = default_config().data
        cfg.name, cfg.root, cfg.backend, cfg.batch_size = "shards", str(root), backend, 16
        cfg.num_workers = 2 if backend == "dali" else 0
        return build_loader(cfg, split, train=train, img_size=32, mean=mean, std=std, seed=0, batch_size=16)

    def epoch(ld) -> tuple[list[str], list[torch.Tensor]]:
        ld.set_epoch(0)
        keys, images = [], []
        for x, _y, k in ld:
            keys.extend(k)
            images.append(x.float().cpu())
        return keys, images

    t = time.perf_counter()
    dali_val = loader("dali", "val", False)
    rec.data["dali_device"] = "cpu" if dali_val.device_id is None else f"cuda:{dali_val.device_id} (mixed decode)"
    kv, iv = epoch(dali_val)
    rv, jv = epoch(loader("wds", "val", False))
    kt, _ = epoch(loader("dali", "train", True))
    rt, _ = epoch(loader("wds", "train", True))
    diff = max(float((a - b).abs().max()) for a, b in zip(iv, jv)) if len(iv) == len(jv) and iv else None
    rec.data.update(eval_keys=len(kv), eval_keys_equal_in_order=kv == rv, train_keys=len(kt),
                    train_keys_equal_as_sets=sorted(kt) == sorted(rt) and len(kt) == len(set(kt)),
                    eval_max_abs_pixel_diff_normalized=diff, seconds=round(time.perf_counter() - t, 2))
    rec.data["passed"] = bool(kv) and rec.data["eval_keys_equal_in_order"] and rec.data["train_keys_equal_as_sets"]
    rec.save()


# -- throughput


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


def section_throughput(rec: Record, ctx: dict) -> None:
    import torch

    from vipamin_scale.config import default_config
    from vipamin_scale.engine import build_engine
    from vipamin_scale.models import build_model
    from vipamin_scale.models.prompted import cross_entropy

    s = ctx["sizes"]
    device = torch.device("cuda", 0) if cuda() else torch.device("cpu")
    dev_name = torch.cuda.get_device_name(0) if cuda() else "cpu"
    peak, reason = peak_bf16(dev_name)
    cfg = default_config(model__name=s["model"], model__img_size=s["img"], model__checkpoint=None, prompt__length=10,
                         prompt__deep=True, train__precision="bf16", data__batch_size=s["batch"])
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
        m = copy.deepcopy(base).to(device)
        prompts = torch.nn.Parameter(m.prompt().detach().clone())
        opt = torch.optim.AdamW([prompts, *m.head.parameters()], lr=1e-3)
        return bare_prompted_step(m.backbone, prompts, m.head, opt, ac, torch.bfloat16)

    def ours(engine: str, ac: bool):
        c = copy.deepcopy(cfg)
        c.engine.activation_checkpointing = ac
        if engine == "zero3":
            c.engine.name, c.engine.zero_stage = "deepspeed", 3
        eng = build_engine(c, copy.deepcopy(base), total_steps=10 ** 6, warmup_steps=0, lr=1e-3)
        eng.model.train()

        def step(images, labels):
            loss = cross_entropy(eng.forward(images), labels)
            eng.backward(loss)
            eng.step()
            return loss
        return step

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
            if counted and peak:
                out["mfu"] = counted["flops_per_image"] * out["images_per_s"] / peak
            else:
                out["mfu"], out["mfu_note"] = None, reason or "model FLOPs not counted"
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


# -- the initializer at size


def synthetic_shards(root: Path, n: int) -> Path:
    """`n` JPEGs of ImageNet-like sizes (bench_data.make_images) written as train shards."""
    from bench_data import make_images

    from vipamin_scale.data.shards import write_dataset

    write_dataset({"train": make_images(n)}, [str(c) for c in range(10)], root, maxcount=128, verify=False)
    return root


def section_init_size(rec: Record, ctx: dict) -> None:
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


def section_data(rec: Record, ctx: dict) -> None:
    import torch
    from bench_data import epoch, make_images, make_loader

    from vipamin_scale.data.shards import write_dataset

    s = ctx["sizes"]
    root = ctx["work"] / "data_shards"
    samples = make_images(s["data_images"])
    write_dataset({"train": samples}, [str(c) for c in range(10)], root, maxcount=128, verify=False)
    setups = [("wds", False), ("dali", False)] + ([("dali", True)] if torch.cuda.is_available() else [])
    rec.data.update(images=s["data_images"], batch=s["data_batch"], threads=s["data_threads"], epochs=s["data_epochs"],
                    img_size=224, transform="decode + RandomResizedCrop(224) + flip + normalize (bench_data.py)")
    for backend, gpu in setups:
        key = "dali_mixed" if gpu else ("dali_cpu" if backend == "dali" else "wds_pil")

        def measure(backend=backend, gpu=gpu):
            loader = make_loader(backend, root, s["data_threads"], s["data_batch"], gpu)
            times, n = [], 0
            for number in range(s["data_epochs"]):
                seconds, n = epoch(loader, number, gpu)
                times.append(seconds)
            best = min(times[1:] or times)
            return {"images_per_s": n / best, "epoch_s_all": times, "images_per_epoch": n}

        rec.item(key, measure)


SECTION_FUNCS: dict[str, Callable[[Record, dict], None]] = {
    "env": section_env, "train": section_train, "init": section_init, "dali": section_dali,
    "throughput": section_throughput, "init_size": section_init_size, "data": section_data}


# ----------------------------------------------------------------------------- the report


def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def results_section(doc: dict) -> str:
    secs = doc["sections"]
    env = (secs.get("env") or {}).get("result") or {}
    lines = [BEGIN, "## GPU readiness (`make gpu-check`, benchmarks/gpu_check.py)", "",
             f"Device: **{env.get('device', '?')}** (driver {env.get('driver') or '?'}, {env.get('memory_gib', '?')} GiB); "
             f"torch {env.get('torch', '?')}, CUDA {env.get('cuda_build') or '–'}, cuDNN {env.get('cudnn') or '–'}, "
             f"NCCL {env.get('nccl') or '–'}; {env.get('deepspeed') or 'deepspeed ?'}, {env.get('dali') or 'DALI ?'}, "
             f"{env.get('timm') or 'timm ?'}.", "",
             f"Command: `{doc['meta']['command']}`, {doc['meta']['started']}, "
             f"{fmt(doc['meta'].get('seconds'), '.0f')} s{' (CPU smoke run: tiny sizes, figures not meaningful)' if doc['meta']['smoke'] else ''}.",
             "", "| section | status | s | passed | note |", "|---|---|---|---|---|"]
    for name in SECTIONS:
        sec = secs.get(name)
        if not sec:
            continue
        res = sec.get("result") or {}
        note = sec.get("error") or ""
        lines.append(f"| {name} | {sec['status']} | {fmt(sec.get('seconds'), '.0f')} | "
                     f"{fmt(res.get('passed')) if name in CORRECTNESS else ''} | {note.replace('|', '/')[:160]} |")
    train = (secs.get("train") or {}).get("result") or {}
    runs = [(k, v) for k, v in train.items() if isinstance(v, dict) and "passed" in v]
    if runs:
        lines += ["", f"Training runs (tiny ViT, 4 steps, on {train.get('device')}): max relative loss difference "
                  "against the reference curve: " + ", ".join(
                      f"{k} {fmt(v.get('max_rel_diff'), '.1e')} ({'ok' if v['passed'] else 'FAIL'})"
                      for k, v in runs if k != train.get("reference")) + "."]
    tr = (secs.get("throughput") or {}).get("result") or {}
    if tr:
        flops = (tr.get("model_flops") or {}).get("flops_per_image")
        lines += ["", f"Throughput: {tr.get('model')}, {tr.get('img_size')} px, bf16, batch {tr.get('batch')}; "
                  f"model FLOPs/image {fmt(flops)}; peak {fmt(tr.get('peak_bf16_flops'))} FLOP/s.", "",
                  "| step | act. ckpt | images/s | MFU | peak mem GiB | vs bare | largest batch | images/s there |",
                  "|---|---|---|---|---|---|---|---|"]
        for key in ("bare", "bare_ac", "ddp", "ddp_ac", "zero3", "zero3_ac"):
            r = tr.get(key)
            if not r:
                continue
            if "error" in r and "images_per_s" not in r:
                lines.append(f"| {key} | | failed: {r['error'][:120]} | | | | | |")
                continue
            vs = r.get("speed_vs_bare", r.get("speed_vs_bare_ac"))
            lines.append(f"| {r.get('step')} | {r.get('activation_checkpointing')} | {fmt(r.get('images_per_s'), '.1f')} | "
                         f"{fmt(r.get('mfu'), '.1%') if r.get('mfu') is not None else '–'} | {fmt(r.get('peak_mem_gib'), '.1f')} | "
                         f"{fmt(vs, '.2f')} | {r.get('largest_batch', '–')} ({r.get('stopped_by', '')}) | "
                         f"{fmt(r.get('images_per_s_at_largest'), '.1f')} |")
    ini = (secs.get("init_size") or {}).get("result") or {}
    if ini.get("capture_s") is not None:
        lines += ["", f"Initializer at size: {ini.get('model')}, B = {ini.get('B')} on {ini.get('device')}: capture "
                  f"{fmt(ini.get('capture_s'))} s vs plain forward {fmt(ini.get('forward_s'))} s "
                  f"({fmt(ini.get('capture_vs_forward'), '.2f')}x; peak {fmt(ini.get('capture_peak_mem_gib'))} vs "
                  f"{fmt(ini.get('forward_peak_mem_gib'))} GiB), math {fmt(ini.get('math_s'))} s "
                  f"({ini.get('math_device')})."]
    da = (secs.get("data") or {}).get("result") or {}
    rows = [(k, da[k]) for k in ("wds_pil", "dali_cpu", "dali_mixed") if isinstance(da.get(k), dict)]
    if rows:
        lines += ["", f"Loaders at 224 px ({da.get('images')} JPEGs, batch {da.get('batch')}, {da.get('threads')} "
                  "threads/workers, best epoch after the first): " + ", ".join(
                      f"{k} {fmt(v.get('images_per_s'), '.0f')} images/s" if "images_per_s" in v else f"{k} failed"
                      for k, v in rows) + "."]
    lines.append(END)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver


def run_section(name: str, cap: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run one section in its own process group, killed at `cap` seconds. Returns its record:
    status ok | failed | timeout, seconds, result (what the section wrote, partial if it died),
    error and where (one line each) when it did not finish."""
    result_file, log = work / f"{name}.json", work / f"{name}.log"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--work", str(work),
           "--cap", str(cap)] + (["--smoke"] if args.smoke else [])
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            rc = None
    rec: dict[str, Any] = {"seconds": round(time.perf_counter() - t, 1), "log": str(log)}
    try:
        rec["result"] = json.loads(result_file.read_text()) if result_file.is_file() else {}
    except ValueError as exc:
        rec["result"] = {}
        rec["result_error"] = one_line(exc)
    res = rec["result"]
    if rc is None:
        rec.update(status="timeout", error=f"timed out after {cap:.0f} s (killed); last log line: {last_line(log)}")
    elif rc != 0:
        rec.update(status="failed", error=res.get("error") or last_line(log) or f"exit {rc}", where=res.get("where", ""))
    else:
        rec["status"] = "ok"
        failed_items = [k for k, v in res.items() if isinstance(v, dict) and "error" in v and len(v) <= 2]
        if failed_items:
            rec["error"] = "; ".join(f"{k}: {res[k]['error']}" for k in failed_items)
        if name in CORRECTNESS and not res.get("passed"):
            rec.update(status="failed", error=rec.get("error") or "a correctness comparison did not pass (see result)")
    return rec


def child(args: argparse.Namespace) -> int:
    import shutil

    work = Path(args.work)
    rec = Record(work / f"{args.child}.json")
    scratch = work / args.child  # this section's own, emptied first (a rerun must not append to old runs)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    ctx = {"smoke": args.smoke, "work": scratch, "cap": args.cap, "sizes": sizes(args.smoke)}
    try:
        SECTION_FUNCS[args.child](rec, ctx)
    except Exception as exc:
        rec.data.update(failure(exc))
        rec.save()
        traceback.print_exc()
        return 1
    return 0


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the same code paths on the CPU with tiny sizes (< 3 min)")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory for gpu.json and (with --smoke) RESULTS.md; default benchmarks/results, "
                         "with --smoke a new temporary directory")
    ap.add_argument("--results-md", type=Path, default=None,
                    help="markdown file whose gpu-check section is replaced; default benchmarks/RESULTS.md "
                         "(with --smoke: OUT/RESULTS.md)")
    ap.add_argument("--work", type=Path, default=None, help="scratch and per-section logs (default .cache/gpu_check; "
                    "with --smoke OUT/gpu_check_work)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"the whole run's time (default {BUDGET_S['gpu']:.0f} s, with --smoke {BUDGET_S['smoke']:.0f} s); "
                         "a section gets min(its cap, what is left)")
    ap.add_argument("--only", default=None, help="comma-separated sections to run (default: all, in order)")
    ap.add_argument("--child", choices=list(SECTION_FUNCS), help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = BUDGET_S["smoke" if args.smoke else "gpu"]
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(SECTIONS))
        if unknown:
            ap.error(f"--only: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    if args.child:
        return child(args)
    if not args.smoke and not cuda():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or pass --smoke for the CPU smoke run", file=sys.stderr)
        return 2
    committed = {RESULTS_JSON.parent.resolve(), RESULTS_MD.resolve()}
    if args.smoke:
        out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_smoke_"))
        md = args.results_md or out / "RESULTS.md"
        if out.resolve() in committed or md.resolve() in committed:
            print("gpu_check: --smoke writes tiny-size figures; it never replaces the committed "
                  "benchmarks/results/gpu.json or benchmarks/RESULTS.md (pick another --out / --results-md)",
                  file=sys.stderr)
            return 2
    else:
        out, md = args.out or RESULTS_JSON.parent, args.results_md or RESULTS_MD
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or (out / "gpu_check_work" if args.smoke else REPO / ".cache" / "gpu_check")
    work.mkdir(parents=True, exist_ok=True)
    json_path = out / "gpu.json"
    names = [n for n in SECTIONS if not args.only or n in args.only.split(",")]
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"meta": {"command": " ".join(["python benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
                                    "smoke": args.smoke, "budget_s": args.budget_s,
                                    "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                           "sections": {}}
    for name in names:
        left = args.budget_s - (time.perf_counter() - t0)
        cap = min(SECTIONS[name][1 if args.smoke else 0], left)
        if cap < 5:
            doc["sections"][name] = {"status": "skipped", "seconds": 0.0, "result": {},
                                     "error": f"not run: the --budget-s of {args.budget_s:.0f} s was spent"}
        else:
            print(f"gpu_check: {name} (cap {cap:.0f} s) ...", file=sys.stderr, flush=True)
            doc["sections"][name] = run_section(name, cap, args, work)
            sec = doc["sections"][name]
            print(f"gpu_check: {name}: {sec['status']} in {sec['seconds']:.0f} s"
                  + (f" -- {sec['error']}" if sec.get("error") else ""), file=sys.stderr, flush=True)
        doc["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(json_path, portable(doc, {"WORK": Path(work).resolve(), "": REPO}))  # no path of this machine
        write_marked_section(md, BEGIN, END, results_section(doc))
    bad = [n for n, s in doc["sections"].items() if s["status"] != "ok"]
    print(f"gpu_check: wrote {json_path} and the gpu-check section of {md}; "
          + (f"not ok: {', '.join(bad)}" if bad else "every section ok"), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
