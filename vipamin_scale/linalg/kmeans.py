"""Distributed k-means (SPT/kmeans) and a world-size-invariant uniform token draw (SPT/rand).

Data layout. Rank `r` of the group holds `X_r` (`n_r × d`, `n_r` may be 0). The global row set is
the rank-major concatenation `X = [X_0; X_1; …]`: rank `r`'s rows are global rows
`offset_r … offset_r + n_r − 1`, `offset_r = Σ_{s<r} n_s` (counts from one all-gather).
Tokens never move; only `k × d` centroids, per-rank scalars and the few chosen rows travel.

The math is `vipamin_scale/init/spt.py`'s, whose module docstring is the determinism contract;
this module composes its pure per-shard pieces (`sq_distances`, `assign`, `cluster_sums`,
`farthest_rows`, `centroids_from_sums`, `global_row_draw`, `gather_rows_partial`) with
collectives. With one process the results are bit-for-bit those of `spt.kmeans_pp_indices`,
`spt.lloyd`, `spt.update` and `spt.spt_rand`; with more ranks they are equal up to the float64
rounding of cross-rank sums. Per contract point:

1. Randomness: `g = torch.Generator("cpu").manual_seed(seed)` on every rank, so every rank
   draws the same numbers without communication. k-means++ draws `u = rand(k)` up front;
   SPT/rand draws the global index set `spt.global_row_draw(n, P, seed)` (a `randperm`).
2. Distances are computed per shard with `spt.sq_distances`, row by row in effect.
3. k-means++: centre 0 is global row `min(⌊u_0 n⌋, n − 1)`. Centre `j`: with `w` the squared
   distance of each row to its nearest chosen centre, the first global row whose running sum of
   `w` exceeds `t = u_j · Σw`. Sharded: the per-rank sums of `w` (last entry of each local
   cumsum) are all-gathered in rank order; the owner is the first rank whose running total
   exceeds `t` and finds its row with its local cumsum against `t − (total of earlier ranks)`.
   Past the end (rounding), the last global row, as `spt.pick_by_weight` clamps. All weights 0:
   row `min(⌊u_j n⌋, n − 1)`. The owner broadcasts the row with its index.
4. Assignment: `spt.assign` on the shard (argmin, ties to the lower centroid).
5. Update: `spt.cluster_sums` on the shard, sums and counts all-reduced in one tensor; empty
   clusters (ascending) take the rows with the largest `d2`, ties to the lower global row: each
   rank proposes its local top-`m` (`spt.farthest_rows`), the `(d2, global row)` candidates are
   all-gathered and merged (by `d2` descending, then row ascending), and the chosen rows are
   summed from `spt.gather_rows_partial`; then `spt.centroids_from_sums`.
6. Lloyd: `labels = assign(C_0)`; up to `iters` times `C = update(labels)`,
   `labels' = assign(C)`, `changed` all-reduced; stop once `changed < tol · n`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vipamin_scale.init import spt as spt_math

from .tsqr import GroupComm

__all__ = ["KMeansResult", "distributed_rand_draw", "kmeans", "kmeans_pp_indices", "kmeans_pp_init", "update"]

_F64 = torch.float64


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


def _layout(X: Tensor, comm: GroupComm) -> _Layout:
    """Row counts of all ranks (one all-gather); checks that every rank has the same width d."""
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D (n_local, d) tensor of rows, got shape {tuple(X.shape)}")
    meta = torch.tensor([X.shape[0], X.shape[1]], dtype=torch.int64, device=X.device)
    gathered = comm.all_gather(meta).tolist()  # (W, 2): rows, width per rank
    widths = sorted({w for _, w in gathered})
    if len(widths) != 1:
        raise ValueError(f"all ranks must hold rows of the same width d, got widths {widths}")
    counts = [c for c, _ in gathered]
    return _Layout(counts=counts, offset=sum(counts[: comm.rank]), n=sum(counts))


def _rows(X: Tensor, gidx: Tensor, lay: _Layout, comm: GroupComm) -> Tensor:
    """Global rows `gidx` `(m,)` as `(m, d)` float64 on every rank: each owner fills its rows,
    the partials (zero elsewhere) are summed."""
    rows, _ = spt_math.gather_rows_partial(X, gidx.to(X.device), lay.offset)  # (m, d)
    return comm.all_reduce_(rows)


def _row(X: Tensor, gidx: int, lay: _Layout, comm: GroupComm) -> Tensor:
    """Global row `gidx` `(d,)` on every rank, broadcast by its owner."""
    owner = lay.owner(gidx)
    row = X.new_zeros(X.shape[1])
    if comm.rank == owner:
        row.copy_(X[gidx - lay.offset])
    return comm.broadcast_(row, src=owner)


def _pick_by_weight(X: Tensor, w: Tensor, u: float, lay: _Layout, comm: GroupComm) -> tuple[int, Tensor]:
    """Sharded `spt.pick_by_weight` over this rank's weights `w` `(n_local,)`: the global row
    index and the row `(d,)`, the same on every rank."""
    cum = torch.cumsum(w, dim=0)  # (n_local,) float64
    local_total = cum[-1:] if cum.numel() else w.new_zeros(1)
    rank_cum = torch.cumsum(comm.all_gather(local_total).flatten(), dim=0)  # (W,) running totals
    total = float(rank_cum[-1])
    if not total > 0.0:  # every row sits on a chosen centre
        gidx = min(int(math.floor(u * lay.n)), lay.n - 1)
        return gidx, _row(X, gidx, lay, comm)
    t = u * total
    owner = int(torch.searchsorted(rank_cum, torch.tensor([t], dtype=_F64, device=w.device), right=True)[0])
    past_end = owner >= comm.size  # u·total rounded up to the total: the last global row
    if past_end:
        owner = max(r for r, c in enumerate(lay.counts) if c > 0)
    buf = X.new_zeros(X.shape[1] + 1)  # (d + 1,): the row, then its global index (exact in float64)
    if comm.rank == owner:
        n_local = X.shape[0]
        if past_end:
            i = n_local - 1
        else:
            before = float(rank_cum[owner - 1]) if owner > 0 else 0.0
            target = torch.tensor([t - before], dtype=_F64, device=w.device)
            i = min(int(torch.searchsorted(cum, target, right=True)[0]), n_local - 1)
        buf[:-1] = X[i]
        buf[-1] = lay.offset + i
    comm.broadcast_(buf, src=owner)
    return int(buf[-1]), buf[:-1]


def _kmeans_pp(X: Tensor, k: int, seed: int, lay: _Layout, comm: GroupComm) -> tuple[Tensor, Tensor]:
    """k-means++ seeds: global row indices `(k,)` int64 and centres `(k, d)` float64."""
    if k < 1 or lay.n < k:
        raise ValueError(f"k-means: need 1 <= k <= number of rows, got k={k} for {lay.n} rows")
    u = torch.rand(k, generator=torch.Generator(device="cpu").manual_seed(int(seed)), dtype=_F64)  # (k,)
    idx = [min(int(math.floor(float(u[0]) * lay.n)), lay.n - 1)]
    C = X.new_empty((k, X.shape[1]))  # (k, d)
    C[0] = _row(X, idx[0], lay, comm)
    w = spt_math.sq_distances(X, C[0:1])[:, 0]  # (n_local,) squared distance to the nearest centre
    for j in range(1, k):
        gidx, row = _pick_by_weight(X, w, float(u[j]), lay, comm)
        idx.append(gidx)
        C[j] = row
        w = torch.minimum(w, spt_math.sq_distances(X, C[j : j + 1])[:, 0])
    return torch.tensor(idx, dtype=torch.int64), C


def kmeans_pp_indices(X_local: Tensor, k: int, seed: int, group: Any = None) -> Tensor:
    """Global row indices `(k,)` int64 of the k-means++ seeds (as `spt.kmeans_pp_indices`)."""
    comm = GroupComm(group)
    X = X_local.to(_F64)
    return _kmeans_pp(X, k, seed, _layout(X, comm), comm)[0]


def kmeans_pp_init(X_local: Tensor, k: int, seed: int, group: Any = None) -> Tensor:
    """k-means++ centres `(k, d)` float64 over the rows of all ranks (as `spt.kmeans_pp_init`)."""
    comm = GroupComm(group)
    X = X_local.to(_F64)
    return _kmeans_pp(X, k, seed, _layout(X, comm), comm)[1]


def _farthest_rows(d2: Tensor, m: int, lay: _Layout, comm: GroupComm) -> Tensor:
    """Global indices `(m,)` of the `m` largest `d2` over all ranks, ties to the lower row."""
    local = spt_math.farthest_rows(d2, m)  # (≤ m,) local indices, largest first
    cand = torch.full((m, 2), math.inf, dtype=_F64, device=d2.device)  # (m, 2): -d2, global row
    cand[: local.numel(), 0] = -d2.to(_F64)[local]
    cand[: local.numel(), 1] = (local + lay.offset).to(_F64)
    cand = comm.all_gather(cand).reshape(-1, 2)  # (W·m, 2); padding (+inf) sorts last
    by_row = torch.sort(cand[:, 1], stable=True).indices
    cand = cand[by_row]
    by_d2 = torch.sort(cand[:, 0], stable=True).indices  # -d2 ascending = d2 descending
    return cand[by_d2[:m], 1].to(torch.int64)


def _update(
    X: Tensor, labels: Tensor, d2: Tensor, k: int, lay: _Layout, comm: GroupComm
) -> tuple[Tensor, int]:
    """Sharded `spt.update`: centroids `(k, d)` and the number of re-seeded (empty) clusters."""
    d = X.shape[1]
    sums, counts = spt_math.cluster_sums(X, labels, k)  # (k, d) float64, (k,) int64
    acc = torch.cat([sums, counts.to(_F64).unsqueeze(1)], dim=1)  # (k, d + 1): one all-reduce
    comm.all_reduce_(acc)
    sums, counts = acc[:, :d], acc[:, d].round().to(torch.int64)
    n_empty = int((counts == 0).sum())
    if n_empty:
        reseed = _rows(X, _farthest_rows(d2, n_empty, lay, comm), lay, comm)  # (e, d)
    else:
        reseed = X.new_zeros((0, d))
    return spt_math.centroids_from_sums(sums, counts, reseed), n_empty


def update(X_local: Tensor, labels: Tensor, d2: Tensor, k: int, group: Any = None) -> Tensor:
    """One Lloyd update over all ranks (as `spt.update`): centroids `(k, d)` float64 from this
    rank's `labels` `(n_local,)` and squared distances `d2` `(n_local,)` (from `spt.assign`)."""
    comm = GroupComm(group)
    X = X_local.to(_F64)
    return _update(X, labels, d2, k, _layout(X, comm), comm)[0]


def kmeans(
    X_local: Tensor,
    k: int,
    seed: int,
    iters: int = 100,
    tol: float = 1e-3,
    group: Any = None,
) -> KMeansResult:
    """k-means++ then Lloyd over the rows of all ranks (as `spt.kmeans`); collective.

    Stops when fewer than `tol · n` tokens change cluster or after `iters` updates. Same
    centroids on every rank; bit-for-bit `spt.kmeans` with one process.
    """
    if iters < 0:
        raise ValueError(f"init.kmeans_iters must be >= 0, got {iters}")
    comm = GroupComm(group)
    X = X_local.to(_F64)  # (n_local, d)
    lay = _layout(X, comm)
    _, C = _kmeans_pp(X, k, seed, lay, comm)
    labels, d2 = spt_math.assign(X, C)  # (n_local,), (n_local,)
    changed, converged, reseeded, it = lay.n, False, 0, 0
    while it < iters:
        C, n_empty = _update(X, labels, d2, k, lay, comm)
        reseeded += n_empty
        new_labels, d2 = spt_math.assign(X, C)
        moved = (new_labels != labels).sum().reshape(1)  # (1,) int64
        changed = int(comm.all_reduce_(moved)[0])
        labels = new_labels
        it += 1
        if changed < tol * lay.n:
            converged = True
            break
    inertia = float(comm.all_reduce_(d2.sum().reshape(1))[0])
    return KMeansResult(C, labels, it, converged, changed, reseeded, inertia)


def distributed_rand_draw(X_local: Tensor, P: int, seed: int, group: Any = None) -> Tensor:
    """SPT/rand over all ranks (as `spt.spt_rand`): rows `(P, d)` float64, the global rows
    `spt.global_row_draw(n, P, seed)` of the rank-major concatenation, whatever the world size.
    Collective; the same tensor on every rank (one owner per row: the sum adds only zeros)."""
    comm = GroupComm(group)
    lay = _layout(X_local, comm)
    idx = spt_math.global_row_draw(lay.n, P, seed)  # (P,) global rows, the same on every rank
    return _rows(X_local, idx, lay, comm)
