"""albumentations pipelines for N-channel images (HWC), chosen by `data.augment` (a preset name)
with `data.augment_options` as keyword arguments.

The dataset hands them normalised float32 (mean 0, std 1 per channel, unbounded), but every preset
is valid for any value range, any channel count and float32 or uint16 input, because it is built
only from operations whose numerics hold whatever the range:
  - geometry (crop and resize with bilinear interpolation, flips, 90-degree turns, an affine with
    reflected borders): every output pixel is an input pixel or a convex combination of input
    pixels, so it lies within the channel's [min, max] (up to float rounding) and no constant
    fill value enters the image;
  - intensity (`ChannelGamma`): a monotone map of each channel onto its own [min, max].
No operation clips to a fixed range such as [0, 1] (albumentations' brightness/contrast jitter
does, even with `ensure_safe_range=False`), none creates NaN from finite input, and the dtype
is kept. Every random draw comes from the Compose's generators, so `SeededAugmentation`
(pipeline/engine/state.py) makes each sample's transform a function of (seed, epoch, index).
"""
from __future__ import annotations

import math
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.transforms_interface import BaseTransformInitSchema
from pydantic import Field


class ChannelGamma(A.ImageOnlyTransform):
    """Exposure jitter valid for any value range: per channel c, with lo_c and hi_c the channel's
    own min and max in this image (NaN ignored),

        out = lo_c + (hi_c - lo_c) * ((x - lo_c) / (hi_c - lo_c)) ** gamma

    with one gamma per image drawn log-uniformly from [1 / (1 + limit), 1 + limit] (MONAI's
    RandAdjustContrast). Monotone, so each channel keeps its exact min and max and its ranks;
    a constant channel and NaN pixels are unchanged. Input [H, W, C] of any C, float or integer
    dtype (integers are rounded back); output of the same shape and dtype.
    """

    class InitSchema(BaseTransformInitSchema):
        limit: float = Field(ge=0)

    def __init__(self, limit: float = 0.2, p: float = 0.5):
        super().__init__(p=p)
        self.limit = limit

    def get_params(self) -> dict[str, Any]:
        bound = math.log1p(self.limit)
        return {"gamma": math.exp(self.py_random.uniform(-bound, bound))}

    def apply(self, img: np.ndarray, gamma: float, **params: Any) -> np.ndarray:
        return channel_gamma(img, gamma)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("limit",)


def channel_gamma(img: np.ndarray, gamma: float) -> np.ndarray:
    """[H, W, C] (or [H, W]) -> same shape and dtype; see ChannelGamma."""
    x = img.astype(np.float64)
    axes = tuple(range(x.ndim - 1)) if x.ndim == 3 else None
    with np.errstate(invalid="ignore"):  # all-NaN channels: nanmin warns, the channel stays NaN
        lo, hi = np.nanmin(x, axis=axes, keepdims=True), np.nanmax(x, axis=axes, keepdims=True)
    span = hi - lo
    safe = np.where(span > 0, span, 1.0)
    out = lo + span * np.clip((x - lo) / safe, 0.0, 1.0) ** gamma
    out = np.clip(out, lo, hi)  # float rounding only: the map itself stays in [lo, hi]
    if np.issubdtype(img.dtype, np.integer):
        out = np.rint(out)
    return out.astype(img.dtype)


def satellite_train(img_size: int, scale=(0.6, 1.0)) -> A.Compose:
    # Overhead imagery has no "up": flips and 90-degree turns are free augmentations.
    # No colour jitter: band ratios carry the signal in multispectral data.
    return A.Compose([
        A.RandomResizedCrop(size=(img_size, img_size), scale=tuple(scale), ratio=(0.75, 1.333), p=1.0),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
    ])


def medical_train(img_size: int, scale=(0.8, 1.0), rotate: float = 10.0, intensity: float = 0.1) -> A.Compose:
    # Radiographs have an anatomical up and a left/right convention: no vertical flips or
    # 90-degree turns; a mild affine and a gamma jitter mimic positioning and exposure.
    # Reflected borders: a constant fill (0) would be a value the image may not hold (the mean
    # after normalisation, but black or out of range for raw values).
    # intensity: gamma drawn from [1 / (1 + intensity), 1 + intensity] (ChannelGamma).
    return A.Compose([
        A.RandomResizedCrop(size=(img_size, img_size), scale=tuple(scale), ratio=(0.9, 1.1), p=1.0),
        A.Affine(rotate=(-rotate, rotate), translate_percent=(-0.05, 0.05), scale=(0.95, 1.05),
                 border_mode=cv2.BORDER_REFLECT_101, p=0.7),
        ChannelGamma(limit=intensity, p=0.7),
    ])


def no_augment(img_size: int) -> A.Compose:
    return eval_transform(img_size)


def eval_transform(img_size: int) -> A.Compose:
    return A.Compose([A.Resize(img_size, img_size)])


TRAIN_TRANSFORMS = {"satellite": satellite_train, "medical": medical_train, "none": no_augment}


def train_transform(name: str, img_size: int, options: dict | None = None) -> A.Compose:
    if name not in TRAIN_TRANSFORMS:
        raise KeyError(f"data.augment={name!r}; known: {sorted(TRAIN_TRANSFORMS)}")
    return TRAIN_TRANSFORMS[name](img_size, **(options or {}))
