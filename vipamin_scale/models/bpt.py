"""BPT prompt provider: bilinear prompts `P_l = Z_l W_l^T` for `PromptedViT` (spec: BASELINES.md, "BPT").

    BPTPrompts(mode, W0 (L_p, d, c), Z0 (L_p, P, c))   forward() -> (L_p, P, d)

Modes (`prompt.bpt`):
  whiten_fixed      c = d, W_l = (Σ_l + εI)^{-1/2} frozen: a persistent buffer `W`, never touched by
                    the optimizer; only `Z` trains (BPT-fwhiten). Same parameter count as VPT.
  whiten_trainable  c = d, W_l starts at (Σ_l + εI)^{-1/2} and trains with Z (BPT-twhiten).
  lowrank           c = prompt.bpt_rank < d, W_l (d × c) trains with Z; initialized Xavier-uniform
                    U(±sqrt(6 / (d + c))) or, with prompt.bpt_init=whiten, to the c leading columns
                    of U S^{-1/2} (principal whitening directions).

Initial `Z_l` (P × c): N(0, 0.02²), drawn from a generator seeded with `init.seed + 2` (Xavier `W`
from `init.seed + 3`; `init.seed` itself draws VPT's random prompts, `+ 1` the head).

Composition with a prompt initializer (init.method=vipamin|spt, or prompt.init_file): given
prompts `P0_l` (P × d), `Z_l` is set by least squares, `Z_l = argmin ‖Z W_l^T − P0_l‖_F`, with `W_l`
at its initial value. In the whitening modes `W_l` is invertible, so the model starts from exactly
`P0` (up to float rounding) and the bilinear parametrization only changes how the optimizer moves
it. In low rank (c < d) `Z_l W_l^T` is the orthogonal projection of every prompt onto the
c-dimensional column space of `W_l`: the initializer's prompts are not reproduced, only their
component in that subspace (report it: `fit_residual` holds the relative residual per layer).

Whitening: the modes that need it (`needs_whitening`) are built from a ready `Whitening` (the
statistics of the backbone that is trained, computed beforehand by whoever trains:
`init.bpt_stats.bpt_whitening`); the provider and the model never read data themselves.

Checkpoints and resume: the train loop saves trainable parameters by name (`prompt.Z`, and
`prompt.W` where it trains). The frozen whitening matrix is a buffer rebuilt, when the model is
built, from statistics recomputed from the backbone and the calibration images; that computation
is deterministic, so a resumed run (same world size) has the same `W` bit for bit.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn as nn

import vipamin_scale.distributed as D

log = logging.getLogger(__name__)

MODES = ("whiten_fixed", "whiten_trainable", "lowrank")
Z_STD = 0.02


def needs_whitening(mode: str, bpt_init: str = "xavier") -> bool:
    """Whether `prompt.bpt=mode` (with `prompt.bpt_init`) starts from the whitening statistics: every
    mode but low rank with Xavier init."""
    return not (mode == "lowrank" and bpt_init == "xavier")


def bpt_param_count(L_p: int, P: int, d: int, mode: str, rank: Optional[int] = None) -> int:
    """Trainable prompt parameters of BPT: `L_p · P · c` for Z, plus `L_p · d · c` for a trainable W."""
    if mode == "whiten_fixed":
        return L_p * P * d
    if mode == "whiten_trainable":
        return L_p * (P * d + d * d)
    if mode == "lowrank":
        if rank is None:
            raise ValueError("bpt_param_count: lowrank needs the rank")
        return L_p * (P * rank + d * rank)
    raise ValueError(f"prompt.bpt: must be one of {', '.join(MODES)}; got {mode!r}")


def vpt_param_count(L_p: int, P: int, d: int) -> int:
    """VPT's trainable prompt parameters at the same shape: the `(L_p, P, d)` tensor."""
    return L_p * P * d


def xavier_factor(L_p: int, d: int, c: int, seed: int) -> torch.Tensor:
    """Xavier-uniform `W` (L_p, d, c), U(-a, a) with a = sqrt(6 / (d + c)), float64, seeded."""
    a = math.sqrt(6.0 / (d + c))
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.rand((L_p, d, c), generator=g, dtype=torch.float64).mul_(2 * a).sub_(a)


def random_Z(L_p: int, P: int, c: int, seed: int) -> torch.Tensor:
    """`Z` (L_p, P, c) ~ N(0, 0.02²), float64, seeded."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((L_p, P, c), generator=g, dtype=torch.float64).mul_(Z_STD)


def lowrank_init(U: torch.Tensor, S: torch.Tensor, rank: int) -> torch.Tensor:
    """The `rank` leading columns of `U diag(S)^{-1/2}` (principal whitening directions), (d, rank)."""
    d = U.shape[0]
    if not 1 <= rank <= d:
        raise ValueError(f"prompt.bpt_rank: must lie in [1, d={d}]; got {rank}")
    return U[:, :rank].double() * S[:rank].double().rsqrt()


def least_squares_Z(prompts: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """`Z = argmin ‖Z W^T − prompts‖_F`: prompts (P, d), W (d, c) → Z (P, c) float64.

    Solved as `W Z^T = prompts^T` with an SVD-based least-squares solver (minimum-norm `Z` if `W`
    is rank deficient). Exact when `W` has rank `d`; otherwise `Z W^T` is the projection of each
    prompt onto the column space of `W`.
    """
    prompts, W = prompts.detach().double().cpu(), W.detach().double().cpu()
    if prompts.ndim != 2 or W.ndim != 2 or prompts.shape[1] != W.shape[0]:
        raise ValueError(f"least_squares_Z: need prompts (P, d) and W (d, c); got {tuple(prompts.shape)}, {tuple(W.shape)}")
    return torch.linalg.lstsq(W, prompts.T, driver="gelsd").solution.T.contiguous()  # (P, c)


def fit_Z(prompts: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Per layer least squares `Z_l W_l^T ≈ prompts_l`: prompts (L_p, P, d), W (L_p, d, c) →
    (Z (L_p, P, c) float64, relative residual ‖Z_l W_l^T − P_l‖ / ‖P_l‖ per layer)."""
    Zs, res = [], []
    for l in range(prompts.shape[0]):
        target = prompts[l].detach().double().cpu()
        Z = least_squares_Z(target, W[l])
        fit = Z @ W[l].detach().double().cpu().T
        res.append(((fit - target).norm() / target.norm().clamp_min(1e-300)).item())
        Zs.append(Z)
    return torch.stack(Zs), res


class BPTPrompts(nn.Module):
    """Bilinear prompts `(L_p, P, d) = Z (L_p, P, c) @ W^T (L_p, c, d)`."""

    def __init__(self, mode: str, W: torch.Tensor, Z: torch.Tensor):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"prompt.bpt: must be one of {', '.join(MODES)}; got {mode!r}")
        if W.ndim != 3 or Z.ndim != 3 or W.shape[0] != Z.shape[0] or W.shape[2] != Z.shape[2]:
            raise ValueError(f"BPTPrompts: need W (L_p, d, c) and Z (L_p, P, c); got {tuple(W.shape)}, {tuple(Z.shape)}")
        L_p, d, c = W.shape
        if mode != "lowrank" and c != d:
            raise ValueError(f"prompt.bpt={mode}: W must be square (d × d); got {tuple(W.shape[1:])}")
        self.mode = mode
        self.Z = nn.Parameter(Z.detach().clone().float())
        if mode == "whiten_fixed":
            self.register_buffer("W", W.detach().clone().float(), persistent=True)
        else:
            self.W = nn.Parameter(W.detach().clone().float())
        self.fit_residual: Optional[list[float]] = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.Z.shape[0], self.Z.shape[1], self.W.shape[1])

    @property
    def rank(self) -> int:
        return self.W.shape[2]

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self) -> torch.Tensor:
        return torch.matmul(self.Z, self.W.transpose(1, 2))  # (L_p, P, d)

    def extra_repr(self) -> str:
        L_p, P, d = self.shape
        return f"mode={self.mode}, L_p={L_p}, P={P}, d={d}, c={self.rank}"


def build_bpt_prompts(mode: str, shape: tuple[int, int, int], seed: int, rank: int = 32, bpt_init: str = "xavier",
                      whitening=None, prompts: Optional[torch.Tensor] = None) -> BPTPrompts:
    """The provider for a model of prompt shape `(L_p, P, d)`.

    `whitening`: an object with `W` (L_p, d, d), `U` (L_p, d, d), `S` (L_p, d) (see
    `init.bpt_stats.Whitening`); needed unless mode=lowrank with bpt_init=xavier (`needs_whitening`).
    `prompts` (L_p, P, d): initial prompts to reproduce by least squares (module docstring).
    """
    L_p, P, d = shape
    if mode == "lowrank":
        if not 1 <= rank < d:
            raise ValueError(f"prompt.bpt_rank: must lie in [1, d) = [1, {d}) for prompt.bpt=lowrank; got {rank}")
        c = rank
    else:
        c = d
    if whitening is None and needs_whitening(mode, bpt_init):
        raise ValueError(f"prompt.bpt={mode}: needs the whitening statistics (init.bpt_stats.bpt_whitening)")
    if whitening is not None and tuple(whitening.W.shape) != (L_p, d, d):
        raise ValueError(f"BPT whitening of shape {tuple(whitening.W.shape)} does not fit prompts (L_p, P, d) = {shape}")
    if mode == "lowrank" and bpt_init == "xavier":
        W0 = xavier_factor(L_p, d, c, seed + 3)
    elif mode == "lowrank":
        W0 = torch.stack([lowrank_init(whitening.U[l], whitening.S[l], c) for l in range(L_p)])
    else:
        W0 = whitening.W.double()
    residual = None
    if prompts is not None:
        if tuple(prompts.shape) != shape:
            raise ValueError(f"BPT initial prompts of shape {tuple(prompts.shape)} do not fit (L_p, P, d) = {shape}")
        Z0, residual = fit_Z(prompts, W0)
    else:
        Z0 = random_Z(L_p, P, c, seed + 2)
    provider = BPTPrompts(mode, W0, Z0)
    provider.fit_residual = residual
    if D.rank() == 0:
        log.info("bpt %s: prompts (L_p, P, d) = %s, c = %d: %d trainable prompt parameters (VPT at the same P: %d)%s",
                 mode, shape, c, provider.num_trainable, vpt_param_count(L_p, P, d),
                 "" if residual is None else f"; initial prompts fitted by least squares, relative residual max "
                 f"{max(residual):.3g}")
    return provider
