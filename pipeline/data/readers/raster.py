"""TIFF / GeoTIFF through rasterio: any band count and dtype, nodata and masks as NaN.

`read_raster` is the rich entry point (band selection by 1-based index or band description,
an optional window, and the georeference); `read_tiff` is the plain READERS function.

Values are physical: each band's scale and offset (GDAL's per-band metadata, as GeoTIFFs of
scaled integers carry them, e.g. Landsat Collection 2 reflectance = DN * 2.75e-5 - 0.2) are
applied, value = stored * scale + offset, in float64 before the cast to float32. The band's
declared unit (GDAL unit type) is in `Raster.units` and `raster_units`.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ._common import NOT_DECLARED, ReadError, finish

# Per-file limit on C * H * W read at once (4 GiB as float32): a guard against huge or
# corrupt headers, not a data-set limit. Pass `max_pixels=` to read a larger scene.
MAX_PIXELS = 2**30


@dataclass(frozen=True)
class Raster:
    """Pixels plus what a later stage needs to write georeferenced output."""

    data: np.ndarray                  # [C, H, W] float32, NaN at nodata / masked pixels
    crs: Any | None                   # rasterio.crs.CRS; None when the file has no georeference
    transform: Any                    # affine.Affine: pixel (col, row) -> CRS (x, y) of this window
    bands: tuple[int, ...]            # 1-based band indexes read, in output order
    band_names: tuple[str, ...]       # band descriptions, "band_<i>" where a band has none
    source_dtype: str                 # stored dtype of the first band read (e.g. "uint16")
    nodata: float | None              # stored nodata value (already turned into NaN in `data`)
    units: tuple[str, ...] = ()       # per band read: its declared unit, or NOT_DECLARED

    def profile(self, dtype: str = "float32", nodata: float | None = float("nan")) -> dict:
        """Keyword arguments for `rasterio.open(path, "w", **profile)` writing `data` back."""
        c, h, w = self.data.shape
        return {"driver": "GTiff", "width": w, "height": h, "count": c, "dtype": dtype,
                "crs": self.crs, "transform": self.transform, "nodata": nodata}


def read_tiff(path: Path, bands: Sequence[int | str] | None = None,
              max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """TIFF/GeoTIFF -> float32 [C, H, W] in physical values (scales/offsets applied), NaN at nodata."""
    return read_raster(path, bands=bands, max_pixels=max_pixels).data


def raster_units(path: Path, index: int | None = None, bands: Sequence[int | str] | None = None,
                 max_pixels: int = MAX_PIXELS) -> list[str]:
    """The unit of each band `read_tiff` returns (header only): declared, or NOT_DECLARED."""
    import rasterio

    with _quiet_georeference(), rasterio.open(path) as src:
        return [src.units[i - 1] or NOT_DECLARED for i in resolve_bands(Path(path), src.descriptions, bands)]


def read_raster(path: str | Path, bands: Sequence[int | str] | None = None,
                window: tuple[int, int, int, int] | None = None,
                max_pixels: int = MAX_PIXELS) -> Raster:
    """Read a raster with its georeference.

    bands: 1-based indexes and/or band descriptions (case-insensitive), in the order wanted;
        None reads every band.
    window: (row_off, col_off, height, width) in pixels; None reads the whole raster.
    """
    import rasterio
    from rasterio.errors import RasterioIOError

    path = Path(path)
    try:
        with _quiet_georeference(), rasterio.open(path) as src:
            indexes = resolve_bands(path, src.descriptions, bands)
            win = None if window is None else _window(path, src, window)
            h, w = (src.height, src.width) if win is None else (window[2], window[3])
            if len(indexes) * h * w > max_pixels:
                raise ReadError(f"{path}: {len(indexes)} x {h} x {w} pixels exceeds "
                                f"max_pixels={max_pixels} (possible bomb; pass max_pixels=)")
            masked = src.read(indexes, window=win, masked=True)  # MaskedArray [C, H, W]
            meta = _georeference(src, win)
            names = tuple(src.descriptions[i - 1] or f"band_{i}" for i in indexes)
            dtype, nodata = src.dtypes[indexes[0] - 1], src.nodata
            scales, offsets = (np.array([v[i - 1] for i in indexes], np.float64)[:, None, None]
                               for v in (src.scales, src.offsets))
            units = tuple(src.units[i - 1] or NOT_DECLARED for i in indexes)
    except RasterioIOError as err:
        raise ReadError(f"{path}: not a readable raster or corrupt/truncated: {err}") from None
    if (scales != 1).any() or (offsets != 0).any():  # stored integers of a physical quantity
        masked = masked.astype(np.float64) * scales + offsets
    data = np.ma.filled(masked.astype(np.float32), np.nan)
    return Raster(finish(path, data), *meta, tuple(indexes), names, dtype, nodata, units)


@contextmanager
def _quiet_georeference() -> Iterator[None]:
    """rasterio's NotGeoreferencedWarning (a plain TIFF) silenced."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def resolve_bands(path: Path, descriptions: Sequence[str | None],
                  bands: Sequence[int | str] | None) -> list[int]:
    """Band selectors (1-based int or description) -> 1-based indexes; ReadError on unknown ones."""
    count = len(descriptions)
    if bands is None:
        return list(range(1, count + 1))
    if isinstance(bands, (int, str)):
        bands = [bands]
    lookup = {d.lower(): i + 1 for i, d in enumerate(descriptions) if d}
    indexes = []
    for b in bands:
        if isinstance(b, (int, np.integer)) and not isinstance(b, bool):
            if not 1 <= b <= count:
                raise ReadError(f"{path}: band {b} out of range 1..{count} (bands are 1-based)")
            indexes.append(int(b))
        elif isinstance(b, str) and b.lower() in lookup:
            indexes.append(lookup[b.lower()])
        else:
            known = [d for d in descriptions if d] or "none: the file has no band descriptions"
            raise ReadError(f"{path}: no band {b!r}; band descriptions: {known}")
    return indexes


def _window(path: Path, src, window: tuple[int, int, int, int]):
    """(row_off, col_off, height, width) -> rasterio Window; ReadError unless inside the raster."""
    from rasterio.windows import Window

    row, col, h, w = window
    if h <= 0 or w <= 0 or row < 0 or col < 0 or row + h > src.height or col + w > src.width:
        raise ReadError(f"{path}: window {tuple(window)} (row, col, height, width) is not inside "
                        f"the {src.height} x {src.width} raster")
    return Window(col, row, w, h)


def _georeference(src, win) -> tuple[Any | None, Any]:
    """-> (crs or None, affine transform of the window read)."""
    transform = src.transform if win is None else src.window_transform(win)
    return src.crs, transform
