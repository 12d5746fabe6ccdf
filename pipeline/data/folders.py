"""What counts as an image file and a class folder: one rule for every folder source.

Walking a folder (`list_images`), every path below it is one of
  junk    OS and archive metadata, never data, and never entered when a folder:
          `__MACOSX` (macOS zip archives), `._*` (AppleDouble resource forks), `.DS_Store`,
          `Thumbs.db`, `desktop.ini`, `@eaDir` (Synology thumbnails), and any other hidden name
          (starting with "."), e.g. `.git`, `.ipynb_checkpoints`, `.cache`
  image   any other file a reader takes: a known suffix (readers.READERS), or no suffix and
          the DICOM preamble
  other   anything else (`notes.txt`, `labels.xlsx`): skipped
A class folder (`class_folders`) is a sub-folder of the root that is not junk; a file directly
in the root is skipped. Nothing is skipped silently: every skipped path comes back with its
reason, prepare writes them to `skipped.csv` and counts them in its summary.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.readers import READERS

JUNK_NAMES = {
    "__MACOSX": "macOS zip metadata",
    ".DS_Store": "macOS Finder metadata",
    "Thumbs.db": "Windows thumbnail cache",
    "desktop.ini": "Windows folder settings",
    "@eaDir": "Synology thumbnails",
}
SKIPPED_FILE = "skipped.csv"


@dataclass
class Listing:
    images: list[Path] = field(default_factory=list)          # sorted
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason); a junk folder is one entry


def junk_reason(name: str) -> str | None:
    """Why a file or folder name is OS/archive junk, or None when it is not."""
    if name in JUNK_NAMES:
        return f"OS/archive junk: {name} ({JUNK_NAMES[name]})"
    if name.startswith("._"):
        return "OS/archive junk: ._* (AppleDouble resource fork)"
    if name.startswith("."):
        return "OS/archive junk: hidden"
    return None


def is_image_file(path: Path) -> bool:
    """A file a reader takes: a known suffix, or no suffix and the DICOM preamble."""
    name = path.name.lower()
    if not path.is_file():
        return False
    if name.endswith(".nii.gz") or path.suffix.lower() in READERS:
        return True
    if path.suffix == "" and path.stat().st_size > 132:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    return False


def list_images(root: Path, recursive: bool = True) -> Listing:
    """Image files under `root` (the rule above), and every path skipped with its reason.
    FileNotFoundError when `root` is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    out = Listing()
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        for d in sorted(dirs):
            why = junk_reason(d)
            if why or not recursive:
                out.skipped.append((here / d, why or "a sub-folder (recursive=false)"))
        dirs[:] = sorted(d for d in dirs if recursive and not junk_reason(d))  # not entered
        for f in sorted(files):
            path = here / f
            why = junk_reason(f) or (None if is_image_file(path) else _no_reader(path))
            if why:
                out.skipped.append((path, why))
            else:
                out.images.append(path)
    out.images.sort()
    return out


def class_folders(root: Path) -> tuple[list[str], list[tuple[Path, str]]]:
    """-> (class folder names, sorted; paths in `root` that are no class folder, with reasons)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes, skipped = [], []
    for p in sorted(root.iterdir()):
        why = junk_reason(p.name) or (None if p.is_dir() else "not in a class folder (expected root/<class>/<images>)")
        if why:
            skipped.append((p, why))
        else:
            classes.append(p.name)
    return classes, skipped


def write_skipped(out_dir: Path, skipped: list[tuple[Path, str]]) -> dict[str, int]:
    """`out_dir/skipped.csv` (path, reason) -> count per kind of reason (the text before ':')."""
    with open(Path(out_dir) / SKIPPED_FILE, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "reason"])
        writer.writerows((str(p), why) for p, why in skipped)
    return dict(Counter(why.split(":")[0] for _, why in skipped))


def read_skipped(out_dir: Path) -> list[tuple[str, str]]:
    path = Path(out_dir) / SKIPPED_FILE
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(r["path"], r["reason"]) for r in csv.DictReader(f)]


def _no_reader(path: Path) -> str:
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".gz") else path.suffix
    return f"no reader: suffix {suffix!r}" if suffix else "no reader: no suffix and no DICOM preamble"
