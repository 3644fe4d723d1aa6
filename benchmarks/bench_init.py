"""Initializer wall time by phase, at 1 and 2 ranks, and the math phase against the public code's structure.

    python benchmarks/bench_init.py [--quick] [--images B] [--out benchmarks/results/init.json]

1. `vipamin-scale init` (VIPAMIN-Deep, random weights) under torchrun at 1 and 2 processes for
   ViT-B/16 and a reduced-depth ViT-H/14 at 224 px on CPU: the phases the prompts file records
   (capture, all-reduce, math, gather) and the launcher's wall time.
2. The math phase, side by side in one process on the same captured statistics: ours (one
   pseudo-inverse per layer, float64, `init/vipamin.py`) against a reference that follows the
   public code's structure (a pseudo-inverse and a projection per prompt, single process).
Prints a markdown table and writes JSON. Absolute times on a shared machine are noise; the ratios
in one run are the figures to quote.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vipamin_scale.launch import command as torchrun  # noqa: E402

MODELS = {  # label: (timm name, depth override, image size)
    "ViT-B/16": ("vit_base_patch16_224", None, 224),
    "ViT-H/14 (reduced depth)": ("vit_huge_patch14_224", 4, 224),
}
QUICK = {"ViT-test (quick)": ("vit_test_d96", None, 32)}


def run_cli_init(name: str, depth, img: int, world: int, images: int, P: int, out: Path) -> dict:
    args = [f"model.name={name}", f"model.img_size={img}", "model.checkpoint=null", "data=digits",
            f"prompt.length={P}", "init=vipamin", f"init.num_images={images}", "init.batch_size=8",
            f"out={out}", f"hydra.run.dir={out.parent / (out.stem + '_run')}"]
    if depth:
        args.append(f"model.depth={depth}")
    cmd = torchrun(world, "init", *args)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // world)))
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"init failed ({name}, world {world}):\n{proc.stderr[-3000:]}")
    from vipamin_scale.init.run import read_prompts_metadata

    meta = read_prompts_metadata(out)
    return {"wall_s": wall, **meta["wall_times"]}


def public_structure_math(stats: dict, weights: list[dict], R: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    """The public code's loop structure: per layer an SVD of S, then per prompt a cosine top-k and
    a pseudo-inverse of W_V and a projection (the map is the corrected one, so the outputs are
    comparable; the cost is in the structure)."""
    out = torch.zeros_like(R)
    for l, w in enumerate(weights):
        E, K, S = stats["E"][l], stats["K"][l], stats["S"][l]
        P = R.shape[1]
        _, sig, Vh = torch.linalg.svd(S, full_matrices=False)
        V = Vh[: int((sig > sig[0] * 1e-12).sum())].T
        keys = torch.nn.functional.normalize(K[P:], dim=-1)
        for i in range(P):
            sim = torch.nn.functional.normalize(K[i], dim=-1) @ keys.T
            p_match = E[sim.topk(k).indices].mean(0)
            u = R[l, i] @ w["W_V"].T + w["b_V"]
            u_perp = u - V @ (V.T @ u)
            p_orth = torch.linalg.pinv(w["W_V"]) @ (u_perp - w["b_V"])
            out[l, i] = (1 - lam) * p_match + lam * p_orth
    return out


def math_comparison(name: str, depth, img: int, images: int, P: int, layers: int) -> dict:
    from vipamin_scale.config import default_config
    from vipamin_scale.init import vipamin as vip
    from vipamin_scale.init.capture import CaptureSpec, capture_layer_stats, layer_weights
    from vipamin_scale.init.random import xavier_prompts
    from vipamin_scale.init.run import Calibration
    from vipamin_scale.init.sharded import reduce_means
    from vipamin_scale.models import build_model

    cfg = default_config(model__name=name, model__img_size=img, model__checkpoint=None, model__depth=depth,
                         prompt__length=P, init__method="vipamin", init__num_images=images, init__batch_size=8)
    model = build_model(cfg, 1)
    rows = list(range(layers))
    R = xavier_prompts(model.num_prompt_layers, P, model.dim, model.patch_size, 0)
    sums = capture_layer_stats(model, Calibration(cfg, model), R.float(), CaptureSpec(layers=rows, match=True, attn_out=True))
    _, stats = reduce_means(sums)
    weights = [layer_weights(model, l) for l in rows]
    t = time.perf_counter()
    ours = torch.stack([vip.vipamin_layer(E=stats["E"][l], K=stats["K"][l], R=R[l], W_V=weights[l]["W_V"],
                                          b_V=weights[l]["b_V"], k=8, lam=0.5, S=stats["S"][l], orth_scale="raw").prompts
                        for l in rows])
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = public_structure_math(stats, weights, R[:layers], k=8, lam=0.5)
    t_ref = time.perf_counter() - t
    return {"layers": layers, "P": P, "ours_s": t_ours, "reference_s": t_ref, "ratio": t_ref / t_ours,
            "max_abs_diff": float((ours - ref).abs().max() / ref.abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the script")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "init.json")
    args = ap.parse_args()
    models = QUICK if args.quick else MODELS
    images = 8 if args.quick else args.images
    work = REPO / ".cache" / "bench_init"
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for label, (name, depth, img) in models.items():
        row = {"model": label, "timm": name, "depth": depth, "img_size": img, "B": images, "P": args.prompts}
        for world in (1, 2):
            row[f"world{world}"] = run_cli_init(name, depth, img, world, images, args.prompts,
                                                work / f"{name}_w{world}.safetensors")
        row["math"] = math_comparison(name, depth, img, min(images, 8), args.prompts, layers=2)
        results.append(row)
        print(f"done: {label}", file=sys.stderr)

    lines = ["| model | ranks | wall (s) | capture (s) | all-reduce (s) | math (s) | gather (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for world in (1, 2):
            w = r[f"world{world}"]
            lines.append(f"| {r['model']} | {world} | {w['wall_s']:.1f} | {w['capture_s']:.2f} | "
                         f"{w['allreduce_s']:.3f} | {w['math_s']:.2f} | {w['gather_s']:.3f} |")
    lines += ["", "| model | layers | P | ours (s) | public-structure reference (s) | ratio | rel. max diff |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["math"]
        lines.append(f"| {r['model']} | {m['layers']} | {m['P']} | {m['ours_s']:.3f} | {m['reference_s']:.3f} | "
                     f"{m['ratio']:.1f}x | {m['max_abs_diff']:.1e} |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"images": images, "cpu_count": os.cpu_count(), "results": results}, indent=2, allow_nan=False))


if __name__ == "__main__":
    main()
