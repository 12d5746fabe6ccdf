"""Explicit channel conversions, applied by the reader before validation (`data.channels`).

    grey (1)    -> N   every channel a copy of the grey one
    RGB (3)     -> 1   luminance Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601, as PIL's "L"
                       and OpenCV's RGB2GRAY); a pixel that is nodata in any channel stays nodata
    C           -> C   unchanged
Palette images (PNG, DICOM PALETTE COLOR) and YBR DICOM are already RGB (or grey) when they
get here: the format readers resolve them. Anything else (e.g. RGBA kept with alpha="keep" into
a 3-channel set, or 13 bands into 3) has no conversion that does not guess: ReadError.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ._common import ReadError

LUMA_BT601 = np.array([0.299, 0.587, 0.114], np.float32)


def conversion(stored: int, wanted: int) -> str | None:
    """The conversion from `stored` to `wanted` channels in words, "" for none needed, None if
    there is none (e.g. 4 -> 3)."""
    if stored == wanted:
        return ""
    if stored == 1:
        return f"grey -> {wanted} channels by replication"
    if stored == 3 and wanted == 1:
        return "RGB -> grey by luminance (BT.601)"
    return None


def no_conversion(path: Path, stored: int, wanted: int) -> str:
    """The reason a file with `stored` channels cannot join a `wanted`-channel data set."""
    return (f"{path}: {stored} channels, the data set has {wanted}, and no conversion turns "
            f"{stored} into {wanted} (there are grey -> N and RGB -> grey): set data.channels, or a "
            f"reader option that changes the count (e.g. png: {{alpha: drop}}, tiff: {{bands: [...]}})")


def convert_channels(path: Path, img: np.ndarray, channels: int | None) -> np.ndarray:
    """float32 [C, H, W] -> float32 [channels, H, W] (None: unchanged). ReadError naming the file
    when no conversion exists."""
    if channels is None or img.shape[0] == channels:
        return img
    if conversion(img.shape[0], channels) is None:
        raise ReadError(no_conversion(path, img.shape[0], channels))
    if img.shape[0] == 1:
        return np.repeat(img, channels, axis=0)
    return np.tensordot(LUMA_BT601, img, axes=1)[None].astype(np.float32)  # [3, H, W] -> [1, H, W]
