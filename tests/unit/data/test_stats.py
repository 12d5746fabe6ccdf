import numpy as np
import pytest

from pipeline.data.manifest import Record, stratified_fraction
from pipeline.data.stats import Normalizer, compute_channel_stats


def _write(tmp_path, arrays):
    paths = []
    for i, a in enumerate(arrays):
        np.save(tmp_path / f"{i}.npy", a)
        paths.append(tmp_path / f"{i}.npy")
    return paths


def test_streaming_stats_match_numpy_and_skip_nodata(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.normal([[[10]], [[-3]], [[500]]], [[[2]], [[1]], [[50]]], (3, 8, 8)).astype(np.float32)
              for _ in range(20)]
    arrays[3][1, :4] = np.nan  # nodata pixels
    stats = compute_channel_stats(_write(tmp_path, arrays), ["a", "b", "c"], quiet=True)
    full = np.stack(arrays)  # [N, C, H, W]
    np.testing.assert_allclose(stats["mean"], np.nanmean(full, axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(stats["std"], np.nanstd(full, axis=(0, 2, 3)), rtol=1e-4)
    # all 1280 values per channel fit the reservoir: percentiles are exact
    np.testing.assert_allclose(stats["p_low"], np.nanpercentile(full, 1, axis=(0, 2, 3)), rtol=1e-5)
    assert stats["pixels"] == [1280, 1280 - 32, 1280]


def test_percentiles_from_a_bounded_sample_stay_close(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.uniform(0, 1000, (1, 64, 64)).astype(np.float32) for _ in range(10)]
    stats = compute_channel_stats(_write(tmp_path, arrays), sample_per_channel=5000, quiet=True)
    assert abs(stats["p_high"][0] - 990) < 15 and abs(stats["p_low"][0] - 10) < 15


def test_channel_count_change_is_an_error_naming_the_file(tmp_path):
    paths = _write(tmp_path, [np.zeros((3, 4, 4), np.float32), np.zeros((4, 4, 4), np.float32)])
    with pytest.raises(ValueError, match=r"1\.npy: 4 channels, earlier images had 3"):
        compute_channel_stats(paths, quiet=True)


def test_normalizer_clips_standardises_and_refuses_wrong_channels():
    stats = {"channels": ["x", "y"], "mean": [10.0, 0.0], "std": [2.0, 1.0],
             "p_low": [0.0, -1.0], "p_high": [20.0, 1.0]}
    norm = Normalizer(stats)
    img = np.array([[[10.0, 100.0]], [[np.nan, -5.0]]], np.float32)  # [2, 1, 2]
    np.testing.assert_allclose(norm(img), [[[0.0, 5.0]], [[0.0, -1.0]]])
    with pytest.raises(ValueError, match="image has 3 channels, statistics are for 2"):
        norm(np.zeros((3, 4, 4), np.float32))


def test_stratified_fraction_keeps_every_class_and_is_reproducible(tmp_path):
    recs = [Record(tmp_path / f"{i}", "train", i % 4 if i < 90 else 3, "g") for i in range(100)]
    a = stratified_fraction(recs, 0.1, seed=0)
    assert a == stratified_fraction(recs, 0.1, seed=0)
    assert {r.label for r in a} == {0, 1, 2, 3}
    counts = {k: sum(r.label == k for r in a) for k in range(4)}
    assert counts == {0: 2, 1: 2, 2: 2, 3: 3}  # round(0.1 * [23, 22, 22, 32])
