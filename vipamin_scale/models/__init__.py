"""Backbones and the prompted model, built from the config."""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer

from vipamin_scale.config import ConfigError
from vipamin_scale.models.backbones import build_backbone
from vipamin_scale.models.bpt import build_bpt_prompts, needs_whitening
from vipamin_scale.models.prompted import PromptedViT, VPTPrompts, load_prompts_file, random_prompts


def load_backbone(cfg) -> VisionTransformer:
    """The frozen backbone that `model.*` names, its weights read from disk (or timm's cache): a run
    does this once, and its initializer, BPT's statistics and its training all use that object."""
    return build_backbone(cfg.model.name, cfg.model.img_size, cfg.model.checkpoint, cfg.model.checkpoint_format,
                          depth=cfg.model.depth, pretrained=cfg.model.pretrained)


def build_model(cfg, num_classes: int, prompts: torch.Tensor | None = None, whitening=None,
                backbone: VisionTransformer | None = None) -> PromptedViT:
    """Backbone (frozen) + prompts + head as the config says, from ready tensors.

    The model never reads data and never runs a collective: what depends on the calibration
    images (the initializer's prompts, BPT's whitening) is computed beforehand by whoever trains
    (`init.run.run_init`, `init.bpt_stats.bpt_whitening`, on the same backbone) and handed in.

    `backbone`: the frozen backbone to wrap (used as is, not copied); `None` loads the config's
    (`load_backbone`). `prompts` (L_p, P, d) overrides the config's source; otherwise
    `prompt.init_file` if given, else VPT's random prompts seeded with `init.seed`.

    `prompt.kind=bpt`: the provider is `BPTPrompts` (`models/bpt.py`); given initial prompts, its
    `Z` is fitted by least squares so that `Z W^T` reproduces them (projects them, in low rank).
    Every mode but lowrank with Xavier init starts from `whitening` (an `init.bpt_stats.Whitening`
    of this backbone); without it, a ValueError saying how to compute it.
    """
    if backbone is None:
        backbone = load_backbone(cfg)
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
    pc = cfg.prompt
    if pc.bpt == "lowrank" and not pc.bpt_rank < model.dim:
        raise ConfigError(f"prompt.bpt_rank: must be < d={model.dim} for prompt.bpt=lowrank; got {pc.bpt_rank}")
    if whitening is None and needs_whitening(pc.bpt, pc.bpt_init):
        init = f", prompt.bpt_init={pc.bpt_init}" if pc.bpt == "lowrank" else ""
        raise ValueError(f"build_model: prompt.kind=bpt with prompt.bpt={pc.bpt}{init} starts from the whitening "
                         "statistics of this backbone, and none were given: compute them first "
                         "(init.bpt_stats.bpt_whitening(cfg, backbone)) and pass whitening=")
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


__all__ = ["build_model", "build_backbone", "load_backbone", "normalization", "PromptedViT", "VPTPrompts", "random_prompts"]
