"""Test oracle for `vipamin_scale.linalg.kmeans`: its determinism contract written out for one
process over the whole token matrix, the plain way (no shards, no collectives).

This was `init/spt.py`'s single-process k-means; the package keeps one k-means
(`linalg/kmeans.py`, one process or many), and the tests check it against this straightforward
reading of the contract, bit for bit with one process. It composes the package's pure per-shard
pieces (`sq_distances`, `assign`, `cluster_sums`, `farthest_rows`, `centroids_from_sums`)
exactly as the old single-process code did.
"""
from __future__ import annotations

import math

import torch

from vipamin_scale.linalg.kmeans import assign, centroids_from_sums, cluster_sums, farthest_rows, sq_distances

__all__ = ["assign", "farthest_rows", "kmeans", "kmeans_pp_indices", "kmeans_pp_init", "lloyd", "pick_by_weight",
           "update"]

_F64 = torch.float64


def pick_by_weight(w: torch.Tensor, u: float) -> int:
    """The first index with ``cumsum(w) > u * sum(w)``; ``min(floor(u * n), n-1)`` when all weights are 0."""
    n = w.shape[0]
    cs = torch.cumsum(w.to(_F64), dim=0)  # (n,)
    total = float(cs[-1])
    if not total > 0.0:
        return min(int(math.floor(u * n)), n - 1)
    target = torch.tensor([u * total], dtype=_F64)
    i = int(torch.searchsorted(cs, target, right=True)[0])
    return min(i, n - 1)


def kmeans_pp_indices(X: torch.Tensor, P: int, seed: int) -> torch.Tensor:
    """Global row indices (P,) int64 of the k-means++ seeds (contract point 3)."""
    X = X.to(_F64)  # (n, d)
    n = X.shape[0]
    u = torch.rand(P, generator=torch.Generator(device="cpu").manual_seed(int(seed)), dtype=_F64)  # (P,)
    idx = [min(int(math.floor(float(u[0]) * n)), n - 1)]
    w = sq_distances(X, X[idx[0]][None])[:, 0]  # (n,) squared distance to nearest chosen center
    for j in range(1, P):
        i = pick_by_weight(w, float(u[j]))
        idx.append(i)
        w = torch.minimum(w, sq_distances(X, X[i][None])[:, 0])
    return torch.tensor(idx, dtype=torch.int64)


def kmeans_pp_init(X: torch.Tensor, P: int, seed: int) -> torch.Tensor:
    """k-means++ seeds: centroids (P, d) float64, rows of X (n, d) at ``kmeans_pp_indices``."""
    return X.to(_F64)[kmeans_pp_indices(X, P, seed)]


def update(X: torch.Tensor, labels: torch.Tensor, d2: torch.Tensor, P: int) -> torch.Tensor:
    """One Lloyd update (contract point 5) over all rows at once."""
    X = X.to(_F64)  # (n, d)
    sums, counts = cluster_sums(X, labels, P)
    n_empty = int((counts == 0).sum())
    reseed = X[farthest_rows(d2, n_empty)] if n_empty else X.new_zeros((0, X.shape[1]))  # (e, d)
    return centroids_from_sums(sums, counts, reseed)


def lloyd(X: torch.Tensor, C: torch.Tensor, iters: int, tol: float = 1e-3
          ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lloyd iterations from centroids C (P, d): ``(C, labels, n_iter)`` (contract point 6)."""
    X = X.to(_F64)  # (n, d)
    C = C.to(_F64)  # (P, d)
    P, n = C.shape[0], X.shape[0]
    labels, d2 = assign(X, C)
    it = 0
    while it < iters:
        C = update(X, labels, d2, P)
        new_labels, d2 = assign(X, C)
        changed = int((new_labels != labels).sum())
        labels = new_labels
        it += 1
        if changed < tol * n:
            break
    return C, labels, it


def kmeans(X: torch.Tensor, P: int, iters: int, seed: int, tol: float = 1e-3) -> torch.Tensor:
    """k-means++ then Lloyd: centroids (P, d) float64 of the rows of X (n, d)."""
    C, _, _ = lloyd(X, kmeans_pp_init(X, P, seed), iters, tol)
    return C
