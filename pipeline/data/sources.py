"""Generic sources: a folder of images, class folders, or a CSV manifest -> our manifest.

Used as `data.dataset: folder | imagefolder | csv` with `data.options` as keyword arguments.
Every image a file holds becomes a row (frames of a multi-frame DICOM, slices of a volume) with
its `index`; by default the images of one source file form one group, and splits are drawn per
group so that no group straddles train and test. Each row records its file's sha256.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from pipeline.data.manifest import write_manifest
from pipeline.data.readers import MULTI_READERS, READERS, ReadError, image_suffix, read_images
from pipeline.data.splits import assign_splits

COLUMNS = ("index", "sha256")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_image_file(path: Path) -> bool:
    """A file a reader takes: a known suffix, or no suffix and the DICOM preamble."""
    name = path.name.lower()
    if not path.is_file() or name.startswith("."):
        return False
    if name.endswith(".nii.gz") or path.suffix.lower() in READERS:
        return True
    if path.suffix == "" and path.stat().st_size > 132:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    return False


def scan(root: Path, recursive: bool = True) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in files if is_image_file(p))


def expand(path: Path, reader_options: dict) -> list[int | None]:
    """Image indices a file holds: [None] for single-image files, [0..n-1] for volumes/frames.

    Counted by decoding with exactly the reader options every later read uses (read_images), so
    a manifest never lists a slice the decoder does not return. An unreadable file yields [None]:
    prepare's validation reports and quarantines it.
    """
    try:
        if image_suffix(path) not in MULTI_READERS:
            return [None]
        n = len(read_images(path, **reader_options))
    except ReadError:
        return [None]
    return [None] if n == 1 else list(range(n))


def _write(out_dir: Path, rows: list[tuple], info: dict) -> dict:
    write_manifest(out_dir, rows, COLUMNS)
    (out_dir / "dataset.json").write_text(json.dumps(info, indent=2))
    return info


def _entries(files: list[tuple[Path, str, str, str]], reader_options: dict) -> list[list]:
    """(path, label, group, split or "") per file -> [path, split, label, group, index, sha256]
    per image the file holds."""
    out = []
    for path, label, group, split in files:
        digest = file_sha256(path) if path.is_file() else ""
        indices = expand(path, reader_options) if path.is_file() else [None]
        out += [[str(path), split, label, group, "" if i is None else i, digest] for i in indices]
    return out


def _split(rows: list[list], fractions, seed: int) -> list[list]:
    """Labelled rows without a split get one, per group and stratified by class; rows without
    a label are the unlabelled pool."""
    todo = [r for r in rows if not r[1] and r[2] != ""]
    labels = [tuple(int(c) for c in r[2].split("|")) if "|" in r[2] else int(r[2]) for r in todo]
    split_of = assign_splits([r[3] for r in todo], labels, fractions, seed) if todo else {}
    for r in rows:
        r[1] = r[1] or (split_of[r[3]] if r[2] != "" else "unlabelled")
    return rows


def build_folder(out_dir, root: str, recursive: bool = True, channels: list[str] | None = None,
                 reader_options: dict | None = None) -> dict:
    """Every image under `root` -> the unlabelled pool (each file its own group)."""
    files = [(p.resolve(), "", str(p.resolve()), "unlabelled") for p in scan(Path(root), recursive)]
    rows = _entries(files, reader_options or {})
    return _write(Path(out_dir), rows, {"name": Path(root).name, "task": "unlabelled", "classes": [],
                                        "channels": channels, "source": {"root": str(root)}})


def build_imagefolder(out_dir, root: str, split_fractions=(0.6, 0.2, 0.2), seed: int = 0,
                      channels: list[str] | None = None, reader_options: dict | None = None,
                      unlabelled_root: str | None = None) -> dict:
    """root/<class>/**/image -> labelled rows, split per source file (its group) and stratified
    by class; an optional extra unlabelled pool."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class folders (expected root/<class>/<images>)")
    empty = [c for c in classes if not scan(root / c)]
    if empty:
        raise ValueError(f"{root}: class folder(s) {empty} hold no image file (readers: {sorted(READERS)})")
    files = [(p.resolve(), str(i), str(p.resolve()), "") for i, c in enumerate(classes) for p in scan(root / c)]
    if unlabelled_root:
        files += [(p.resolve(), "", str(p.resolve()), "unlabelled") for p in scan(Path(unlabelled_root))]
    rows = _split(_entries(files, reader_options or {}), split_fractions, seed)
    return _write(Path(out_dir), rows, {"name": root.name, "task": "multiclass", "classes": classes,
                                        "channels": channels, "source": {"root": str(root)}})


def build_csv(out_dir, manifest: str, split_fractions=(0.6, 0.2, 0.2), seed: int = 0,
              classes: list[str] | None = None, channels: list[str] | None = None,
              reader_options: dict | None = None) -> dict:
    """A user CSV or Parquet table with `path` and optional `label`, `split`, `group` columns
    (paths relative to the table's folder).

    Labels may be class names or indices; `a|b` is multi-label. Rows without a split are
    assigned one per group (the group defaults to the source file), stratified by class.
    """
    manifest = Path(manifest)
    if manifest.suffix.lower() == ".parquet":
        import pandas as pd

        table = pd.read_parquet(manifest).fillna("").astype(str).to_dict("records")
    else:
        with open(manifest, newline="") as f:
            table = list(csv.DictReader(f))
    if not table or "path" not in table[0]:
        raise ValueError(f"{manifest}: needs a 'path' column")
    names = classes or sorted({n for r in table for n in (r.get("label") or "").split("|") if n})
    index_of = {n: str(i) for i, n in enumerate(names)}

    def label_of(text: str, line: int) -> str:
        parts = [p for p in (text or "").split("|") if p]
        try:
            return "|".join(index_of[p] if p in index_of else str(int(p)) for p in parts)
        except ValueError:
            raise ValueError(f"{manifest}:{line}: unknown label {text!r} (classes: {names})") from None

    files = []
    for line, r in enumerate(table, start=2):
        path = (manifest.parent / r["path"]).resolve()
        files.append((path, label_of(r.get("label", ""), line), r.get("group") or str(path), r.get("split") or ""))
    rows = _split(_entries(files, reader_options or {}), split_fractions, seed)
    task = "multilabel" if any("|" in (r.get("label") or "") for r in table) else "multiclass"
    return _write(Path(out_dir), rows, {"name": manifest.stem, "task": task, "classes": names,
                                        "channels": channels, "source": {"manifest": str(manifest)}})


SOURCES = {"folder": build_folder, "imagefolder": build_imagefolder, "csv": build_csv}
