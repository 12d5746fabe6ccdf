"""BEiT's block-wise masking: the properties the BEiT paper's generator has, on the grids our tiles give."""
import math

import numpy as np
import pytest
import torch

from pipeline.data.masking import blockwise_blocks, blockwise_mask

GRIDS = [(2, 2), (4, 4), (8, 8), (7, 11), (14, 14), (16, 16)]


def min_block(grid):
    return max(1, round(16 * grid[0] * grid[1] / 196))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", [0.4, 0.6])
def test_masked_share_is_within_one_block_of_the_target_and_never_above(grid, ratio):
    target = round(grid[0] * grid[1] * ratio)
    smallest = min(min_block(grid), target)
    counts = np.array([blockwise_mask(grid, ratio, np.random.default_rng(seed)).sum() for seed in range(1500)])
    assert counts.max() <= target
    assert (target - counts).max() < smallest, (target, smallest, counts.min())


@pytest.mark.parametrize("grid", GRIDS)
def test_blocks_lie_inside_the_grid_with_beits_size_and_aspect(grid):
    smallest = min(min_block(grid), round(grid[0] * grid[1] * 0.4))
    for seed in range(300):
        blocks = blockwise_blocks(grid, 0.4, np.random.default_rng(seed))
        assert blocks
        for top, left, h, w in blocks:
            assert 0 <= top and top + h <= grid[0] and 0 <= left and left + w <= grid[1]
            assert h * w >= smallest
            assert 0.3 <= h / w <= 1 / 0.3


def test_full_size_grid_uses_beits_16_patch_blocks():
    blocks = blockwise_blocks((14, 14), 0.4, np.random.default_rng(0))
    assert all(h * w >= 16 for _, _, h, w in blocks)
    assert blockwise_mask((14, 14), 0.4, np.random.default_rng(0)).sum() in range(78 - 15, 79)  # 0.4 x 196 = 78


def test_masks_are_reproducible_from_the_seed_and_differ_between_seeds():
    a = blockwise_mask((8, 8), 0.4, np.random.default_rng([0, 1, 7]))
    b = blockwise_mask((8, 8), 0.4, np.random.default_rng([0, 1, 7]))
    c = blockwise_mask((8, 8), 0.4, np.random.default_rng([0, 1, 8]))
    assert a.dtype == bool and a.shape == (8, 8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_masks_differ_across_ranks(prepared_landsat):
    """Each rank reads its own shard of sample indices; a mask is drawn from (seed, epoch, index),
    so the two ranks of a 2-process run mask differently, and the same run masks identically again."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    from pipeline.data.dataset import ManifestDataset
    from pipeline.data.manifest import load_manifest, select
    from pipeline.data.stats import load_stats
    from pipeline.engine.state import SeededAugmentation
    from functools import partial

    pool = ManifestDataset(select(load_manifest(prepared_landsat / "manifest.csv"), "unlabelled"),
                           load_stats(prepared_landsat / "stats.json"))
    draw = partial(blockwise_mask, (4, 4), 0.4)
    data = SeededAugmentation(pool, seed=0, mask_fn=draw)
    data.set_epoch(1)
    batches = BatchSampler(SequentialSampler(range(16)), batch_size=4, drop_last=True)
    shards = [list(BatchSamplerShard(batches, num_processes=2, process_index=r)) for r in (0, 1)]
    masks = [torch.stack([data[i][2] for batch in shard for i in batch]) for shard in shards]
    assert set(i for b in shards[0] for i in b).isdisjoint(i for b in shards[1] for i in b)
    assert not torch.equal(masks[0], masks[1])
    again = torch.stack([data[i][2] for batch in shards[0] for i in batch])
    assert torch.equal(masks[0], again)
    assert math.isclose(masks[0].float().mean().item(), 6 / 16, abs_tol=1 / 16)


@pytest.mark.parametrize("bad", [dict(mask_ratio=0.0), dict(mask_ratio=1.0), dict(min_aspect=0.0),
                                 dict(min_aspect=0.5, max_aspect=0.4)])
def test_bad_parameters_are_refused_naming_them(bad):
    kwargs = {"grid": (8, 8), "mask_ratio": 0.4, "rng": np.random.default_rng(0), **bad}
    with pytest.raises(ValueError, match="mask_ratio|aspect range"):
        blockwise_blocks(**kwargs)
