"""Image readers, chosen by file suffix. Every reader returns float32 [C, H, W], NaN at nodata.

    read_image(path, index=None, **options)  -> one image [C, H, W]
    read_images(path, **options)             -> every image in the file, list of [C, H, W]

One file can hold several images: the frames of a multi-frame DICOM, the slices of a NIfTI
volume, the arrays of a MedMNIST .npz. `read_images` returns them all (one element for an
ordinary file). `read_image` returns one: for such a file it needs `index` (ReadError otherwise,
saying how many there are); for a single-image file `index` may be None or 0.

Options go to the format's reader (TypeError for one it does not take):
  .png .jpg .jpeg   alpha="drop"|"keep"|"nodata"                         (png.read_png)
  .tif .tiff        bands=[1-based index or description, ...], max_pixels (raster.read_tiff;
                    raster.read_raster also returns crs/transform)
  .dcm              window=None|"lung"|(center, width)|[...], force=False (dicom.read_dicom)
  .nii .nii.gz      axis=2, min_nonzero_fraction=0.01, canonical=True     (nifti.read_nifti)
  .npy              -                                                     (arrays.read_npy)
  .npz              split=None|"train"|"val"|"test"                       (arrays.read_npz)
A file without a known suffix is read as DICOM when it has the DICOM preamble ("DICM" at byte
128), as DICOM series often come as files without a suffix.

Every failure to decode a file (missing, zero-byte, corrupt, truncated, not an image, no finite
pixel, decompression bomb) is a ReadError naming the file and the reason. A bad option value is
an OptionError (a configuration error, not a bad file).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import numpy as np

from ._common import OptionError, ReadError
from .arrays import read_npy, read_npz, read_npz_images, read_npz_split
from .dicom import dicom_metadata, read_dicom, read_dicom_frames
from .nifti import read_nifti, read_nifti_slices
from .png import read_png
from .raster import Raster, read_raster, read_tiff

# suffix -> reader of one image (called as reader(path) with default options).
READERS: dict[str, Callable[..., np.ndarray]] = {
    ".npy": read_npy,
    ".npz": read_npz,
    ".png": read_png,
    ".jpg": read_png,
    ".jpeg": read_png,
    ".tif": read_tiff,
    ".tiff": read_tiff,
    ".dcm": read_dicom,
    ".dicom": read_dicom,
    ".nii": read_nifti,
    ".nii.gz": read_nifti,
}
# suffix -> reader of every image in a file, for formats that can hold several.
MULTI_READERS: dict[str, Callable[..., list[np.ndarray]]] = {
    ".npz": read_npz_images,
    ".dcm": read_dicom_frames,
    ".dicom": read_dicom_frames,
    ".nii": read_nifti_slices,
    ".nii.gz": read_nifti_slices,
}
# Formats whose library messages may quote patient data: never pass them on.
PRIVATE_SUFFIXES = {".dcm", ".dicom"}

__all__ = ["READERS", "MULTI_READERS", "OptionError", "ReadError", "Raster", "dicom_metadata",
           "image_suffix", "read_image", "read_images", "read_npz_split", "read_raster"]


def read_image(path: str | Path, index: int | None = None, **options) -> np.ndarray:
    """One image -> float32 [C, H, W], NaN at nodata. `index` picks one of several in a file."""
    path = Path(path)
    suffix = image_suffix(path)
    reader = READERS[suffix]
    if index is not None:
        if "index" in inspect.signature(reader).parameters:
            options["index"] = index
        elif index not in (0, -1):
            raise ReadError(f"{path}: holds one image, index {index} is out of range")
    return _call(path, suffix, reader, options)


def read_images(path: str | Path, **options) -> list[np.ndarray]:
    """Every image in a file -> list of float32 [C, H, W] (one element for most formats)."""
    path = Path(path)
    suffix = image_suffix(path)
    reader = MULTI_READERS.get(suffix)
    if reader is None:
        return [_call(path, suffix, READERS[suffix], options)]
    return _call(path, suffix, reader, options)


def image_suffix(path: str | Path) -> str:
    """The READERS key for a file: its suffix (".nii.gz" counts as one), or ".dcm" when a file
    with an unknown suffix carries the DICOM preamble. ReadError for a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise ReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ReadError(f"{path}: empty file (0 bytes)")
    name = path.name.lower()
    suffix = ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()
    if suffix in READERS:
        return suffix
    if _has_dicom_preamble(path):
        return ".dcm"
    raise ReadError(f"{path}: no reader for suffix {path.suffix!r} (known: {sorted(READERS)})")


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def _call(path: Path, suffix: str, reader: Callable, options: dict):
    """Run a reader; any decoder exception becomes a ReadError naming the file."""
    try:
        inspect.signature(reader).bind(path, **options)
    except TypeError:
        known = [p for p in inspect.signature(reader).parameters if p != "path"]
        raise TypeError(f"{reader.__name__}() takes options {known}, got {sorted(options)}") from None
    try:
        return reader(path, **options)
    except (ReadError, OptionError):
        raise
    except Exception as err:  # decoder errors differ per library; name the file either way
        if suffix in PRIVATE_SUFFIXES:  # library text could quote the header: say only the type
            raise ReadError(f"{path}: {type(err).__name__} while reading") from None
        raise ReadError(f"{path}: {type(err).__name__}: {err}") from err
