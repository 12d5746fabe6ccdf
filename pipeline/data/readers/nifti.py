"""NIfTI (.nii, .nii.gz) volumes -> 2D slices through nibabel.

- The volume is reoriented to the closest canonical (RAS+) orientation first (`canonical=True`),
  so `axis=2` means axial slices, 1 coronal, 0 sagittal, whatever the scanner stored.
- Scaling (scl_slope / scl_inter) is applied, so int16 with a slope and float32 of the same
  values read equal; NIfTI declares no intensity unit (read_units: "not declared").
- Dimensions past the third (e.g. time in fMRI, [X, Y, Z, T]) give further slices: the
  list runs through all slices of volume 0, then of volume 1, ...
- A slice whose fraction of non-zero finite pixels is below `min_nonzero_fraction` is skipped
  (background-only slices at the edge of a scan). `index` counts the kept slices.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ._common import OptionError, ReadError, finish, pick_one


def read_nifti_slices(path: Path, axis: int = 2, min_nonzero_fraction: float = 0.01,
                      canonical: bool = True) -> list[np.ndarray]:
    """Volume -> list of float32 [1, H, W] slices (empty ones skipped)."""
    path = Path(path)
    volume = _load(path, canonical)  # [X, Y, Z, *rest]
    if not 0 <= axis < 3:
        raise OptionError(f"axis={axis}: expected 0, 1 or 2 (one of the three spatial axes)")
    stacked = np.moveaxis(volume, axis, 0).reshape(volume.shape[axis], *_plane(volume, axis), -1)
    slices = []
    for v in range(stacked.shape[-1]):  # [S, H, W, V]: all slices of volume 0, then 1, ...
        for s in range(stacked.shape[0]):
            plane = stacked[s, :, :, v]
            if np.mean(np.isfinite(plane) & (plane != 0)) >= min_nonzero_fraction:
                slices.append(plane)
    if not slices:
        raise ReadError(f"{path}: all {stacked.shape[0] * stacked.shape[-1]} slices along axis "
                        f"{axis} have fewer than {min_nonzero_fraction:.1%} non-zero pixels")
    return [finish(path, s[None]) for s in slices]


def read_nifti(path: Path, index: int | None = None, axis: int = 2,
               min_nonzero_fraction: float = 0.01, canonical: bool = True) -> np.ndarray:
    """One kept slice -> float32 [1, H, W]; `index` is required when more than one is kept."""
    return pick_one(path, read_nifti_slices(path, axis, min_nonzero_fraction, canonical), index, "slices")


def _load(path: Path, canonical: bool) -> np.ndarray:
    """-> float32 volume [X, Y, Z, ...] (2D images get Z = 1)."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img = nib.load(path)
        if canonical and len(img.shape) >= 3:
            img = nib.as_closest_canonical(img)
        if np.iscomplexobj(np.empty(0, img.get_data_dtype())):
            raise ReadError(f"{path}: complex-valued NIfTI data is not an image")
        volume = img.get_fdata(dtype=np.float32)
    except ReadError:
        raise
    except ImageFileError as err:
        raise ReadError(f"{path}: not a NIfTI file: {err}") from None
    except (OSError, EOFError, ValueError) as err:  # gzip/zlib errors, truncated data
        raise ReadError(f"{path}: corrupt or truncated NIfTI: {type(err).__name__}: {err}") from None
    if volume.ndim == 2:
        volume = volume[..., None]
    if volume.ndim < 3 or 0 in volume.shape:
        raise ReadError(f"{path}: NIfTI data has shape {volume.shape}, expected at least 2D")
    return volume


def _plane(volume: np.ndarray, axis: int) -> tuple[int, int]:
    """Shape [H, W] of a slice along `axis`: the other two spatial axes, in order."""
    h, w = (volume.shape[a] for a in range(3) if a != axis)
    return h, w
