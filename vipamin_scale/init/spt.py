"""SPT prompts (Self-Prompt Tuning, spec: BASELINES.md): prototypes of the task's own tokens.

Single-process pure functions (float64 inside and out; no I/O, no torch.distributed). The input
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

Determinism contract (what ``vipamin_scale/linalg/kmeans.py`` reproduces; at world size 1 it is
bit-for-bit when it calls these functions on the full X, at larger world sizes equal up to the
float64 rounding of cross-rank sums):

1. Randomness. All draws come from ``g = torch.Generator("cpu").manual_seed(seed)``; nothing
   else touches ``g``.
   * ``global_row_draw(n, P, seed)`` = ``torch.randperm(n, generator=g)[:P]``: global row
     indices, a function of ``(n, P, seed)`` only. A rank holding global rows
     ``[offset, offset + n_local)`` takes the drawn rows it owns (``gather_rows_partial``) and
     the (P, d) partials are summed over ranks.
   * ``kmeans_pp_indices`` draws ``u = torch.rand(P, generator=g, dtype=float64)`` once, up front.
2. Distances. ``sq_distances(X, C) = clamp(||x||^2 - 2 x.c + ||c||^2, min=0)`` in float64, computed
   row block by row block (``ASSIGN_BLOCK`` rows); each row's value depends on that row and C only.
3. k-means++ seeding (``kmeans_pp_indices``). Center 0 is global row ``min(floor(u[0] * n), n-1)``.
   Center j >= 1: ``w`` = each row's squared distance to its nearest chosen center; with
   ``cs = cumsum(w)`` in global row order and ``target = u[j] * cs[-1]``, center j is the first
   global row with ``cs > target`` (``pick_by_weight``). If all weights are 0 (fewer distinct
   rows than P) it is row ``min(floor(u[j] * n), n-1)``. Distributed: per-rank totals gathered
   in rank order give the prefix of each shard; the owning rank resolves the local row.
4. Assignment (``assign``): label = argmin over centroids of the squared distance, ties to the
   lower centroid index; ``d2`` = that minimum.
5. Update (``update`` = ``cluster_sums`` -> [all-reduce] -> ``centroids_from_sums``): per-cluster
   float64 sums (``index_add_`` in row order) and int64 counts; centroid = sum / count. Empty
   clusters, in increasing cluster index, take the rows with the largest ``d2`` (farthest from
   their centroid), largest first, ties to the lower global row index (``farthest_rows``);
   distributed: each rank proposes its local top-m ``(d2, global row)`` and the merge sorts by
   ``d2`` descending, then global row ascending.
6. Lloyd (``lloyd``): labels = assign(C0); repeat up to ``iters`` times: C = update(labels),
   new labels = assign(C); stop after an iteration in which fewer than ``tol * n`` labels
   changed. The result is the last C (the one the final labels were assigned to).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ASSIGN_BLOCK",
    "sq_distances",
    "pick_by_weight",
    "kmeans_pp_indices",
    "kmeans_pp_init",
    "assign",
    "cluster_sums",
    "farthest_rows",
    "centroids_from_sums",
    "update",
    "lloyd",
    "kmeans",
    "global_row_draw",
    "gather_rows_partial",
    "spt_rand",
    "pool_windows",
    "pool_prompts",
]

_F64 = torch.float64
ASSIGN_BLOCK = 65536  # rows per block in ``assign`` (bounds memory at ASSIGN_BLOCK x P)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _check_rows(n: int, P: int, what: str) -> None:
    if P < 1:
        raise ValueError(f"{what}: the prompt count P must be >= 1, got {P}")
    if n < P:
        raise ValueError(f"{what}: need at least P = {P} rows to draw from, got {n}")


# ----------------------------------------------------------------------------- k-means


def sq_distances(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (n, m) between rows of X (n, d) and C (m, d), float64,
    ``||x||^2 - 2 x.c + ||c||^2`` clamped at 0."""
    X = X.to(_F64)  # (n, d)
    C = C.to(_F64)  # (m, d)
    xx = X.pow(2).sum(dim=1, keepdim=True)  # (n, 1)
    cc = C.pow(2).sum(dim=1)  # (m,)
    return (xx - 2.0 * (X @ C.T) + cc).clamp_min_(0.0)  # (n, m)


def pick_by_weight(w: torch.Tensor, u: float) -> int:
    """The first index with ``cumsum(w) > u * sum(w)`` (sampling proportional to ``w`` with the
    uniform ``u`` in [0, 1)); ``min(floor(u * n), n-1)`` when all weights are 0."""
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
    _check_rows(n, P, "kmeans_pp_init")
    u = torch.rand(P, generator=_generator(seed), dtype=_F64)  # (P,) all draws, up front
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


def assign(X: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid per row: ``labels`` (n,) int64 (ties to the lower centroid index) and
    ``d2`` (n,) float64, the squared distance to it. Rows are processed in blocks."""
    X = X.to(_F64)  # (n, d)
    C = C.to(_F64)  # (P, d)
    labels, d2 = [], []
    for s in range(0, X.shape[0], ASSIGN_BLOCK):
        D = sq_distances(X[s : s + ASSIGN_BLOCK], C)  # (block, P)
        m, a = torch.min(D, dim=1)  # argmin returns the first minimum
        labels.append(a)
        d2.append(m)
    if not labels:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=_F64)
    return torch.cat(labels), torch.cat(d2)


def cluster_sums(X: torch.Tensor, labels: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums (P, d) float64 and counts (P,) int64 of the rows of X (n, d)."""
    X = X.to(_F64)  # (n, d)
    sums = X.new_zeros((P, X.shape[1])).index_add_(0, labels, X)  # (P, d)
    counts = torch.bincount(labels, minlength=P)  # (P,)
    return sums, counts


def farthest_rows(d2: torch.Tensor, m: int) -> torch.Tensor:
    """Indices (m,) of the ``m`` largest ``d2`` (n,), largest first, ties to the lower index."""
    return torch.sort(-d2.to(_F64), stable=True).indices[:m]


def centroids_from_sums(sums: torch.Tensor, counts: torch.Tensor, reseed: torch.Tensor) -> torch.Tensor:
    """Centroids (P, d) = sums / counts; the empty clusters, in increasing index, take the rows
    of ``reseed`` (m, d) in order (m >= number of empty clusters; the farthest rows)."""
    sums = sums.to(_F64)  # (P, d)
    empty = torch.nonzero(counts == 0).flatten()  # (e,) ascending
    C = sums / counts.clamp_min(1).to(_F64)[:, None]  # (P, d)
    if empty.numel():
        if reseed.shape[0] < empty.numel():
            raise ValueError(f"k-means: {empty.numel()} empty clusters but only {reseed.shape[0]} re-seed rows")
        C[empty] = reseed[: empty.numel()].to(_F64)
    return C


def update(X: torch.Tensor, labels: torch.Tensor, d2: torch.Tensor, P: int) -> torch.Tensor:
    """One Lloyd update: centroids (P, d) of the assignment ``labels`` (n,), empty clusters
    re-seeded with the rows farthest from their centroid (``d2`` (n,) from ``assign``)."""
    X = X.to(_F64)  # (n, d)
    sums, counts = cluster_sums(X, labels, P)
    n_empty = int((counts == 0).sum())
    reseed = X[farthest_rows(d2, n_empty)] if n_empty else X.new_zeros((0, X.shape[1]))  # (e, d)
    return centroids_from_sums(sums, counts, reseed)


def lloyd(
    X: torch.Tensor, C: torch.Tensor, iters: int, tol: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lloyd iterations from centroids C (P, d): returns ``(C, labels, n_iter)`` (contract point 6)."""
    if iters < 0:
        raise ValueError(f"init.kmeans_iters must be >= 0, got {iters}")
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
    """SPT's k-means prompts: centroids (P, d) float64 of the rows of X (n, d)."""
    C0 = kmeans_pp_init(X, P, seed)  # (P, d)
    C, _, _ = lloyd(X, C0, iters, tol)
    return C


# ----------------------------------------------------------------------------- random draws


def global_row_draw(n_rows: int, P: int, seed: int) -> torch.Tensor:
    """``P`` distinct global row indices (P,) int64, uniform without replacement; a function of
    ``(n_rows, P, seed)`` only, so every rank computes the same draw."""
    _check_rows(n_rows, P, "global_row_draw")
    return torch.randperm(n_rows, generator=_generator(seed))[:P]


def gather_rows_partial(
    X_local: torch.Tensor, idx: torch.Tensor, row_offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The drawn rows a shard owns: ``(rows (P, d) float64, zero where not owned; owned (P,) bool)``
    for a shard holding global rows ``[row_offset, row_offset + n_local)``. Summing ``rows``
    over the shards gives ``X_global[idx]``."""
    X_local = X_local.to(_F64)  # (n_local, d)
    local = idx - int(row_offset)  # (P,)
    owned = (local >= 0) & (local < X_local.shape[0])  # (P,)
    rows = X_local.new_zeros((idx.shape[0], X_local.shape[1]))  # (P, d)
    rows[owned] = X_local[local[owned]]
    return rows, owned


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
