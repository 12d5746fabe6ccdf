"""Dataset manifests: one row per image with `path,split,label,group` (paths relative to the file)."""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("unlabelled", "train", "val", "test")


@dataclass(frozen=True)
class Record:
    path: Path
    split: str
    label: int | tuple[int, ...]  # class index, -1 when unlabelled; a tuple for multi-label rows
    group: str


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
            records.append(Record(path.parent / row["path"], row["split"],
                                  _parse_label(row["label"], path, line), row["group"]))
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
    """sha256 over the manifest and the bytes of every file it lists (order as listed)."""
    manifest_path = Path(manifest_path)
    h = hashlib.sha256(manifest_path.read_bytes())
    for r in load_manifest(manifest_path):
        h.update(r.path.read_bytes())
    return h.hexdigest()


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
