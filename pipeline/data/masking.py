"""Mask generators for masked image modelling: pure functions of a seeded numpy Generator.

Each returns a boolean mask over the patch grid, [h, w], True = masked. The data pipeline draws
one per sample from a generator seeded by (seed, epoch, sample index), so masks are reproducible,
differ between samples (hence between ranks, which read different samples) and survive resume.
"""
from __future__ import annotations

import math

import numpy as np


def random_patch_mask(grid: tuple[int, int], mask_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """MAE-style: exactly int(L * mask_ratio) of the L = h * w patches, uniformly at random
    (He et al. 2021). -> bool [h, w]."""
    h, w = grid
    n = int(h * w * mask_ratio)
    mask = np.zeros(h * w, dtype=bool)
    mask[rng.permutation(h * w)[:n]] = True
    return mask.reshape(h, w)


def grouped_patch_mask(grid: tuple[int, int], group: int, mask_ratio: float,
                       rng: np.random.Generator) -> np.ndarray:
    """SimMIM-style: the grid is cut into group x group squares of patches (the mask patch size
    over the model patch size); ceil(squares * mask_ratio) squares are masked whole (Xie et al.
    2022, MaskGenerator of the SimMIM reference code). -> bool [h, w].
    Raises ValueError when `group` does not divide the grid."""
    h, w = grid
    if h % group or w % group:
        raise ValueError(f"mask groups of {group} x {group} patches do not tile the {h} x {w} patch grid")
    gh, gw = h // group, w // group
    n = math.ceil(gh * gw * mask_ratio)
    coarse = np.zeros(gh * gw, dtype=bool)
    coarse[rng.permutation(gh * gw)[:n]] = True
    return coarse.reshape(gh, gw).repeat(group, axis=0).repeat(group, axis=1)


def blockwise_mask(grid: tuple[int, int], mask_ratio: float, rng: np.random.Generator,
                   min_block_patches: int | None = None, min_aspect: float = 0.3,
                   max_aspect: float | None = None) -> np.ndarray:
    """BEiT's block-wise masking (Bao et al. 2021, masking_generator.py of the BEiT code): random
    rectangles of at least `min_block_patches` patches with aspect ratio in [min_aspect,
    max_aspect] (default 1 / min_aspect) are added until round(L * mask_ratio) patches are masked
    (or no block fits). min_block_patches defaults to BEiT's 16 of 196 patches, scaled to the grid
    (at least 1). -> bool [h, w]."""
    h, w = grid
    total = int(round(h * w * mask_ratio))
    if min_block_patches is None:
        min_block_patches = max(1, min(16, round(16 * h * w / 196)))
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    mask = np.zeros((h, w), dtype=bool)
    count = 0
    while count < total:
        delta = _add_block(mask, total - count, min_block_patches, log_aspect, rng)
        if delta == 0:
            break
        count += delta
    return mask


def _add_block(mask: np.ndarray, max_patches: int, min_patches: int, log_aspect, rng) -> int:
    """One block of at most `max_patches` new patches (10 attempts) -> patches newly masked."""
    h, w = mask.shape
    for _ in range(10):
        area = rng.uniform(min(min_patches, max_patches), max_patches)
        aspect = math.exp(rng.uniform(*log_aspect))
        bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < bh <= h and 0 < bw <= w:
            top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
            window = mask[top:top + bh, left:left + bw]
            new = bh * bw - int(window.sum())
            if 0 < new <= max_patches:
                window[...] = True
                return new
    return 0
