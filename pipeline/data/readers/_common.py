"""What every reader shares: the error type and the final check on a decoded image."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data import DataError


class ReadError(DataError):
    """A file could not be decoded into an image; the message names the file and why."""


class OptionError(DataError):
    """A reader option has an invalid value (a configuration error, not a bad file)."""


# The unit of values whose file declares none (PNG, JPEG, .npy, an untagged GeoTIFF band, most
# non-CT DICOM): stored values, or physical ones in a unit only the data's source knows.
NOT_DECLARED = "not declared"


def no_unit(path: Path, index: int | None = None, **options) -> str:
    """The `units` function of formats that never declare a unit."""
    return NOT_DECLARED


def finish(path: Path, arr: np.ndarray) -> np.ndarray:
    """Decoded pixels [C, H, W] (any dtype) -> float32 [C, H, W], NaN kept as nodata.

    Raises ReadError for a wrong rank, an empty array, any infinite value (NaN marks nodata;
    +-inf is corrupt data) or an image without one finite pixel.
    """
    if arr.ndim != 3:
        raise ReadError(f"{path}: expected an image [C, H, W], got shape {arr.shape}")
    if arr.size == 0:
        raise ReadError(f"{path}: image has no pixels (shape {arr.shape})")
    if np.iscomplexobj(arr) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ReadError(f"{path}: pixel type {arr.dtype} is not a real number type")
    out = np.asarray(arr, dtype=np.float32)
    n_inf = int(np.isinf(out).sum())
    if n_inf:
        raise ReadError(f"{path}: {n_inf} infinite pixel value(s) (corrupt data; use NaN for nodata)")
    if not np.isfinite(out).any():
        raise ReadError(f"{path}: no finite pixel (all NaN or nodata)")
    return out


def channels_first(arr: np.ndarray) -> np.ndarray:
    """[H, W] -> [1, H, W]; [H, W, C] -> [C, H, W]."""
    return arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)


def pick_one(path: Path, images: list[np.ndarray], index: int | None, what: str) -> np.ndarray:
    """One of the images a file holds: `index` is required when there are several.
    `what` names them in messages ("frames", "slices", "images")."""
    if index is None:
        if len(images) > 1:
            raise ReadError(f"{path}: holds {len(images)} {what}; pass index= (0..{len(images) - 1}) "
                            "or use read_images()")
        index = 0
    if not -len(images) <= index < len(images):
        raise ReadError(f"{path}: {what} index {index} out of range for {len(images)} {what}")
    return images[index]
