"""Backbones and the prompted model, built from the config."""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vipamin_scale.models.backbones import build_backbone
from vipamin_scale.models.prompted import PromptedViT, VPTPrompts, load_prompts_file, random_prompts


def build_model(cfg, num_classes: int, prompts: torch.Tensor | None = None) -> PromptedViT:
    """Backbone (frozen) + prompts + head as the config says.

    `prompts` (L_p, P, d) overrides the config's source; otherwise `prompt.init_file` if given,
    else VPT's random prompts seeded with `init.seed`.
    """
    backbone = build_backbone(cfg.model.name, cfg.model.img_size, cfg.model.checkpoint, cfg.model.checkpoint_format)
    model = PromptedViT(backbone, num_classes, cfg.prompt.length, cfg.prompt.deep,
                        dropout=cfg.prompt.dropout, pool=cfg.model.pool, seed=cfg.init.seed)
    if prompts is None and cfg.prompt.init_file:
        prompts = load_prompts_file(cfg.prompt.init_file, model)
    if prompts is not None:
        model._check_prompt_shape(prompts)
        model.prompt = VPTPrompts(prompts)
    return model


def normalization(cfg, backbone) -> tuple[list[float], list[float]]:
    """The model's mean/std (timm's pretrained config; ImageNet's for tiny models) unless overridden."""
    pcfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean = list(cfg.data.mean) if cfg.data.mean is not None else list(pcfg.get("mean", IMAGENET_DEFAULT_MEAN))
    std = list(cfg.data.std) if cfg.data.std is not None else list(pcfg.get("std", IMAGENET_DEFAULT_STD))
    return mean, std


__all__ = ["build_model", "build_backbone", "normalization", "PromptedViT", "VPTPrompts", "random_prompts"]
