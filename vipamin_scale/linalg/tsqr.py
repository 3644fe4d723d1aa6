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
then works on the rows it is given, alone). `GroupComm` wraps these cases and is shared with
`kmeans.py`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["LOCAL", "GroupComm", "tsqr", "StreamingTSQR", "energy_rank"]


class _LocalGroup:
    """Sentinel type: a 'group' of one process, whatever torch.distributed says."""

    def __repr__(self) -> str:
        return "LOCAL"


LOCAL: Any = _LocalGroup()


class GroupComm:
    """The few collectives `linalg/` needs, over a process group or over one process.

    `group`: `None` (default group if initialized, else single process), a `ProcessGroup`, or
    `LOCAL`. Ranks are group ranks. Without a process group, or with one rank, every collective
    is the identity. Tensors may live anywhere: each collective runs on the backend's device
    (CUDA for NCCL, CPU otherwise) and results come back on the caller's tensor's device.
    """

    def __init__(self, group: Any = None) -> None:
        self.active = group is not LOCAL and dist.is_available() and dist.is_initialized()
        if group is not None and group is not LOCAL and not self.active:
            raise ValueError("a process group was passed but torch.distributed is not initialized")
        self.group = None if group is LOCAL else group
        self.rank = dist.get_rank(self.group) if self.active else 0
        self.size = dist.get_world_size(self.group) if self.active else 1
        self.device = torch.device("cpu")
        if self.active and str(dist.get_backend(self.group)).lower() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    @property
    def trivial(self) -> bool:
        return not self.active or self.size == 1

    def all_reduce_(self, t: Tensor) -> Tensor:
        """In-place sum over ranks; returns `t`."""
        if not self.trivial:
            buf = t.to(self.device).contiguous()
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
            if buf is not t:
                t.copy_(buf)
        return t

    def all_gather(self, t: Tensor) -> Tensor:
        """Stack every rank's `t` (same shape everywhere): `(size, *t.shape)`, in rank order."""
        if self.trivial:
            return t.unsqueeze(0).clone()
        buf = t.to(self.device).contiguous()
        parts = [torch.empty_like(buf) for _ in range(self.size)]
        dist.all_gather(parts, buf, group=self.group)
        return torch.stack(parts).to(t.device)

    def gather(self, t: Tensor, dst: int = 0) -> list[Tensor] | None:
        """Every rank's `t` as a list on group rank `dst`, `None` elsewhere."""
        if self.trivial:
            return [t]
        buf = t.to(self.device).contiguous()
        parts = [torch.empty_like(buf) for _ in range(self.size)] if self.rank == dst else None
        dist.gather(buf, gather_list=parts, group=self.group, group_dst=dst)
        return None if parts is None else [p.to(t.device) for p in parts]

    def broadcast_(self, t: Tensor, src: int) -> Tensor:
        """In-place broadcast from group rank `src`; returns `t`."""
        if not self.trivial:
            buf = t.to(self.device).contiguous()
            dist.broadcast(buf, group=self.group, group_src=src)
            if buf is not t:
                t.copy_(buf)
        return t


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
    comm = GroupComm(group)
    if comm.size == 1:
        return _svd_of_r(_reduced_r(R_local), d)
    device = R_local.device
    rows = torch.tensor([R_local.shape[0]], dtype=torch.int64, device=device)
    rows_all = comm.all_gather(rows).flatten().tolist()  # (W,) rows of each R_r
    padded = R_local.new_zeros((d, d))
    padded[: R_local.shape[0]] = R_local
    parts = comm.gather(padded, dst=0)
    svals = torch.empty(d, dtype=torch.float64, device=device)
    V = torch.empty((d, d), dtype=torch.float64, device=device)
    if comm.rank == 0:
        assert parts is not None
        stacked = torch.cat([p[:k] for p, k in zip(parts, rows_all)])  # (Σ k_r, d), Σ k_r ≤ W·d
        s, v = _svd_of_r(_reduced_r(stacked), d)
        svals.copy_(s)
        V.copy_(v)
    comm.broadcast_(svals, src=0)
    comm.broadcast_(V, src=0)
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
