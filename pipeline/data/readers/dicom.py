"""DICOM through pydicom: modality LUT / rescale, MONOCHROME1 inversion, windowing, frames.

Pipeline per frame (grayscale):
  stored values -> modality LUT or RescaleSlope/Intercept (also from enhanced multi-frame
  functional groups) -> optional window(s) to [0, 1] -> MONOCHROME1 inverted so that a higher
  value is always brighter.
Without a window the output is in modality units (e.g. Hounsfield units for CT). With
`window=` each window becomes one channel, e.g. `window=["lung", "mediastinum", "bone"]` gives
a 3-channel CT image. Colour images (RGB, YBR, palette) come back as RGB [3, H, W].
`dicom_units` names the unit per channel: the rescale type when it is one of the standard's
defined terms (HU for CT, whose rescale gives Hounsfield units by definition), a window's
"0..1 (window C/W of HU)", else "not declared".

Compressed transfer syntaxes need decoder plugins: pylibjpeg with pylibjpeg-libjpeg (JPEG,
JPEG-LS) and pylibjpeg-openjpeg (JPEG 2000); RLE is built into pydicom.

PRIVACY: no value from the header appears in any message, log line or returned metadata.
Errors name the file and a reason written here, never the library's text (which can quote
header values), and are raised `from None` so no chained traceback carries it either.
pydicom's own warnings and log records are silenced while a file is read.
`dicom_metadata` returns only the technical, non-identifying fields in SAFE_FIELDS.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

from ._common import NOT_DECLARED, OptionError, ReadError, channels_first, finish

# (center, width) in modality units (Hounsfield units for CT).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
Window = Union[str, tuple[float, float]]  # preset name, "header" (the file's own), or (center, width)

# The only header fields dicom_metadata returns: technical, never identifying.
SAFE_FIELDS = ("Modality", "PhotometricInterpretation", "Rows", "Columns", "SamplesPerPixel",
               "BitsAllocated", "BitsStored", "PixelRepresentation", "PixelSpacing",
               "SliceThickness", "RescaleSlope", "RescaleIntercept", "ViewPosition")
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# RescaleType defined terms (PS3.3 C.11.1.1.2): the only header text a unit may quote
RESCALE_TYPES = {"OD", "HU", "MGML", "Z_EFF", "ED", "EDW", "HU_MOD", "PCT"}  # (US: unspecified)
_QUIET_LOGGERS = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg")
_DECODERS_HINT = ("install decoder plugins: pip install pylibjpeg pylibjpeg-libjpeg "
                  "pylibjpeg-openjpeg (or python-gdcm)")


def read_dicom(path: Path, index: int | None = None, window: Window | Sequence[Window] | None = None,
               force: bool = False) -> np.ndarray:
    """One image -> float32 [C, H, W]. A multi-frame file needs `index` (or use read_dicom_frames)."""
    path, window = Path(path), parse_window(window)
    with _quiet():
        ds = _open(path, force)
        n = _frame_count(path, ds)
        if index is None and n > 1:
            raise ReadError(f"{path}: multi-frame DICOM with {n} frames; pass index= "
                            f"(0..{n - 1}) or use read_images()")
        i = 0 if index is None else _check_index(path, index, n)
        pixels = _decode(path, ds, i if n > 1 else None)
        return _to_image(path, ds, pixels, i, window)


def read_dicom_frames(path: Path, window: Window | Sequence[Window] | None = None,
                      force: bool = False) -> list[np.ndarray]:
    """Every frame -> list of float32 [C, H, W] (one element for a single-frame file)."""
    path, window = Path(path), parse_window(window)
    with _quiet():
        ds = _open(path, force)
        n = _frame_count(path, ds)
        pixels = _decode(path, ds, None)  # [F, H, W(, 3)] when n > 1
        frames = [pixels] if n == 1 else list(pixels)
        return [_to_image(path, ds, f, i, window) for i, f in enumerate(frames)]


def dicom_units(path: Path, index: int | None = None, window: Window | Sequence[Window] | None = None,
                force: bool = False) -> list[str]:
    """The unit of each channel read_dicom returns (header only), see the module doc."""
    path, window = Path(path), parse_window(window)
    with _quiet():
        ds = _open(path, force, pixels=False)
        if int(ds.get("SamplesPerPixel", 1)) > 1 or str(ds.get("PhotometricInterpretation")) == "PALETTE COLOR":
            return [NOT_DECLARED] * 3
        unit = _modality_unit(ds, 0 if index is None else index)
        if window is None:
            return [unit]
        return [f"0..1 (the file's window of {unit})" if w == "header" else f"0..1 (window {w[0]:g}/{w[1]:g} of {unit})"
                for w in window]


def _modality_unit(ds, frame: int) -> str:
    """HU, another RescaleType defined term, or NOT_DECLARED (never other header text)."""
    item = ds if "RescaleType" in ds else _functional_item(ds, frame, "PixelValueTransformationSequence")
    declared = str(item.get("RescaleType", "")) if item is not None else ""
    if declared in RESCALE_TYPES:
        return declared
    return "HU" if str(ds.get("Modality", "")) == "CT" else NOT_DECLARED


def dicom_metadata(path: str | Path, force: bool = False) -> dict:
    """Technical, non-identifying header fields (SAFE_FIELDS) plus frame count and transfer syntax."""
    path = Path(path)
    with _quiet():
        ds = _open(path, force, pixels=False)
        meta = {"frames": _frame_count(path, ds), "transfer_syntax": _syntax_name(ds)}
        for key in SAFE_FIELDS:
            value = ds.get(key)
            if value is not None and value != "":
                meta[key] = _plain(value)
    return meta


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom's (and its decoders') warnings and log records: their text may quote
    header values. Disabling only the "pydicom" logger would not stop its child loggers."""
    import pydicom.pixels  # noqa: F401  (creates pydicom's loggers before they are disabled)

    manager = logging.getLogger().manager
    names = [n for n in list(manager.loggerDict) if n.split(".")[0] in _QUIET_LOGGERS]
    loggers = [logging.getLogger(n) for n in set(names) | set(_QUIET_LOGGERS)]
    was_disabled = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, was in zip(loggers, was_disabled):
            lg.disabled = was


def _open(path: Path, force: bool, pixels: bool = True):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, force=force, stop_before_pixels=not pixels)
    except InvalidDicomError:
        raise ReadError(f"{path}: not a DICOM file (no 'DICM' preamble; pass force=True for "
                        f"files written without one)") from None
    except Exception as err:
        raise ReadError(f"{path}: DICOM header could not be parsed ({type(err).__name__})") from None
    if pixels and not any(tag in ds for tag in _PIXEL_TAGS):
        raise ReadError(f"{path}: DICOM file has no pixel data (e.g. a report or structure set)")
    return ds


def _frame_count(path: Path, ds) -> int:
    try:
        return int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise ReadError(f"{path}: invalid NumberOfFrames in the header") from None


def _check_index(path: Path, index: int, n: int) -> int:
    if not -n <= index < n:
        raise ReadError(f"{path}: frame index {index} out of range for {n} frame(s)")
    return index % n


def _syntax_name(ds) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return str(uid.name) if uid is not None else "unknown"


def _decode(path: Path, ds, index: int | None) -> np.ndarray:
    """Stored pixels: [H, W(, 3)] for one frame, [F, H, W(, 3)] for all frames of a multi-frame file."""
    from pydicom.pixels import pixel_array

    try:
        return ds.pixel_array if index is None else pixel_array(ds, index=index)
    except Exception as err:
        raise ReadError(f"{path}: cannot decode pixel data (transfer syntax "
                        f"{_syntax_name(ds)}): {_reason(err)}") from None


def _reason(err: Exception) -> str:
    """A reason written here for a decoder error (the library's own text may quote the header)."""
    text = str(err)
    if "less than expected" in text or "truncated" in text.lower():
        return "pixel data is shorter than the header says (truncated file)"
    if "plugin" in text or "decod" in text.lower():
        return f"no installed decoder could decode it; {_DECODERS_HINT}"
    return f"{type(err).__name__} while decoding"


def _to_image(path: Path, ds, pixels: np.ndarray, frame: int,
              window: list[tuple[float, float] | str] | None) -> np.ndarray:
    """One decoded frame [H, W] or [H, W, 3] -> float32 [C, H, W]; window as parse_window gives."""
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)  # [H, W] indices -> [H, W, 3] RGB
    if pixels.ndim == 3:
        if window is not None:
            raise ReadError(f"{path}: windowing applies to grayscale images, this one is "
                            f"{photometric} with {pixels.shape[-1]} samples per pixel")
        return finish(path, channels_first(pixels))
    values = _modality(ds, pixels, frame)  # [H, W] float32 in modality units
    inverted = photometric == "MONOCHROME1"
    if window is None:
        if inverted:
            lo, hi = _modality_range(ds, frame)
            values = (lo + hi) - values
        return finish(path, values[None])
    pairs = [_header_window(path, ds, frame) if w == "header" else w for w in window]
    channels = [_apply_window(values, c, w) for c, w in pairs]
    out = np.stack(channels)  # [n_windows, H, W] in [0, 1]
    return finish(path, 1.0 - out if inverted else out)


def _modality(ds, pixels: np.ndarray, frame: int) -> np.ndarray:
    """Stored values -> modality units (float32): LUT, top-level rescale or functional-group rescale."""
    from pydicom.pixels import apply_modality_lut

    if ds.get("ModalityLUTSequence") or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    item = _functional_item(ds, frame, "PixelValueTransformationSequence")
    out = pixels.astype(np.float32)
    if item is not None and "RescaleSlope" in item and "RescaleIntercept" in item:
        out = out * np.float32(item.RescaleSlope) + np.float32(item.RescaleIntercept)
    return out


def _modality_range(ds, frame: int) -> tuple[float, float]:
    """Modality-unit range of every storable value (from BitsStored), for MONOCHROME1 inversion.

    Using the theoretical range, not the image's own min/max, keeps one mapping for all images.
    """
    bits = int(ds.get("BitsStored", 16))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        stored = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
    else:
        stored = np.array([0, 2**bits - 1], dtype=np.int64)
    mapped = _modality(ds, stored, frame)
    return float(mapped.min()), float(mapped.max())


def _functional_item(ds, frame: int, name: str):
    """Item of an enhanced multi-frame functional group macro: per-frame first, then shared."""
    for group, i in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(group)
        if seq and i < len(seq) and seq[i].get(name):
            return seq[i].get(name)[0]
    return None


def parse_window(window) -> list[tuple[float, float] | str] | None:
    """window option -> [(center, width) or "header", ...]; OptionError before any file is read."""
    if window is None:
        return None
    if isinstance(window, str) or _is_pair(window):
        window = [window]
    if not isinstance(window, (list, tuple)) or not window:
        raise OptionError(f"window={window!r}: expected a preset name, 'header', (center, width) "
                          f"or a list of those")
    return [_one_window(w) for w in window]


def _is_pair(w) -> bool:
    return (isinstance(w, (tuple, list)) and len(w) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in w))


def _one_window(w) -> tuple[float, float] | str:
    if w == "header":
        return w
    if isinstance(w, str) and w in WINDOW_PRESETS:
        return WINDOW_PRESETS[w]
    if not _is_pair(w):
        raise OptionError(f"window {w!r}: expected (center, width), 'header' or one of "
                          f"{sorted(WINDOW_PRESETS)}")
    if w[1] < 1:
        raise OptionError(f"window {w!r}: width must be >= 1")
    return float(w[0]), float(w[1])


def _header_window(path: Path, ds, frame: int) -> tuple[float, float]:
    """The file's first WindowCenter/WindowWidth (top level or enhanced FrameVOILUTSequence)."""
    source = ds if "WindowCenter" in ds else _functional_item(ds, frame, "FrameVOILUTSequence")
    if source is None or "WindowCenter" not in source or "WindowWidth" not in source:
        raise ReadError(f"{path}: window='header' but the file defines no window")
    center, width = (_plain(source.get(k)) for k in ("WindowCenter", "WindowWidth"))
    center, width = (v[0] if isinstance(v, list) else v for v in (center, width))
    if not isinstance(center, (int, float)) or not isinstance(width, (int, float)) or width < 1:
        raise ReadError(f"{path}: window='header' but the header window is not valid")
    return float(center), float(width)


def _apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 linear window -> [0, 1]."""
    out = (values - (center - 0.5)) / (width - 1.0) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _plain(value):
    """pydicom value (IS is an int, DS a float, multi-values are lists) -> JSON-friendly value."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, (int, float)):
        return int(value) if isinstance(value, int) else float(value)
    return str(value)
