"""Backbones and the prompted model, built from the config."""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vipamin_scale.models.backbones import build_backbone
from vipamin_scale.models.prompted import PromptedViT, VPTPrompts, load_prompts_file, random_prompts


def build_model(cfg, num_classes: int, prompts: torch.Tensor | None = None, whitening=None) -> PromptedViT:
    """Backbone (frozen) + prompts + head as the config says.

    `prompts` (L_p, P, d) overrides the config's source; otherwise `prompt.init_file` if given,
    else VPT's random prompts seeded with `init.seed`.

    `prompt.kind=bpt`: the provider is `BPTPrompts` (`models/bpt.py`); given initial prompts, its
    `Z` is fitted by least squares so that `Z W^T` reproduces them (projects them, in low rank).
    The whitening statistics are computed here, on this model's own backbone, with one
    calibration pass (`init.bpt_stats.compute_whitening`; collective under torchrun: every rank
    must build the model) unless `whitening` (a `Whitening`) is given or the mode needs none
    (lowrank with Xavier init). Computing them here, rather than in the caller, guarantees they
    belong to the backbone that is trained, and a resumed run rebuilds them identically.
    """
    backbone = build_backbone(cfg.model.name, cfg.model.img_size, cfg.model.checkpoint, cfg.model.checkpoint_format,
                              depth=cfg.model.depth, pretrained=cfg.model.pretrained)
    model = PromptedViT(backbone, num_classes, cfg.prompt.length, cfg.prompt.deep,
                        dropout=cfg.prompt.dropout, pool=cfg.model.pool, seed=cfg.init.seed)
    if prompts is None and cfg.prompt.init_file:
        prompts = load_prompts_file(cfg.prompt.init_file, model)
    if prompts is not None:
        model._check_prompt_shape(prompts)
    if cfg.prompt.kind == "bpt":
        model.prompt = _bpt_provider(cfg, model, prompts, whitening)
    elif prompts is not None:
        model.prompt = VPTPrompts(prompts)
    return model


def _bpt_provider(cfg, model: PromptedViT, prompts: torch.Tensor | None, whitening):
    from vipamin_scale.config import ConfigError
    from vipamin_scale.models.bpt import build_bpt_prompts

    pc = cfg.prompt
    if pc.bpt == "lowrank" and not pc.bpt_rank < model.dim:
        raise ConfigError(f"prompt.bpt_rank: must be < d={model.dim} for prompt.bpt=lowrank; got {pc.bpt_rank}")
    if whitening is None and not (pc.bpt == "lowrank" and pc.bpt_init == "xavier"):
        from vipamin_scale.init.bpt_stats import compute_whitening

        whitening = compute_whitening(cfg, model)
    provider = build_bpt_prompts(pc.bpt, model.prompt_shape, cfg.init.seed, rank=pc.bpt_rank, bpt_init=pc.bpt_init,
                                 whitening=whitening, prompts=prompts)
    model._check_prompt_shape(provider(), source="BPT prompt provider")
    return provider


def normalization(cfg, backbone) -> tuple[list[float], list[float]]:
    """The model's mean/std (timm's pretrained config; ImageNet's for tiny models) unless overridden."""
    pcfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean = list(cfg.data.mean) if cfg.data.mean is not None else list(pcfg.get("mean", IMAGENET_DEFAULT_MEAN))
    std = list(cfg.data.std) if cfg.data.std is not None else list(pcfg.get("std", IMAGENET_DEFAULT_STD))
    return mean, std


__all__ = ["build_model", "build_backbone", "normalization", "PromptedViT", "VPTPrompts", "random_prompts"]
