"""Prepare and first-epoch time of the data pipeline on mixed-size DICOM files and a large volume.

Two unlabelled folders, built under --work from real files (never downloaded):
  dicom   single-channel pydicom-data studies of seven sizes (64 x 64 MR up to a 1955 x 1841 CR,
          multi-frame MR and CT, three JPEG 2000 files among them), each copied --copies times
  nifti   one int16 .nii.gz volume of --size^3 voxels: nibabel's anatomical.nii resampled
Per folder it times what `mimflow run` does before the model sees a batch:
  prepare      stages.prepare._build: manifest, validation, channel statistics (from scratch)
  epoch 1      stages.common.cached_read_fn (the decoded-image cache is built here) + one pass of
               the pretraining DataLoader (train transform at model.img_size, batch 16, 0 workers)
  epoch 2      one more pass (what every later epoch costs)
Warnings raised on the way (e.g. "tile cache not used") are counted and the first one is shown.

Usage:  python scripts/benchmark_prepare.py [--work /tmp/mimflow-bench-prepare] [--size 300] [--copies 4]
"""
from __future__ import annotations

import argparse
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from pipeline.config import load_config
from pipeline.data.manifest import load_manifest, select
from pipeline.data.stats import load_stats
from pipeline.distributed import make_accelerator
from pipeline.stages.common import cached_read_fn, make_dataset, make_loader
from pipeline.stages.prepare import _build

DICOM_FILES = ("MR_small.dcm", "CT_small.dcm", "emri_small.dcm", "693_UNCR.dcm", "eCT_Supplemental.dcm",
               "MR2_UNCR.dcm", "RG1_UNCR.dcm",  # uncompressed, 64^2 .. 1955 x 1841
               "693_J2KR.dcm", "MR2_J2KR.dcm", "RG3_J2KR.dcm")  # JPEG 2000 lossless, 512^2 .. 1760^2


def dicom_folder(root: Path, copies: int) -> Path:
    from pydicom.data import get_testdata_file

    root.mkdir(parents=True, exist_ok=True)
    for name in DICOM_FILES:
        for i in range(copies):
            shutil.copy(get_testdata_file(name, download=False), root / f"{i}_{name}")
    return root


def nifti_folder(root: Path, size: int) -> Path:
    import nibabel as nib
    from scipy import ndimage

    root.mkdir(parents=True, exist_ok=True)
    src = nib.load(Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii")
    vol = src.get_fdata(dtype=np.float32)  # [33, 41, 25]
    zoom = [size / s for s in vol.shape]
    big = ndimage.zoom(vol, zoom, order=1).astype(np.int16)  # [size, size, size]
    nib.save(nib.Nifti1Image(big, src.affine @ np.diag([1 / z for z in zoom] + [1])), root / "volume.nii.gz")
    return root


def timed(fn):
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, time.perf_counter() - start, [str(w.message) for w in caught]


def one_epoch(loader) -> int:
    return sum(len(images) for images, _ in loader)


def measure(name: str, folder: Path, work: Path) -> None:
    cfg = load_config(None, ["data.dataset=folder", f"data.options={{root: {folder}}}",
                             f"data.root={work / 'prepared' / name}", "data.augment=medical",
                             "model.backbone=vit_debug", "model.img_size=32", "model.patch_size=4",
                             "pretrain.batch_size_per_device=16", "run.quiet=true", "run.device=cpu"])
    shutil.rmtree(work / "prepared" / name, ignore_errors=True)
    acc = make_accelerator(cfg.run)
    out = Path(cfg.data.root) / cfg.data.dataset
    _, t_prepare, w_prepare = timed(lambda: _build(cfg, out))
    pool = select(load_manifest(out / "manifest.csv"), "unlabelled")
    stats = load_stats(out / "stats.json")

    def first():
        read_fn = cached_read_fn(cfg, pool, acc)
        loader = make_loader(make_dataset(cfg, pool, stats, train=True, read_fn=read_fn),
                             cfg.pretrain.batch_size_per_device, cfg, train=True)
        return loader, one_epoch(loader)

    (loader, n), t_first, w_first = timed(first)
    _, t_second, w_second = timed(lambda: one_epoch(loader))
    print(f"{name:<6} {len(pool):>6} {t_prepare:>10.1f} {t_first:>12.1f} {t_second:>10.1f}   "
          f"{len(w_prepare) + len(w_first) + len(w_second)} warning(s)")
    for w in dict.fromkeys(w_prepare + w_first + w_second):
        print(f"         warning: {w[:160]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/mimflow-bench-prepare")
    parser.add_argument("--size", type=int, default=300, help="edge of the NIfTI volume in voxels")
    parser.add_argument("--copies", type=int, default=4, help="copies of each DICOM file")
    parser.add_argument("--only", choices=("dicom", "nifti"), help="run one folder only")
    args = parser.parse_args()
    work = Path(args.work)
    folders = {}
    if args.only in (None, "dicom"):
        folders["dicom"] = dicom_folder(work / "src" / "dicom", args.copies)
    if args.only in (None, "nifti"):
        folders["nifti"] = nifti_folder(work / "src" / "nifti", args.size)
    print(f"{'folder':<6} {'images':>6} {'prepare s':>10} {'epoch 1 s':>12} {'epoch 2 s':>10}")
    for name, folder in folders.items():
        measure(name, folder, work)


if __name__ == "__main__":
    main()
