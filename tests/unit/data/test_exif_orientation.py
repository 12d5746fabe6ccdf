"""Issue 14, case 6: a phone picture or a photographed slide is read upright.

JPEG (and PNG) files carry the camera's "this side up" in EXIF tag 274; it used to be ignored,
silently, so such images were trained on sideways. Files are written by Pillow with each of the
eight orientations and compared with what `PIL.ImageOps.exif_transpose` makes of them.
"""
import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.config import ConfigError, load_config
from pipeline.data.readers import read_image

ORIENTATION = 0x0112


def write(path, arr: np.ndarray, orientation: int) -> None:
    im = Image.fromarray(arr)  # L, RGB, RGBA or I;16 from the array's shape and dtype
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    im.save(path, exif=exif, **({"quality": 95} if path.suffix == ".jpg" else {}))


def channels_first(arr: np.ndarray) -> np.ndarray:
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)).astype(np.float32)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix,mode", [(".jpg", "RGB"), (".jpg", "L"), (".png", "RGB"), (".png", "I;16")])
def test_exif_orientation_is_applied_as_pil_does(tmp_path, suffix, mode, orientation):
    rng = np.random.default_rng(orientation)
    h, w = 12, 20  # not square: orientations 5-8 swap height and width
    arr = (rng.integers(0, 65536, (h, w), dtype=np.uint16) if mode == "I;16"
           else rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8))
    path = tmp_path / f"photo{suffix}"
    write(path, arr, orientation)
    with Image.open(path) as im:
        stored = np.asarray(im)
        upright = np.asarray(ImageOps.exif_transpose(im))
    got = read_image(path)
    np.testing.assert_array_equal(got, channels_first(upright))
    assert got.shape[1:] == ((w, h) if orientation >= 5 else (h, w))
    kept = read_image(path, **{suffix.strip(".").replace("jpg", "jpeg"): {"orientation": "stored"}})
    np.testing.assert_array_equal(kept, channels_first(stored))


def test_alpha_turns_with_the_pixels(tmp_path):
    rgba = np.zeros((6, 10, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[0, :3, 3] = 0  # transparent top-left corner
    write(tmp_path / "a.png", rgba, 6)  # a quarter turn clockwise to be upright
    img = read_image(tmp_path / "a.png", png={"alpha": "nodata"})
    assert img.shape == (3, 10, 6)
    assert np.isnan(img[:, :3, -1]).all() and np.isnan(img).sum() == 9  # now the top-right corner


def test_orientation_option_is_checked_when_the_recipe_loads():
    cfg = load_config(None, ["data.reader_options={jpeg: {orientation: stored}}"])
    assert cfg.data.reader_options.as_dict() == {"jpeg": {"orientation": "stored"}}
    with pytest.raises(ConfigError, match="orientation"):
        load_config(None, ["data.reader_options={jpeg: {orientation: sideways}}"])
