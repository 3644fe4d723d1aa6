"""k-means (SPT/kmeans) and a world-size-invariant uniform token draw (SPT/rand): the one k-means.

One process or many: every function takes `group` (default: the default process group when one
is initialized, else a single process; `LOCAL` for single-process math inside a process group).

Data layout. Rank `r` of the group holds `X_r` (`n_r × d`, `n_r` may be 0). The global row set is
the rank-major concatenation `X = [X_0; X_1; …]`: rank `r`'s rows are global rows
`offset_r … offset_r + n_r − 1`, `offset_r = Σ_{s<r} n_s` (counts from one all-gather).
Tokens never move; only `k × d` centroids, per-rank scalars and the few chosen rows travel.
With one process `X` is the token matrix of one layer in global order (image-major in the global
image order, then patch order).

Determinism contract. With one process the result is a function of `(X, k, seed, iters, tol)`;
with more ranks it is the same up to the float64 rounding of cross-rank sums (labels, iteration
counts and seeding rows identical), whatever the row split:

1. Randomness: `g = torch.Generator("cpu").manual_seed(seed)` on every rank, so every rank
   draws the same numbers without communication; nothing else touches `g`. k-means++ draws
   `u = rand(k, dtype=float64)` up front; SPT/rand draws the global index set
   `global_row_draw(n, P, seed) = randperm(n, generator=g)[:P]`, a function of `(n, P, seed)` only.
2. Distances: `sq_distances(X, C) = clamp(‖x‖² − 2 x·c + ‖c‖², min=0)` in float64, per shard
   and row block by row block (`ASSIGN_BLOCK` rows); each row's value depends on that row and C only.
3. k-means++: centre 0 is global row `min(⌊u_0 n⌋, n − 1)`. Centre `j`: with `w` the squared
   distance of each row to its nearest chosen centre, the first global row whose running sum of
   `w` (in global row order) exceeds `t = u_j · Σw`. Sharded: the per-rank sums of `w` (last
   entry of each local cumsum) are all-gathered in rank order; the owner is the first rank whose
   running total exceeds `t` and finds its row with its local cumsum against
   `t − (total of earlier ranks)`. Past the end (rounding), the last global row. All weights 0
   (fewer distinct rows than k): row `min(⌊u_j n⌋, n − 1)`. The owner broadcasts the row with
   its index.
4. Assignment (`assign`): label = argmin over centroids of the squared distance, ties to the
   lower centroid index; `d2` = that minimum.
5. Update (`cluster_sums` → all-reduce → `centroids_from_sums`): per-cluster float64 sums
   (`index_add_` in row order) and int64 counts, all-reduced in one tensor; centroid = sum /
   count. Empty clusters, in increasing cluster index, take the rows with the largest `d2`
   (farthest from their centroid), largest first, ties to the lower global row
   (`farthest_rows`): each rank proposes its local top-`m` `(d2, global row)`, the candidates
   are all-gathered and merged (by `d2` descending, then row ascending), and the chosen rows are
   summed from `gather_rows_partial`.
6. Lloyd: `labels = assign(C_0)`; up to `iters` times `C = update(labels)`,
   `labels' = assign(C)`, `changed` all-reduced; stop after an iteration in which fewer than
   `tol · n` labels changed. The result is the last C (the one the final labels were assigned to).

The per-shard pieces (`sq_distances`, `assign`, `cluster_sums`, `farthest_rows`,
`centroids_from_sums`, `global_row_draw`, `gather_rows_partial`) are pure tensor functions; the
collectives are `vipamin_scale.distributed`'s, over `group`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import vipamin_scale.distributed as D

__all__ = [
    "ASSIGN_BLOCK",
    "KMeansResult",
    "assign",
    "centroids_from_sums",
    "cluster_sums",
    "distributed_rand_draw",
    "farthest_rows",
    "gather_rows_partial",
    "global_row_draw",
    "kmeans",
    "kmeans_pp_indices",
    "kmeans_pp_init",
    "sq_distances",
    "update",
]

_F64 = torch.float64
ASSIGN_BLOCK = 65536  # rows per block in `assign` (bounds memory at ASSIGN_BLOCK x k)


# ----------------------------------------------------------------------------- per-shard pieces (pure)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def sq_distances(X: Tensor, C: Tensor) -> Tensor:
    """Squared Euclidean distances (n, m) between rows of X (n, d) and C (m, d), float64,
    ``||x||^2 - 2 x.c + ||c||^2`` clamped at 0."""
    X = X.to(_F64)  # (n, d)
    C = C.to(_F64)  # (m, d)
    xx = X.pow(2).sum(dim=1, keepdim=True)  # (n, 1)
    cc = C.pow(2).sum(dim=1)  # (m,)
    return (xx - 2.0 * (X @ C.T) + cc).clamp_min_(0.0)  # (n, m)


def assign(X: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid per row: ``labels`` (n,) int64 (ties to the lower centroid index) and
    ``d2`` (n,) float64, the squared distance to it. Rows are processed in blocks."""
    X = X.to(_F64)  # (n, d)
    C = C.to(_F64)  # (k, d)
    labels, d2 = [], []
    for s in range(0, X.shape[0], ASSIGN_BLOCK):
        D = sq_distances(X[s : s + ASSIGN_BLOCK], C)  # (block, k)
        m, a = torch.min(D, dim=1)  # argmin returns the first minimum
        labels.append(a)
        d2.append(m)
    if not labels:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=_F64)
    return torch.cat(labels), torch.cat(d2)


def cluster_sums(X: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-cluster sums (k, d) float64 and counts (k,) int64 of the rows of X (n, d)."""
    X = X.to(_F64)  # (n, d)
    sums = X.new_zeros((k, X.shape[1])).index_add_(0, labels, X)  # (k, d)
    counts = torch.bincount(labels, minlength=k)  # (k,)
    return sums, counts


def farthest_rows(d2: Tensor, m: int) -> Tensor:
    """Indices (m,) of the ``m`` largest ``d2`` (n,), largest first, ties to the lower index."""
    return torch.sort(-d2.to(_F64), stable=True).indices[:m]


def centroids_from_sums(sums: Tensor, counts: Tensor, reseed: Tensor) -> Tensor:
    """Centroids (k, d) = sums / counts; the empty clusters, in increasing index, take the rows
    of ``reseed`` (m, d) in order (m >= number of empty clusters; the farthest rows)."""
    sums = sums.to(_F64)  # (k, d)
    empty = torch.nonzero(counts == 0).flatten()  # (e,) ascending
    C = sums / counts.clamp_min(1).to(_F64)[:, None]  # (k, d)
    if empty.numel():
        if reseed.shape[0] < empty.numel():
            raise ValueError(f"k-means: {empty.numel()} empty clusters but only {reseed.shape[0]} re-seed rows")
        C[empty] = reseed[: empty.numel()].to(_F64)
    return C


def global_row_draw(n_rows: int, P: int, seed: int) -> Tensor:
    """``P`` distinct global row indices (P,) int64, uniform without replacement; a function of
    ``(n_rows, P, seed)`` only, so every rank computes the same draw."""
    if P < 1:
        raise ValueError(f"global_row_draw: the prompt count P must be >= 1, got {P}")
    if n_rows < P:
        raise ValueError(f"global_row_draw: need at least P = {P} rows to draw from, got {n_rows}")
    return torch.randperm(n_rows, generator=_generator(seed))[:P]


def gather_rows_partial(X_local: Tensor, idx: Tensor, row_offset: int) -> tuple[Tensor, Tensor]:
    """The drawn rows a shard owns: ``(rows (P, d) float64, zero where not owned; owned (P,) bool)``
    for a shard holding global rows ``[row_offset, row_offset + n_local)``. Summing ``rows``
    over the shards gives ``X_global[idx]``."""
    X_local = X_local.to(_F64)  # (n_local, d)
    local = idx - int(row_offset)  # (P,)
    owned = (local >= 0) & (local < X_local.shape[0])  # (P,)
    rows = X_local.new_zeros((idx.shape[0], X_local.shape[1]))  # (P, d)
    rows[owned] = X_local[local[owned]]
    return rows, owned


# ----------------------------------------------------------------------------- collective k-means


@dataclass
class KMeansResult:
    centroids: Tensor  # (k, d) float64, the same on every rank
    labels: Tensor  # (n_local,) int64, the cluster of each of this rank's rows
    iterations: int  # Lloyd updates run (0 .. iters)
    converged: bool  # stopped because fewer than tol·n tokens changed cluster
    changed: int  # tokens that changed cluster at the last update (n when iterations = 0)
    reseeded: int  # empty clusters re-seeded, over all updates
    inertia: float  # Σ_i d2_i, squared distance of every row to its centroid, over all ranks


@dataclass
class _Layout:
    counts: list[int]  # rows per group rank
    offset: int  # first global row of this rank
    n: int  # global rows

    def owner(self, gidx: int) -> int:
        """Group rank holding global row `gidx`."""
        end = 0
        for r, c in enumerate(self.counts):
            end += c
            if gidx < end:
                return r
        raise IndexError(f"global row {gidx} out of range (n={self.n})")


def _layout(X: Tensor, group: Any) -> _Layout:
    """Row counts of all ranks (one all-gather); checks that every rank has the same width d."""
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D (n_local, d) tensor of rows, got shape {tuple(X.shape)}")
    meta = torch.tensor([X.shape[0], X.shape[1]], dtype=torch.int64, device=X.device)
    gathered = D.all_gather(meta, group).tolist()  # (W, 2): rows, width per rank
    widths = sorted({w for _, w in gathered})
    if len(widths) != 1:
        raise ValueError(f"all ranks must hold rows of the same width d, got widths {widths}")
    counts = [c for c, _ in gathered]
    return _Layout(counts=counts, offset=sum(counts[: D.rank(group)]), n=sum(counts))


def _rows(X: Tensor, gidx: Tensor, lay: _Layout, group: Any) -> Tensor:
    """Global rows `gidx` `(m,)` as `(m, d)` float64 on every rank: each owner fills its rows,
    the partials (zero elsewhere) are summed."""
    rows, _ = gather_rows_partial(X, gidx.to(X.device), lay.offset)  # (m, d)
    return D.all_reduce_sum(rows, group)


def _row(X: Tensor, gidx: int, lay: _Layout, group: Any) -> Tensor:
    """Global row `gidx` `(d,)` on every rank, broadcast by its owner."""
    owner = lay.owner(gidx)
    row = X.new_zeros(X.shape[1])
    if D.rank(group) == owner:
        row.copy_(X[gidx - lay.offset])
    return D.broadcast(row, owner, group)


def _pick_by_weight(X: Tensor, w: Tensor, u: float, lay: _Layout, group: Any) -> tuple[int, Tensor]:
    """Contract point 3 over this rank's weights `w` `(n_local,)`: the global row index and the
    row `(d,)`, the same on every rank."""
    cum = torch.cumsum(w, dim=0)  # (n_local,) float64
    local_total = cum[-1:] if cum.numel() else w.new_zeros(1)
    rank_cum = torch.cumsum(D.all_gather(local_total, group).flatten(), dim=0)  # (W,) running totals
    total = float(rank_cum[-1])
    if not total > 0.0:  # every row sits on a chosen centre
        gidx = min(int(math.floor(u * lay.n)), lay.n - 1)
        return gidx, _row(X, gidx, lay, group)
    t = u * total
    owner = int(torch.searchsorted(rank_cum, torch.tensor([t], dtype=_F64, device=w.device), right=True)[0])
    past_end = owner >= D.world_size(group)  # u·total rounded up to the total: the last global row
    if past_end:
        owner = max(r for r, c in enumerate(lay.counts) if c > 0)
    buf = X.new_zeros(X.shape[1] + 1)  # (d + 1,): the row, then its global index (exact in float64)
    if D.rank(group) == owner:
        n_local = X.shape[0]
        if past_end:
            i = n_local - 1
        else:
            before = float(rank_cum[owner - 1]) if owner > 0 else 0.0
            target = torch.tensor([t - before], dtype=_F64, device=w.device)
            i = min(int(torch.searchsorted(cum, target, right=True)[0]), n_local - 1)
        buf[:-1] = X[i]
        buf[-1] = lay.offset + i
    D.broadcast(buf, owner, group)
    return int(buf[-1]), buf[:-1]


def _kmeans_pp(X: Tensor, k: int, seed: int, lay: _Layout, group: Any) -> tuple[Tensor, Tensor]:
    """k-means++ seeds: global row indices `(k,)` int64 and centres `(k, d)` float64."""
    if k < 1 or lay.n < k:
        raise ValueError(f"k-means: need 1 <= k <= number of rows, got k={k} for {lay.n} rows")
    u = torch.rand(k, generator=_generator(seed), dtype=_F64)  # (k,)
    idx = [min(int(math.floor(float(u[0]) * lay.n)), lay.n - 1)]
    C = X.new_empty((k, X.shape[1]))  # (k, d)
    C[0] = _row(X, idx[0], lay, group)
    w = sq_distances(X, C[0:1])[:, 0]  # (n_local,) squared distance to the nearest centre
    for j in range(1, k):
        gidx, row = _pick_by_weight(X, w, float(u[j]), lay, group)
        idx.append(gidx)
        C[j] = row
        w = torch.minimum(w, sq_distances(X, C[j : j + 1])[:, 0])
    return torch.tensor(idx, dtype=torch.int64), C


def kmeans_pp_indices(X_local: Tensor, k: int, seed: int, group: Any = None) -> Tensor:
    """Global row indices `(k,)` int64 of the k-means++ seeds (contract point 3)."""
    X = X_local.to(_F64)
    return _kmeans_pp(X, k, seed, _layout(X, group), group)[0]


def kmeans_pp_init(X_local: Tensor, k: int, seed: int, group: Any = None) -> Tensor:
    """k-means++ centres `(k, d)` float64 over the rows of all ranks: the rows at `kmeans_pp_indices`."""
    X = X_local.to(_F64)
    return _kmeans_pp(X, k, seed, _layout(X, group), group)[1]


def _farthest_rows(d2: Tensor, m: int, lay: _Layout, group: Any) -> Tensor:
    """Global indices `(m,)` of the `m` largest `d2` over all ranks, ties to the lower row."""
    local = farthest_rows(d2, m)  # (≤ m,) local indices, largest first
    cand = torch.full((m, 2), math.inf, dtype=_F64, device=d2.device)  # (m, 2): -d2, global row
    cand[: local.numel(), 0] = -d2.to(_F64)[local]
    cand[: local.numel(), 1] = (local + lay.offset).to(_F64)
    cand = D.all_gather(cand, group).reshape(-1, 2)  # (W·m, 2); padding (+inf) sorts last
    by_row = torch.sort(cand[:, 1], stable=True).indices
    cand = cand[by_row]
    by_d2 = torch.sort(cand[:, 0], stable=True).indices  # -d2 ascending = d2 descending
    return cand[by_d2[:m], 1].to(torch.int64)


def _update(
    X: Tensor, labels: Tensor, d2: Tensor, k: int, lay: _Layout, group: Any
) -> tuple[Tensor, int]:
    """Contract point 5: centroids `(k, d)` and the number of re-seeded (empty) clusters."""
    d = X.shape[1]
    sums, counts = cluster_sums(X, labels, k)  # (k, d) float64, (k,) int64
    acc = torch.cat([sums, counts.to(_F64).unsqueeze(1)], dim=1)  # (k, d + 1): one all-reduce
    D.all_reduce_sum(acc, group)
    sums, counts = acc[:, :d], acc[:, d].round().to(torch.int64)
    n_empty = int((counts == 0).sum())
    if n_empty:
        reseed = _rows(X, _farthest_rows(d2, n_empty, lay, group), lay, group)  # (e, d)
    else:
        reseed = X.new_zeros((0, d))
    return centroids_from_sums(sums, counts, reseed), n_empty


def update(X_local: Tensor, labels: Tensor, d2: Tensor, k: int, group: Any = None) -> Tensor:
    """One Lloyd update over all ranks: centroids `(k, d)` float64 from this rank's `labels`
    `(n_local,)` and squared distances `d2` `(n_local,)` (from `assign`)."""
    X = X_local.to(_F64)
    return _update(X, labels, d2, k, _layout(X, group), group)[0]


def kmeans(
    X_local: Tensor,
    k: int,
    seed: int,
    iters: int = 100,
    tol: float = 1e-3,
    group: Any = None,
) -> KMeansResult:
    """k-means++ then Lloyd over the rows of all ranks (contract points 3-6); collective.

    Stops when fewer than `tol · n` tokens change cluster or after `iters` updates. Same
    centroids on every rank.
    """
    if iters < 0:
        raise ValueError(f"init.kmeans_iters must be >= 0, got {iters}")
    X = X_local.to(_F64)  # (n_local, d)
    lay = _layout(X, group)
    _, C = _kmeans_pp(X, k, seed, lay, group)
    labels, d2 = assign(X, C)  # (n_local,), (n_local,)
    changed, converged, reseeded, it = lay.n, False, 0, 0
    while it < iters:
        C, n_empty = _update(X, labels, d2, k, lay, group)
        reseeded += n_empty
        new_labels, d2 = assign(X, C)
        moved = (new_labels != labels).sum().reshape(1)  # (1,) int64
        changed = int(D.all_reduce_sum(moved, group)[0])
        labels = new_labels
        it += 1
        if changed < tol * lay.n:
            converged = True
            break
    inertia = float(D.all_reduce_sum(d2.sum().reshape(1), group)[0])
    return KMeansResult(C, labels, it, converged, changed, reseeded, inertia)


def distributed_rand_draw(X_local: Tensor, P: int, seed: int, group: Any = None) -> Tensor:
    """SPT/rand over all ranks: rows `(P, d)` float64, the global rows
    `global_row_draw(n, P, seed)` of the rank-major concatenation, whatever the world size.
    Collective; the same tensor on every rank (one owner per row: the sum adds only zeros)."""
    lay = _layout(X_local, group)
    idx = global_row_draw(lay.n, P, seed)  # (P,) global rows, the same on every rank
    return _rows(X_local, idx, lay, group)
