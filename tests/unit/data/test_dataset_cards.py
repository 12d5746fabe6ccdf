"""datasets/<name>/: data cards and prepare.py parsers, on small files in each real format."""
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from card_files import write_ben_patch, write_chestxray
from pipeline.data.manifest import load_manifest
from pipeline.data.readers import read_image, read_raster

DATASETS = Path(__file__).resolve().parents[3] / "datasets"
NAMES = ["eurosat", "bigearthnet", "chestxray14", "medmnist"]
SPLITS = {"unlabelled", "train", "val", "test"}


def load(name: str):
    """datasets/<name>/prepare.py as a module (datasets/ is deliberately not a package)."""
    spec = importlib.util.spec_from_file_location(f"test_cards_{name}", DATASETS / name / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def manifest_rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["path", "split", "label", "group"]
        return list(reader)


def check_common(out: Path, info: dict) -> list[dict]:
    """Manifest + dataset.json invariants every dataset must meet -> manifest rows."""
    assert json.loads((out / "dataset.json").read_text()) == info
    assert {"name", "task", "classes", "channels"} <= set(info)
    assert info["task"] in ("multiclass", "multilabel")
    rows = manifest_rows(out)
    split_of = {}
    for r in rows:
        assert r["split"] in SPLITS
        assert (out / r["path"]).is_file(), r["path"]  # relative to out_dir, or absolute
        labels = [int(x) for x in r["label"].split("|") if x != ""]
        if info["task"] == "multiclass":
            assert len(labels) == 1
        assert all(0 <= x < len(info["classes"]) for x in labels)
        if r["split"] != "unlabelled":
            assert split_of.setdefault(r["group"], r["split"]) == r["split"], f"{r['group']} straddles splits"
    return rows


@pytest.mark.parametrize("name", NAMES)
def test_every_dataset_has_a_card_and_a_build_function(name):
    card = (DATASETS / name / "README.md").read_text().lower()
    for word in ("source", "licence", "layout", "manifest.csv"):
        assert word in card, f"{name}/README.md says nothing about {word}"
    assert callable(load(name).build)
    assert not (DATASETS / "__init__.py").exists()  # would shadow Hugging Face `datasets`


# ---------------------------------------------------------------- EuroSAT

def _eurosat(src: Path, per_class: int = 3) -> None:
    """13-band 64 x 64 uint16 GeoTIFFs in class folders; tiles of a class sit side by side."""
    mod = load("eurosat")
    rng = np.random.default_rng(0)
    for c, cls in enumerate(mod.CLASSES):
        folder = src / "EuroSAT_MS" / cls
        folder.mkdir(parents=True)
        for i in range(per_class):
            x0, y0 = 2560 * (100 + 10 * c) + i * 640, 5500000  # one 2,560 m block per class, 640 m tiles
            with rasterio.open(folder / f"{cls}_{i + 1}.tif", "w", driver="GTiff", width=64, height=64,
                               count=13, dtype="uint16", crs="EPSG:32632",
                               transform=from_origin(x0, y0, 10, 10)) as dst:
                dst.write(rng.integers(0, 4000, (13, 64, 64), dtype=np.uint16))


def test_eurosat_manifest_from_13_band_geotiffs(tmp_path):
    _eurosat(tmp_path / "src")
    mod = load("eurosat")
    info = mod.build(tmp_path / "src", tmp_path / "out", block_m=2560.0, seed=1)
    rows = check_common(tmp_path / "out", info)
    assert info["task"] == "multiclass" and info["variant"] == "ms"
    assert info["channels"] == mod.MS_BANDS and len(info["channels"]) == 13
    assert len(rows) == 30 and {r["split"] for r in rows} == {"train", "val", "test"}
    for r in rows:
        assert Path(r["path"]).is_absolute() and mod.CLASSES[int(r["label"])] == Path(r["path"]).parent.name
    # three 640 m tiles of a class fall in one 2,560 m block -> one group, 10 groups in all
    assert info["groups"] == 10 and len({r["group"] for r in rows}) == 10
    assert read_image(rows[0]["path"]).shape == (13, 64, 64)
    records = load_manifest(tmp_path / "out" / "manifest.csv")  # the pipeline's own loader
    assert len(records) == 30 and all(0 <= r.label < 10 for r in records)


def test_eurosat_group_by_file_and_missing_classes(tmp_path):
    _eurosat(tmp_path / "src", per_class=2)
    mod = load("eurosat")
    info = mod.build(tmp_path / "src", tmp_path / "out", group_by="file")
    assert info["groups"] == 20
    for tif in (tmp_path / "src" / "EuroSAT_MS" / "River").iterdir():
        tif.unlink()
    with pytest.raises(FileNotFoundError, match="River"):
        mod.build(tmp_path / "src", tmp_path / "out2")


def test_eurosat_rgb_jpeg_variant(tmp_path):
    mod = load("eurosat")
    for cls in mod.CLASSES:
        (tmp_path / "src" / "EuroSAT_RGB" / cls).mkdir(parents=True)
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "src" / "EuroSAT_RGB" / cls / f"{cls}_1.jpg")
    info = mod.build(tmp_path / "src", tmp_path / "out")
    rows = check_common(tmp_path / "out", info)
    assert info["variant"] == "rgb" and info["channels"] == ["red", "green", "blue"]
    assert read_image(rows[0]["path"]).shape == (3, 64, 64)


# ---------------------------------------------------------------- BigEarthNet

def test_bigearthnet_resamples_bands_and_maps_labels(tmp_path):
    src = tmp_path / "src"
    write_ben_patch(src, "S2A_MSIL2A_20170613T101031_0_0", ["Coniferous forest", "Water bodies"], 400000)
    write_ben_patch(src, "S2A_MSIL2A_20170613T101031_0_1", ["Discontinuous urban fabric", "Airports"], 401200)
    write_ben_patch(src, "S2A_MSIL2A_20170613T101031_0_2", ["Airports"], 402400)  # nothing left in 19 classes
    write_ben_patch(src, "S2A_MSIL2A_20170613T101031_0_9", ["Pastures"], 450000)
    write_ben_patch(src, "S2A_MSIL2A_20170613T101031_5_5", ["Sea and ocean"], 480000)
    write_ben_patch(src, "S2A_MSIL2A_20170613T101031_7_7", ["Peatbogs"], 500000)
    (src / "patches_with_seasonal_snow.csv").write_text("S2A_MSIL2A_20170613T101031_7_7\n")
    mod = load("bigearthnet")
    info = mod.build(src, tmp_path / "out", block_m=12000.0)
    rows = check_common(tmp_path / "out", info)
    assert info["task"] == "multilabel" and len(info["classes"]) == 19 and info["channels"] == mod.BANDS
    assert info["patches"] == 4 and info["dropped_without_label"] == 1
    by_name = {Path(r["path"]).stem: r for r in rows}
    names = [n for n, _ in mod.LABELS_19]
    assert by_name["S2A_MSIL2A_20170613T101031_0_0"]["label"] == f"{names.index('Coniferous forest')}|{names.index('Inland waters')}"
    assert by_name["S2A_MSIL2A_20170613T101031_0_1"]["label"] == str(names.index("Urban fabric"))
    assert "S2A_MSIL2A_20170613T101031_7_7" not in by_name  # excluded as seasonal snow
    # the two neighbouring patches share a 12 km block; the far ones do not
    assert by_name["S2A_MSIL2A_20170613T101031_0_0"]["group"] == by_name["S2A_MSIL2A_20170613T101031_0_1"]["group"]
    assert len({r["group"] for r in rows}) == 3
    r = read_raster(tmp_path / "out" / rows[0]["path"], bands=["B04", "B01", "B8A"])
    assert r.data.shape == (3, 120, 120) and r.crs.to_epsg() == 32634 and r.transform.a == 10
    np.testing.assert_array_equal(r.data[:, 0, 0], [104, 101, 108])  # each band's own values
    assert read_image(tmp_path / "out" / rows[0]["path"]).shape == (12, 120, 120)


def test_bigearthnet_43_classes_and_output_size(tmp_path):
    write_ben_patch(tmp_path / "src", "S2B_MSIL2A_20180204T094029_1_1", ["Airports", "Salines"], 400000)
    mod = load("bigearthnet")
    info = mod.build(tmp_path / "src", tmp_path / "out", size=64, nomenclature=43, exclude_noisy=False)
    rows = check_common(tmp_path / "out", info)
    assert len(info["classes"]) == 43 and rows[0]["label"] == "5|36"
    r = read_raster(tmp_path / "out" / rows[0]["path"])
    assert r.data.shape == (12, 64, 64) and r.transform.a == pytest.approx(1200 / 64)
    with pytest.raises(ValueError, match="nomenclature"):
        mod.build(tmp_path / "src", tmp_path / "out", nomenclature=10)


# ---------------------------------------------------------------- ChestX-ray14

CXR_ROWS = [  # Image Index, Finding Labels, Patient ID, View Position
    ("00000001_000.png", "Cardiomegaly", "1", "PA"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", "1", "PA"),
    ("00000002_000.png", "No Finding", "2", "AP"),
    ("00000003_000.png", "Hernia|Infiltration", "3", "PA"),
    ("00000003_001.png", "Pleural_Thickening", "3", "PA"),
    ("00000004_000.png", "Mass|Nodule", "4", "PA"),
    ("00000005_000.png", "Effusion", "5", "AP"),
    ("00000006_000.png", "No Finding", "6", "PA"),
]


def _chestxray(src: Path, official: bool = True, rgba: str = "00000004_000.png") -> None:
    write_chestxray(src, CXR_ROWS, rgba=rgba)
    if official:
        (src / "test_list.txt").write_text("00000003_000.png\n00000003_001.png\n00000006_000.png\n")
        (src / "train_val_list.txt").write_text("\n".join(r[0] for r in CXR_ROWS if r[2] not in "36") + "\n")


def test_chestxray14_multilabel_manifest_split_by_patient(tmp_path):
    _chestxray(tmp_path / "src")
    mod = load("chestxray14")
    info = mod.build(tmp_path / "src", tmp_path / "out", split_fractions=(0.6, 0.4, 0.0))
    rows = check_common(tmp_path / "out", info)
    assert info["task"] == "multilabel" and info["classes"] == mod.FINDINGS and info["channels"] == ["gray"]
    by_name = {Path(r["path"]).name: r for r in rows}
    f = mod.FINDINGS.index
    assert by_name["00000001_001.png"]["label"] == f"{f('Cardiomegaly')}|{f('Emphysema')}"
    assert by_name["00000003_000.png"]["label"] == f"{f('Infiltration')}|{f('Hernia')}"
    assert by_name["00000002_000.png"]["label"] == ""  # No Finding: labelled, no positive class
    assert {by_name[n]["split"] for n in ("00000003_000.png", "00000003_001.png", "00000006_000.png")} == {"test"}
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert by_name["00000001_000.png"]["group"] == by_name["00000001_001.png"]["group"] == "patient_1"
    # the RGBA file was converted explicitly; every listed image reads as one channel
    assert info["converted_to_grayscale"] == ["00000004_000.png"]
    assert Path(by_name["00000004_000.png"]["path"]).parent == (tmp_path / "out" / "converted").resolve()
    assert all(read_image(r["path"]).shape == (1, 32, 32) for r in rows)


def test_chestxray14_random_patient_split_views_and_missing_images(tmp_path):
    _chestxray(tmp_path / "src", official=False)
    mod = load("chestxray14")
    info = mod.build(tmp_path / "src", tmp_path / "out", views=["PA"], split_fractions=(0.5, 0.25, 0.25))
    rows = check_common(tmp_path / "out", info)
    assert len(rows) == 6 and not info["official_test_split"]
    (tmp_path / "src" / "images_001" / "images" / "00000001_000.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 8 images"):
        mod.build(tmp_path / "src", tmp_path / "out2")
    info = mod.build(tmp_path / "src", tmp_path / "out3", missing="skip")
    assert info["missing_images"] == 1 and info["images"] == 7


def test_chestxray14_rejects_unknown_findings(tmp_path):
    _chestxray(tmp_path / "src")
    csv_path = tmp_path / "src" / "Data_Entry_2017.csv"
    csv_path.write_text(csv_path.read_text().replace("Effusion", "Efusion"))
    with pytest.raises(ValueError, match="Efusion"):
        load("chestxray14").build(tmp_path / "src", tmp_path / "out")


# ---------------------------------------------------------------- MedMNIST

def _npz(path: Path, rgb: bool, multilabel: bool, n=(6, 2, 3)) -> dict:
    rng = np.random.default_rng(5)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 28, 28, 3) if rgb else (count, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.integers(0, 2, (count, 14)) if multilabel
                                     else rng.integers(0, 9, (count, 1))).astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return arrays


def test_medmnist_rgb_multiclass_keeps_official_splits(tmp_path):
    (tmp_path / "src").mkdir()
    arrays = _npz(tmp_path / "src" / "pathmnist.npz", rgb=True, multilabel=False)
    mod = load("medmnist")
    info = mod.build(tmp_path / "src", tmp_path / "out", flag="pathmnist")
    rows = check_common(tmp_path / "out", info)
    assert info["task"] == "multiclass" and info["classes"] == mod.CLASSES["pathmnist"]
    assert info["channels"] == ["red", "green", "blue"] and info["counts"] == {"train": 6, "val": 2, "test": 3}
    val = [r for r in rows if r["split"] == "val"]
    np.testing.assert_array_equal(read_image(tmp_path / "out" / val[1]["path"]),
                                  arrays["val_images"][1].transpose(2, 0, 1))
    assert val[1]["label"] == str(arrays["val_labels"][1, 0])
    assert len(load_manifest(tmp_path / "out" / "manifest.csv")) == 11


def test_medmnist_gray_multilabel_and_size_suffix(tmp_path):
    (tmp_path / "src").mkdir()
    arrays = _npz(tmp_path / "src" / "chestmnist_64.npz", rgb=False, multilabel=True)
    mod = load("medmnist")
    info = mod.build(tmp_path / "src", tmp_path / "out", flag="chestmnist", size=64, limit_per_split=2)
    rows = check_common(tmp_path / "out", info)
    assert info["task"] == "multilabel" and len(info["classes"]) == 14 and info["channels"] == ["gray"]
    assert len(rows) == 6
    first = rows[0]
    assert first["label"] == "|".join(str(i) for i in np.flatnonzero(arrays["train_labels"][0]))
    assert read_image(tmp_path / "out" / first["path"]).shape == (1, 28, 28)
    with pytest.raises(FileNotFoundError, match="chestmnist_128"):
        mod.build(tmp_path / "src", tmp_path / "out", flag="chestmnist", size=128)
