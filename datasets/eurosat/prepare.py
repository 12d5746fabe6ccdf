"""Build the EuroSAT manifest from an extracted copy (MS 13-band GeoTIFF or RGB JPEG).

Expected layout (any depth above the class folders; both official archives work):
    <src_dir>/.../<ClassName>/<ClassName>_<n>.tif      EuroSAT_MS: 13-band Sentinel-2, 64 x 64
    <src_dir>/.../<ClassName>/<ClassName>_<n>.jpg      EuroSAT_RGB: 3-band JPEG, 64 x 64
Images are not copied: the manifest lists their absolute paths.

Groups: neighbouring EuroSAT tiles see the same fields and towns, so a random image split leaks.
For georeferenced GeoTIFFs the group is the `block_m` x `block_m` square (in the tile's CRS)
that holds the tile's top-left corner; every group goes wholly to one split. JPEGs carry no
location, so each image is its own group there (`group_by="file"` forces that for TIFFs too).

Run alone:  python datasets/eurosat/prepare.py SRC_DIR --out .mimflow/data/eurosat
"""
from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path


from pipeline.data.folders import list_images
from pipeline.data.manifest import write_manifest
from pipeline.data.splits import assign_splits

CLASSES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
           "Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]
# Plane order inside the EuroSAT MS GeoTIFFs (B8A comes last there).
MS_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]
RGB_BANDS = ["red", "green", "blue"]
SUFFIXES = {"ms": (".tif", ".tiff"), "rgb": (".jpg", ".jpeg")}
DOWNLOAD_URLS = {  # used only by download(); never by build() or the tests
    "ms": "https://zenodo.org/records/7711810/files/EuroSAT_MS.zip",
    "rgb": "https://zenodo.org/records/7711810/files/EuroSAT_RGB.zip",
}


def build(src_dir: str | Path, out_dir: str | Path, variant: str = "auto",
          split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0,
          group_by: str = "location", block_m: float = 2560.0) -> dict:
    """Write manifest.csv and dataset.json under out_dir; return the dataset info.

    variant: "ms", "rgb" or "auto" (whichever the folder holds; an error if both or neither).
    group_by: "location" (spatial blocks of block_m metres, GeoTIFF only) or "file".
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if group_by not in ("location", "file"):
        raise ValueError(f"group_by={group_by!r}, expected 'location' or 'file'")
    variant = _variant(src_dir, variant)
    images = find_images(src_dir, variant)  # [(path, class index)]
    groups = [_group(p, variant, group_by, block_m) for p, _ in images]
    split_of = assign_splits(groups, [label for _, label in images], split_fractions, seed)
    rows = [(str(p.resolve()), split_of[g], label, g) for (p, label), g in zip(images, groups)]
    write_manifest(out_dir, rows)
    info = {
        "name": "eurosat",
        "task": "multiclass",
        "classes": CLASSES,
        "channels": MS_BANDS if variant == "ms" else RGB_BANDS,
        "variant": variant,
        "image_size": 64,
        "counts_per_class": {CLASSES[c]: n for c, n in sorted(Counter(l for _, l in images).items())},
        "groups": len(set(groups)),
        "options": {"variant": variant, "split_fractions": list(split_fractions), "seed": seed,
                    "group_by": group_by, "block_m": block_m},
    }
    (out_dir / "dataset.json").write_text(json.dumps(info, indent=2))
    return info


def find_images(src_dir: Path, variant: str) -> list[tuple[Path, int]]:
    """-> [(image path, class index)] sorted by path; every class must have images."""
    index = {c.lower(): i for i, c in enumerate(CLASSES)}
    found = sorted((p, index[p.parent.name.lower()]) for p in list_images(src_dir).images  # no OS junk
                   if p.suffix.lower() in SUFFIXES[variant] and p.parent.name.lower() in index)
    missing = sorted(set(CLASSES) - {CLASSES[c] for _, c in found})
    if missing:
        raise FileNotFoundError(f"{src_dir}: no {variant.upper()} images for classes {missing} "
                                f"(expected <ClassName>/<ClassName>_<n>{SUFFIXES[variant][0]})")
    return found


def _variant(src_dir: Path, variant: str) -> str:
    if variant in SUFFIXES:
        return variant
    if variant != "auto":
        raise ValueError(f"variant={variant!r}, expected 'ms', 'rgb' or 'auto'")
    present = [v for v, sfx in SUFFIXES.items() if any(p.suffix.lower() in sfx for p in list_images(src_dir).images)]
    if len(present) != 1:
        raise FileNotFoundError(f"{src_dir}: found {present or 'no'} EuroSAT variants; pass variant='ms' or 'rgb'")
    return present[0]


def _group(path: Path, variant: str, group_by: str, block_m: float) -> str:
    """Spatial block of a georeferenced GeoTIFF, else the file itself."""
    if variant == "rgb" or group_by == "file":
        return path.stem
    import rasterio

    with rasterio.open(path) as src:
        if src.count != len(MS_BANDS):
            raise ValueError(f"{path}: {src.count} bands, EuroSAT MS has {len(MS_BANDS)}")
        if src.crs is None or src.transform.is_identity:
            return path.stem  # no georeference: the file is its own group
        x, y = src.transform.c, src.transform.f  # top-left corner in CRS units (metres for UTM)
        return f"{src.crs.to_epsg() or 'crs'}_{math.floor(x / block_m)}_{math.floor(y / block_m)}"






def download(dest: str | Path, variant: str = "ms") -> Path:
    """Fetch and extract the official archive (network; never called by build or tests)."""
    import urllib.request
    import zipfile

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / Path(DOWNLOAD_URLS[variant]).name
    if not archive.exists():
        urllib.request.urlretrieve(DOWNLOAD_URLS[variant], archive)
    with zipfile.ZipFile(archive) as z:
        z.extractall(dest)
    return dest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder with the extracted EuroSAT archive")
    parser.add_argument("--out", default=".mimflow/data/eurosat")
    parser.add_argument("--variant", default="auto", choices=["auto", "ms", "rgb"])
    parser.add_argument("--group-by", default="location", choices=["location", "file"])
    parser.add_argument("--block-m", type=float, default=2560.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--download", action="store_true", help="first fetch the archive into SRC")
    a = parser.parse_args()
    if a.download:
        download(a.src, "rgb" if a.variant == "rgb" else "ms")
    print(json.dumps(build(a.src, a.out, a.variant, seed=a.seed, group_by=a.group_by, block_m=a.block_m), indent=2))
