"""Random prompts: VPT's Xavier-uniform initialization (spec: VIPAMIN.md, "Random prompts").

    R[l, i, :] ~ U(-v, v) elementwise,   v = sqrt(6 / (3 * ph * pw + d))

(``3 * ph * pw`` is the fan-in of the patch-embedding convolution, ``d`` its fan-out; about
0.0625 for ViT-B/16.) The draw is made in float64 from a CPU ``torch.Generator`` seeded with
``seed`` and only then cast to ``dtype``, so the values do not depend on the requested dtype
(beyond the final rounding) and are identical on every rank and every machine.

The same ``R`` feeds both VIPAMIN modules (matching capture and the orthogonal module), so
final prompt ``i`` of layer ``l`` is a function of ``R[l, i]`` alone.

Pure tensor math: no I/O, no torch.distributed, no model objects.
"""

from __future__ import annotations

import math

import torch

__all__ = ["xavier_bound", "xavier_prompts"]


def xavier_bound(patch_size: tuple[int, int], d: int) -> float:
    """The half-width ``v = sqrt(6 / (3 * ph * pw + d))`` of VPT's uniform prompt init."""
    ph, pw = (int(s) for s in patch_size)
    if ph <= 0 or pw <= 0 or d <= 0:
        raise ValueError(f"xavier_bound: patch size {patch_size} and width d={d} must be positive")
    return math.sqrt(6.0 / (3 * ph * pw + d))


def xavier_prompts(
    num_layers: int,
    P: int,
    d: int,
    patch_size: tuple[int, int],
    seed: int,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Xavier-uniform prompts ``R`` of shape ``(num_layers, P, d)`` (``num_layers`` is ``L_p``).

    Deterministic: the same ``(num_layers, P, d, patch_size, seed)`` gives the same tensor,
    whatever the process, rank or device (drawn on CPU; move it afterwards).
    """
    if num_layers < 1 or P < 1 or d < 1:
        raise ValueError(f"xavier_prompts: need num_layers, P, d >= 1, got {num_layers}, {P}, {d}")
    v = xavier_bound(patch_size, d)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    # U[0, 1) drawn in float64, mapped to [-v, v)
    R = torch.rand((num_layers, P, d), generator=g, dtype=torch.float64)  # (L_p, P, d)
    R = R.mul_(2.0 * v).sub_(v)
    return R.to(dtype)
