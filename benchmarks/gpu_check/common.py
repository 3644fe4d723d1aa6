"""What every section shares: paths, sizes, the tiny runs' arguments, one-line failures, the
per-section Record, child processes (the CLI, torchrun) and their killing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "benchmarks" / "gpu_check.py"  # the script each section's process runs (--child NAME)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(1, str(REPO / "benchmarks"))

from vipamin_scale.launch import command as torchrun  # noqa: E402,F401  (the one torchrun command)
from vipamin_scale.paths import atomic_write_bytes  # noqa: E402

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
RESULTS_JSON = REPO / "benchmarks" / "results" / "gpu.json"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"

# Peak dense (no sparsity) bf16 tensor FLOP/s by device name (substring of torch's name), from the
# vendors' data sheets. A device not listed gets MFU null with the reason.
PEAK_BF16 = {"H200": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.5e12, "A100": 312e12,
             "L40S": 362.05e12, "B200": 2250e12}

# name: (time cap on a GPU, time cap in --smoke), seconds, in the order they run: the sections that
# measure issue 24's targets first (step, engines, fewshot; issue 22's packed; init_size, dali, data), then the correctness
# runs and the throughput table the 2026-11-30 run already passed. The GPU caps keep one hang from
# eating the device's minutes; the smoke caps only stop a hang (a shared 2-core machine is slow).
SECTIONS: dict[str, tuple[float, float]] = {
    "env": (45, 120), "step": (200, 300), "engines": (150, 300), "fewshot": (60, 180), "packed": (200, 120),
    "init_size": (100, 180),
    "dali": (60, 180), "data": (75, 180), "train": (150, 300), "init": (120, 300), "throughput": (180, 300)}
BUDGET_S = {"gpu": 540.0, "smoke": 1500.0}  # the whole run (--budget-s); 540 s: one call on a lent device
CORRECTNESS = ("train", "init", "dali")  # sections whose result carries `passed`


def sizes(smoke: bool) -> dict[str, Any]:
    """Every size the sections use: the real ones, or the smoke run's tiny ones."""
    if smoke:
        return dict(model="vit_test_d64", img=32, batch=2, search_start=2, search_limit=4, search_cap_s=10,
                    warmup=1, steps=2, init_B=16, init_batch=8, data_images=32, data_batch=8, data_threads=1,
                    data_epochs=2, fewshot_model="vit_test_d64", fewshot_img=32, fewshot_batch=10, fewshot_warmup=1,
                    fewshot_steps=3, compile=False, packed_procs=1, packed_ks=[2])
    return dict(model="vit_huge_patch14_224", img=224, batch=64, search_start=64, search_limit=8192,
                search_cap_s=20, warmup=2, steps=5, init_B=256, init_batch=32, data_images=512, data_batch=64,
                data_threads=8, data_epochs=3, fewshot_model="vit_small_patch14_dinov2", fewshot_img=112,
                fewshot_batch=10, fewshot_warmup=5, fewshot_steps=30, compile=True, packed_procs=14,
                packed_ks=[1, 4, 8, 16, 32, 64])


# TINY correctness runs: the test suite's tiny ViT on the digits, 4 steps, then the val split.
TRAIN_ARGS = ["model=vit_test_d64", "model.pool=mean", "data=digits", "data.max_train_samples=64",
              "data.batch_size=16", "data.eval_batch_size=128", "train.epochs=1", "train.lr=0.5",
              "train.warmup_epochs=0", "train.log_every=1", "train.progress=false", "prompt.length=4",
              "train.test_at_end=false"]
TRAIN_RUNS = [("ddp", "fp32", False), ("ddp", "bf16", False), ("zero2", "fp32", False), ("zero2", "bf16", False),
              ("zero3", "fp32", True), ("zero3", "bf16", True)]
INIT_ARGS = ["model=vit_test_d64", "data=digits", "prompt.length=4", "init=vipamin", "init.num_images=64",
             "init.batch_size=16", "init.k=2"]


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



def peak_bf16(device: str) -> tuple[Optional[float], Optional[str]]:
    for key, value in PEAK_BF16.items():
        if key in device:
            return value, None
    return None, f"no peak bf16 FLOP/s known for device {device!r} (gpu_check.PEAK_BF16)"



def compose_config(overrides: list[str]):
    """The config `vipamin-scale train <overrides>` would run with (`vipamin_scale.compose`)."""
    from vipamin_scale import compose

    return compose(overrides)

