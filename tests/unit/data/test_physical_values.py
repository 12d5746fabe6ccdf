"""Issue 14, case 5: every format that declares how its values map to physical ones is read in
physical values, and the unit goes to stats.json.

Each test writes the same values packed two ways in the real format (GeoTIFF via rasterio with
per-band scales/offsets, DICOM via pydicom with rescale slope/intercept, NIfTI via nibabel with
scl_slope/scl_inter) and reads them equal. Before, the GeoTIFF of scaled integers read as raw
counts (band means in the tens of thousands instead of reflectance below 1).
"""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import rasterio
from rasterio.transform import from_origin

from pipeline.config import load_config
from pipeline.data.readers import NOT_DECLARED, read_image, read_images, read_raster, read_units
from pipeline.stages.prepare import _build
from test_own_imagery import dicom, png

BANDS = 5
# per band: reflectance = DN * scale + offset (Landsat Collection 2 uses 2.75e-5 and -0.2)
SCALES = np.array([2.75e-5, 2.75e-5, 1e-4, 2e-5, 5e-5])
OFFSETS = np.array([-0.2, -0.2, 0.0, -0.1, 0.0])


def reflectance(seed: int = 0, size: int = 16) -> np.ndarray:
    """[BANDS, size, size] float32 reflectance in 0.02..0.6, on each band's DN grid."""
    rng = np.random.default_rng(seed)
    dn = np.rint((rng.uniform(0.02, 0.6, (BANDS, size, size)) - OFFSETS[:, None, None]) / SCALES[:, None, None])
    return (dn * SCALES[:, None, None] + OFFSETS[:, None, None]).astype(np.float32)


def geotiff(path: Path, data: np.ndarray, dtype: str, nodata, scales=None, offsets=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    c, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype=dtype, nodata=nodata,
                       crs="EPSG:32633", transform=from_origin(500000, 5000000, 30, 30)) as dst:
        dst.write(data.astype(dtype))
        if scales is not None:
            dst.scales, dst.offsets = tuple(scales), tuple(offsets)
        dst.units = ("reflectance",) * c


def scaled_integers(refl: np.ndarray) -> np.ndarray:
    """Reflectance -> the uint16 DN a scaled GeoTIFF stores (0 is nodata)."""
    return np.rint((refl - OFFSETS[:, None, None]) / SCALES[:, None, None])


def test_geotiff_scaled_integers_read_as_the_float_reflectance(tmp_path):
    refl = reflectance()
    refl[1, 3, 4] = np.nan  # nodata in both files
    geotiff(tmp_path / "float.tif", np.nan_to_num(refl, nan=-9999), "float32", -9999)
    geotiff(tmp_path / "dn.tif", np.nan_to_num(scaled_integers(refl), nan=0), "uint16", 0, SCALES, OFFSETS)
    as_float, as_dn = read_image(tmp_path / "float.tif"), read_image(tmp_path / "dn.tif")
    np.testing.assert_allclose(as_dn, as_float, rtol=0, atol=1e-6, equal_nan=True)
    assert np.isnan(as_dn[1, 3, 4]) and np.isnan(as_dn).sum() == 1
    assert 0 < np.nanmean(as_dn) < 1  # reflectance, not counts in the tens of thousands
    raster = read_raster(tmp_path / "dn.tif", bands=[3, 1])
    assert raster.units == ("reflectance", "reflectance") and raster.source_dtype == "uint16"
    np.testing.assert_allclose(raster.data, as_float[[2, 0]], atol=1e-6, equal_nan=True)
    assert read_units(tmp_path / "dn.tif") == ["reflectance"] * BANDS


def ct(path: Path, stored: np.ndarray, slope: float, intercept: float, rescale_type: str | None) -> None:
    """A CT slice storing `stored` (int16: signed pixel representation) with a rescale."""
    dicom(path, stored.view(np.uint16) if stored.dtype == np.int16 else stored)
    ds = pydicom.dcmread(path)
    ds.PixelRepresentation = int(stored.dtype == np.int16)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if rescale_type:
        ds.RescaleType = rescale_type
    ds.save_as(path)


def test_dicom_rescale_gives_the_same_hounsfield_units_from_either_packing(tmp_path):
    hu = np.random.default_rng(1).integers(-2000, 3000, (16, 16)) / 2.0  # HU in steps of 0.5
    ct(tmp_path / "signed.dcm", (hu * 2).astype(np.int16), 0.5, 0, "HU")
    ct(tmp_path / "offset.dcm", (hu * 2 + 4096).astype(np.uint16), 0.5, -2048, None)
    a, b = read_image(tmp_path / "signed.dcm"), read_image(tmp_path / "offset.dcm")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[0], hu.astype(np.float32))
    assert read_units(tmp_path / "signed.dcm") == read_units(tmp_path / "offset.dcm") == ["HU"]
    assert read_units(tmp_path / "offset.dcm", dicom={"window": ["lung", "bone"]}) == [
        "0..1 (window -600/1500 of HU)", "0..1 (window 400/1800 of HU)"]


def test_nifti_scl_slope_and_float_storage_read_equal(tmp_path):
    vol = np.random.default_rng(2).normal(300, 80, (12, 10, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "float.nii.gz")
    packed = nib.Nifti1Image(vol, np.eye(4))
    packed.set_data_dtype(np.int16)  # nibabel chooses scl_slope / scl_inter for int16
    nib.save(packed, tmp_path / "int16.nii.gz")
    stored = nib.load(tmp_path / "int16.nii.gz")
    slope = float(stored.dataobj.slope)  # the header's scl_slope, as nibabel applies it
    assert stored.get_data_dtype() == np.int16 and slope not in (0.0, 1.0)
    for a, b in zip(read_images(tmp_path / "float.nii.gz"), read_images(tmp_path / "int16.nii.gz")):
        np.testing.assert_allclose(b, a, rtol=0, atol=slope / 2 + 1e-4)
    assert read_units(tmp_path / "int16.nii.gz") == [NOT_DECLARED]


def prepare(tmp_path: Path, root: Path, name: str) -> dict:
    cfg = load_config(None, ["data.dataset=folder", f"data.options={{root: {root}}}",
                             f"data.root={tmp_path / name}", "run.quiet=true"])
    _build(cfg, tmp_path / name / "folder")
    return json.loads((tmp_path / name / "folder" / "stats.json").read_text())


def test_stats_are_in_physical_values_and_record_the_unit(tmp_path, capsys):
    for i in range(3):
        refl = reflectance(seed=i)
        geotiff(tmp_path / "float" / f"{i}.tif", refl, "float32", None)
        geotiff(tmp_path / "dn" / f"{i}.tif", scaled_integers(refl), "uint16", 0, SCALES, OFFSETS)
    a, b = prepare(tmp_path, tmp_path / "float", "a"), prepare(tmp_path, tmp_path / "dn", "b")
    assert a["units"] == b["units"] == ["reflectance"] * BANDS
    np.testing.assert_allclose(b["mean"], a["mean"], atol=1e-5)
    np.testing.assert_allclose(b["p_high"], a["p_high"], atol=1e-5)
    assert all(0 < m < 1 for m in b["mean"])
    assert "units: reflectance (every channel; stats.json has them)" in capsys.readouterr().out


def test_a_channel_of_mixed_units_is_a_warning_and_recorded(tmp_path, capsys):
    for i in range(2):
        ct(tmp_path / "mixed" / f"ct{i}.dcm", np.full((16, 16), 40 + i, np.int16), 1, -1024, "HU")
        png(tmp_path / "mixed" / f"photo{i}.png", seed=i)
    stats = prepare(tmp_path, tmp_path / "mixed", "m")
    assert stats["units"] == ["mixed: HU (2 files), not declared (2 files)"]
    out = capsys.readouterr().out
    assert "WARNING channel 'band_0' holds values of several units (HU (2 files), not declared (2 files))" in out
