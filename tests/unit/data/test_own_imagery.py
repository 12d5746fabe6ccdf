"""Issue 8: a user's own folder of mixed formats, prepared with only the recipe written.

Every case is built from small files in the real formats: PNG through Pillow, DICOM through
pydicom (greyscale CT-like and colour ultrasound-like YBR_FULL / RGB), NIfTI through nibabel.
"""
import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.config import ConfigError, load_config
from pipeline.data import DataError
from pipeline.data.manifest import load_manifest, read_record
from pipeline.data.readers import read_images
from pipeline.stages.prepare import BadDataError, _build

EXAMPLE4D = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
RNG = np.random.default_rng(0)


def png(path: Path, mode: str = "L", size: int = 16, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = {"L": (size, size), "RGB": (size, size, 3), "RGBA": (size, size, 4)}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)
    return arr


def dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", modality: str = "CT") -> None:
    """A minimal valid DICOM file (Secondary Capture) holding `pixels` [H, W] uint16 or
    [H, W, 3] uint8 RGB, stored as `photometric` (YBR_FULL is converted from the RGB given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, modality
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        stored = convert_color_space(pixels, "RGB", "YBR_FULL") if photometric == "YBR_FULL" else pixels
        ds.SamplesPerPixel, ds.PlanarConfiguration, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 0, 8, 8, 7
    else:
        stored = pixels
        ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds.save_as(path, enforce_file_format=True)


def nifti(path: Path, shape=(12, 10, 6)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    vol = RNG.normal(100, 20, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    return vol


def cfg_for(tmp_path: Path, root: Path, *overrides: str, dataset: str = "imagefolder", fractions="[1, 0, 0]"):
    options = f"{{root: {root}, split_fractions: {fractions}}}" if dataset == "imagefolder" else f"{{root: {root}}}"
    return load_config(None, [f"data.dataset={dataset}", f"data.options={options}",
                              f"data.root={tmp_path / 'prepared'}", "run.quiet=true", *overrides])


def prepare(cfg):
    return _build(cfg, Path(cfg.data.root) / cfg.data.dataset)


# ---------------------------------------------------------------- case 1: mixed channel counts

def test_auto_converts_grey_to_the_largest_count_present_and_says_so(tmp_path, capsys):
    grey = png(tmp_path / "img" / "A" / "a0.png")
    png(tmp_path / "img" / "A" / "a1.png", seed=1)
    rgb = png(tmp_path / "img" / "B" / "b0.png", "RGB", seed=2)
    info = prepare(cfg_for(tmp_path, tmp_path / "img"))
    out = capsys.readouterr().out
    assert info["channels"] == ["band_0", "band_1", "band_2"] and info["quarantined"] == 0
    assert info["counts"]["train"] == 3  # before: all of B quarantined as "3 channels, the data set has 1"
    assert "channels: 3" in out and "auto: the largest count present" in out
    assert "converted 2 image(s): grey -> 3 channels by replication" in out
    recs = {r.path.name: r for r in load_manifest(tmp_path / "prepared" / "imagefolder" / "manifest.csv")}
    assert {r.channels for r in recs.values()} == {3}
    np.testing.assert_array_equal(read_record(recs["a0.png"]), np.repeat(grey[None], 3, 0).astype(np.float32))
    np.testing.assert_array_equal(read_record(recs["b0.png"]), rgb.transpose(2, 0, 1).astype(np.float32))


def test_channels_1_turns_rgb_into_luminance_and_names_are_kept(tmp_path):
    png(tmp_path / "img" / "A" / "a0.png")
    rgb = png(tmp_path / "img" / "B" / "b0.png", "RGB", seed=2)
    info = prepare(cfg_for(tmp_path, tmp_path / "img", "data.channels=[gray]"))
    assert info["channels"] == ["gray"] and info["conversions"] == {"RGB -> grey by luminance (BT.601)": 1}
    rec = next(r for r in load_manifest(tmp_path / "prepared" / "imagefolder" / "manifest.csv") if r.label == 1)
    expected = np.asarray(Image.fromarray(rgb).convert("L"), np.float32)  # Pillow's own luminance
    assert np.abs(read_record(rec)[0] - expected).max() <= 0.5


def test_colour_ultrasound_dicom_joins_greyscale_ct_as_rgb(tmp_path):
    """YBR_FULL and RGB ultrasound frames among MONOCHROME2 CT slices of two sizes."""
    root = tmp_path / "img"
    for i, size in enumerate((16, 24)):
        dicom(root / "ct" / f"{i}.dcm", RNG.integers(0, 4000, (size, size), dtype=np.uint16))
    colour = RNG.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    dicom(root / "us" / "ybr.dcm", colour, "YBR_FULL", "US")
    dicom(root / "us" / "rgb.dcm", colour, "RGB", "US")
    info = prepare(cfg_for(tmp_path, root))
    assert info["quarantined"] == 0 and len(info["channels"]) == 3
    recs = {r.path.name: r for r in load_manifest(tmp_path / "prepared" / "imagefolder" / "manifest.csv")}
    rgb = colour.transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(read_record(recs["rgb.dcm"]), rgb)
    assert np.abs(read_record(recs["ybr.dcm"]) - rgb).max() <= 3  # YBR -> RGB, 8-bit rounding
    assert read_record(recs["1.dcm"]).shape == (3, 24, 24)


def test_prepare_refuses_when_quarantine_would_remove_a_whole_class(tmp_path):
    png(tmp_path / "img" / "A" / "a0.png")
    png(tmp_path / "img" / "B" / "b0.png", "RGBA")  # alpha kept: 4 channels, no conversion to 1
    cfg = cfg_for(tmp_path, tmp_path / "img", "data.channels=1", "data.reader_options={png: {alpha: keep}}")
    with pytest.raises(DataError, match=r"class 'B': quarantine would remove all of its images \(1 of 1\)"
                                        r".*b0\.png: 4 channels.*Fix: set data\.channels"):
        prepare(cfg)
    assert "b0.png" in (tmp_path / "prepared" / "imagefolder" / "quarantine.csv").read_text()


def test_prepare_refuses_a_class_losing_more_than_the_set_share(tmp_path):
    for i in range(5):
        png(tmp_path / "img" / "A" / f"a{i}.png", seed=i)
    (tmp_path / "img" / "A" / "a0.png").write_bytes(b"")
    (tmp_path / "img" / "A" / "a1.png").write_text("not an image")
    with pytest.raises(DataError, match=r"class 'A': quarantine would remove 40% \(over "
                                        r"data.max_quarantined_share=0.2\).*raise data.max_quarantined_share"):
        prepare(cfg_for(tmp_path, tmp_path / "img"))
    info = prepare(cfg_for(tmp_path, tmp_path / "img", "data.max_quarantined_share=0.5"))
    assert info["quarantined"] == 2 and info["counts"]["train"] == 3


# ---------------------------------------------------------------- case 3: options per reader

def test_options_are_keyed_by_reader_so_dicom_and_nifti_share_a_folder(tmp_path):
    root = tmp_path / "img"
    ct = RNG.integers(0, 2000, (16, 16), dtype=np.uint16)
    dicom(root / "scan.dcm", ct)
    vol = nifti(root / "vol.nii.gz")
    cfg = cfg_for(tmp_path, root, "data.reader_options={dicom: {window: [1000, 400]}, nifti: {axis: 2}}",
                  dataset="folder")
    info = prepare(cfg)  # before: a TypeError from the DICOM reader, which has no `axis`
    recs = load_manifest(tmp_path / "prepared" / "folder" / "manifest.csv")
    assert info["quarantined"] == 0 and len(recs) == 1 + vol.shape[2]
    window = next(r for r in recs if r.path.name == "scan.dcm")
    img = read_record(window, **cfg.data.reader_options)
    assert 0 <= img.min() and img.max() <= 1  # windowed to [0, 1]


@pytest.mark.parametrize("override,message", [
    ("data.reader_options={axis: 2}", r"'axis' is an option of the nifti reader.*\{nifti: \{axis: \.\.\.\}\}"),
    ("data.reader_options={dicom: {axis: 2}}", r"data\.reader_options\.dicom\.axis: unknown key"),
    ("data.reader_options={nifti: {axis: 3}}", r"data\.reader_options\.nifti\.axis: Input should be 0, 1 or 2"),
    ("data.reader_options={gif: {}}", r"data\.reader_options\.gif: unknown key"),
    ("data.reader_options={png: {alpha: clear}}", r"data\.reader_options\.png\.alpha"),
])
def test_reader_options_are_checked_at_config_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_bad_window_name_fails_before_any_file_is_read(tmp_path):
    dicom(tmp_path / "img" / "a.dcm", RNG.integers(0, 99, (8, 8), dtype=np.uint16))
    with pytest.raises(DataError, match=r"reader_options\.dicom\.window: .*'lungs'"):
        prepare(cfg_for(tmp_path, tmp_path / "img", "data.reader_options={dicom: {window: lungs}}", dataset="folder"))
    assert not (tmp_path / "prepared" / "folder" / "manifest.csv").exists()


def test_every_reader_option_in_the_config_is_one_the_reader_takes():
    from pipeline.config import ReaderOptions
    from pipeline.data.readers import FORMATS

    assert set(ReaderOptions.model_fields) == set(FORMATS)
    for name, field in ReaderOptions.model_fields.items():
        section = field.annotation.__args__[0]
        assert set(section.model_fields) == set(FORMATS[name].options()), name


# ---------------------------------------------------------------- case 4: counting == decoding

@pytest.mark.parametrize("axis", [0, 1, 2])
def test_manifest_lists_exactly_the_slices_the_decoder_returns_for_every_axis(tmp_path, axis):
    root = tmp_path / "img"
    root.mkdir()
    shutil.copy(EXAMPLE4D, root / "example4d.nii.gz")  # [128, 96, 24, 2]: 4D, slices of both volumes
    options = {"nifti": {"axis": axis, "min_nonzero_fraction": 0.0}}
    cfg = cfg_for(tmp_path, root, f"data.reader_options={json.dumps(options)}", dataset="folder")
    info = prepare(cfg)
    recs = load_manifest(tmp_path / "prepared" / "folder" / "manifest.csv")
    slices = read_images(root / "example4d.nii.gz", **options)
    assert len(recs) == len(slices) == 2 * nib.load(EXAMPLE4D).shape[axis]  # before: sized for axis 2
    assert info["quarantined"] == 0
    for r in recs[:: max(1, len(recs) // 7)]:
        np.testing.assert_array_equal(read_record(r, **options), slices[r.index])


# ---------------------------------------------------------------- case 6: stratified group splits

def test_splits_are_stratified_by_class_and_reported_per_class_and_split(tmp_path, capsys):
    for cls, n in (("common", 20), ("rare", 5), ("frequent", 12)):
        for i in range(n):
            png(tmp_path / "img" / cls / f"{i}.png", seed=i)
    info = prepare(cfg_for(tmp_path, tmp_path / "img", fractions="[0.6, 0.2, 0.2]"))
    counts = info["split_counts"]
    for name, n in (("common", 20), ("rare", 5), ("frequent", 12)):
        per = counts[name]
        assert all(per[s]["images"] >= 1 for s in ("train", "val", "test")), (name, per)
        assert abs(per["train"]["images"] - 0.6 * n) <= 1.5, (name, per)
    out = capsys.readouterr().out
    assert "(images / groups)" in out and "rare" in out


def test_a_class_with_too_few_groups_fails_naming_it_unless_accepted(tmp_path, capsys):
    for i in range(10):
        png(tmp_path / "img" / "A" / f"{i}.png", seed=i)
    png(tmp_path / "img" / "B" / "0.png")
    png(tmp_path / "img" / "B" / "1.png", seed=1)
    cfg = cfg_for(tmp_path, tmp_path / "img", fractions="[0.6, 0.2, 0.2]")
    with pytest.raises(DataError, match=r"class 'B' has no image in the (val|test) split: it has 2 group\(s\)"
                                        r".*data\.allow_missing_classes=true"):
        prepare(cfg)
    info = prepare(cfg_for(tmp_path, tmp_path / "img", "data.allow_missing_classes=true", fractions="[0.6, 0.2, 0.2]"))
    assert sum(n["images"] for n in info["split_counts"]["B"].values()) == 2
    assert "WARNING class 'B' has no image in the" in capsys.readouterr().out


def test_frames_of_a_multi_frame_file_never_straddle_splits(tmp_path):
    from pydicom.data import get_testdata_file

    for cls in ("a", "b"):
        for i in range(4):
            (tmp_path / "img" / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(get_testdata_file("emri_small.dcm", download=False), tmp_path / "img" / cls / f"{i}.dcm")
    prepare(cfg_for(tmp_path, tmp_path / "img", fractions="[0.5, 0.25, 0.25]"))
    recs = load_manifest(tmp_path / "prepared" / "imagefolder" / "manifest.csv")
    assert len(recs) == 80  # 8 files x 10 frames
    split_of = {}
    for r in recs:
        assert split_of.setdefault(r.group, r.split) == r.split


# ---------------------------------------------------------------- case 9: strict mode and reuse

def test_strict_after_a_lenient_prepare_rebuilds_and_fails_listing_every_entry(tmp_path, capsys):
    for i in range(12):
        png(tmp_path / "img" / "A" / f"{i}.png", seed=i)
    for i in range(7):
        (tmp_path / "img" / "A" / f"bad{i}.png").write_bytes(b"")
    lenient = cfg_for(tmp_path, tmp_path / "img", "data.max_quarantined_share=0.5")
    assert prepare(lenient)["quarantined"] == 7
    strict = cfg_for(tmp_path, tmp_path / "img", "data.max_quarantined_share=0.5", "data.strict=true")
    with pytest.raises(BadDataError) as err:
        prepare(strict)  # before: silently reused the filtered result of the lenient prepare
    lines = str(err.value).splitlines()
    assert lines[0].startswith("data.strict=true and 7 of 19 images (7 of 19 files) cannot be used; "
                               "all are listed in ")
    assert len(lines) == 1 + 5 + 1 and lines[-1].startswith("  ... 2 more in ")  # the first five, then "N more"
    assert "data.strict changed since" in capsys.readouterr().out
    quarantine = list(csv.DictReader(open(tmp_path / "prepared" / "imagefolder" / "quarantine.csv")))
    assert sorted(Path(q["path"]).name for q in quarantine) == [f"bad{i}.png" for i in range(7)]


@pytest.mark.parametrize("override", ["data.channels=3", "data.reader_options={png: {alpha: nodata}}",
                                      "data.options.split_fractions=[0.5, 0.5, 0]", "data.max_quarantined_share=0.3",
                                      "data.clip_percentiles=[2, 98]", "run.seed=1"])
def test_prepared_data_is_reused_only_with_the_same_settings(tmp_path, capsys, override):
    for i in range(4):
        png(tmp_path / "img" / "A" / f"{i}.png", seed=i)
    cfg = cfg_for(tmp_path, tmp_path / "img")
    prepare(cfg)
    capsys.readouterr()
    prepare(cfg)
    assert capsys.readouterr().out == ""  # reused
    prepare(load_config(None, [*_overrides(cfg), override]))
    assert "changed since" in capsys.readouterr().out


def _overrides(cfg) -> list[str]:
    return [f"data.dataset={cfg.data.dataset}", f"data.options={json.dumps(cfg.data.options)}",
            f"data.root={cfg.data.root}", "run.quiet=true"]
