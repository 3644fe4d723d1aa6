"""env: device, driver, torch / CUDA / cuDNN / NCCL, DeepSpeed, DALI, timm versions."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Any, Optional

from gpu_check.common import Record, one_line, peak_bf16


def run(rec: Record, ctx: dict) -> None:
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

