"""Image readers, chosen by file format. Every reader returns float32 [C, H, W], NaN at nodata.

    read_image(path, index=None, channels=None, **reader_options)  -> one image [C, H, W]
    read_images(path, channels=None, **reader_options)             -> every image in the file

One file can hold several images: the frames of a multi-frame DICOM, the slices of a NIfTI
volume, the arrays of a MedMNIST .npz. `read_images` returns them all (one element for an
ordinary file); the data set's manifest lists exactly these, so counting and decoding never
disagree. `read_image` returns one: for such a file it needs `index` (ReadError otherwise,
saying how many there are); for a single-image file `index` may be None or 0.

`reader_options` are keyed by reader name; each file takes only its own reader's, so one set
serves a folder of mixed formats, e.g. `read_image(p, dicom={"window": "lung"}, nifti={"axis": 0})`:
  png   .png           alpha="drop"|"keep"|"nodata", orientation="exif"|"stored" (png.read_png)
  jpeg  .jpg .jpeg     alpha, orientation (as png)                           (png.read_png)
  tiff  .tif .tiff     bands=[1-based index or description, ...], max_pixels (raster.read_tiff;
                       raster.read_raster also returns crs/transform)
  dicom .dcm .dicom    window=None|"lung"|(center, width)|[...], force=False (dicom.read_dicom)
  nifti .nii .nii.gz   axis=2, min_nonzero_fraction=0.01, canonical=True     (nifti.read_nifti)
  npy   .npy           -                                                     (arrays.read_npy)
  npz   .npz           split=None|"train"|"val"|"test"                       (arrays.read_npz)
An unknown reader name or option is an OptionError naming it and the accepted ones.
`channels` (an int) converts every image to that many channels (channels.convert_channels:
grey -> N, RGB -> grey); None keeps what the file stores.
A file without a known suffix is read as DICOM when it has the DICOM preamble ("DICM" at byte
128), as DICOM series often come as files without a suffix.

Values are physical wherever the format declares how: GeoTIFF per-band scales and offsets,
DICOM modality LUT / rescale slope and intercept, NIfTI scl_slope / scl_inter. `read_units`
names the unit of each channel (from the header alone): a GeoTIFF band's declared unit, a
DICOM rescale type (HU for CT) or window, and "not declared" (NOT_DECLARED) for everything
else: PNG, JPEG, NumPy and NIfTI declare none.

Every failure to decode a file (missing, zero-byte, corrupt, truncated, not an image, no finite
pixel, decompression bomb, no channel conversion) is a ReadError naming the file and the reason.
A bad option value is an OptionError (a configuration error, not a bad file).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ._common import NOT_DECLARED, OptionError, ReadError, no_unit
from .arrays import read_npy, read_npz, read_npz_images, read_npz_split
from .channels import conversion, convert_channels, no_conversion
from .dicom import dicom_metadata, dicom_units, parse_window, read_dicom, read_dicom_frames
from .nifti import read_nifti, read_nifti_slices
from .png import read_png
from .raster import Raster, raster_units, read_raster, read_tiff


@dataclass(frozen=True)
class Format:
    suffixes: tuple[str, ...]
    read: Callable[..., np.ndarray]                        # one image: read(path, [index,] **options)
    read_all: Callable[..., list[np.ndarray]] | None = None  # every image, for multi-image formats
    units: Callable[..., str | list[str]] = no_unit          # units(path, index, **options): per channel, or one for all

    def options(self) -> tuple[str, ...]:
        """The option names this reader accepts."""
        return tuple(p for p in inspect.signature(self.read).parameters if p not in ("path", "index"))


# reader name (the key of data.reader_options) -> its format
FORMATS: dict[str, Format] = {
    "png": Format((".png",), read_png),
    "jpeg": Format((".jpg", ".jpeg"), read_png),
    "tiff": Format((".tif", ".tiff"), read_tiff, units=raster_units),
    "dicom": Format((".dcm", ".dicom"), read_dicom, read_dicom_frames, dicom_units),
    "nifti": Format((".nii", ".nii.gz"), read_nifti, read_nifti_slices),
    "npy": Format((".npy",), read_npy),
    "npz": Format((".npz",), read_npz, read_npz_images),
}
READER_OF_SUFFIX = {s: name for name, f in FORMATS.items() for s in f.suffixes}
# suffix -> reader of one image (called as reader(path) with default options).
READERS: dict[str, Callable[..., np.ndarray]] = {s: FORMATS[n].read for s, n in READER_OF_SUFFIX.items()}
# suffix -> reader of every image in a file, for formats that can hold several.
MULTI_READERS = {s: FORMATS[n].read_all for s, n in READER_OF_SUFFIX.items() if FORMATS[n].read_all}
# Formats whose library messages may quote patient data: never pass them on.
PRIVATE_SUFFIXES = {".dcm", ".dicom"}

__all__ = ["FORMATS", "READERS", "MULTI_READERS", "NOT_DECLARED", "OptionError", "ReadError", "Raster",
           "check_reader_options", "conversion", "convert_channels", "dicom_metadata", "no_conversion",
           "image_suffix", "read_image", "read_images", "read_npz_split", "read_raster", "read_units",
           "reader_name"]


def read_image(path: str | Path, index: int | None = None, channels: int | None = None,
               **reader_options: dict) -> np.ndarray:
    """One image -> float32 [C, H, W], NaN at nodata. `index` picks one of several in a file;
    `channels` converts to that many channels."""
    path = Path(path)
    suffix = image_suffix(path)
    reader, options = READERS[suffix], _options_for(suffix, reader_options)
    if index is not None:
        if "index" in inspect.signature(reader).parameters:
            options["index"] = index
        elif index not in (0, -1):
            raise ReadError(f"{path}: holds one image, index {index} is out of range")
    return convert_channels(path, _call(path, suffix, reader, options), channels)


def read_images(path: str | Path, channels: int | None = None, **reader_options: dict) -> list[np.ndarray]:
    """Every image in a file -> list of float32 [C, H, W] (one element for most formats)."""
    path = Path(path)
    suffix = image_suffix(path)
    options = _options_for(suffix, reader_options)
    reader = MULTI_READERS.get(suffix)
    images = [_call(path, suffix, READERS[suffix], options)] if reader is None else _call(path, suffix, reader, options)
    return [convert_channels(path, img, channels) for img in images]


def read_units(path: str | Path, index: int | None = None, channels: int | None = None,
               **reader_options: dict) -> list[str]:
    """The unit of each channel read_image(path, index, channels, **reader_options) returns,
    from the header alone; ReadError (naming the file) when the header cannot be read."""
    path = Path(path)
    suffix = image_suffix(path)
    units = _call(path, suffix, FORMATS[READER_OF_SUFFIX[suffix]].units,
                  {"index": index, **_options_for(suffix, reader_options)})
    units = [units] if isinstance(units, str) else list(units)
    if channels is None or channels == len(units):
        return units
    if len(units) == 1 or len(set(units)) == 1:  # grey -> N, or RGB -> grey of one unit
        return [units[0]] * channels
    return [" + ".join(dict.fromkeys(units))] * channels  # RGB -> grey of several units


def reader_name(path: str | Path) -> str:
    """The data.reader_options key that applies to a file ("png", "dicom", "nifti", ...)."""
    return READER_OF_SUFFIX[image_suffix(path)]


def check_reader_options(reader_options: dict) -> None:
    """OptionError naming `reader_options.<reader>.<option>` for an unknown reader or option, or a
    value that can be checked without a file (DICOM windows), before any file is read."""
    for name, options in reader_options.items():
        if name not in FORMATS:
            raise OptionError(f"reader_options.{name}: no such reader (readers: {', '.join(FORMATS)})")
        if not isinstance(options, dict):
            raise OptionError(f"reader_options.{name}: expected a mapping of options, got {options!r}")
        accepted = FORMATS[name].options()
        for key in options:
            if key not in accepted:
                raise OptionError(f"reader_options.{name}.{key}: unknown option ({name} takes "
                                  f"{', '.join(accepted) or 'no options'})")
        if name == "dicom" and options.get("window") is not None:
            try:
                parse_window(options["window"])
            except OptionError as err:
                raise OptionError(f"reader_options.dicom.window: {err}") from None


def _options_for(suffix: str, reader_options: dict) -> dict:
    check_reader_options(reader_options)
    return dict(reader_options.get(READER_OF_SUFFIX[suffix]) or {})


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
        return reader(path, **options)
    except (ReadError, OptionError):
        raise
    except Exception as err:  # decoder errors differ per library; name the file either way
        if suffix in PRIVATE_SUFFIXES:  # library text could quote the header: say only the type
            raise ReadError(f"{path}: {type(err).__name__} while reading") from None
        raise ReadError(f"{path}: {type(err).__name__}: {err}") from err
