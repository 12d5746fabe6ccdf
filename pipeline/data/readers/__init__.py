"""Image readers, chosen by file suffix. Every reader returns float32 [C, H, W], NaN at nodata."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np


class ReadError(ValueError):
    """A file could not be decoded into an image; the message names the file and why."""


def read_npy(path: Path) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ReadError(f"{path}: expected [C, H, W] or [H, W], got shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


# suffix -> reader; other formats register here.
READERS: dict[str, Callable[[Path], np.ndarray]] = {".npy": read_npy}


def read_image(path: str | Path) -> np.ndarray:
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ReadError(f"{path}: no reader for suffix {path.suffix!r} (known: {sorted(READERS)})")
    try:
        return reader(path)
    except ReadError:
        raise
    except Exception as err:  # decoder errors differ per library; name the file either way
        raise ReadError(f"{path}: {type(err).__name__}: {err}") from err
