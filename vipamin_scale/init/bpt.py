"""BPT (Bilinear Prompt Tuning) math: the whitening matrix and the bilinear factors of a prompt.

Spec: BASELINES.md, "BPT". Per layer `l`, with `W_Q`, `W_K` the `d × d` query/key slices of
`attn.qkv.weight` (out × in) and `Xbar` (`N_p × d`) the mean block input over the calibration
images at the patch positions (layer 0: the `patch_embed` output):

    M = W_Q W_K^T Xbar^T              (d × N_p)   = mean over images of W_Q W_K^T X^T (M is linear in X)
    Σ = M M^T / d                     (d × d)     init.bpt_sigma=mean (the paper's)
    Σ = A C A^T, A = W_Q W_K^T        (d × d)     init.bpt_sigma=tokens: C = mean over images and
                                                  patch tokens of x x^T, so Σ = mean of z z^T, z = A x
    ε = init.bpt_eps × σ_max(Σ)                   (relative: weak directions gain ≤ (1 + 1/bpt_eps)^{1/2})
    Σ + εI = U diag(S) U^T            (S descending; the SVD of a symmetric positive definite matrix)
    W = U diag(S)^{-1/2} U^T          = (Σ + εI)^{-1/2}   (ZCA whitening)

The mean `Σ` has rank at most `min(d, N_p)`: for ViT-B/16 at 224 px (`N_p = 196 < d = 768`) most of its
spectrum is the `ε` that is added, so `W` whitens `Σ + εI` exactly and `Σ` itself only on its range.

The prompts are `P_l = Z_l W_l^T` (`Z_l`: `P × c`, `W_l`: `d × c`). `least_squares_Z` finds the
`Z` that makes `Z W^T` closest (Frobenius) to given prompts: exact when `W` has rank `d`
(`c = d`, the whitening modes); for `c < d` (low rank) `Z W^T` is the orthogonal projection of
each prompt onto the column space of `W`. It and `lowrank_init` are the provider's own math and
live beside it in `models/bpt.py` (re-exported here).

Pure tensor math in float64: no I/O, no torch.distributed, no model objects.
"""
from __future__ import annotations

import torch

# the provider's own math (its initial factors), kept beside it: `models/` imports nothing from `init/`
from vipamin_scale.models.bpt import least_squares_Z, lowrank_init

__all__ = ["attention_covariance", "token_covariance", "relative_eps", "whiten", "whitening_matrix", "lowrank_init",
           "least_squares_Z"]


def attention_covariance(W_Q: torch.Tensor, W_K: torch.Tensor, Xbar: torch.Tensor) -> torch.Tensor:
    """`Σ = M M^T / d` with `M = W_Q W_K^T Xbar^T`; `W_Q`, `W_K` (d, d), `Xbar` (N_p, d) → (d, d) float64."""
    W_Q, W_K, Xbar = W_Q.double(), W_K.double(), Xbar.double()
    d = W_Q.shape[0]
    if W_Q.shape != (d, d) or W_K.shape != (d, d) or Xbar.ndim != 2 or Xbar.shape[1] != d:
        raise ValueError(f"attention_covariance: need W_Q, W_K (d, d) and Xbar (N_p, d); got "
                         f"{tuple(W_Q.shape)}, {tuple(W_K.shape)}, {tuple(Xbar.shape)}")
    M = W_Q @ (W_K.T @ Xbar.T)  # (d, N_p)
    Sigma = (M @ M.T) / d  # (d, d)
    return 0.5 * (Sigma + Sigma.T)  # exactly symmetric


def token_covariance(W_Q: torch.Tensor, W_K: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """`Σ = A C A^T` with `A = W_Q W_K^T` and `C` (d, d) the mean of `x x^T` over images and patch
    tokens: the second moment of `z = A x` over every token (full rank once B·N_p ≥ d) → (d, d) float64."""
    W_Q, W_K, C = W_Q.double(), W_K.double(), C.double()
    d = W_Q.shape[0]
    if W_Q.shape != (d, d) or W_K.shape != (d, d) or C.shape != (d, d):
        raise ValueError(f"token_covariance: need W_Q, W_K, C (d, d); got {tuple(W_Q.shape)}, {tuple(W_K.shape)}, "
                         f"{tuple(C.shape)}")
    A = W_Q @ W_K.T
    Sigma = A @ C @ A.T
    return 0.5 * (Sigma + Sigma.T)


def relative_eps(Sigma: torch.Tensor, rel: float) -> float:
    """`ε = rel × σ_max(Σ)` (Σ symmetric PSD: its largest eigenvalue)."""
    if rel < 0:
        raise ValueError(f"init.bpt_eps: must be >= 0; got {rel}")
    return rel * float(torch.linalg.eigvalsh(Sigma.double())[-1].clamp_min(0.0))


def whitening_matrix(W_Q: torch.Tensor, W_K: torch.Tensor, Xbar: torch.Tensor, eps: float,
                     layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`whiten(attention_covariance(W_Q, W_K, Xbar), eps, layer)`: the paper's Σ, absolute `eps`."""
    return whiten(attention_covariance(W_Q, W_K, Xbar), eps, layer)


def whiten(Sigma: torch.Tensor, eps: float,
           layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ZCA whitening `W = (Σ + εI)^{-1/2}` → `(W (d, d), U (d, d), S (d,))`, float64; `eps` absolute.

    `U`, `S` are the eigenvectors and eigenvalues of `Σ + εI` (`S` descending, `ε` included), so
    `W = U diag(S^{-1/2}) U^T` and `W (Σ + εI) W^T = I`. A numerically singular `Σ + εI` (ε = 0
    and `Σ` rank deficient) is an error naming the layer rather than a matrix of infinities.
    """
    if eps < 0:
        raise ValueError(f"init.bpt_eps: must be >= 0; got {eps}")
    Sigma = 0.5 * (Sigma.double() + Sigma.double().T)
    d = Sigma.shape[0]
    lam, U = torch.linalg.eigh(Sigma)  # ascending
    lam, U = lam.flip(0), U.flip(1)
    S = lam.clamp_min(0.0) + eps  # Σ is PSD: negative eigenvalues are rounding
    tol = S.max().clamp_min(torch.finfo(torch.float64).tiny) * d * torch.finfo(torch.float64).eps
    if S.min() <= tol:
        where = f" at layer {layer}" if layer is not None else ""
        raise ValueError(f"init.bpt_eps: Σ + εI is numerically singular{where} (ε={eps}, "
                         f"smallest eigenvalue {S.min().item():.3g}, largest {S.max().item():.3g}); use init.bpt_eps > 0")
    W = (U * S.rsqrt()) @ U.T  # (d, d)
    return 0.5 * (W + W.T), U, S
