"""Image transforms: PIL RGB image -> normalized float32 tensor (3, img_size, img_size).

eval:  resize the shorter side to img_size (bicubic), center crop img_size x img_size, scale to
       [0, 1], normalize with (mean, std). An image already img_size x img_size is only scaled
       and normalized: no resampling touches its pixels.
train: the eval transform, unless `augment` (off by default, as in the VTAB protocol): then
       RandomResizedCrop(img_size, bicubic) + horizontal flip with probability 1/2, then normalize.
       The random draws come from a per-sample seed when one is given (the loader derives it from
       (seed, epoch, key)), so an epoch is reproducible whatever the worker layout; the global
       torch RNG is left untouched.

mean/std are given by the caller (the model's defaults, or data.mean/data.std).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

BICUBIC = T.InterpolationMode.BICUBIC


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean/std: need 3 channel values; got mean={list(mean)}, std={list(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std: every value must be > 0; got {list(std)}")
    return (torch.tensor([float(m) for m in mean]).view(3, 1, 1),
            torch.tensor([float(s) for s in std]).view(3, 1, 1))


class EvalTransform:
    """Resize (shorter side, bicubic) + center crop + normalize; identity geometry at model size."""

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float]):
        if img_size <= 0:
            raise ValueError(f"img_size: must be > 0; got {img_size}")
        self.img_size = int(img_size)
        self.mean, self.std = _check_stats(mean, std)

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """uint8 RGB -> float32 in [0, 1] -> (x - mean) / std."""
        x = TF.pil_to_tensor(img).to(torch.float32).div_(255.0)
        return x.sub_(self.mean).div_(self.std)

    def __call__(self, img: Image.Image, seed: int | None = None) -> torch.Tensor:
        s = self.img_size
        if img.size != (s, s):
            img = TF.center_crop(TF.resize(img, s, interpolation=BICUBIC), [s, s])
        return self.to_tensor(img)

    def __repr__(self) -> str:
        return f"EvalTransform(img_size={self.img_size}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class TrainTransform(EvalTransform):
    """RandomResizedCrop + horizontal flip + normalize when `augment`, else exactly EvalTransform."""

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], augment: bool = False):
        super().__init__(img_size, mean, std)
        self.augment = bool(augment)
        self._aug = T.Compose([T.RandomResizedCrop(self.img_size, interpolation=BICUBIC),
                               T.RandomHorizontalFlip()])

    def __call__(self, img: Image.Image, seed: int | None = None) -> torch.Tensor:
        if not self.augment:
            return super().__call__(img)
        if seed is None:
            return self.to_tensor(self._aug(img))
        with torch.random.fork_rng(devices=[]):  # private draws; the caller's RNG state is restored
            torch.manual_seed(seed)
            return self.to_tensor(self._aug(img))

    def __repr__(self) -> str:
        return super().__repr__().replace("EvalTransform(", f"TrainTransform(augment={self.augment}, ")


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> EvalTransform:
    return EvalTransform(img_size, mean, std)


def train_transform(img_size: int, mean: Sequence[float], std: Sequence[float], augment: bool = False) -> EvalTransform:
    return TrainTransform(img_size, mean, std, augment) if augment else EvalTransform(img_size, mean, std)
