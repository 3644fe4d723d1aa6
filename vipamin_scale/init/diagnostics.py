"""Diagnostics of the paper's two failure modes, plus scale (spec: VIPAMIN.md, "Diagnostics").

Pure tensor math, float64 inside; results are 0-dim float64 tensors (``float(x)`` for metadata).

Attention entropy (``attention_entropy``) of attention rows a (each sums to 1 over N keys):
    H = -sum_j a_j log a_j          (0 log 0 = 0)
    reported as mean H over all leading dims (heads, prompts, images) and as mean H / ln N
    (1 for uniform attention, 0 for one-hot).

Projection energy (``projection_energy``) of vectors u onto span(Q), Q (d, r) orthonormal:
    mean_i ||Q^T u_i||^2 / ||u_i||^2      (a zero vector counts 0)

Value vectors (``value_vectors``): u = W_V norm1(p) + b_V (what the forward sees) and
    u = W_V p + b_V (the paper's view), row convention ``p @ W_V^T + b_V``.

Scale (``scale_ratio``): mean prompt norm / mean patch-token norm.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Union

import torch

__all__ = ["ValueVectors", "attention_entropy", "projection_energy", "value_vectors", "scale_ratio"]

_F64 = torch.float64

NormSpec = Union[Callable[[torch.Tensor], torch.Tensor], tuple]


class ValueVectors(NamedTuple):
    """``norm1``: (P, d) ``W_V norm1(p) + b_V`` (None when no norm was given); ``raw``: (P, d)
    ``W_V p + b_V``."""

    norm1: torch.Tensor | None
    raw: torch.Tensor


def attention_entropy(attn_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(raw, normalized)`` mean entropy of attention rows ``attn_probs`` (..., N).

    The mean runs over every leading dim; ``normalized = raw / ln N`` (defined as 1 for N = 1,
    where the only distribution is uniform).
    """
    a = attn_probs.to(_F64)  # (..., N)
    N = a.shape[-1]
    H = -torch.special.xlogy(a, a).sum(dim=-1)  # (...,) entropy per row
    raw = H.mean()
    normalized = raw / math.log(N) if N > 1 else torch.ones((), dtype=_F64)
    return raw, normalized


def projection_energy(U: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``||Q^T u||^2 / ||u||^2``; U (..., d) (leading dims flattened), Q (d, r)
    with orthonormal columns. A zero row contributes 0."""
    U = U.to(_F64).reshape(-1, U.shape[-1])  # (n, d)
    Q = Q.to(_F64)  # (d, r)
    num = (U @ Q).pow(2).sum(dim=1)  # (n,) ||Q^T u||^2
    den = U.pow(2).sum(dim=1)  # (n,) ||u||^2
    ratio = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(den))  # (n,)
    return ratio.mean()


def _apply_norm(p: torch.Tensor, norm: NormSpec) -> torch.Tensor:
    if callable(norm):
        return norm(p).to(_F64)  # the callable must accept float64 input
    gamma, beta, eps = norm
    d = p.shape[-1]
    return torch.nn.functional.layer_norm(p, (d,), gamma.to(_F64), beta.to(_F64), float(eps))


def value_vectors(
    p: torch.Tensor,
    W_V: torch.Tensor,
    b_V: torch.Tensor,
    norm: NormSpec | None = None,
) -> ValueVectors:
    """Value vectors of prompts ``p`` (P, d) under ``W_V`` (d, d), ``b_V`` (d,).

    ``norm``: a callable applied to the float64 prompts (e.g. a float64 LayerNorm), or a
    ``(gamma, beta, eps)`` tuple for ``LayerNorm(d)``; None skips the norm1 vectors.
    """
    p = p.to(_F64)  # (P, d)
    W_V = W_V.to(_F64)  # (d, d)
    b_V = b_V.to(_F64)  # (d,)
    raw = p @ W_V.T + b_V  # (P, d)
    normed = None if norm is None else _apply_norm(p, norm) @ W_V.T + b_V  # (P, d)
    return ValueVectors(norm1=normed, raw=raw)


def scale_ratio(prompts: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
    """Mean row norm of ``prompts`` (..., d) over mean row norm of ``patch_tokens`` (..., d),
    leading dims flattened (call it once per layer)."""
    pn = prompts.to(_F64).reshape(-1, prompts.shape[-1]).norm(dim=1).mean()  # ()
    tn = patch_tokens.to(_F64).reshape(-1, patch_tokens.shape[-1]).norm(dim=1).mean()  # ()
    return pn / tn
