"""Issue 14, cases 3 and 4: folders as users really have them, and copies that must not leak.

Case 3: a class folder tree extracted from a macOS zip (`__MACOSX/`, `._*` AppleDouble files),
with Finder, Explorer and Synology leftovers, notes and hidden folders: only real images count,
only real class folders are classes, and every skipped path is listed with its reason.
Case 4: byte-identical files (exported archives, re-downloaded tiles) share one group, so no
copy of an image is in train and test; prepare reports how many it found.
"""
import csv
import json
import shutil
import struct
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.data import DataError
from pipeline.data.folders import list_images
from pipeline.data.manifest import load_manifest
from pipeline.data.sources import build_csv, build_imagefolder
from pipeline.stages.prepare import _build

CLASSES = ("cat", "dog", "fish")


def png(path: Path, seed: int, size: int = 16) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(arr, "L").save(path)
    return path.read_bytes()


def apple_double() -> bytes:
    """The header macOS writes into `._name` resource-fork files (AppleDouble v2, one entry)."""
    return struct.pack(">IIl16sH", 0x00051607, 0x00020000, 0, b"Mac OS X        ", 1) + b"\0" * 64


def macos_zip(tmp_path: Path, per_class: int = 8) -> Path:
    """A zip as macOS Archive Utility writes it (every file with its __MACOSX/._ twin), plus
    leftovers users' folders collect; extracted with shutil -> the image root."""
    src = tmp_path / "src"
    seed = 0
    for c in CLASSES:
        for i in range(per_class):
            seed += 1
            png(src / "pets" / c / f"{i}.png", seed)
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted((src / "pets").rglob("*.png")):
            rel = f.relative_to(src)
            z.write(f, str(rel))
            z.writestr(f"__MACOSX/{rel.parent}/._{rel.name}", apple_double())
        z.writestr("pets/.DS_Store", b"\0\0\0\1Bud1" + b"\0" * 40)
        z.writestr("pets/cat/.DS_Store", b"\0\0\0\1Bud1" + b"\0" * 40)
        z.writestr("pets/dog/Thumbs.db", b"\xd0\xcf\x11\xe0" + b"\0" * 60)
        z.writestr("pets/dog/notes.txt", "fed at 8")
        z.writestr("pets/README.md", "my pets")
    out = tmp_path / "extracted"
    shutil.unpack_archive(archive, out)
    root = out / "pets"
    shutil.move(out / "__MACOSX", root / "__MACOSX")  # users often move the whole extract
    # a Synology share keeps real JPEG thumbnails next to the images, a notebook its checkpoints
    thumb = root / "fish" / "@eaDir" / "0.png" / "SYNOFILE_THUMB_M.jpg"
    thumb.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(thumb)
    png(root / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png", 999)
    return root


def test_folder_from_a_macos_zip_gives_the_real_classes_and_images_and_lists_the_rest(tmp_path):
    root = macos_zip(tmp_path)
    info = build_imagefolder(tmp_path / "out", str(root), split_fractions=(0.5, 0.25, 0.25))
    assert info["classes"] == list(CLASSES)  # before: __MACOSX was class 0
    recs = load_manifest(tmp_path / "out" / "manifest.csv")
    assert len(recs) == 24 and all(r.path.suffix == ".png" and not r.path.name.startswith(".") for r in recs)
    with open(tmp_path / "out" / "skipped.csv", newline="") as f:
        skipped = {Path(r["path"]).relative_to(root).as_posix(): r["reason"] for r in csv.DictReader(f)}
    assert skipped == {
        "__MACOSX": "OS/archive junk: __MACOSX (macOS zip metadata)",
        ".DS_Store": "OS/archive junk: .DS_Store (macOS Finder metadata)",
        "README.md": "not in a class folder (expected root/<class>/<images>)",
        "cat/.DS_Store": "OS/archive junk: .DS_Store (macOS Finder metadata)",
        "cat/.ipynb_checkpoints": "OS/archive junk: hidden",
        "dog/Thumbs.db": "OS/archive junk: Thumbs.db (Windows thumbnail cache)",
        "dog/notes.txt": "no reader: suffix '.txt'",
        "fish/@eaDir": "OS/archive junk: @eaDir (Synology thumbnails)",
    }
    assert info["skipped"] == {"OS/archive junk": 6, "not in a class folder (expected root/<class>/<images>)": 1,
                               "no reader": 1}


def test_appledouble_files_beside_images_are_skipped_not_quarantined(tmp_path):
    folder = tmp_path / "pool"
    png(folder / "a.png", 1)
    (folder / "._a.png").write_bytes(apple_double())
    listing = list_images(folder)
    assert listing.images == [folder / "a.png"]
    assert listing.skipped == [(folder / "._a.png", "OS/archive junk: ._* (AppleDouble resource fork)")]


def test_prepare_summary_lists_what_was_skipped(tmp_path, capsys):
    root = macos_zip(tmp_path)
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.options={{root: {root}, split_fractions: [0.5, 0.25, 0.25]}}",
                             f"data.root={tmp_path / 'prep'}", "run.quiet=true"])
    _build(cfg, tmp_path / "prep" / "imagefolder")
    out = capsys.readouterr().out
    assert "skipped 8 path(s) that are no images (6 OS/archive junk" in out
    assert f"skipped {root / '__MACOSX'} (OS/archive junk: __MACOSX (macOS zip metadata))" in out
    assert "... 3 more in" in out


def test_class_folder_without_an_image_is_refused_with_its_name(tmp_path):
    for i in range(3):
        png(tmp_path / "img" / "cat" / f"{i}.png", i)
    (tmp_path / "img" / "dog").mkdir()
    (tmp_path / "img" / "dog" / "._0.png").write_bytes(apple_double())
    (tmp_path / "img" / "dog" / "scan.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(DataError, match=r"class folder 'dog' holds no image file \(it holds only "
                                        r"\._0\.png \(OS/archive junk: \._\* \(AppleDouble resource fork\)\), "
                                        r"scan\.pdf \(no reader: suffix '\.pdf'\)\)"):
        build_imagefolder(tmp_path / "out", str(tmp_path / "img"))
    (tmp_path / "img" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.options={{root: {tmp_path / 'img'}}}",
                             f"data.root={tmp_path / 'prep'}", "run.quiet=true"])
    with pytest.raises(DataError, match="class 'dog': quarantine would remove all of its images"):
        _build(cfg, tmp_path / "prep" / "imagefolder")


# ------------------------------------------------------------------------------- case 4: copies

def splits_of_content(out: Path) -> dict[str, set]:
    by_hash = defaultdict(set)
    for r in load_manifest(out / "manifest.csv"):
        by_hash[r.sha256].add(r.split)
    return by_hash


def test_copies_share_a_group_and_never_straddle_splits(tmp_path):
    root = tmp_path / "img"
    for c in ("cat", "dog"):
        for i in range(12):
            data = png(root / c / f"{i}.png", seed=hash((c, i)) % 1000)
            for k in range(i % 3):  # re-downloads: 0, 1 or 2 copies of each image
                (root / c / f"{i}_copy{k}.png").write_bytes(data)
    for seed in range(5):
        build_imagefolder(tmp_path / f"out{seed}", str(root), split_fractions=(0.6, 0.2, 0.2), seed=seed)
        assert all(len(s) == 1 for s in splits_of_content(tmp_path / f"out{seed}").values())
    recs = load_manifest(tmp_path / "out0" / "manifest.csv")
    groups = {r.path.name: r.group for r in recs if r.path.parent.name == "cat"}
    assert groups["2.png"] == groups["2_copy0.png"] == groups["2_copy1.png"] != groups["3.png"]


def test_a_copy_joins_patients_transitively(tmp_path):
    shared = png(tmp_path / "p1_a.png", 1)
    png(tmp_path / "p1_b.png", 2)
    (tmp_path / "p2_a.png").write_bytes(shared)  # patient 2 holds a copy of patient 1's image
    png(tmp_path / "p3_a.png", 3)
    rows = [("p1_a.png", "a", "p1"), ("p1_b.png", "a", "p1"), ("p2_a.png", "a", "p2"), ("p3_a.png", "b", "p3")]
    (tmp_path / "m.csv").write_text("path,label,group\n" + "".join(f"{p},{l},{g}\n" for p, l, g in rows))
    build_csv(tmp_path / "out", str(tmp_path / "m.csv"), split_fractions=(0.5, 0.5, 0))
    groups = {r.path.name: r.group for r in load_manifest(tmp_path / "out" / "manifest.csv")}
    assert groups == {"p1_a.png": "p1", "p1_b.png": "p1", "p2_a.png": "p1", "p3_a.png": "p3"}


def test_prepare_reports_copies_and_copies_with_other_labels(tmp_path, capsys):
    root = tmp_path / "img"
    for c in ("cat", "dog"):
        for i in range(6):
            png(root / c / f"{i}.png", seed=100 * (c == "dog") + i)
    (root / "cat" / "0_again.png").write_bytes((root / "cat" / "0.png").read_bytes())
    (root / "cat" / "1_again.png").write_bytes((root / "cat" / "1.png").read_bytes())
    (root / "dog" / "cat0.png").write_bytes((root / "cat" / "0.png").read_bytes())  # mislabelled copy
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.options={{root: {root}, split_fractions: [0.5, 0.5, 0]}}",
                             f"data.root={tmp_path / 'prep'}", "run.quiet=true"])
    info = _build(cfg, tmp_path / "prep" / "imagefolder")
    assert info["duplicates"]["files"] == 3 and info["duplicates"]["sets"] == 2
    assert info["duplicates"]["conflicting_labels"] == 1 and info["duplicates"]["across_splits"] == 0
    out = capsys.readouterr().out
    assert "duplicates: 3 file(s) are byte-identical copies of another (2 set(s))" in out
    assert "WARNING 1 set(s) of copies carry different labels" in out and "(cat) ==" in out
    saved = json.loads((tmp_path / "prep" / "imagefolder" / "dataset.json").read_text())
    assert saved["duplicates"]["files"] == 3


def test_copies_in_splits_the_table_fixes_are_a_warning(tmp_path, capsys):
    for i in range(4):
        png(tmp_path / f"{i}.png", i)
    (tmp_path / "leak.png").write_bytes((tmp_path / "0.png").read_bytes())
    rows = ["0.png,a,train", "1.png,a,train", "2.png,a,test", "3.png,a,test", "leak.png,a,test"]
    (tmp_path / "m.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    cfg = load_config(None, ["data.dataset=csv", f"data.options={{manifest: {tmp_path / 'm.csv'}}}",
                             f"data.root={tmp_path / 'prep'}", "run.quiet=true", "data.allow_missing_classes=true"])
    info = _build(cfg, tmp_path / "prep" / "csv")
    assert info["duplicates"]["across_splits"] == 1
    assert "WARNING 1 set(s) of copies lie in more than one split, as the source assigned them" in capsys.readouterr().out
