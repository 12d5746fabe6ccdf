"""Issue 14, case 1: every augmentation preset is valid for the values and channels it sees.

The medical preset used to clip normalised images to [0, 1] (albumentations' brightness/contrast
jitter) and fill rotated corners with 0; each preset is now checked on 1, 3, 5 and 13-channel
float32 (normalised, unbounded) and uint16 (raw counts) inputs.
"""
import random

import cv2
import numpy as np
import pytest

from pipeline.data.transforms import TRAIN_TRANSFORMS, ChannelGamma, channel_gamma, eval_transform, train_transform

SIZE = 32
DRAWS = 12


def smooth_field(channels: int, dtype, seed: int) -> np.ndarray:
    """[SIZE, SIZE, C] image with spatial structure (white noise would lose variance to any
    interpolation, hiding what the augmentation does): normalised N(0, 1) float32 per channel,
    or uint16 counts spread over 1,000..30,000."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(SIZE // 4, SIZE // 4, channels)).astype(np.float32)
    fine = np.stack([cv2.resize(coarse[..., c], (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
                     for c in range(channels)], -1)
    fine = (fine - fine.mean((0, 1))) / fine.std((0, 1))
    if dtype == np.uint16:
        return np.rint(15500 + 4000 * np.clip(fine, -3.5, 3.5)).astype(np.uint16)
    return fine.astype(np.float32)


def reseed(transform, seed: int) -> None:
    """What SeededAugmentation does before each sample."""
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


@pytest.mark.parametrize("dtype", [np.float32, np.uint16], ids=["float32", "uint16"])
@pytest.mark.parametrize("channels", [1, 3, 5, 13])
@pytest.mark.parametrize("preset", sorted(TRAIN_TRANSFORMS))
def test_preset_keeps_range_distribution_and_dtype(preset, channels, dtype):
    transform = train_transform(preset, SIZE)
    for draw in range(DRAWS):
        x = smooth_field(channels, dtype, seed=draw)
        reseed(transform, draw)
        y = transform(image=x)["image"]
        assert y.shape == (SIZE, SIZE, channels) and y.dtype == x.dtype
        assert np.isfinite(y.astype(np.float64)).all()
        xf, yf = x.astype(np.float64), y.astype(np.float64)
        lo, hi = xf.min((0, 1)), xf.max((0, 1))
        tol = 1e-5 * (hi - lo)
        # range: every output value within its channel's input range (no fill, no overshoot)
        assert (yf.min((0, 1)) >= lo - tol).all() and (yf.max((0, 1)) <= hi + tol).all(), (preset, draw)
        # distribution: not squeezed or shifted (clipping N(0, 1) to [0, 1] gives std ~0.3, mean ~0.4)
        std_ratio = yf.std((0, 1)) / xf.std((0, 1))
        shift = np.abs(yf.mean((0, 1)) - xf.mean((0, 1))) / xf.std((0, 1))
        assert (std_ratio > 0.6).all() and (std_ratio < 1.5).all(), (preset, draw, std_ratio)
        assert (shift < 0.5).all(), (preset, draw, shift)
        # no clipping: clipped images pile many pixels on their extremes
        at_extremes = ((yf == yf.min((0, 1))) | (yf == yf.max((0, 1)))).mean((0, 1))
        assert (at_extremes < 0.05).all(), (preset, draw, at_extremes)


@pytest.mark.parametrize("preset", sorted(TRAIN_TRANSFORMS))
def test_a_sample_is_a_function_of_its_seed(preset):
    transform = train_transform(preset, 16)
    x = smooth_field(5, np.float32, seed=0)
    outs = []
    for seed in (7, 7, 8):
        reseed(transform, seed)
        outs.append(transform(image=x)["image"])
    np.testing.assert_array_equal(outs[0], outs[1])
    if preset != "none":
        assert not np.array_equal(outs[0], outs[2])


def test_channel_gamma_keeps_each_channels_min_max_and_order():
    x = smooth_field(3, np.float32, seed=1)
    x[0, 0, 1] = np.nan  # nodata stays nodata
    x[..., 2] = 4.0  # a constant channel is left alone
    for gamma in (0.7, 1.0, 1.4):
        y = channel_gamma(x, gamma)
        assert y.dtype == np.float32 and np.isnan(y[0, 0, 1]) and np.isnan(y).sum() == 1
        np.testing.assert_array_equal(y[..., 2], 4.0)
        for c in range(2):
            np.testing.assert_allclose([np.nanmin(y[..., c]), np.nanmax(y[..., c])],
                                       [np.nanmin(x[..., c]), np.nanmax(x[..., c])], rtol=1e-6)
            ok = np.isfinite(x[..., c])
            assert (np.argsort(x[..., c][ok], kind="stable") == np.argsort(y[..., c][ok], kind="stable")).mean() > 0.99
    counts = smooth_field(2, np.uint16, seed=2)
    out = channel_gamma(counts, 1.3)
    assert out.dtype == np.uint16 and out.min() == counts.min() and out.max() == counts.max()


def test_gamma_draw_is_bounded_by_its_limit():
    t = ChannelGamma(limit=0.25, p=1.0)
    t.set_random_state(np.random.default_rng(0), random.Random(0))
    gammas = [t.get_params()["gamma"] for _ in range(200)]
    assert 1 / 1.25 - 1e-9 <= min(gammas) < 0.85 and 1.2 < max(gammas) <= 1.25 + 1e-9


def test_eval_transform_resizes_any_channel_count_within_range():
    x = smooth_field(13, np.uint16, seed=3)
    y = eval_transform(16)(image=x)["image"]
    assert y.shape == (16, 16, 13) and y.dtype == np.uint16
    assert (y.min((0, 1)) >= x.min((0, 1))).all() and (y.max((0, 1)) <= x.max((0, 1))).all()
