"""Generic sources: a folder of images, class folders, or a CSV manifest -> our manifest.

Used as `data.dataset: folder | imagefolder | csv` with `data.options` as keyword arguments.
Every image a file holds becomes a row (frames of a multi-frame DICOM, slices of a volume) with
its `index`; by default the images of one source file form one group, and splits are drawn per
group so that no group straddles train and test. Each row records its file's sha256, and files
with equal content share a group (`share_groups_of_copies`): a copy never straddles splits.
Folder sources follow one rule for what is an image and a class folder (folders.py); whatever
they skip is written to `skipped.csv`.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from pipeline.data import DataError
from pipeline.data.folders import class_folders, list_images, write_skipped
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


def share_groups_of_copies(rows: list[list]) -> list[list]:
    """Rows [path, split, label, group, index, sha256]: rows whose files have equal content
    (sha256) get one group, the smallest name among the groups so joined (transitively: a
    patient with a copy of another patient's file joins that patient), so that no copy of a
    file straddles splits. Rows without a sha256 keep theirs. Changes `rows` in place."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    groups = sorted({r[3] for r in rows})
    node = {g: i for i, g in enumerate(groups)}
    first_group_of: dict[str, str] = {}
    edges = [(node[r[3]], node[first_group_of.setdefault(r[5], r[3])]) for r in rows if r[5]]
    if not edges:
        return rows
    a, b = np.array(edges).T
    _, component = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(len(groups),) * 2),
                                        directed=False)
    name: dict[int, str] = {}
    for g in groups:  # sorted: the first group seen of a component is its smallest name
        name.setdefault(component[node[g]], g)
    for r in rows:
        r[3] = name[component[node[r[3]]]]
    return rows


def _split(rows: list[list], fractions, seed: int) -> list[list]:
    """Labelled rows without a split get one, per group (copies of a file joined into one) and
    stratified by class; rows without a label are the unlabelled pool."""
    share_groups_of_copies(rows)
    todo = [r for r in rows if not r[1] and r[2] != ""]
    labels = [tuple(int(c) for c in r[2].split("|")) if "|" in r[2] else int(r[2]) for r in todo]
    split_of = assign_splits([r[3] for r in todo], labels, fractions, seed) if todo else {}
    for r in rows:
        r[1] = r[1] or (split_of[r[3]] if r[2] != "" else "unlabelled")
    return rows


def build_folder(out_dir, root: str, recursive: bool = True, channels: list[str] | None = None,
                 reader_options: dict | None = None) -> dict:
    """Every image under `root` (folders.py's rule) -> the unlabelled pool (each file its own
    group, copies joined)."""
    listing = list_images(Path(root), recursive)
    files = [(p.resolve(), "", str(p.resolve()), "unlabelled") for p in listing.images]
    rows = share_groups_of_copies(_entries(files, reader_options or {}))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _write(out_dir, rows, {"name": Path(root).name, "task": "unlabelled", "classes": [],
                                  "channels": channels, "source": {"root": str(root)},
                                  "skipped": write_skipped(out_dir, listing.skipped)})


def build_imagefolder(out_dir, root: str, split_fractions=(0.6, 0.2, 0.2), seed: int = 0,
                      channels: list[str] | None = None, reader_options: dict | None = None,
                      unlabelled_root: str | None = None) -> dict:
    """root/<class>/**/image -> labelled rows, split per source file (its group; copies joined)
    and stratified by class; an optional extra unlabelled pool. Class folders and images follow
    folders.py's rule. DataError naming the folder when there is no class folder, or a class
    folder holds no image file."""
    root = Path(root)
    classes, skipped = class_folders(root)
    if not classes:
        raise DataError(f"{root}: no class folders (expected root/<class>/<images>)"
                        + (f"; skipped: {_first(skipped)}" if skipped else ""))
    listings = {c: list_images(root / c) for c in classes}
    for c, listing in listings.items():
        if not listing.images:
            holds = f"it holds only {_first(listing.skipped)}" if listing.skipped else "it is empty"
            raise DataError(f"{root}: class folder {c!r} holds no image file ({holds}); add images, or "
                            f"remove the folder (readers: {' '.join(sorted(READERS))})")
    files = [(p.resolve(), str(i), str(p.resolve()), "") for i, c in enumerate(classes) for p in listings[c].images]
    skipped += [s for c in classes for s in listings[c].skipped]
    if unlabelled_root:
        pool = list_images(Path(unlabelled_root))
        files += [(p.resolve(), "", str(p.resolve()), "unlabelled") for p in pool.images]
        skipped += pool.skipped
    rows = _split(_entries(files, reader_options or {}), split_fractions, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _write(out_dir, rows, {"name": root.name, "task": "multiclass", "classes": classes,
                                  "channels": channels, "source": {"root": str(root)},
                                  "skipped": write_skipped(out_dir, skipped)})


def _first(skipped: list[tuple[Path, str]], n: int = 3) -> str:
    """'a.txt (no reader: suffix '.txt'), ... and 4 more' for a one-line message."""
    text = ", ".join(f"{p.name} ({why})" for p, why in skipped[:n])
    return text + (f" and {len(skipped) - n} more" if len(skipped) > n else "")


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
            indices = [index_of[p] if p in index_of else str(int(p)) for p in parts]
        except ValueError:
            raise ValueError(f"{manifest}:{line}: unknown label {text!r} (classes: {names})") from None
        outside = [i for i in indices if not 0 <= int(i) < len(names)]
        if outside:
            raise ValueError(f"{manifest}:{line}: label {text!r} names class {outside[0]}, but there are "
                             f"{len(names)} classes (0..{len(names) - 1}: {names})")
        return "|".join(indices)

    files = []
    for line, r in enumerate(table, start=2):
        path = (manifest.parent / r["path"]).resolve()
        files.append((path, label_of(r.get("label", ""), line), r.get("group") or str(path), r.get("split") or ""))
    rows = _split(_entries(files, reader_options or {}), split_fractions, seed)
    task = "multilabel" if any("|" in (r.get("label") or "") for r in table) else "multiclass"
    return _write(Path(out_dir), rows, {"name": manifest.stem, "task": task, "classes": names,
                                        "channels": channels, "source": {"manifest": str(manifest)}})


SOURCES = {"folder": build_folder, "imagefolder": build_imagefolder, "csv": build_csv}
