"""Small files in the real formats of the public multi-label sets (NIH ChestX-ray14 and
BigEarthNet-S2 v1.0), shared by the data-card unit tests and the end-to-end runs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.transform import from_origin

CXR_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", ""]


def write_chestxray(src: Path, rows: list[tuple[str, str, str, str]], rgba: str | None = None,
                    size: int = 32, pixels=None) -> None:
    """Data_Entry_2017.csv (the release's columns) + 8-bit grayscale PNGs in images_00N/images/, four
    per folder. rows: (Image Index, Finding Labels, Patient ID, View Position); `rgba` names one file
    stored as RGBA (some of the release's are); pixels(i, row) -> uint8 [size, size] (default flat 10*i)."""
    src.mkdir(parents=True)
    with open(src / "Data_Entry_2017.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CXR_HEADER)
        for name, labels, pid, view in rows:
            w.writerow([name, labels, 0, pid, 58, "M", view, 1024, 1024, 0.143, 0.143, ""])
    for i, row in enumerate(rows):
        folder = src / f"images_{1 + i // 4:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        gray = pixels(i, row) if pixels else np.full((size, size), 10 * i % 256, np.uint8)
        im = Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)])) if row[0] == rgba else Image.fromarray(gray)
        im.save(folder / row[0])


BEN_SIZES = {"B01": 20, "B09": 20, "B02": 120, "B03": 120, "B04": 120, "B08": 120,
             "B05": 60, "B06": 60, "B07": 60, "B8A": 60, "B11": 60, "B12": 60}


def write_ben_patch(src: Path, name: str, labels: list[str], x0: float, value: int = 100, bands=None) -> None:
    """One BigEarthNet-S2 v1.0 patch folder: a uint16 GeoTIFF per band at its own resolution (10 m:
    120 px, 20 m: 60 px, 60 m: 20 px over 1.2 km) and <name>_labels_metadata.json. bands(band, size)
    -> uint16 [size, size] (default: flat value + the band number)."""
    folder = src / "BigEarthNet-v1.0" / name
    folder.mkdir(parents=True)
    for band, size in BEN_SIZES.items():
        res = 1200 / size
        data = bands(band, size) if bands else np.full((size, size), value + int(band[1:3].replace("A", "")), np.uint16)
        with rasterio.open(folder / f"{name}_{band}.tif", "w", driver="GTiff", width=size, height=size,
                           count=1, dtype="uint16", crs="EPSG:32634",
                           transform=from_origin(x0, 4800000, res, res)) as dst:
            dst.write(data[None])
    meta = {"labels": labels, "coordinates": {"ulx": x0, "uly": 4800000}, "tile_source": "T34",
            "acquisition_date": "2017-06-13 10:10:31"}
    (folder / f"{name}_labels_metadata.json").write_text(json.dumps(meta))
