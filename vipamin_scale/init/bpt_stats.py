"""BPT's whitening statistics: the capture pass and the sharded per-layer math around `init/bpt.py`.

    bpt_whitening(cfg, backbone) -> Whitening | None   (None: the run needs none)
    compute_whitening(cfg, model) -> Whitening(W (L_p, d, d), U (L_p, d, d), S (L_p, d), Xbar (L_p, N_p, d), B)

Whoever trains a BPT model computes them first, on the backbone it then trains, and hands them to
`models.build_model(..., whitening=)`: the model never reads data itself.

Works unchanged under torchrun, like `vipamin-scale init`:
  1. every rank reads its contiguous block of the first `init.num_images` training images
     (`run.Calibration`, eval transform);
  2. one prompt-free forward per batch collects `X[l]`, the sum of block `l`'s input at the patch
     positions (layer 0: the `patch_embed` output) — `capture_layer_stats(block_in=True)` — and,
     for `init.bpt_sigma=tokens`, `C[l]`, the sum over images of the token mean of `x x^T`;
  3. `reduce_means` all-reduces the sums into `Xbar[l]` (and `C[l]`), float64, on every rank;
  4. layer `l`'s Σ (`init.bpt_sigma`: `mean` from `Xbar`, `tokens` from `C`), its relative
     `ε = init.bpt_eps × σ_max(Σ)` and its whitening (`bpt.whiten`) run on rank `l mod world`
     and are gathered to every rank (`map_layers`).
The result depends only on the backbone's weights, the calibration images, `init.bpt_sigma`,
`init.bpt_eps` and the float rounding of the reduction: the same run (same world size) recomputes it bit for bit,
which is what a resumed run relies on for a frozen whitening matrix.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from omegaconf import DictConfig
from timm.models.vision_transformer import VisionTransformer

from vipamin_scale.init import bpt as bpt_math
from vipamin_scale.init.capture import CaptureSpec, capture_layer_stats, layer_weights
from vipamin_scale.init.run import Calibration, calibration_model
from vipamin_scale.init.sharded import map_layers, reduce_means
from vipamin_scale.models.bpt import needs_whitening
from vipamin_scale.models.prompted import PromptedViT

log = logging.getLogger(__name__)


@dataclass
class Whitening:
    """Per prompt row `l` (the layer the row is inserted before): float64 tensors."""

    W: torch.Tensor  # (L_p, d, d)  (Σ_l + εI)^{-1/2}
    U: torch.Tensor  # (L_p, d, d)  eigenvectors of Σ_l + εI, columns by descending eigenvalue
    S: torch.Tensor  # (L_p, d)     eigenvalues of Σ_l + εI, descending (ε included)
    Xbar: torch.Tensor  # (L_p, N_p, d) mean block input at the patch positions (layer 0: patch_embed output)
    B: int  # calibration images used
    sigma: str  # init.bpt_sigma: mean | tokens
    eps: torch.Tensor  # (L_p,) the absolute ε added per row (init.bpt_eps × σ_max(Σ_l))
    seconds: float  # wall time of capture + math


def bpt_whitening(cfg: DictConfig, backbone: VisionTransformer) -> Optional[Whitening]:
    """The whitening a run of `cfg` builds its model from, computed on `backbone` (the one it trains,
    on its device; left as it was), or None when it needs none (`prompt.kind` is not bpt, or low
    rank with Xavier init). Collective under torchrun: every rank calls it."""
    pc = cfg.prompt
    if pc.kind != "bpt" or not needs_whitening(pc.bpt, pc.bpt_init):
        return None
    device = next(backbone.parameters()).device
    return compute_whitening(cfg, calibration_model(cfg, backbone).to(device))


def compute_whitening(cfg: DictConfig, model: PromptedViT) -> Whitening:
    """Σ^{-1/2} (and its eigenbasis) for every prompt row of `model`, from its own backbone."""
    t0 = time.perf_counter()
    L_p, P, d = model.prompt_shape
    rows = list(range(L_p))
    calib = Calibration(cfg, model)
    device = next(model.backbone.parameters()).device

    def batches() -> Iterator[torch.Tensor]:
        for images in calib:
            yield images.to(device)

    was_training = model.training
    sigma = str(cfg.init.bpt_sigma)
    tokens = sigma == "tokens"
    sums = capture_layer_stats(model, batches(), torch.zeros(model.prompt_shape),
                               CaptureSpec(layers=rows, block_in=True, block_in_cov=tokens))
    model.train(was_training)
    B, means = reduce_means(sums, tables=("X", "C") if tokens else ("X",))
    rel = float(cfg.init.bpt_eps)

    def compute(l: int) -> dict:
        w = layer_weights(model, l)
        Sigma = (bpt_math.token_covariance(w["W_Q"], w["W_K"], means["C"][l]) if tokens
                 else bpt_math.attention_covariance(w["W_Q"], w["W_K"], means["X"][l]))
        eps = bpt_math.relative_eps(Sigma, rel)
        W, U, S = bpt_math.whiten(Sigma, eps, layer=l)
        return {"W": W, "U": U, "S": S, "eps": torch.tensor([eps], dtype=torch.float64)}

    out, _ = map_layers(rows, compute, {"W": (d, d), "U": (d, d), "S": (d,), "eps": (1,)})
    seconds = time.perf_counter() - t0
    log.info("bpt: whitening (Σ: %s) of %d layer(s) from B=%d images in %.2fs (eigenvalues of Σ+εI, layer 0: "
             "max %.3g, min %.3g; ε=%g×σ_max=%.3g)", sigma, L_p, B, seconds, out["S"][0, 0].item(),
             out["S"][0, -1].item(), rel, out["eps"][0, 0].item())
    Xbar = torch.stack([means["X"][l] for l in rows])
    return Whitening(W=out["W"], U=out["U"], S=out["S"], Xbar=Xbar, B=B, sigma=sigma, eps=out["eps"][:, 0],
                     seconds=seconds)
