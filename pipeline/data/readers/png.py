"""PNG and JPEG: the stored channels and values, 8- or 16-bit, never silently turned into RGB.

Channels (C) and values per PNG colour type, before any `data.channels` conversion:
  grey 1/2/4-bit        C=1, scaled to 0..255 (0/255 for 1-bit, 0/85/170/255 for 2-bit), as PIL
                        and OpenCV both decode them
  grey 8/16-bit         C=1, stored values (0..255 / 0..65535)
  grey+alpha 8/16-bit   C=1 (+ alpha)
  RGB 8/16-bit          C=3, stored values
  RGBA 8/16-bit         C=3 (+ alpha)
  palette 1/2/4/8-bit   the palette's colours: C=1 when every palette entry the image uses is
                        grey (R=G=B), else C=3 (its indices mean nothing as intensities)
JPEG: grey C=1, colour (RGB, YCbCr, CMYK) C=3. Bilevel ("1") images of any format become 0/255.

Transparency, from an alpha channel or a tRNS chunk (a palette's per-entry alpha, or the one
grey value / RGB colour that is transparent): `alpha="drop"` (default) ignores it, `"keep"`
appends it as the last channel (0 transparent .. 255, or 65535 for 16-bit, opaque), `"nodata"`
turns fully transparent pixels into NaN (nodata) and removes it.
EXIF orientation (a camera's or phone's "this side up", tag 274) is applied by default, exactly
as `PIL.ImageOps.exif_transpose` does (90-degree turns and mirrorings; 5-8 swap H and W);
`orientation="stored"` keeps the pixels as stored.
Decompression bombs: more than `PIL.Image.MAX_IMAGE_PIXELS` pixels is a ReadError (raise that
global to read larger files on purpose).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ._common import OptionError, ReadError, channels_first, finish

ALPHA_MODES = ("drop", "keep", "nodata")
ORIENTATIONS = ("exif", "stored")
EXIF_ORIENTATION = 0x0112
# EXIF orientation -> PIL.ImageOps.exif_transpose's operation, on [H, W] or [H, W, C] arrays
_UPRIGHT = {
    2: lambda a: a[:, ::-1],                       # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],                    # ROTATE_180
    4: lambda a: a[::-1],                          # FLIP_TOP_BOTTOM
    5: lambda a: np.swapaxes(a, 0, 1),             # TRANSPOSE
    6: lambda a: np.rot90(a, -1),                  # ROTATE_270 (a quarter turn clockwise)
    7: lambda a: np.swapaxes(a[::-1, ::-1], 0, 1),  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),                   # ROTATE_90 (a quarter turn anticlockwise)
}
_CONVERT = {"CMYK": "RGB", "YCbCr": "RGB", "1": "L"}


def read_png(path: Path, alpha: str = "drop", orientation: str = "exif") -> np.ndarray:
    """PNG/JPEG file -> float32 [C, H, W] (C = 1 grey, 3 colour, +1 with alpha="keep"), upright
    by its EXIF orientation unless orientation="stored"."""
    if alpha not in ALPHA_MODES:
        raise OptionError(f"alpha={alpha!r}, expected one of {ALPHA_MODES}")
    if orientation not in ORIENTATIONS:
        raise OptionError(f"orientation={orientation!r}, expected one of {ORIENTATIONS}")
    path = Path(path)
    with warnings.catch_warnings():
        # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; treat that as the bomb it may be.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                pixels, opacity = _decode(path, im)
                if orientation == "exif":
                    pixels, opacity = _upright(im, pixels, opacity)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ReadError(f"{path}: refused as a possible decompression bomb "
                            f"(limit PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): {err}") from None
        except UnidentifiedImageError:
            raise ReadError(f"{path}: not a PNG/JPEG image (PIL cannot identify it)") from None
        except OSError as err:  # truncated or corrupt stream
            raise ReadError(f"{path}: corrupt or truncated image: {err}") from None
    return finish(path, _apply_alpha(channels_first(pixels), opacity, alpha))


def _decode(path: Path, im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (pixels [H, W] or [H, W, C] without alpha, opacity [H, W] (0 = transparent) or None)."""
    if _is_deep_colour_png(im):
        return _decode_deep_png(path, im)
    im.load()  # raises on truncated data (PIL does not pad truncated files by default)
    if im.mode in ("P", "PA"):
        return _decode_palette(im)
    if im.mode in _CONVERT:
        im = im.convert(_CONVERT[im.mode])
    arr = np.asarray(im)
    if im.mode in ("LA", "La", "RGBA", "RGBa"):
        return arr[..., :-1].squeeze(-1) if im.mode.startswith("L") else arr[..., :-1], arr[..., -1]
    return arr, _colour_key(arr, im.info.get("transparency"))


def _upright(im: Image.Image, pixels: np.ndarray, opacity: np.ndarray | None):
    """Apply the EXIF orientation tag (absent or out of 1..8: as stored, as PIL does)."""
    turn = _UPRIGHT.get(im.getexif().get(EXIF_ORIENTATION))
    if turn is None:
        return pixels, opacity
    return np.ascontiguousarray(turn(pixels)), None if opacity is None else np.ascontiguousarray(turn(opacity))


def _decode_palette(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Palette image -> (grey [H, W] when every used entry is grey, else RGB [H, W, 3], opacity)."""
    rgba = np.asarray(im.convert("RGBA"))  # the palette's colours, tRNS as alpha
    used = np.unique(np.asarray(im)[..., 0] if im.mode == "PA" else np.asarray(im))
    palette = np.asarray(im.getpalette("RGB"), np.uint8).reshape(-1, 3)[used]
    grey = bool((palette == palette[:, :1]).all())
    transparent = "transparency" in im.info or im.mode == "PA"
    return (rgba[..., 0] if grey else rgba[..., :3]), (rgba[..., 3] if transparent else None)


def _colour_key(arr: np.ndarray, key) -> np.ndarray | None:
    """tRNS of a grey or RGB image (one transparent value or colour) -> opacity [H, W] or None."""
    if key is None or isinstance(key, bytes):
        return None
    hit = arr == key if arr.ndim == 2 else (arr == np.asarray(key, arr.dtype)).all(-1)
    return np.where(hit, 0, np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else 1).astype(arr.dtype)


def _is_deep_colour_png(im: Image.Image) -> bool:
    """PIL reduces 16-bit colour (and grey+alpha) PNGs to 8 bits; those go through OpenCV."""
    rawmode = im.tile[0][3] if im.tile else ""
    return im.format == "PNG" and not im.mode.startswith("I") and ";16" in str(rawmode)


def _decode_deep_png(path: Path, im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """16-bit RGB/RGBA/LA PNG -> (uint16 [H, W] or [H, W, 3], opacity or None)."""
    import cv2

    # OpenCV turns a tRNS colour into an alpha channel itself; PIL's header says which it was.
    stored_alpha = str(im.tile[0][3]).startswith(("RGBA", "LA"))
    arr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ReadError(f"{path}: corrupt or truncated 16-bit PNG (OpenCV could not decode it)")
    if arr.ndim == 2:
        return arr, None
    colour = arr[..., 0] if im.mode == "RGBA" and str(im.tile[0][3]).startswith("LA") else arr[..., 2::-1]
    opacity = arr[..., 3] if arr.shape[-1] == 4 else None
    if opacity is not None and not stored_alpha and "transparency" not in im.info:
        opacity = None
    return colour, opacity


def _apply_alpha(arr: np.ndarray, opacity: np.ndarray | None, alpha: str) -> np.ndarray:
    """[C, H, W] colour + opacity [H, W] (or None) -> [C', H, W] as `alpha` asks."""
    if opacity is None or alpha == "drop":
        return arr
    if alpha == "keep":
        return np.concatenate([arr.astype(np.float32), opacity[None].astype(np.float32)])
    color = arr.astype(np.float32)
    color[:, opacity == 0] = np.nan
    return color
