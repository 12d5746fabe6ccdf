"""Generic sources and the prepare-time validation, on small files in real formats."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.data.manifest import changed_files, load_manifest
from pipeline.data.sources import build_csv, build_folder, build_imagefolder
from pipeline.data.validate import validate_records


def _png(path, value, size=8, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(np.full(shape, value, np.uint8), mode).save(path)


@pytest.fixture
def imagefolder(tmp_path):
    root = tmp_path / "images"
    for c in ("cat", "dog"):
        for i in range(10):
            _png(root / c / f"{i}.png", i * 10)
    return root


def test_imagefolder_labels_groups_splits_and_hashes(imagefolder, tmp_path):
    info = build_imagefolder(tmp_path / "out", str(imagefolder), split_fractions=(0.6, 0.2, 0.2), seed=1)
    assert info["classes"] == ["cat", "dog"]
    recs = load_manifest(tmp_path / "out" / "manifest.csv")
    assert len(recs) == 20 and {r.label for r in recs} == {0, 1}
    assert {r.split for r in recs} == {"train", "val", "test"}
    assert all(len(r.sha256) == 64 for r in recs)
    again = build_imagefolder(tmp_path / "out2", str(imagefolder), split_fractions=(0.6, 0.2, 0.2), seed=1)
    assert again == info
    assert [r.split for r in load_manifest(tmp_path / "out2" / "manifest.csv")] == [r.split for r in recs]


def test_frames_of_one_file_share_a_group_and_a_split(tmp_path):
    root = tmp_path / "vols"
    root.mkdir()
    for i in range(6):
        np.savez(root / f"vol{i}.npz", train_images=np.random.rand(4, 8, 8).astype(np.float32))
    build_folder(tmp_path / "out", str(root))
    recs = load_manifest(tmp_path / "out" / "manifest.csv")
    assert len(recs) == 24 and sorted({r.index for r in recs}) == [0, 1, 2, 3]
    by_group = {}
    for r in recs:
        by_group.setdefault(r.group, set()).add(r.split)
    assert len(by_group) == 6 and all(len(s) == 1 for s in by_group.values())


def test_csv_and_parquet_manifests_with_names_and_multilabel(tmp_path):
    for i in range(8):
        _png(tmp_path / "img" / f"{i}.png", i)
    rows = [{"path": f"img/{i}.png", "label": ["a", "b", "a|b", ""][i % 4], "group": f"patient{i // 2}"}
            for i in range(8)]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    info = build_csv(tmp_path / "out", str(tmp_path / "m.csv"), seed=0)
    assert info["task"] == "multilabel" and info["classes"] == ["a", "b"]
    recs = load_manifest(tmp_path / "out" / "manifest.csv")
    assert recs[2].label == (0, 1) and recs[0].label == 0 and recs[3].split == "unlabelled"
    labelled_groups = {}
    for r in recs:
        if r.split != "unlabelled":
            labelled_groups.setdefault(r.group, set()).add(r.split)
    assert all(len(s) == 1 for s in labelled_groups.values())  # a patient never straddles splits
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    build_csv(tmp_path / "outp", str(tmp_path / "m.parquet"), seed=0)
    assert (tmp_path / "outp" / "manifest.csv").read_text() == (tmp_path / "out" / "manifest.csv").read_text()


def test_unknown_label_names_the_line(tmp_path):
    _png(tmp_path / "x.png", 1)
    (tmp_path / "m.csv").write_text("path,label\nx.png,a\nx.png,0\n")  # a name or an index
    build_csv(tmp_path / "out", str(tmp_path / "m.csv"), classes=["a"], split_fractions=(1, 0, 0))
    assert [r.label for r in load_manifest(tmp_path / "out" / "manifest.csv")] == [0, 0]
    (tmp_path / "m.csv").write_text("path,label\nx.png,a\nx.png,zebra\n")
    with pytest.raises(ValueError, match=r"m\.csv:3: unknown label 'zebra'"):
        build_csv(tmp_path / "out", str(tmp_path / "m.csv"), classes=["a"])


def test_changed_file_is_detected(imagefolder, tmp_path):
    build_imagefolder(tmp_path / "out", str(imagefolder))
    recs = load_manifest(tmp_path / "out" / "manifest.csv")
    assert changed_files(recs) == []
    _png(imagefolder / "cat" / "3.png", 255)
    assert changed_files(recs) == [imagefolder / "cat" / "3.png"]


def test_validation_quarantines_each_kind_of_bad_file_and_keeps_every_good_one(imagefolder, tmp_path):
    bad = imagefolder / "dog"
    (bad / "zero.png").write_bytes(b"")
    (bad / "text.png").write_text("hello")
    good = (imagefolder / "cat" / "0.png").read_bytes()
    (bad / "truncated.png").write_bytes(good[: len(good) // 2])
    rgba = np.full((8, 8, 4), 5, np.uint8)  # 4 channels (alpha kept) in a 1-channel set: no conversion
    Image.fromarray(rgba, "RGBA").save(bad / "rgba.png")
    np.save(bad / "nan.npy", np.full((1, 8, 8), np.nan, np.float32))
    arr = np.ones((1, 8, 8), np.float32)
    arr[0, 0, 0] = np.inf
    np.save(bad / "inf.npy", arr)
    Image.new("L", (20000, 20000)).save(bad / "bomb.png")  # 400 Mpx: over the decompression limit
    build_imagefolder(tmp_path / "out", str(imagefolder))
    v = validate_records(load_manifest(tmp_path / "out" / "manifest.csv"), 1, {"png": {"alpha": "keep"}}, quiet=True)
    good_recs, bad_recs = v.good, v.bad
    reasons = {r.path.name: why for r, why in bad_recs}
    assert set(reasons) == {"zero.png", "text.png", "truncated.png", "rgba.png", "nan.npy", "inf.npy", "bomb.png"}
    assert "4 channels, the data set has 1, and no conversion turns 4 into 1" in reasons["rgba.png"]
    assert "1 infinite pixel value" in reasons["inf.npy"]
    assert all(str(r.path) in reasons[r.path.name] for r, _ in bad_recs)  # each names its file
    assert len(good_recs) == 20


def test_prepare_writes_quarantine_and_strict_fails(imagefolder, tmp_path):
    from pipeline.stages.prepare import BadDataError, _build

    (imagefolder / "dog" / "zero.png").write_bytes(b"")
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.options={{root: {imagefolder}}}",
                             f"data.root={tmp_path / 'prep'}", "run.quiet=true"])
    info = _build(cfg, tmp_path / "prep" / "imagefolder")
    assert info["quarantined"] == 1 and info["counts"]["train"] + info["counts"]["val"] + info["counts"]["test"] == 20
    assert "zero.png" in (tmp_path / "prep" / "imagefolder" / "quarantine.csv").read_text()
    assert json.loads((tmp_path / "prep" / "imagefolder" / "stats.json").read_text())["channels"] == ["band_0"]
    strict = cfg.model_copy(update={"data": cfg.data.model_copy(update={"strict": True, "root": str(tmp_path / "s")})})
    with pytest.raises(BadDataError, match="zero.png"):
        _build(strict, tmp_path / "s" / "imagefolder")
