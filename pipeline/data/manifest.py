"""Dataset manifests: one row per image with `path,split,label,group` (paths relative to the file),
optionally `index` (image within a multi-image file), `sha256` and `channels` (the channel count
prepare resolved: every reader of the row converts to it)."""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.data.readers import ReadError, convert_channels, read_image, read_images

SPLITS = ("unlabelled", "train", "val", "test")


@dataclass(frozen=True)
class Record:
    path: Path
    split: str
    label: int | tuple[int, ...]  # class index, -1 when unlabelled; a tuple for multi-label rows
    group: str
    index: int | None = None  # which image of a multi-image file (frame, slice); None: the only one
    sha256: str = ""  # content hash of the file when the manifest records it
    channels: int | None = None  # convert to this many channels when read; None: as stored


def load_manifest(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    records = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "split", "label", "group"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            if row["split"] not in SPLITS:
                raise ValueError(f"{path}:{line}: split {row['split']!r} not in {SPLITS}")
            index = (row.get("index") or "").strip()
            channels = (row.get("channels") or "").strip()
            records.append(Record(path.parent / row["path"], row["split"],
                                  _parse_label(row["label"], path, line), row["group"],
                                  int(index) if index else None, row.get("sha256") or "",
                                  int(channels) if channels else None))
    return records


def _parse_label(text: str, path: Path, line: int) -> int | tuple[int, ...]:
    """'' -> -1 (no label), '3' -> 3, '2|8' -> (2, 8) (multi-label)."""
    text = text.strip()
    try:
        if "|" in text:
            return tuple(int(t) for t in text.split("|") if t)
        return int(float(text)) if text else -1
    except ValueError:
        raise ValueError(f"{path}:{line}: label {text!r} is not a class index or '|'-joined indices") from None


def select(records: list[Record], split: str) -> list[Record]:
    return [r for r in records if r.split == split]


def dataset_hash(manifest_path: str | Path) -> str:
    """sha256 over the manifest and the bytes of every file it lists (order as listed).

    A manifest whose rows carry their files' sha256 already pins the content: hash it alone.
    """
    manifest_path = Path(manifest_path)
    h = hashlib.sha256(manifest_path.read_bytes())
    records = load_manifest(manifest_path)
    if not all(r.sha256 for r in records):
        for path in dict.fromkeys(r.path for r in records):
            h.update(path.read_bytes())
    return h.hexdigest()


def changed_files(records: list[Record]) -> list[Path]:
    """Files whose content no longer matches the sha256 recorded in the manifest."""
    changed = []
    for path, digest in dict.fromkeys((r.path, r.sha256) for r in records if r.sha256):
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            changed.append(path)
    return changed


def read_record(rec: Record, **reader_options) -> np.ndarray:
    """The image a manifest row points at -> float32 [C, H, W] with the row's channel count.
    `reader_options` are keyed by reader ({"dicom": {"window": "lung"}})."""
    return read_image(rec.path, index=rec.index, channels=rec.channels, **reader_options)


def read_records(records: list[Record], **reader_options) -> Iterator[tuple[int, Record, np.ndarray | ReadError]]:
    """Every record's image, decoding each file once (a volume's slices, a multi-frame file's
    frames) -> (position in `records`, record, float32 [C, H, W] or the ReadError it raised).

    Files come in order of first appearance; one file's images are held in memory at a time.
    """
    by_file: dict[Path, list[int]] = {}
    for i, rec in enumerate(records):
        by_file.setdefault(rec.path, []).append(i)
    for path, positions in by_file.items():
        if all(records[i].index is None for i in positions):
            images, error = None, None
            try:
                images = [read_image(path, **reader_options)]
            except ReadError as err:
                error = err
        else:
            try:
                images, error = read_images(path, **reader_options), None
            except ReadError as err:
                images, error = None, err
        for i in positions:
            yield i, records[i], (error if error is not None else _pick(records[i], images))


def _pick(rec: Record, images: list[np.ndarray]) -> np.ndarray | ReadError:
    index = 0 if rec.index is None else rec.index
    if rec.index is None and len(images) > 1 or not -len(images) <= index < len(images):
        return ReadError(f"{rec.path}: image index {rec.index} out of range for {len(images)} image(s)")
    try:
        return convert_channels(rec.path, images[index], rec.channels)
    except ReadError as err:
        return err


def stratified_fraction(records: list[Record], fraction: float, seed: int) -> list[Record]:
    """Keep `fraction` of each class (at least one image per class), reproducibly."""
    if fraction >= 1.0:
        return list(records)
    rng = np.random.default_rng(seed)
    keep = []
    for label in sorted({r.label for r in records}):
        members = [r for r in records if r.label == label]
        n = max(1, round(fraction * len(members)))
        keep += [members[i] for i in sorted(rng.choice(len(members), n, replace=False))]
    return keep


def load_dataset_info(prepared_dir: str | Path) -> dict:
    return json.loads((Path(prepared_dir) / "dataset.json").read_text())


def write_manifest(out_dir: Path, rows: list[tuple], extra_columns: tuple[str, ...] = ()) -> None:
    """rows: (path, split, label, group, *extra_columns) -> out_dir/manifest.csv."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "split", "label", "group", *extra_columns])
        writer.writerows(rows)
