"""pipeline/data/cache.py: decoded-image cache in memory-mapped shards."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import Affine
from torch.utils.data import DataLoader, Dataset

from pipeline.data.cache import CachedReader, CacheError, TileCache, cache_key, cached_reader
from pipeline.data.manifest import Record, read_record
from pipeline.data.readers import read_image

REPO = Path(__file__).resolve().parents[3]
CALLS = {"n": 0}


def counting_read(path, **options):
    CALLS["n"] += 1
    return read_image(path, **options)


def bits(a: np.ndarray) -> np.ndarray:
    """float32 -> its bit patterns, so NaN == NaN and -0.0 != 0.0."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def make_tiles(folder: Path, n: int = 10, shape=(3, 8, 8)) -> list[Record]:
    """n files: float32 .npy with NaN (nodata) and uint16 GeoTIFFs with a nodata value."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        if i % 2:
            arr = rng.normal(1000, 300, shape).astype(np.float32)
            arr[0, 0, i % shape[2]] = np.nan
            path = folder / f"t{i}.npy"
            np.save(path, arr)
        else:
            path = folder / f"t{i}.tif"
            with rasterio.open(path, "w", driver="GTiff", width=shape[2], height=shape[1], count=shape[0],
                               dtype="uint16", nodata=0, crs="EPSG:32621",
                               transform=Affine(30, 0, 700000, 0, -30, -2700000)) as dst:
                arr = rng.integers(1, 40000, shape).astype(np.uint16)
                arr[:, 1, i % shape[2]] = 0  # nodata -> NaN
                dst.write(arr)
        records.append(Record(path, "unlabelled", -1, f"g{i // 4}"))
    return records


def test_round_trip_is_bitwise_equal_to_direct_reads_across_shards(tmp_path):
    records = make_tiles(tmp_path / "src")
    cache = TileCache.build(records, tmp_path / "cache", shard_size=3, quiet=True)
    assert len(cache) == 10 and cache.shape == (3, 8, 8)
    assert len(cache.index["shards"]) == 4  # 3 + 3 + 3 + 1
    for i, r in enumerate(records):
        direct = read_image(r.path)
        assert cache[i].dtype == np.float32
        assert np.array_equal(bits(cache[i]), bits(direct)), r.path
    assert np.isnan(cache[1]).any() and np.isnan(cache[0]).any()  # NaN nodata survives
    assert np.array_equal(bits(cache[-1]), bits(cache[9]))
    with pytest.raises(IndexError):
        cache[10]
    cache[0][:] = 0  # a copy: the cache itself is untouched
    assert np.array_equal(bits(cache[0]), bits(read_image(records[0].path)))


def test_second_build_and_open_read_no_source_file(tmp_path):
    records = make_tiles(tmp_path / "src")
    expected = [read_image(r.path) for r in records]
    CALLS["n"] = 0
    first = TileCache.build(records, tmp_path / "cache", read_fn=counting_read, quiet=True)
    assert CALLS["n"] == len(records)
    again = TileCache.build(records, tmp_path / "cache", read_fn=counting_read, quiet=True)
    assert CALLS["n"] == len(records) and again.path == first.path  # opened, nothing decoded

    shutil.move(tmp_path / "src", tmp_path / "gone")  # no source file exists any more
    cache = TileCache.open(first.path)
    for i, img in enumerate(expected):
        assert np.array_equal(bits(cache[i]), bits(img))
    reader = CachedReader(cache)
    assert np.array_equal(bits(reader(records[3].path)), bits(expected[3]))


def test_key_follows_files_reader_and_options(tmp_path):
    records = make_tiles(tmp_path / "src", n=4)
    paths = [os.path.abspath(r.path) for r in records]
    key = cache_key(paths)
    assert cache_key(paths) == key
    assert cache_key(paths, reader_options={"tiff": {"bands": [1]}}) != key
    assert cache_key(paths, read_fn=counting_read) != key
    assert cache_key(paths[::-1]) != key
    content = cache_key(paths, fingerprint="content")
    np.save(records[1].path, np.zeros((3, 8, 8), np.float32) + 7)  # the file changes
    assert cache_key(paths) != key and cache_key(paths, fingerprint="content") != content
    rebuilt = TileCache.build(records, tmp_path / "cache", quiet=True)
    assert np.all(rebuilt[1] == 7)


def test_failed_build_leaves_no_valid_looking_cache(tmp_path):
    records = make_tiles(tmp_path / "src")

    def broken(path, **options):
        if path.endswith("t5.npy"):
            raise RuntimeError("decoder crashed")
        return read_image(path, **options)

    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="decoder crashed"):
        TileCache.build(records, root, read_fn=broken, shard_size=2, quiet=True)
    assert list(root.iterdir()) == []  # neither a key folder nor a temp folder is left
    assert len(TileCache.build(records, root, quiet=True)) == 10


def test_killed_build_leaves_only_a_temp_folder_that_is_never_opened(tmp_path):
    records = make_tiles(tmp_path / "src")
    root = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, signal
        from pipeline.data.cache import TileCache
        from pipeline.data.readers import read_image
        def dies(path, **kw):  # SIGKILL midway: no cleanup code runs
            if path.endswith("t6.tif"):
                os.kill(os.getpid(), signal.SIGKILL)
            return read_image(path, **kw)
        TileCache.build({[str(r.path) for r in records]!r}, {str(root)!r}, read_fn=dies, shard_size=2, quiet=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    left = list(root.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".tmp-")
    assert list(left[0].glob("shard_*.npy")) and not (left[0] / "index.json").exists()
    with pytest.raises(CacheError, match="no tile cache here"):
        TileCache.open(left[0])
    cache = TileCache.build(records, root, quiet=True)  # rebuilds and sweeps the dead temp folder
    assert [p.name for p in root.iterdir()] == [cache.path.name]


def test_images_of_mixed_shapes_keep_the_cache_each_with_its_shape(tmp_path):
    """Issue 8 case 5: X-rays of several sizes and volume slices are cached, not read uncached."""
    import nibabel as nib
    from pydicom.data import get_testdata_file

    records = make_tiles(tmp_path / "src", n=4)
    np.save(tmp_path / "src" / "t3.npy", np.ones((3, 8, 9), np.float32))
    for name in ("CT_small.dcm", "MR_small.dcm"):  # 128 x 128 and 64 x 64
        shutil.copy(get_testdata_file(name, download=False), tmp_path / "src" / name)
        records.append(Record(tmp_path / "src" / name, "unlabelled", -1, name, channels=3))
    volume = np.random.default_rng(0).normal(100, 10, (6, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "src" / "v.nii.gz")
    records += [Record(tmp_path / "src" / "v.nii.gz", "unlabelled", -1, "v", index=i) for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "tile cache not used" any more
        read = cached_reader(records, tmp_path / "cache", quiet=True)
    assert isinstance(read, CachedReader) and read.cache.shape is None
    assert [read.cache.shapes[i] for i in (0, 3, 4, 5, 6)] == [(3, 8, 8), (3, 8, 9), (3, 128, 128), (3, 64, 64), (1, 6, 5)]
    for r in records:
        assert np.array_equal(bits(read(r)), bits(read_record(r))), r.path
    shutil.rmtree(tmp_path / "src")  # every image is served from the shards
    assert read(records[4]).shape == (3, 128, 128) and read(records[-1]).shape == (1, 6, 5)


def test_a_volume_is_decoded_once_per_build(tmp_path, monkeypatch):
    import nibabel as nib

    import pipeline.data.readers.nifti as nifti

    nib.save(nib.Nifti1Image(np.ones((6, 5, 8), np.float32), np.eye(4)), tmp_path / "v.nii")
    records = [Record(tmp_path / "v.nii", "unlabelled", -1, "v", index=i) for i in range(8)]
    loads = []
    original = nifti._load
    monkeypatch.setattr(nifti, "_load", lambda *a: (loads.append(1), original(*a))[1])
    TileCache.build(records, tmp_path / "cache", quiet=True)
    assert len(loads) == 1


def test_cached_reader_serves_cached_paths_and_reads_others(tmp_path):
    records = make_tiles(tmp_path / "src", n=6)
    read = cached_reader(records[:4], tmp_path / "cache", quiet=True)
    assert isinstance(read, CachedReader)
    shutil.move(records[0].path, tmp_path / "moved.tif")  # cached: served without the file
    assert np.array_equal(bits(read(records[0].path)), bits(read_image(tmp_path / "moved.tif")))
    assert np.array_equal(bits(read(records[5].path)), bits(read_image(records[5].path)))  # not cached
    assert len(pickle.dumps(read)) < 10_000  # paths and index, not pixels


def test_images_of_one_multi_image_file_are_cached_by_index(tmp_path):
    images = np.random.default_rng(1).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "stack.npz"
    np.savez(path, train_images=images, train_labels=np.zeros((5, 1), np.int64))
    records = [Record(path, "unlabelled", -1, "g", index=i) for i in (4, 0, 2)]
    cache = TileCache.build(records, tmp_path / "cache", quiet=True)
    read = CachedReader(cache)
    path.unlink()
    for i, r in enumerate(records):
        expected = images[r.index].transpose(2, 0, 1).astype(np.float32)
        assert np.array_equal(cache[i], expected) and np.array_equal(read(r), expected)
        assert np.array_equal(read(path, index=r.index), expected)
    assert cache.position(path, 2) == 2 and cache.position(path, 1) is None and cache.position(path) is None


class _CachedDataset(Dataset):
    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        return torch.from_numpy(self.cache[i]), i, os.getpid()


def test_cache_inside_a_dataloader_with_two_workers(tmp_path):
    records = make_tiles(tmp_path / "src", n=12)
    cache = TileCache.build(records, tmp_path / "cache", shard_size=5, quiet=True)
    cache[0]  # maps a shard in the parent: workers must map their own
    loader = DataLoader(_CachedDataset(cache), batch_size=3, num_workers=2)
    seen, pids = {}, set()
    for images, idx, pid in loader:
        pids |= set(pid.tolist())
        for img, i in zip(images, idx.tolist()):
            seen[i] = img.numpy()
    assert sorted(seen) == list(range(12)) and os.getpid() not in pids and len(pids) == 2
    for i, r in enumerate(records):
        assert np.array_equal(bits(seen[i]), bits(read_image(r.path)))
    state = pickle.loads(pickle.dumps(cache))  # spawn-started workers get a picklable view
    assert state._maps == {} and np.array_equal(bits(state[7]), bits(cache[7]))


def test_open_rejects_a_damaged_cache(tmp_path):
    records = make_tiles(tmp_path / "src", n=4)
    cache = TileCache.build(records, tmp_path / "cache", quiet=True)
    index = json.loads((cache.path / "index.json").read_text())
    index["count"] = 5
    (cache.path / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheError, match=r"index.json: changed since it was written \(checksum mismatch\)"):
        TileCache.open(cache.path)
    with pytest.warns(UserWarning, match="rebuilding the tile cache"):
        rebuilt = TileCache.build(records, tmp_path / "cache", quiet=True)
    assert len(rebuilt) == 4 and rebuilt.path == cache.path
    shard = rebuilt.path / "shard_00000.npy"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated on disk
    with pytest.raises(CacheError, match="unreadable shard"):
        TileCache.open(rebuilt.path)
    with pytest.raises(CacheError, match="no images"):
        TileCache.build([], tmp_path / "cache")


def _flip_values(shard: Path) -> None:
    """Zero a shard's values, keeping its .npy header (and so its shape) intact."""
    arr = np.load(shard, mmap_mode="r+")
    arr[:] = 0
    arr.flush()
    del arr


def test_a_shard_zeroed_behind_an_intact_header_is_caught_and_rebuilt(tmp_path):
    records = make_tiles(tmp_path / "src", n=4)
    cache = TileCache.build(records, tmp_path / "cache", quiet=True)
    before = cache[1].copy()
    _flip_values(cache.path / "shard_00000.npy")
    with pytest.raises(CacheError, match=r"shard_00000.npy: its values changed since it was written"):
        TileCache.open(cache.path)
    with pytest.warns(UserWarning, match="rebuilding the tile cache"):
        rebuilt = TileCache.build(records, tmp_path / "cache", quiet=True)
    assert np.array_equal(bits(rebuilt[1]), bits(before))


def test_an_index_listing_other_images_or_another_order_is_not_trusted(tmp_path):
    from pipeline.data.cache import _index_checksum

    records = make_tiles(tmp_path / "src", n=4)
    cache = TileCache.build(records, tmp_path / "cache", quiet=True)
    index = json.loads((cache.path / "index.json").read_text())
    index["paths"] = index["paths"][::-1]  # path order changed, and consistently re-checksummed
    index["checksum"] = _index_checksum(index)
    (cache.path / "index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="other images \\(or another order\\)"):
        rebuilt = TileCache.build(records, tmp_path / "cache", quiet=True)
    for i, r in enumerate(records):
        assert np.array_equal(bits(rebuilt[i]), bits(read_image(r.path)))


def test_a_file_changed_in_place_with_size_and_mtime_kept_gets_a_new_cache(tmp_path):
    """cp -p / rsync / restores keep size and timestamps; the manifest's sha256 (which prepare
    re-checks) keys the cache, so the new pixels are what training reads."""
    import dataclasses
    import hashlib

    folder = tmp_path / "src"
    folder.mkdir()
    paths = []
    for i in range(3):
        np.save(folder / f"t{i}.npy", np.full((1, 4, 4), float(i), np.float32))
        paths.append(folder / f"t{i}.npy")
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    records = [Record(p, "unlabelled", -1, p.name, sha256=sha(p)) for p in paths]
    first = TileCache.build(records, tmp_path / "cache", quiet=True)
    stat = os.stat(paths[1])
    np.save(paths[1], np.full((1, 4, 4), 7.0, np.float32))  # same size
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime
    assert os.stat(paths[1]).st_size == stat.st_size
    fresh = [dataclasses.replace(r, sha256=sha(r.path)) for r in records]  # as prepare rewrites it
    second = TileCache.build(fresh, tmp_path / "cache", quiet=True)
    assert second.path != first.path and second[1][0, 0, 0] == 7.0
