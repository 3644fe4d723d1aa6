"""VIPAMIN prompt initialization: the per-layer tensor math (spec: VIPAMIN.md).

Pure functions from captured statistics and frozen weights to prompts: no I/O, no
torch.distributed, no model objects. Every input is cast to float64 and every tensor returned
is float64 (the caller casts the final prompts to float32 for the file). Row-vector convention
throughout (PyTorch's): a prompt is a row ``p`` of shape ``(d,)`` and its value vector is
``p @ W_V^T + b_V`` -- the spec's column-vector ``W_V p + b_V``.

Per layer ``l`` (the layer index only appears in error messages):

Matching (``match_prompts``)
    c[i, j]   = cos(K[i], K[P + j])                       i < P, j < N_p
    J_i       = the k largest c[i, :], ties to the lower patch index
    p_match_i = mean_{j in J_i} E[j]

Row space of the attention output (``row_space_basis``, ``basis_from_svd``)
    Q (d, r): orthonormal columns spanning the rows of S. Computed from the SVD
    S = U diag(sigma) V^T: r = #{sigma > rtol * sigma_max} (numerical rank; rtol defaults to
    max(S.shape) * eps_float64, numpy's matrix_rank rule) and Q = V[:, :r]. This is the span of
    the reduced QR of S^T (the spec's wording) but rank-revealing; only the projector Q Q^T is
    used downstream, and every result below is invariant to the choice of basis.
    With ``energy < 1``: r = the smallest count of leading right singular vectors whose
    sigma^2 sum to at least ``energy * sum(sigma^2)`` (never above the numerical rank).

Orthogonalization (``orthogonal_prompts``), one pseudo-inverse per layer
    u_i      = W_V R_i + b_V
    u_perp_i = (I - Q Q^T) u_i
    p_orth_i = W_V^+ (u_perp_i - b_V)            (default: the pre-image)
    p_orth_i = W_V^+^T (u_perp_i - b_V)          (official_compat: the public code's
                                                  ``(u_perp - b_V) @ pinv(W_V)``)

LayerNorm-exact orthogonalization (``ln_aware_orthogonal_prompts``, ``init.ln_aware``)
    LN(p) = gamma * y + beta with y zero-mean, ||y||^2 = d (eps aside). Solve for y:
    A   = [Q^T W_V diag(gamma) ; 1^T]            (r+1, d)
    c   = [-Q^T (W_V beta + b_V) ; 0]            (r+1,)
    y0  = A^+ c,   n_i = (I - A^+ A) R_i,   y_i = y0 + t_i n_i,   t_i = sqrt(d - ||y0||^2)/||n_i||
    so Q^T (W_V LN(y_i) + b_V) = 0. If ||y0||^2 > d there is no exact solution: y_i = y0 sqrt(d)/||y0||
    (one warning naming the layer). A^+ and I - A^+ A come from one SVD of A (pinv's tolerance).

Scale and mix (``rescale_to``, ``combine``)
    orth_scale=match: p_orth_i <- p_orth_i ||p_match_i|| / ||p_orth_i||
    p_i = (1 - lam) p_match_i + lam p_orth_i,   lam in [0, 1]
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from vipamin_scale.init.diagnostics import projection_energy, value_vectors

__all__ = [
    "EmptyComplementError",
    "LnAwareInfeasibleWarning",
    "VipaminLayerResult",
    "validate_vipamin_options",
    "match_prompts",
    "row_space_basis",
    "basis_from_svd",
    "orthogonal_prompts",
    "ln_aware_orthogonal_prompts",
    "rescale_to",
    "combine",
    "vipamin_layer",
]

_F64 = torch.float64
_ORTH_SCALES = ("match", "raw")


class EmptyComplementError(ValueError):
    """The orthogonal complement of the row space is empty at a layer (r = d, or r + 1 >= d
    for ln_aware), so the orthogonal module is undefined while lam > 0."""


class LnAwareInfeasibleWarning(UserWarning):
    """``init.ln_aware``: ||y0||^2 > d at a layer, no exactly norm1-orthogonal prompt exists."""


# ----------------------------------------------------------------------------- validation


def _check_k(k: Any, N_p: int) -> int:
    if isinstance(k, bool):
        raise ValueError(f"init.k must be an integer in [1, N_p] = [1, {N_p}], got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"init.k must be an integer in [1, N_p] = [1, {N_p}], got {k!r}") from None
    if not 1 <= k <= N_p:
        raise ValueError(f"init.k must be in [1, N_p] = [1, {N_p}], got {k}")
    return k


def _check_lam(lam: Any) -> float:
    try:
        lam_f = float(lam)
    except (TypeError, ValueError):
        raise ValueError(f"init.lam must be a number in [0, 1], got {lam!r}") from None
    if isinstance(lam, bool) or not (0.0 <= lam_f <= 1.0):  # also rejects NaN
        raise ValueError(f"init.lam must be in [0, 1], got {lam!r}")
    return lam_f


def _check_energy(energy: Any) -> float | None:
    if energy is None:
        return None
    e = float(energy)
    if not (0.0 < e <= 1.0):
        raise ValueError(f"init.energy must be in (0, 1], got {energy!r}")
    return e


def validate_vipamin_options(
    k: int,
    lam: float,
    official_compat: bool,
    ln_aware: bool,
    orth_scale: str,
    N_p: int,
) -> None:
    """Check VIPAMIN's options before any compute; raise ``ValueError`` naming the field.

    ``official_compat=true`` is the public code exactly (transposed map, no norm1, raw scale):
    combined with ``ln_aware=true`` or ``orth_scale=match`` it is an error naming the preset
    ``init=vipamin_official``.
    """
    _check_k(k, N_p)
    _check_lam(lam)
    if orth_scale not in _ORTH_SCALES:
        raise ValueError(f"init.orth_scale must be one of {list(_ORTH_SCALES)}, got {orth_scale!r}")
    if official_compat:
        clash = []
        if ln_aware:
            clash.append("init.ln_aware=true")
        if orth_scale == "match":
            clash.append("init.orth_scale=match")
        if clash:
            raise ValueError(
                f"init.official_compat=true reproduces the public code (transposed map, no norm1, "
                f"raw scale) and cannot be combined with {' and '.join(clash)}; "
                f"use the preset init=vipamin_official (official_compat=true, ln_aware=false, "
                f"orth_scale=raw)"
            )


# ----------------------------------------------------------------------------- matching


def match_prompts(K: torch.Tensor, E: torch.Tensor, P: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Matching module: each prompt's key picks its ``k`` most similar patch keys.

    K: (P + N_p, d_h) head-averaged keys, prompt rows first. E: (N_p, d) block inputs at the
    patches. Returns ``p_match`` (P, d) float64, the mean of the selected rows of ``E``, and
    ``idx`` (P, k) int64, the selected patch indices in order of decreasing similarity (ties:
    lower index first -- a stable sort, not ``torch.topk``).
    """
    E = E.to(_F64)  # (N_p, d)
    K = K.to(_F64)  # (P + N_p, d_h)
    N_p = E.shape[0]
    k = _check_k(k, N_p)
    if K.shape[0] != P + N_p:
        raise ValueError(f"match_prompts: K has {K.shape[0]} rows, expected P + N_p = {P} + {N_p}")
    Kn = torch.nn.functional.normalize(K, dim=1, eps=1e-300)  # (P + N_p, d_h) unit rows (0 stays 0)
    c = Kn[:P] @ Kn[P:].T  # (P, N_p) cosine similarities
    # descending with ties to the lower index == ascending stable sort of -c
    idx = torch.sort(-c, dim=1, stable=True).indices[:, :k]  # (P, k)
    p_match = E[idx].mean(dim=1)  # (P, d)
    return p_match, idx


# ----------------------------------------------------------------------------- row space


def basis_from_svd(
    svals: torch.Tensor,
    V: torch.Tensor,
    energy: float | None = None,
    *,
    rtol: float | None = None,
) -> torch.Tensor:
    """Orthonormal basis ``Q`` (d, r) from a precomputed SVD (the ``tokens`` subspace mode).

    svals: (m,) singular values (any order; sorted here, descending). V: (d, m) the matching
    right singular vectors **as columns** (``Vh.T``, not ``Vh``). Keeps the numerical rank
    (``sigma > rtol * sigma_max``, ``rtol`` default ``max(d, m) * eps_float64``) and, with
    ``energy < 1``, only the leading vectors holding ``energy`` of ``sum(sigma^2)``.
    """
    energy = _check_energy(energy)
    svals = svals.to(_F64).reshape(-1)  # (m,)
    V = V.to(_F64)  # (d, m)
    if V.ndim != 2 or V.shape[1] != svals.shape[0]:
        raise ValueError(f"basis_from_svd: V must be (d, m) with m = len(svals) = {svals.shape[0]}, got {tuple(V.shape)}")
    d, m = V.shape
    order = torch.sort(-svals, stable=True).indices  # (m,) descending
    svals, V = svals[order], V[:, order]
    if m == 0 or svals[0] <= 0:
        return V.new_zeros((d, 0))
    if rtol is None:
        rtol = max(d, m) * torch.finfo(_F64).eps
    rank = int((svals > rtol * svals[0]).sum())
    r = rank
    if energy is not None and energy < 1.0:
        s2 = svals[:rank] ** 2  # (rank,)
        frac = torch.cumsum(s2, 0) / s2.sum()  # (rank,) cumulative energy fraction
        # smallest r with frac[r-1] >= energy (a relative 1e-12 slack absorbs rounding)
        r = min(rank, int((frac < energy * (1.0 - 1e-12)).sum()) + 1)
    return V[:, :r].contiguous()


def row_space_basis(S: torch.Tensor, energy: float | None = None, *, rtol: float | None = None) -> torch.Tensor:
    """``Q`` (d, r) with orthonormal columns spanning the rows of ``S`` (N_e, d).

    Rank-revealing through the SVD (see the module docstring); ``rtol`` defaults to
    ``max(N_e, d) * eps_float64``. ``energy < 1`` truncates to the leading right singular
    vectors holding that fraction of ``sum(sigma^2)``.
    """
    S = S.to(_F64)  # (N_e, d)
    if S.ndim != 2:
        raise ValueError(f"row_space_basis: S must be 2-D (N_e, d), got {tuple(S.shape)}")
    if rtol is None:
        rtol = max(S.shape) * torch.finfo(_F64).eps
    _, svals, Vh = torch.linalg.svd(S, full_matrices=False)  # (m,), (m, d)
    return basis_from_svd(svals, Vh.T, energy, rtol=rtol)


# ----------------------------------------------------------------------------- orthogonal module


def _empty_complement(layer: int | None, d: int, what: str) -> EmptyComplementError:
    where = f"layer {layer}" if layer is not None else "this layer"
    return EmptyComplementError(
        f"VIPAMIN at {where}: {what}, so the orthogonal complement of the row space of S is "
        f"empty (width d = {d}) and the orthogonal module is undefined with init.lam > 0; "
        f"set init.energy < 1 to truncate the basis, use init.lam=0, or use fewer tokens"
    )


def orthogonal_prompts(
    R_l: torch.Tensor,
    W_V: torch.Tensor,
    b_V: torch.Tensor,
    Q: torch.Tensor,
    *,
    official_compat: bool = False,
    layer: int | None = None,
) -> torch.Tensor:
    """Orthogonalizing module (no norm1): ``p_orth`` (P, d) float64.

    R_l: (P, d) random prompts; W_V: (d, d) (out x in); b_V: (d,); Q: (d, r) orthonormal.
    Default: the pre-image ``W_V^+ (u_perp - b_V)``, so ``W_V p_orth + b_V = u_perp`` when
    ``W_V`` is invertible. ``official_compat``: the public code's ``(u_perp - b_V) @ pinv(W_V)``.
    ``r == d`` raises :class:`EmptyComplementError` naming ``layer``.
    """
    R_l = R_l.to(_F64)  # (P, d)
    W_V = W_V.to(_F64)  # (d, d)
    b_V = b_V.to(_F64)  # (d,)
    Q = Q.to(_F64)  # (d, r)
    d = W_V.shape[0]
    if Q.shape[1] >= d:
        raise _empty_complement(layer, d, f"the basis has rank r = {Q.shape[1]} = d")
    u = R_l @ W_V.T + b_V  # (P, d) value vectors
    u_perp = u - (u @ Q) @ Q.T  # (P, d) projected off the row space
    W_pinv = torch.linalg.pinv(W_V)  # (d, d) once per layer
    if official_compat:
        return (u_perp - b_V) @ W_pinv  # (P, d) the public code's transposed map
    return (u_perp - b_V) @ W_pinv.T  # (P, d) rows of W_V^+ (u_perp - b_V)


def ln_aware_orthogonal_prompts(
    R_l: torch.Tensor,
    W_V: torch.Tensor,
    b_V: torch.Tensor,
    Q: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    layer: int,
    *,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, float, bool]:
    """Orthogonal prompts that stay orthogonal after ``norm1`` (LayerNorm gamma, beta).

    Returns ``(p_orth (P, d) float64, energy_reached, exact)``. ``energy_reached`` is the mean
    projection energy of ``W_V LN(p_orth) + b_V`` onto ``Q`` with LayerNorm epsilon ``eps``
    (timm's ViT default 1e-6; it only affects this report, not the solution). ``exact`` is False
    when ``||y0||^2 > d``: then every prompt is ``y0 sqrt(d) / ||y0||`` and one
    :class:`LnAwareInfeasibleWarning` names the layer. ``r + 1 >= d`` raises
    :class:`EmptyComplementError`.
    """
    R_l = R_l.to(_F64)  # (P, d)
    W_V = W_V.to(_F64)  # (d, d)
    b_V = b_V.to(_F64)  # (d,)
    Q = Q.to(_F64)  # (d, r)
    gamma = gamma.to(_F64)  # (d,)
    beta = beta.to(_F64)  # (d,)
    d, r = W_V.shape[0], Q.shape[1]
    if r + 1 >= d:
        raise _empty_complement(layer, d, f"init.ln_aware needs r + 1 < d, but r + 1 = {r + 1}")

    A = torch.cat([(Q.T @ W_V) * gamma, W_V.new_ones(1, d)], dim=0)  # (r+1, d)
    c = torch.cat([-(Q.T @ (W_V @ beta + b_V)), W_V.new_zeros(1)])  # (r+1,)
    # A^+ and the null-space projector from one SVD, with pinv's default tolerance
    U, sv, Vh = torch.linalg.svd(A, full_matrices=False)  # (r+1, m), (m,), (m, d)
    keep = sv > max(A.shape) * torch.finfo(_F64).eps * sv[0]  # (m,)
    U, sv, Vh = U[:, keep], sv[keep], Vh[keep]  # rank-q factors
    y0 = Vh.T @ ((U.T @ c) / sv)  # (d,) min-norm solution A^+ c
    y0_sq = float(y0 @ y0)

    if y0_sq <= d:
        n = R_l - (R_l @ Vh.T) @ Vh  # (P, d) rows (I - A^+ A) R_i
        n_norm = n.norm(dim=1)  # (P,)
        if bool((n_norm <= torch.finfo(_F64).eps * R_l.norm(dim=1).clamp_min(1e-300)).any()):
            raise ValueError(
                f"ln_aware at layer {layer}: a random prompt lies in the constraints' row space "
                f"(no null-space component to scale); draw another init.seed"
            )
        t = math.sqrt(d - y0_sq) / n_norm  # (P,)
        p_orth = y0 + t[:, None] * n  # (P, d) zero-mean, ||.||^2 = d
        exact = True
    else:
        p_orth = (y0 * (math.sqrt(d) / math.sqrt(y0_sq))).expand(R_l.shape[0], d).clone()  # (P, d)
        exact = False

    u_ln, _ = value_vectors(p_orth, W_V, b_V, norm=(gamma, beta, eps))  # (P, d)
    energy_reached = float(projection_energy(u_ln, Q))
    if not exact:
        warnings.warn(
            f"init.ln_aware: layer {layer} has no exactly norm1-orthogonal prompt "
            f"(||y0||^2 = {y0_sq:.4g} > d = {d}); using y0 * sqrt(d) / ||y0||, "
            f"projection energy after norm1 = {energy_reached:.3g}",
            LnAwareInfeasibleWarning,
            stacklevel=2,
        )
    return p_orth, energy_reached, exact


# ----------------------------------------------------------------------------- scale and mix


def rescale_to(p_orth: torch.Tensor, p_match: torch.Tensor) -> torch.Tensor:
    """``orth_scale=match``: each row of ``p_orth`` (P, d) rescaled to the norm of the same row
    of ``p_match`` (P, d). A zero row of ``p_orth`` stays zero."""
    p_orth = p_orth.to(_F64)  # (P, d)
    p_match = p_match.to(_F64)  # (P, d)
    n_orth = p_orth.norm(dim=1, keepdim=True)  # (P, 1)
    n_match = p_match.norm(dim=1, keepdim=True)  # (P, 1)
    scale = torch.where(n_orth > 0, n_match / n_orth.clamp_min(1e-300), torch.zeros_like(n_orth))
    return p_orth * scale


def combine(p_match: torch.Tensor, p_orth: torch.Tensor, lam: float) -> torch.Tensor:
    """``(1 - lam) p_match + lam p_orth``; lam = 0 and lam = 1 return exact copies."""
    lam = _check_lam(lam)
    p_match = p_match.to(_F64)  # (P, d)
    p_orth = p_orth.to(_F64)  # (P, d)
    if lam == 0.0:
        return p_match.clone()
    if lam == 1.0:
        return p_orth.clone()
    return (1.0 - lam) * p_match + lam * p_orth


# ----------------------------------------------------------------------------- one layer


@dataclass
class VipaminLayerResult:
    """One layer's VIPAMIN output (all float64).

    prompts: (P, d) the mixed prompts. match: (P, d). orth: (P, d) as mixed (after orth_scale;
    zeros when lam = 0 and the complement is empty -- see ``info['orth_defined']``).
    idx: (P, k) the matched patch indices. info: rank, energies and flags for the metadata.
    """

    prompts: torch.Tensor
    match: torch.Tensor
    orth: torch.Tensor
    idx: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def vipamin_layer(
    *,
    E: torch.Tensor,
    K: torch.Tensor,
    R: torch.Tensor,
    W_V: torch.Tensor,
    b_V: torch.Tensor,
    k: int,
    lam: float,
    S: torch.Tensor | None = None,
    Q: torch.Tensor | None = None,
    energy: float | None = None,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    official_compat: bool = False,
    ln_aware: bool = False,
    orth_scale: str = "match",
    layer: int = 0,
    ln_eps: float = 1e-6,
) -> VipaminLayerResult:
    """A whole VIPAMIN layer: validate, match, orthogonalize, rescale, mix, report.

    E: (N_p, d); K: (P + N_p, d_h); R: (P, d) this layer's random prompts; W_V: (d, d);
    b_V: (d,). The row-space basis is ``Q`` (d, r) if given (``tokens`` mode), else
    ``row_space_basis(S, energy)`` from ``S`` (N_e, d). ``gamma``, ``beta`` (d,) are norm1's
    affine parameters: required for ``ln_aware``; when given, ``info`` also reports the final
    prompts' projection energy after norm1 (LayerNorm eps ``ln_eps``).

    info keys: layer, rank (r, or None without a basis), orth_defined, ln_aware_exact,
    ln_aware_energy (None unless ln_aware), energy_raw (of ``W_V p + b_V`` for the final prompts),
    energy_norm1 (of ``W_V norm1(p) + b_V``; None without gamma/beta).
    """
    P = R.shape[0]
    validate_vipamin_options(k, lam, official_compat, ln_aware, orth_scale, N_p=E.shape[0])
    _check_energy(energy)
    if ln_aware and (gamma is None or beta is None):
        raise ValueError(f"init.ln_aware=true needs norm1's gamma and beta (layer {layer})")
    if Q is None and S is not None:
        Q = row_space_basis(S, energy)  # (d, r)
    if Q is None and lam > 0:
        raise ValueError(f"vipamin_layer (layer {layer}): pass S or Q when init.lam > 0")

    p_match, idx = match_prompts(K, E, P, k)  # (P, d), (P, k)
    d = p_match.shape[1]
    info: dict[str, Any] = {
        "layer": layer,
        "rank": None if Q is None else int(Q.shape[1]),
        "orth_defined": True,
        "ln_aware_exact": None,
        "ln_aware_energy": None,
    }

    r = None if Q is None else Q.shape[1]
    complement_empty = r is None or (r + 1 >= d if ln_aware else r >= d)
    if complement_empty and lam == 0:
        p_orth = torch.zeros_like(p_match)  # (P, d) undefined and unused
        info["orth_defined"] = False
    elif ln_aware:
        p_orth, e_reached, exact = ln_aware_orthogonal_prompts(R, W_V, b_V, Q, gamma, beta, layer, eps=ln_eps)
        info["ln_aware_exact"], info["ln_aware_energy"] = exact, e_reached
    else:
        p_orth = orthogonal_prompts(R, W_V, b_V, Q, official_compat=official_compat, layer=layer)
    if orth_scale == "match":
        p_orth = rescale_to(p_orth, p_match)
    prompts = combine(p_match, p_orth, lam)  # (P, d)

    norm = None if gamma is None or beta is None else (gamma, beta, ln_eps)
    u_ln, u_raw = value_vectors(prompts, W_V, b_V, norm=norm)
    info["energy_raw"] = None if Q is None else float(projection_energy(u_raw, Q))
    info["energy_norm1"] = None if Q is None or u_ln is None else float(projection_energy(u_ln, Q))
    return VipaminLayerResult(prompts=prompts, match=p_match, orth=p_orth, idx=idx, info=info)
