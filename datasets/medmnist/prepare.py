"""Build a MedMNIST (v2 / MedMNIST+) 2D subset from its .npz: one .npy per image + manifest.

Expected input: `<src_dir>/<flag>.npz` (28 px) or `<src_dir>/<flag>_<size>.npz` (64/128/224 px),
or `src_dir` itself pointing at the .npz. Keys: train_images, train_labels, val_*, test_* with
images [N, H, W] (gray) or [N, H, W, 3] (RGB) uint8 and labels [N, 1] (class index) or [N, 14]
(ChestMNIST, multi-label 0/1).

The official train/val/test splits are kept. MedMNIST ships no patient ids, so each image is its
own group. Images are written as uint8 [C, H, W] .npy under out_dir/images/<split>/ (the
multi-image .npz cannot be listed row by row in a manifest). 3D subsets ([N, D, H, W]) are refused.

Run alone:  python datasets/medmnist/prepare.py SRC_DIR --flag pathmnist --out .mimflow/data/pathmnist
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.data.manifest import write_manifest

REPO = Path(__file__).resolve().parents[2]
SPLITS = ("train", "val", "test")
ORGAN = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
         "lung-left", "lung-right", "pancreas", "spleen"]
CLASSES = {  # label names of the 2D subsets, in label-index order (medmnist INFO)
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma",
                  "colorectal adenocarcinoma epithelium"],
    "chestmnist": ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                   "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema",
                   "fibrosis", "pleural", "hernia"],
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                   "melanocytic nevi", "vascular lesions"],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],  # ordinal DR grade, treated as classes
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
                   "monocyte", "neutrophil", "platelet"],
    "tissuemnist": ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                    "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
                    "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"],
    "organamnist": ORGAN, "organcmnist": ORGAN, "organsmnist": ORGAN,
}
DOWNLOAD_URL = "https://zenodo.org/records/10519652/files/{name}.npz"  # never used by tests


def build(src_dir: str | Path, out_dir: str | Path, flag: str | None = None, size: int | None = None,
          limit_per_split: int | None = None) -> dict:
    """Write images/<split>/*.npy, manifest.csv and dataset.json under out_dir; return the info."""
    from pipeline.data.readers import read_npz_split

    npz_path, flag = locate(Path(src_dir), flag, size)
    out_dir = Path(out_dir)
    rows, label_width, shapes = [], set(), set()
    for split in SPLITS:
        images, labels = read_npz_split(npz_path, split, dtype=None)  # [N, C, H, W] uint8, [N] | [N, K]
        images, labels = images[:limit_per_split], labels[:limit_per_split]
        label_width.add(1 if labels.ndim == 1 else labels.shape[1])
        shapes.add(images.shape[1:])
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        for i, (img, lab) in enumerate(zip(images, labels)):
            rel = f"images/{split}/{i:06d}.npy"
            np.save(out_dir / rel, np.ascontiguousarray(img))
            rows.append((rel, split, _label(lab), f"{split}_{i:06d}"))
    if len(label_width) != 1 or len(shapes) != 1:
        raise ValueError(f"{npz_path}: splits disagree on label width {label_width} or image shape {shapes}")
    multilabel = label_width.pop() > 1
    write_manifest(out_dir, rows)
    channels, h, w = shapes.pop()
    info = {
        "name": flag,
        "task": "multilabel" if multilabel else "multiclass",
        "classes": _classes(flag, rows, multilabel),
        "channels": ["gray"] if channels == 1 else ["red", "green", "blue"][:channels],
        "image_size": h,
        "counts": {s: sum(r[1] == s for r in rows) for s in SPLITS},
        "source": npz_path.name,
        "options": {"flag": flag, "size": size, "limit_per_split": limit_per_split},
    }
    if multilabel:  # ChestMNIST: a row of 14 zeros is ChestX-ray14's "No Finding"
        info["empty_label"] = "no finding (none of the labels)"
    (out_dir / "dataset.json").write_text(json.dumps(info, indent=2))
    return info


def locate(src: Path, flag: str | None, size: int | None) -> tuple[Path, str]:
    """-> (.npz path, subset name)."""
    if src.is_file():
        return src, flag or src.stem.split("_")[0]
    if flag is None:
        raise ValueError(f"{src} is a folder: pass flag= (e.g. 'pathmnist')")
    name = flag if size in (None, 28) else f"{flag}_{size}"
    path = src / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (MedMNIST file for flag={flag!r}, size={size})")
    return path, flag


def _label(lab: np.ndarray) -> str:
    """int class index, or `|`-joined indices of the 1 flags for multi-label rows."""
    if np.ndim(lab) == 0:
        return str(int(lab))
    return "|".join(str(i) for i in np.flatnonzero(lab))


def _classes(flag: str, rows: list[tuple], multilabel: bool) -> list[str]:
    if flag in CLASSES:
        return CLASSES[flag]
    seen = [int(x) for r in rows for x in r[2].split("|") if x != ""]
    return [f"class_{i}" for i in range(max(seen, default=-1) + 1)]




def download(dest: str | Path, flag: str, size: int | None = None) -> Path:
    """Fetch one MedMNIST+ file (network; never called by build or tests)."""
    import urllib.request

    name = flag if size in (None, 28) else f"{flag}_{size}"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}.npz"
    if not path.exists():
        urllib.request.urlretrieve(DOWNLOAD_URL.format(name=name), path)
    return path


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # for `pipeline` when run as a script from anywhere
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder holding <flag>[_<size>].npz, or the .npz itself")
    parser.add_argument("--flag", default=None)
    parser.add_argument("--size", type=int, default=None, choices=[28, 64, 128, 224])
    parser.add_argument("--out", default=None)
    parser.add_argument("--limit-per-split", type=int, default=None)
    parser.add_argument("--download", action="store_true", help="first fetch <flag> into SRC")
    a = parser.parse_args()
    if a.download:
        download(a.src, a.flag, a.size)
    out = a.out or f".mimflow/data/{a.flag or Path(a.src).stem}"
    print(json.dumps(build(a.src, out, a.flag, a.size, a.limit_per_split), indent=2))
