"""NumPy arrays: .npy (one image) and .npz in the MedMNIST layout (many images per split).

MedMNIST .npz keys: `train_images`, `train_labels`, `val_images`, `val_labels`, `test_images`,
`test_labels`. Images are [N, H, W] (gray) or [N, H, W, 3] (RGB), uint8; labels are [N, 1]
class indices (multiclass) or [N, K] 0/1 (multi-label, e.g. ChestMNIST).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ._common import OptionError, ReadError, finish, pick_one

NPZ_SPLITS = ("train", "val", "test")


def read_npy(path: Path) -> np.ndarray:
    """[C, H, W] or [H, W] array -> float32 [C, H, W]."""
    path = Path(path)
    arr = np.load(path, allow_pickle=False)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ReadError(f"{path}: expected [C, H, W] or [H, W], got shape {arr.shape}")
    return finish(path, arr)


def read_npz_split(path: str | Path, split: str, dtype: type | None = np.float32
                   ) -> tuple[np.ndarray, np.ndarray]:
    """MedMNIST .npz -> (images [N, C, H, W], labels int64 [N] or [N, K] multi-label).

    Images are float32 unless `dtype=None` (stored dtype, a view: 4x less memory for uint8).
    """
    path = Path(path)
    if split not in NPZ_SPLITS:
        raise OptionError(f"split={split!r}, expected one of {NPZ_SPLITS}")
    with _open_npz(path) as npz:
        images = _get(path, npz, f"{split}_images")
        labels = _get(path, npz, f"{split}_labels")
    images = _to_nchw(path, images, f"{split}_images", dtype)
    if images.size == 0 or (images.dtype.kind == "f" and not np.isfinite(images).any()):
        raise ReadError(f"{path}: {split}_images is empty or has no finite pixel")
    return images, _labels(path, labels, len(images), split)


def read_npz_images(path: Path, split: str | None = None) -> list[np.ndarray]:
    """Every image of one split (or of train, val, test in turn) -> list of float32 [C, H, W]."""
    path = Path(path)
    splits = NPZ_SPLITS if split is None else (split,)
    with _open_npz(path) as npz:
        keys = [f"{s}_images" for s in splits if f"{s}_images" in npz.files]
        if not keys:
            raise ReadError(f"{path}: no {'/'.join(f'{s}_images' for s in splits)} array "
                            f"(keys: {sorted(npz.files)})")
        stacks = [_to_nchw(path, _get(path, npz, k), k) for k in keys]
    return [finish(path, img) for stack in stacks for img in stack]


def read_npz(path: Path, index: int | None = None, split: str | None = None) -> np.ndarray:
    """One image of an .npz -> float32 [C, H, W]; `index` is required when it holds several."""
    return pick_one(path, read_npz_images(path, split), index, "images")


def _open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise ReadError(f"{path}: not a readable .npz archive: {type(err).__name__}: {err}") from None


def _get(path: Path, npz, key: str) -> np.ndarray:
    if key not in npz.files:
        raise ReadError(f"{path}: no {key!r} array (keys: {sorted(npz.files)})")
    try:
        return npz[key]
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise ReadError(f"{path}: array {key!r} is corrupt: {type(err).__name__}: {err}") from None


def _to_nchw(path: Path, images: np.ndarray, key: str, dtype: type | None = np.float32) -> np.ndarray:
    """[N, H, W] or [N, H, W, C] (C in 1, 3, 4) -> [N, C, H, W] as `dtype` (None: stored dtype)."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise ReadError(f"{path}: {key} has shape {images.shape}; expected [N, H, W] or "
                        f"[N, H, W, C] (3D volumes [N, D, H, W] are not 2D images)")
    if not (np.issubdtype(images.dtype, np.number) or images.dtype == bool):
        raise ReadError(f"{path}: {key} has dtype {images.dtype}, not a numeric image")
    return images if dtype is None else images.astype(dtype)


def _labels(path: Path, labels: np.ndarray, n: int, split: str) -> np.ndarray:
    """[N], [N, 1] -> int64 [N]; [N, K] (multi-label 0/1) -> int64 [N, K]."""
    if labels.shape[0] != n:
        raise ReadError(f"{path}: {split}_labels has {labels.shape[0]} rows for {n} images")
    labels = labels.reshape(n, -1)
    if not np.issubdtype(labels.dtype, np.number) or not np.array_equal(labels, np.round(labels)):
        raise ReadError(f"{path}: {split}_labels are not integer class indices / 0-1 flags")
    labels = labels.astype(np.int64)
    return labels[:, 0] if labels.shape[1] == 1 else labels
