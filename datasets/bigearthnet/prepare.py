"""Build BigEarthNet-S2 (v1.0 layout): 12 bands resampled to one grid, multi-label manifest.

Expected layout (any depth above the patch folders):
    <src_dir>/.../<patch>/<patch>_B01.tif ... <patch>_B12.tif, <patch>_B8A.tif
    <src_dir>/.../<patch>/<patch>_labels_metadata.json      {"labels": [CORINE names], ...}
Bands come at 10 m (120 x 120 px: B02 B03 B04 B08), 20 m (60 x 60: B05 B06 B07 B8A B11 B12) and
60 m (20 x 20: B01 B09). Each patch is resampled to `size` x `size` (default 120, the 10 m grid)
and written as one 12-band uint16 GeoTIFF under out_dir/patches/ (band descriptions = band
names, georeference of the 10 m grid), so `read_image` gets [12, size, size].

Labels: the 19-class nomenclature of Sumbul et al. 2021 (`nomenclature=19`, the usual
benchmark; patches with no label left after the mapping are dropped and counted) or the
original 43 CORINE classes (`nomenclature=43`). The manifest label is the `|`-joined list of
class indices.

Optional exclusion lists in src_dir (`patches_with_seasonal_snow.csv`,
`patches_with_cloud_and_shadow.csv`, one patch name per line, as published with the data) are
honoured when `exclude_noisy=True`.

Groups: patches whose 10 m grid's top-left corner falls in the same `block_m` square (in the
patch CRS) form one group, so neighbouring patches (and repeat acquisitions of the same place)
never straddle splits.

Run alone:  python datasets/bigearthnet/prepare.py SRC_DIR --out .mimflow/data/bigearthnet
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np

from pipeline.data.manifest import write_manifest
from pipeline.data.splits import assign_splits

BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
REFERENCE_BAND = "B02"  # a 10 m band: its grid is the output grid
LABELS_43 = [
    "Continuous urban fabric", "Discontinuous urban fabric", "Industrial or commercial units",
    "Road and rail networks and associated land", "Port areas", "Airports",
    "Mineral extraction sites", "Dump sites", "Construction sites", "Green urban areas",
    "Sport and leisure facilities", "Non-irrigated arable land", "Permanently irrigated land",
    "Rice fields", "Vineyards", "Fruit trees and berry plantations", "Olive groves", "Pastures",
    "Annual crops associated with permanent crops", "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland", "Moors and heathland", "Sclerophyllous vegetation",
    "Transitional woodland/shrub", "Beaches, dunes, sands", "Bare rock",
    "Sparsely vegetated areas", "Burnt areas", "Inland marshes", "Peatbogs", "Salt marshes",
    "Salines", "Intertidal flats", "Water courses", "Water bodies", "Coastal lagoons",
    "Estuaries", "Sea and ocean",
]
# 19-class nomenclature: each new class and the original (43-class) indices it merges.
LABELS_19 = [
    ("Urban fabric", [0, 1]), ("Industrial or commercial units", [2]),
    ("Arable land", [11, 12, 13]), ("Permanent crops", [14, 15, 16, 18]), ("Pastures", [17]),
    ("Complex cultivation patterns", [19]),
    ("Land principally occupied by agriculture, with significant areas of natural vegetation", [20]),
    ("Agro-forestry areas", [21]), ("Broad-leaved forest", [22]), ("Coniferous forest", [23]),
    ("Mixed forest", [24]), ("Natural grassland and sparsely vegetated areas", [25, 31]),
    ("Moors, heathland and sclerophyllous vegetation", [26, 27]),
    ("Transitional woodland, shrub", [28]), ("Beaches, dunes, sands", [29]),
    ("Inland wetlands", [33, 34]), ("Coastal wetlands", [35, 36]), ("Inland waters", [38, 39]),
    ("Marine waters", [40, 41, 42]),
]
NOISY_LISTS = ("patches_with_seasonal_snow.csv", "patches_with_cloud_and_shadow.csv")
DOWNLOAD_URL = "https://bigearth.net/downloads/BigEarthNet-S2-v1.0.tar.gz"  # ~66 GB; never used by tests


def build(src_dir: str | Path, out_dir: str | Path, size: int = 120, resampling: str = "bilinear",
          nomenclature: int = 19, split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
          seed: int = 0, block_m: float = 12000.0, exclude_noisy: bool = True,
          limit: int | None = None) -> dict:
    """Write patches/*.tif, manifest.csv and dataset.json under out_dir; return the dataset info."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if nomenclature not in (19, 43):
        raise ValueError(f"nomenclature={nomenclature}, expected 19 or 43")
    to_class = _label_map(nomenclature)
    patches = find_patches(src_dir, _noisy(src_dir) if exclude_noisy else set())[:limit]
    (out_dir / "patches").mkdir(parents=True, exist_ok=True)
    kept, dropped = [], 0
    for folder in patches:
        labels = sorted({to_class[name] for name in _labels(folder) if name in to_class})
        if not labels:
            dropped += 1  # only classes the 19-class nomenclature leaves out
            continue
        rel = f"patches/{folder.name}.tif"
        group = write_patch(folder, out_dir / rel, size, resampling, block_m)
        kept.append((rel, "|".join(map(str, labels)), group))
    if not kept:
        raise FileNotFoundError(f"{src_dir}: no BigEarthNet patch with a usable label")
    split_of = assign_splits([g for _, _, g in kept], [tuple(map(int, lab.split("|"))) for _, lab, _ in kept],
                             split_fractions, seed)
    write_manifest(out_dir, [(p, split_of[g], lab, g) for p, lab, g in kept])
    classes = [n for n, _ in LABELS_19] if nomenclature == 19 else LABELS_43
    info = {
        "name": "bigearthnet",
        "task": "multilabel",
        "classes": classes,
        "channels": BANDS,
        "image_size": size,
        "patches": len(kept),
        "dropped_without_label": dropped,
        "groups": len(split_of),
        "options": {"size": size, "resampling": resampling, "nomenclature": nomenclature,
                    "split_fractions": list(split_fractions), "seed": seed, "block_m": block_m,
                    "exclude_noisy": exclude_noisy, "limit": limit},
    }
    (out_dir / "dataset.json").write_text(json.dumps(info, indent=2))
    return info


def find_patches(src_dir: Path, exclude: set[str]) -> list[Path]:
    """Patch folders (those holding <name>_labels_metadata.json), sorted, minus `exclude`."""
    folders = sorted(p.parent for p in src_dir.rglob("*_labels_metadata.json")
                     if p.name == f"{p.parent.name}_labels_metadata.json")
    return [f for f in folders if f.name not in exclude]


def _labels(folder: Path) -> list[str]:
    meta = json.loads((folder / f"{folder.name}_labels_metadata.json").read_text())
    if not isinstance(meta.get("labels"), list):
        raise ValueError(f"{folder}: labels_metadata.json has no 'labels' list")
    unknown = [n for n in meta["labels"] if n not in LABELS_43]
    if unknown:
        raise ValueError(f"{folder}: unknown CORINE labels {unknown}")
    return meta["labels"]


def _label_map(nomenclature: int) -> dict[str, int]:
    """Original label name -> class index in the chosen nomenclature (absent = dropped)."""
    if nomenclature == 43:
        return {name: i for i, name in enumerate(LABELS_43)}
    return {LABELS_43[o]: i for i, (_, olds) in enumerate(LABELS_19) for o in olds}


def _noisy(src_dir: Path) -> set[str]:
    names = set()
    for listing in NOISY_LISTS:
        for path in src_dir.rglob(listing):
            with open(path, newline="") as f:
                names |= {row[0].strip() for row in csv.reader(f) if row and row[0].strip()}
    return names


def write_patch(folder: Path, out_path: Path, size: int, resampling: str, block_m: float) -> str:
    """Resample the 12 band files to [12, size, size] uint16, write a GeoTIFF -> location group."""
    import rasterio
    from rasterio.enums import Resampling

    method = Resampling[resampling]
    stack = np.empty((len(BANDS), size, size), dtype=np.uint16)
    for i, band in enumerate(BANDS):
        path = folder / f"{folder.name}_{band}.tif"
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: band file {path.name} is missing")
        with rasterio.open(path) as src:
            stack[i] = src.read(1, out_shape=(size, size), resampling=method)
            if band == REFERENCE_BAND:
                crs, ref, ref_shape = src.crs, src.transform, (src.height, src.width)
    # The 10 m grid, rescaled to `size` pixels over the same footprint (1.2 km).
    transform = ref @ ref.scale(ref_shape[1] / size, ref_shape[0] / size)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": len(BANDS),
               "dtype": "uint16", "crs": crs, "transform": transform, "compress": "deflate"}
    with rasterio.open(out_path, "w", **profile) as dst:
        dst.write(stack)
        for i, band in enumerate(BANDS, start=1):
            dst.set_band_description(i, band)
    if crs is None:
        return folder.name
    return f"{crs.to_epsg() or 'crs'}_{math.floor(ref.c / block_m)}_{math.floor(ref.f / block_m)}"






def download(dest: str | Path) -> Path:
    """Fetch and extract the v1.0 archive (network, ~66 GB; never called by build or tests)."""
    import tarfile
    import urllib.request

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / Path(DOWNLOAD_URL).name
    if not archive.exists():
        urllib.request.urlretrieve(DOWNLOAD_URL, archive)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder with the extracted BigEarthNet-S2 v1.0 patches")
    parser.add_argument("--out", default=".mimflow/data/bigearthnet")
    parser.add_argument("--size", type=int, default=120)
    parser.add_argument("--resampling", default="bilinear")
    parser.add_argument("--nomenclature", type=int, default=19, choices=[19, 43])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--download", action="store_true", help="first fetch the archive into SRC")
    a = parser.parse_args()
    if a.download:
        download(a.src)
    print(json.dumps(build(a.src, a.out, a.size, a.resampling, a.nomenclature, seed=a.seed,
                           limit=a.limit), indent=2))
