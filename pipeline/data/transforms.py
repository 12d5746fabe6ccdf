"""albumentations pipelines for N-channel float images (HWC float32, already normalised).

Chosen by `data.augment` (a preset name) with `data.augment_options` as keyword arguments.
"""
from __future__ import annotations

import albumentations as A


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
    # 90-degree turns; a mild affine and intensity jitter mimic positioning and exposure.
    return A.Compose([
        A.RandomResizedCrop(size=(img_size, img_size), scale=tuple(scale), ratio=(0.9, 1.1), p=1.0),
        A.Affine(rotate=(-rotate, rotate), translate_percent=(-0.05, 0.05), scale=(0.95, 1.05), p=0.7),
        A.RandomBrightnessContrast(brightness_limit=intensity, contrast_limit=intensity,
                                   ensure_safe_range=False, p=0.7),
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
