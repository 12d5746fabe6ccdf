"""albumentations pipelines for N-channel float images (HWC float32, already normalised)."""
from __future__ import annotations

import albumentations as A


def satellite_train(img_size: int, scale=(0.6, 1.0)) -> A.Compose:
    # Overhead imagery has no "up": flips and 90-degree turns are free augmentations.
    # No colour jitter: band ratios carry the signal in multispectral data.
    return A.Compose([
        A.RandomResizedCrop(size=(img_size, img_size), scale=scale, ratio=(0.75, 1.333), p=1.0),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
    ])


def eval_transform(img_size: int) -> A.Compose:
    return A.Compose([A.Resize(img_size, img_size)])


TRAIN_TRANSFORMS = {"satellite": satellite_train}
