"""Distributed tall-skinny QR (TSQR) and the SVD of a row-sharded matrix.

`init.subspace = tokens` needs the right singular vectors of the stacked token matrix
`A` (`n × d`, `n = B·N_e` rows in all, sharded over ranks by rows; `n ≫ d`). `A` never exists
in one place; only `d × d` factors travel.

Algorithm (`A = [A_0; A_1; …; A_{W-1}]`, rank `r` holds `A_r`, `n_r × d`, possibly `n_r = 0`):

1. Local reduced QR in float64: `A_r = Q_r R_r`, `R_r` is `min(n_r, d) × d` (upper trapezoidal;
   `0 × d` for a rank without rows). `R_r^T R_r = A_r^T A_r`, so the stack of the `R_r` has the
   same Gram matrix, hence the same singular values and right singular vectors, as `A`.
   `StreamingTSQR` builds `R_r` block by block: `R ← qr([R; block]).R`, so a rank never holds
   more than one block plus a `d × d` factor.
2. Gather the `R_r` on group rank 0 (each padded to `d × d` for the collective, trimmed back
   with the gathered row counts): at most `W·d × d` there, `d × d` on every other rank.
3. On group rank 0: `R = qr([R_0; …; R_{W-1}]).R` and `R = U Σ V^T` (SVD, full `V`).
   Singular values come out descending; each column of `V` gets the sign that makes its
   largest-magnitude entry positive (first such entry on ties), so `V` does not depend on
   LAPACK's sign choices. Columns past `rank(A)` are some orthonormal basis of the null space.
4. Broadcast `(σ, V)` from group rank 0: every rank returns bitwise the same tensors.

Results agree with `torch.linalg.svd` of the gathered `A` to float64 rounding; they are not
bitwise independent of the world size (different splits round differently).

Groups: `group=None` is the default process group when one is initialized and a single process
otherwise; `group=LOCAL` forces single-process math even inside a process group (every rank
then works on the rows it is given, alone). The collectives are `vipamin_scale.distributed`'s,
which handle these cases (and NCCL's GPU-only tensors).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import vipamin_scale.distributed as D
from vipamin_scale.distributed import LOCAL

__all__ = ["LOCAL", "tsqr", "StreamingTSQR", "energy_rank"]


def _reduced_r(A: Tensor) -> Tensor:
    """R factor of the reduced QR of `A` (`m × d`, float64): `min(m, d) × d`; `0 × d` when m = 0."""
    if A.shape[0] == 0:
        return A.new_zeros((0, A.shape[1]))
    return torch.linalg.qr(A, mode="r").R


def _svd_of_r(R: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """Singular values (d,) descending, zero-padded, and right singular vectors V (d, d) of `R`."""
    if R.shape[0] == 0:
        return R.new_zeros(d), torch.eye(d, dtype=R.dtype, device=R.device)
    _, S, Vh = torch.linalg.svd(R, full_matrices=True)  # S: (min(m, d),), Vh: (d, d)
    svals = R.new_zeros(d)
    svals[: S.shape[0]] = S
    V = Vh.mT.contiguous()  # (d, d), columns are right singular vectors
    # Sign convention: the largest-|v| entry of each column is positive.
    lead = V.abs().argmax(dim=0)  # (d,) first index of the max on ties
    signs = torch.sign(V.gather(0, lead.unsqueeze(0))).squeeze(0)
    signs[signs == 0] = 1.0
    return svals, V * signs


def _combine_r(R_local: Tensor, d: int, group: Any) -> tuple[Tensor, Tensor]:
    """Cross-rank part of TSQR: gather the local R factors, QR their stack, SVD, broadcast."""
    if D.world_size(group) == 1:
        return _svd_of_r(_reduced_r(R_local), d)
    device = R_local.device
    rows = torch.tensor([R_local.shape[0]], dtype=torch.int64, device=device)
    rows_all = D.all_gather(rows, group).flatten().tolist()  # (W,) rows of each R_r
    padded = R_local.new_zeros((d, d))
    padded[: R_local.shape[0]] = R_local
    parts = D.gather(padded, dst=0, group=group)
    svals = torch.empty(d, dtype=torch.float64, device=device)
    V = torch.empty((d, d), dtype=torch.float64, device=device)
    if D.rank(group) == 0:
        assert parts is not None
        stacked = torch.cat([p[:k] for p, k in zip(parts, rows_all)])  # (Σ k_r, d), Σ k_r ≤ W·d
        s, v = _svd_of_r(_reduced_r(stacked), d)
        svals.copy_(s)
        V.copy_(v)
    D.broadcast(svals, 0, group)
    D.broadcast(V, 0, group)
    return svals, V


class StreamingTSQR:
    """Running `d × d` R factor of the rows seen so far on this rank, then the cross-rank SVD.

    >>> acc = StreamingTSQR(d)
    >>> for block in blocks: acc.update(block)      # block: (m, d), any float dtype
    >>> svals, V = acc.finalize(group)             # (d,), (d, d), same on every rank

    `update` computes `R ← qr([R; block]).R` in float64, so memory is one block plus `d × d`.
    The factor lives on `device`, or (`device=None`) on the device of the first non-empty block.
    """

    def __init__(self, d: int, device: torch.device | str | None = None) -> None:
        if d < 1:
            raise ValueError(f"StreamingTSQR needs d >= 1, got {d}")
        self.d = d
        self.n_rows = 0
        self._device_fixed = device is not None  # None: follow the first non-empty block
        self.R = torch.zeros((0, d), dtype=torch.float64, device=device)  # (k ≤ d, d)

    def update(self, rows: Tensor) -> "StreamingTSQR":
        """Fold a block of rows `(m, d)` into the running R factor. Returns `self`."""
        if rows.ndim != 2 or rows.shape[1] != self.d:
            raise ValueError(
                f"StreamingTSQR(d={self.d}).update expects (m, {self.d}) rows, got {tuple(rows.shape)}"
            )
        if rows.shape[0] == 0:
            return self
        if not self._device_fixed:
            self.R, self._device_fixed = self.R.to(rows.device), True
        block = rows.detach().to(device=self.R.device, dtype=torch.float64)
        self.R = _reduced_r(torch.cat([self.R, block]))
        self.n_rows += rows.shape[0]
        return self

    def finalize(self, group: Any = None) -> tuple[Tensor, Tensor]:
        """Singular values `(d,)` (descending) and right singular vectors `V` `(d, d)` of all
        rows of all ranks in `group`. Collective: every rank of the group must call it."""
        return _combine_r(self.R, self.d, group)


def tsqr(A_local: Tensor, group: Any = None) -> tuple[Tensor, Tensor]:
    """SVD factors of the row-sharded matrix whose rows on this rank are `A_local` `(n_local, d)`.

    Returns `(svals, V)`: `svals` `(d,)` float64 descending (zeros past the rank, and past the
    total row count when it is below `d`), `V` `(d, d)` float64 with the right singular vectors
    as columns; bitwise the same on every rank. Collective over `group` (see the module doc).
    """
    if A_local.ndim != 2:
        raise ValueError(f"tsqr expects a 2-D (n_local, d) tensor, got shape {tuple(A_local.shape)}")
    acc = StreamingTSQR(A_local.shape[1], device=A_local.device)
    return acc.update(A_local).finalize(group)


def energy_rank(svals: Tensor, energy: float) -> int:
    """Smallest `r` with `Σ_{i<r} σ_i² >= energy · Σ σ²` (`svals` descending, `0 < energy <= 1`).

    Returns 0 for an all-zero spectrum. With `energy = 1` this is the numerical rank: squared
    singular values below the rounding of the running sum do not move it.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    s2 = svals.detach().to(torch.float64).flatten().square()
    if s2.numel() == 0:
        return 0
    cum = torch.cumsum(s2, dim=0)
    total = cum[-1]
    if total <= 0:
        return 0
    target = (energy * total).reshape(1)
    r = int(torch.searchsorted(cum, target, right=False).item()) + 1  # first i with cum[i] >= target
    return min(r, s2.numel())
