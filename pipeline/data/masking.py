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


def blockwise_blocks(grid: tuple[int, int], mask_ratio: float, rng: np.random.Generator,
                     min_block_patches: int | None = None, min_aspect: float = 0.3,
                     max_aspect: float | None = None, attempts: int = 100) -> list[tuple[int, int, int, int]]:
    """BEiT's block-wise masking (Bao et al. 2021, section 2.5 and masking_generator.py of the BEiT
    code), as the blocks it draws: (top, left, height, width) in patches, in drawing order.

    Blocks are added until `target = round(L * mask_ratio)` of the L = h * w patches are masked.
    Each block covers at least `min_block_patches` patches (BEiT: 16 of a 14 x 14 grid; default:
    16 / 196 of the grid, at least 1, so small tiles get proportionally small blocks), has a
    height / width ratio in [min_aspect, max_aspect] (default 1 / min_aspect), lies inside the grid,
    and adds at most the patches still missing (it may overlap earlier blocks), so the masked count
    never exceeds the target. A block that does not fit in `attempts` draws ends the mask. BEiT
    draws 10 times; on small grids that leaves a mask a whole block short about once in a hundred,
    100 draws keep it less than one block short (the tests check this on thousands of seeds).
    Raises ValueError for a ratio outside (0, 1) or an aspect range that is empty."""
    h, w = grid
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio={mask_ratio} must be in (0, 1)")
    max_aspect = max_aspect or (1 / min_aspect if min_aspect > 0 else 0)
    if not 0 < min_aspect <= max_aspect:
        raise ValueError(f"aspect range [{min_aspect}, {max_aspect}] is empty")
    target = int(round(h * w * mask_ratio))
    if min_block_patches is None:
        min_block_patches = max(1, round(16 * h * w / 196))
    min_block_patches = min(min_block_patches, target)
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    mask = np.zeros((h, w), dtype=bool)
    blocks, count = [], 0
    while count < target:
        block = _draw_block(mask, target - count, min_block_patches, log_aspect, (min_aspect, max_aspect),
                            attempts, rng)
        if block is None:
            break
        top, left, bh, bw = block
        window = mask[top:top + bh, left:left + bw]
        count += bh * bw - int(window.sum())
        window[...] = True
        blocks.append(block)
    return blocks


def blockwise_mask(grid: tuple[int, int], mask_ratio: float, rng: np.random.Generator,
                   min_block_patches: int | None = None, min_aspect: float = 0.3,
                   max_aspect: float | None = None) -> np.ndarray:
    """BEiT's block-wise mask over the patch grid (see `blockwise_blocks`) -> bool [h, w]."""
    mask = np.zeros(grid, dtype=bool)
    for top, left, bh, bw in blockwise_blocks(grid, mask_ratio, rng, min_block_patches, min_aspect, max_aspect):
        mask[top:top + bh, left:left + bw] = True
    return mask


def _draw_block(mask: np.ndarray, missing: int, min_patches: int, log_aspect, aspect_range, attempts: int,
                rng) -> tuple[int, int, int, int] | None:
    """One block of >= min_patches patches adding 1..missing new ones, or None after `attempts` draws.
    Area ~ U(min_patches, max(min_patches, missing)), log aspect ratio uniform (as BEiT)."""
    h, w = mask.shape
    for _ in range(attempts):
        area = rng.uniform(min_patches, max(min_patches, missing))
        aspect = math.exp(rng.uniform(*log_aspect))
        bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if not (0 < bh <= h and 0 < bw <= w and bh * bw >= min_patches
                and aspect_range[0] <= bh / bw <= aspect_range[1]):
            continue
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
        if 0 < new <= missing:
            return top, left, bh, bw
    return None
