"""PNG and JPEG: the stored channels and values, 8- or 16-bit, never silently turned into RGB.

- Grayscale stays 1 channel, colour stays RGB (3), 16-bit values stay 0..65535.
- Palette images are expanded to RGB(A) (their indices mean nothing as intensities); CMYK and
  YCbCr JPEGs are converted to RGB; bilevel ("1") images become 0/255.
- Alpha: `alpha="drop"` (default) removes it, `"keep"` keeps it as the last channel,
  `"nodata"` turns fully transparent pixels into NaN and removes it.
- EXIF orientation is not applied: pixels come back as stored.
- Decompression bombs: more than `PIL.Image.MAX_IMAGE_PIXELS` pixels is a ReadError (raise that
  global to read larger files on purpose).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ._common import OptionError, ReadError, channels_first, finish

ALPHA_MODES = ("drop", "keep", "nodata")
_CONVERT = {"P": "RGB", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "1": "L"}


def read_png(path: Path, alpha: str = "drop") -> np.ndarray:
    """PNG/JPEG file -> float32 [C, H, W] with the stored values (C = 1 gray, 3 RGB, +1 alpha)."""
    if alpha not in ALPHA_MODES:
        raise OptionError(f"alpha={alpha!r}, expected one of {ALPHA_MODES}")
    path = Path(path)
    with warnings.catch_warnings():
        # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; treat that as the bomb it may be.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                arr, has_alpha = _decode(path, im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ReadError(f"{path}: refused as a possible decompression bomb "
                            f"(limit PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): {err}") from None
        except UnidentifiedImageError:
            raise ReadError(f"{path}: not a PNG/JPEG image (PIL cannot identify it)") from None
        except OSError as err:  # truncated or corrupt stream
            raise ReadError(f"{path}: corrupt or truncated image: {err}") from None
    return finish(path, _apply_alpha(path, channels_first(arr), has_alpha, alpha))


def _decode(path: Path, im: Image.Image) -> tuple[np.ndarray, bool]:
    """-> (pixels [H, W] or [H, W, C], whether the last channel is alpha)."""
    if _is_deep_colour_png(im):
        return _decode_deep_png(path, im.mode)
    im.load()  # raises on truncated data (PIL does not pad truncated files by default)
    if im.mode in _CONVERT:
        target = _CONVERT[im.mode]
        if im.mode == "P" and "transparency" in im.info:
            target = "RGBA"
        im = im.convert(target)
    arr = np.asarray(im)
    return arr, im.mode in ("LA", "La", "RGBA", "RGBa")


def _is_deep_colour_png(im: Image.Image) -> bool:
    """PIL reduces 16-bit colour (and gray+alpha) PNGs to 8 bits; those go through OpenCV."""
    rawmode = im.tile[0][3] if im.tile else ""
    return im.format == "PNG" and not im.mode.startswith("I") and ";16" in str(rawmode)


def _decode_deep_png(path: Path, mode: str) -> tuple[np.ndarray, bool]:
    """16-bit RGB/RGBA/LA PNG -> (uint16 [H, W, C] in RGB(A)/LA order, has_alpha)."""
    import cv2

    arr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ReadError(f"{path}: corrupt or truncated 16-bit PNG (OpenCV could not decode it)")
    if arr.ndim == 2:
        return arr, False
    if mode == "LA":  # OpenCV expands gray+alpha to BGRA; take gray and alpha back
        return arr[..., [0, 3]], True
    order = [2, 1, 0, 3] if arr.shape[-1] == 4 else [2, 1, 0]  # BGR(A) -> RGB(A)
    return arr[..., order], arr.shape[-1] == 4


def _apply_alpha(path: Path, arr: np.ndarray, has_alpha: bool, alpha: str) -> np.ndarray:
    """[C, H, W] with alpha last when has_alpha -> [C', H, W] as `alpha` asks."""
    if not has_alpha or alpha == "keep":
        return arr
    color = arr[:-1].astype(np.float32)
    if alpha == "nodata":
        color[:, arr[-1] == 0] = np.nan
    return color
