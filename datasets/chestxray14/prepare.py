"""Build NIH ChestX-ray14: 8-bit PNGs + Data_Entry_2017.csv -> multi-label manifest, split by patient.

Expected layout (as distributed; the PNGs may sit in any sub-folders, e.g. images_001/images/):
    <src_dir>/Data_Entry_2017.csv     columns used: Image Index, Finding Labels, Patient ID,
                                      View Position (only with `views=`)
    <src_dir>/**/*.png                1024 x 1024 8-bit grayscale
    <src_dir>/test_list.txt           optional official test list (patient-disjoint), with
    <src_dir>/train_val_list.txt      its complement
Images are not copied: the manifest lists their absolute paths. Any PNG stored with more
than one channel (RGB/RGBA) are converted explicitly to 8-bit grayscale into out_dir/converted/
(`check_channels=True`, a header read per file), so every image is [1, H, W].

Labels: the 14 findings; `Finding Labels` is `|`-separated and "No Finding" means none of the 14
(an empty label field on a labelled split). Splits are by patient: with the official lists the
test split is test_list.txt and val is drawn by patient from train_val; otherwise every patient
goes wholly to train, val or test at random (`split_fractions`).

Run alone:  python datasets/chestxray14/prepare.py SRC_DIR --out .mimflow/data/chestxray14
"""
from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path


from pipeline.data.folders import list_images
from pipeline.data.manifest import write_manifest
from pipeline.data.splits import assign_splits

FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
            "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
            "Pleural_Thickening", "Hernia"]
NO_FINDING = "No Finding"
CSV_NAME = "Data_Entry_2017.csv"
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
SOURCE_URL = "https://nihcc.app.box.com/v/ChestXray-NIHCC"  # manual download (Box); no download()


def build(src_dir: str | Path, out_dir: str | Path,
          split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0,
          official_split: bool = True, views: list[str] | None = None,
          missing: str = "error", check_channels: bool = True) -> dict:
    """Write manifest.csv and dataset.json under out_dir; return the dataset info.

    missing: "error" (default) or "skip" for CSV rows whose PNG is not under src_dir.
    views: keep only these View Position values (e.g. ["PA"]); None keeps all.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if missing not in ("error", "skip"):
        raise ValueError(f"missing={missing!r}, expected 'error' or 'skip'")
    entries = read_entries(src_dir / CSV_NAME, views)  # [(image name, [class idx], patient)]
    images = {p.name: p for p in _pngs(src_dir)}
    absent = [name for name, _, _ in entries if name not in images]
    if absent and (missing == "error" or len(absent) == len(entries)):
        raise FileNotFoundError(f"{src_dir}: {len(absent)} of {len(entries)} images listed in "
                                f"{CSV_NAME} are missing (first: {absent[:3]}); pass missing='skip'")
    entries = [e for e in entries if e[0] in images]
    split_of = patient_splits(src_dir, entries, split_fractions, seed, official_split)
    out_dir.mkdir(parents=True, exist_ok=True)
    converted = grayscale_copies(images, entries, out_dir) if check_channels else {}
    rows = [(str(converted.get(name, images[name].resolve())), split_of[pid],
             "|".join(map(str, labels)), f"patient_{pid}") for name, labels, pid in entries]
    write_manifest(out_dir, rows)
    info = {
        "name": "chestxray14",
        "task": "multilabel",
        "classes": FINDINGS,
        "channels": ["gray"],
        "empty_label": "no finding (none of the 14 classes)",
        "images": len(rows),
        "patients": len(split_of),
        "missing_images": len(absent),
        "converted_to_grayscale": sorted(converted),
        "official_test_split": official_split and _official_lists(src_dir) is not None,
        "options": {"split_fractions": list(split_fractions), "seed": seed,
                    "official_split": official_split, "views": views, "missing": missing,
                    "check_channels": check_channels},
    }
    (out_dir / "dataset.json").write_text(json.dumps(info, indent=2))
    return info


def read_entries(csv_path: Path, views: list[str] | None = None) -> list[tuple[str, list[int], str]]:
    """Data_Entry_2017.csv -> [(image name, sorted finding indices, patient id)]."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: not found (the NIH label file)")
    index = {name.lower(): i for i, name in enumerate(FINDINGS)}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        absent = [c for c in REQUIRED_COLUMNS + (("View Position",) if views else ())
                  if c not in (reader.fieldnames or [])]
        if absent:
            raise ValueError(f"{csv_path}: missing columns {absent}")
        entries = []
        for line, row in enumerate(reader, start=2):
            if views and row["View Position"].strip() not in views:
                continue
            entries.append((row["Image Index"].strip(), _findings(csv_path, line, row, index),
                            row["Patient ID"].strip()))
    return entries


def _findings(csv_path: Path, line: int, row: dict, index: dict[str, int]) -> list[int]:
    names = [n.strip() for n in row["Finding Labels"].split("|") if n.strip()]
    unknown = [n for n in names if n.lower() not in index and n != NO_FINDING]
    if unknown:
        raise ValueError(f"{csv_path}:{line}: unknown findings {unknown} (known: {FINDINGS})")
    return sorted({index[n.lower()] for n in names if n != NO_FINDING})


def _pngs(src_dir: Path) -> list[Path]:
    found = [p for p in list_images(src_dir).images if p.suffix.lower() == ".png"]  # no OS junk (._*.png)
    dupes = [n for n, c in Counter(p.name for p in found).items() if c > 1]
    if dupes:
        raise ValueError(f"{src_dir}: image names found twice, e.g. {dupes[:3]}")
    return found


def _official_lists(src_dir: Path) -> tuple[set[str], set[str]] | None:
    files = [src_dir / "train_val_list.txt", src_dir / "test_list.txt"]
    if not all(f.is_file() for f in files):
        return None
    return tuple({line.strip() for line in f.read_text().splitlines() if line.strip()} for f in files)


def patient_splits(src_dir: Path, entries: list, fractions: tuple[float, float, float], seed: int,
                   official: bool) -> dict[str, str]:
    """-> {patient id: split}; official test list when present and asked for, else random by patient."""
    lists = _official_lists(src_dir) if official else None
    if lists is None:  # stratified on each image's rarest finding, per patient
        return assign_splits([pid for _, _, pid in entries], [tuple(f) for _, f, _ in entries], fractions, seed)
    _, test_names = lists
    test_patients = {pid for name, _, pid in entries if name in test_names}
    other = {pid for name, _, pid in entries if name not in test_names}
    if test_patients & other:
        raise ValueError(f"{src_dir}: test_list.txt shares {len(test_patients & other)} patients "
                         f"with the other images; pass official_split=False")
    train, val = fractions[0], fractions[1]
    rest_entries = [(pid, tuple(f)) for name, f, pid in entries if name not in test_names]
    rest = assign_splits([p for p, _ in rest_entries], [f for _, f in rest_entries],
                         (train / (train + val), val / (train + val), 0.0), seed)
    return {**rest, **{p: "test" for p in test_patients}}




def grayscale_copies(images: dict[str, Path], entries: list, out_dir: Path) -> dict[str, Path]:
    """Listed PNGs stored with several channels -> explicit 8-bit grayscale copies {name: copy}."""
    from PIL import Image

    copies = {}
    for name, _, _ in entries:
        with Image.open(images[name]) as im:  # header only, unless it needs converting
            if im.mode in ("L", "I;16", "I;16B", "I"):
                continue
            target = out_dir / "converted" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            im.convert("L").save(target)
            copies[name] = target.resolve()
    return copies




if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help=f"folder with {CSV_NAME} and the extracted images_*.tar.gz")
    parser.add_argument("--out", default=".mimflow/data/chestxray14")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-official-split", action="store_true")
    parser.add_argument("--views", nargs="*", default=None)
    parser.add_argument("--missing", default="error", choices=["error", "skip"])
    a = parser.parse_args()
    print(json.dumps(build(a.src, a.out, seed=a.seed, official_split=not a.no_official_split,
                           views=a.views, missing=a.missing), indent=2))
