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
    full = np.stack(arrays).astype(np.float64)  # [N, C, H, W]
    # all 1280 values per channel fit the sample: percentiles are exact
    low, high = (np.nanpercentile(full, q, axis=(0, 2, 3)) for q in (1, 99))
    np.testing.assert_allclose(stats["p_low"], low, rtol=1e-6)
    np.testing.assert_allclose(stats["p_high"], high, rtol=1e-6)
    clipped = np.clip(full, low[None, :, None, None], high[None, :, None, None])  # what Normalizer sees
    np.testing.assert_allclose(stats["mean"], np.nanmean(clipped, axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], np.nanstd(clipped, axis=(0, 2, 3)), rtol=1e-7)
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


def test_normalised_training_data_has_mean_0_and_std_1_despite_saturated_pixels(tmp_path):
    """Issue 8 case 7: 16-bit tiles with 0.5% saturated pixels. Statistics of the raw values,
    applied after clipping, gave clean tiles std ~0.05; they must describe the clipped values."""
    import rasterio

    from pipeline.data.dataset import ManifestDataset

    rng = np.random.default_rng(0)
    records = []
    for i in range(12):
        tile = rng.normal([[[8000]], [[12000]]], [[[300]], [[900]]], (2, 32, 32))
        tile[rng.random(tile.shape) < 0.005] = 65535  # saturated detector pixels
        path = tmp_path / f"t{i}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=32, height=32, count=2, dtype="uint16") as dst:
            dst.write(np.clip(tile, 0, 65535).astype(np.uint16))
        records.append(Record(path, "train", 0, f"g{i}"))
    stats = compute_channel_stats(records, quiet=True)
    raw = np.stack([np.asarray(ManifestDataset([r], stats)[0][0]) for r in records])  # [N, C, H, W]
    assert np.abs(raw.mean(axis=(0, 2, 3))).max() < 1e-3
    np.testing.assert_allclose(raw.std(axis=(0, 2, 3)), 1.0, atol=1e-3)
    # the outliers are real: the raw std is 4-14x the clipped one (the old statistics' error)
    images = np.stack([rasterio.open(r.path).read().astype(np.float64) for r in records])
    assert (images.std(axis=(0, 2, 3)) > 4 * np.asarray(stats["std"])).all()
