"""SPT prompts (Self-Prompt Tuning, spec: BASELINES.md): prototypes of the task's own tokens.

Single-process pure functions for SPT/rand and pooling (float64 inside and out; no I/O, no
torch.distributed); SPT/kmeans is `linalg.kmeans` (one process or many). The input
``X`` (n, d) is the token matrix of one layer: all patch tokens of all calibration images, rows
in **global order** (image-major in the global image order, then patch order) -- the order a
distributed version sees when it concatenates the ranks' shards by increasing row offset.

Modes
    kmeans    k-means++ seeding, then Lloyd until < ``tol`` (0.1%) of the assignments change or
              ``iters`` iterations; prompts = centroids.
    rand      P rows drawn uniformly without replacement.
    mean_pool / max_pool
              each image's sequence split into P-1 equal windows of w = N_p // (P-1) tokens plus
              the remainder (if any), each pooled; P of the B * n_w pooled vectors drawn uniformly.

Determinism. SPT/kmeans is `vipamin_scale/linalg/kmeans.py` (the one k-means, one process or
many), whose module docstring is the contract. All draws here come from
``linalg.global_row_draw(n, P, seed)`` = ``torch.randperm(n, generator=Generator("cpu").manual_seed(seed))[:P]``:
global row indices, a function of ``(n, P, seed)`` only, so a rank holding global rows
``[offset, offset + n_local)`` takes the drawn rows it owns (``linalg.kmeans.gather_rows_partial``)
and the (P, d) partials summed over ranks are these functions' results.
"""

from __future__ import annotations

import torch

from vipamin_scale.linalg.kmeans import global_row_draw

__all__ = ["spt_rand", "pool_windows", "pool_prompts"]

_F64 = torch.float64


# ----------------------------------------------------------------------------- random draws


def spt_rand(X: torch.Tensor, P: int, seed: int) -> torch.Tensor:
    """SPT/rand: P rows of X (n, d) drawn uniformly without replacement, (P, d) float64."""
    return X.to(_F64)[global_row_draw(X.shape[0], P, seed)]


# ----------------------------------------------------------------------------- pooling


def pool_windows(tokens: torch.Tensor, P: int, mode: str = "mean") -> torch.Tensor:
    """Pooled windows (B, n_w, d) float64 of tokens (B, N_p, d): P-1 windows of
    ``w = N_p // (P-1)`` tokens and, if ``N_p`` is not a multiple, the remainder window
    (``n_w`` = P-1 or P). ``P = 1`` pools the whole sequence into one window."""
    if mode not in ("mean", "max"):
        raise ValueError(f"init.spt_mode pooling must be 'mean' or 'max', got {mode!r}")
    if P < 1:
        raise ValueError(f"pool_prompts: the prompt count P must be >= 1, got {P}")
    x = tokens.to(_F64)  # (B, N_p, d)
    B, N_p, d = x.shape
    n_win = max(P - 1, 1)
    w = N_p // n_win
    if w < 1:
        raise ValueError(f"pool_prompts: P - 1 = {P - 1} windows need at least that many patches, got N_p = {N_p}")

    def pool(t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.mean(dim=dim) if mode == "mean" else t.amax(dim=dim)

    main = pool(x[:, : n_win * w].reshape(B, n_win, w, d), dim=2)  # (B, n_win, d)
    if n_win * w < N_p:
        rest = pool(x[:, n_win * w :], dim=1)[:, None]  # (B, 1, d)
        main = torch.cat([main, rest], dim=1)  # (B, n_win + 1, d)
    return main


def pool_prompts(tokens: torch.Tensor, P: int, mode: str = "mean", seed: int = 0) -> torch.Tensor:
    """SPT mean_pool / max_pool: P vectors (P, d) float64 drawn uniformly without replacement
    from the pooled windows of all images; pooled vector ``(b, j)`` has global index
    ``b * n_w + j`` (``b`` the image's global index), drawn with ``global_row_draw``."""
    pooled = pool_windows(tokens, P, mode)  # (B, n_w, d)
    flat = pooled.reshape(-1, pooled.shape[-1])  # (B * n_w, d)
    return flat[global_row_draw(flat.shape[0], P, seed)]
