"""Labels as sets of classes, the task a manifest is trained as, and label fractions.

A manifest row's label is a class index (`3`), a `|`-joined set (`2|8`, multi-label), or empty.
On a labelled split (train/val/test) an empty label is an empty label *set*: allowed only in a
multi-label task whose data card says what it means (dataset.json `empty_label`, e.g.
ChestX-ray14's "No Finding"). `check_labels` refuses, naming the manifest row and its file:
a class index outside the data card's classes, an empty set the card does not allow, and a row
with several classes when `finetune.task=multiclass`.

    resolve_task("auto", info, manifest)   -> "multiclass" | "multilabel"
    multi_hot(label, K)                    -> float32 [K] target
    multilabel_fraction(records, f, seed, K) -> a fraction of the rows that keeps every label
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.data import DataError
from pipeline.data.manifest import Record

TASKS = ("auto", "multiclass", "multilabel")
LABELLED = ("train", "val", "test")


def label_set(label: int | tuple[int, ...] | None) -> tuple[int, ...]:
    """A Record's label -> its classes: 3 -> (3,), (2, 8) -> (2, 8), -1 or None (empty) -> ()."""
    if isinstance(label, tuple):
        return label
    return () if label is None or label < 0 else (int(label),)


def multi_hot(label, num_classes: int) -> np.ndarray:
    """A Record's label -> float32 [num_classes], 1 at each class of its set."""
    out = np.zeros(num_classes, np.float32)
    out[list(label_set(label))] = 1.0
    return out


def label_matrix(records: list[Record], num_classes: int) -> np.ndarray:
    """Records -> bool [N, num_classes] (row n, class k: row n holds class k)."""
    return np.stack([multi_hot(r.label, num_classes) for r in records]).astype(bool) if records else \
        np.zeros((0, num_classes), bool)


def empty_label_allowed(info: dict) -> bool:
    """The data card gives an empty label set a meaning (dataset.json `empty_label`)."""
    return bool(info.get("empty_label"))


def _rows(manifest: Path):
    """(line number, row) of the labelled rows, with the label parsed -> (line, row, classes)."""
    with open(manifest, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            if row["split"] not in LABELLED:
                continue
            text = (row["label"] or "").strip()
            try:
                classes = tuple(int(float(t)) for t in text.split("|") if t.strip())
            except ValueError:
                raise DataError(f"{manifest}:{line} ({row['path']}): label {text!r} is not a class index or "
                                "'|'-joined indices") from None
            yield line, row, classes


def check_labels(manifest: str | Path, info: dict, task: str = "auto") -> str:
    """Check every labelled row of a prepared manifest against its data card -> the task it is
    trained as ("multiclass" or "multilabel"; see resolve_task).

    task: finetune.task ("auto", "multiclass" or "multilabel").
    DataError naming the manifest, line and image for the first row that names a class outside
    info["classes"], holds an empty set the card does not allow (or any empty set in a
    multi-class task), or holds several classes when task="multiclass"; and for a multi-label
    task with fewer than 2 classes.
    """
    manifest = Path(manifest)
    if task not in TASKS:
        raise DataError(f"finetune.task={task!r}: expected one of {TASKS}")
    classes = info.get("classes") or []
    resolved = resolve_task(task, info, manifest)
    name = info.get("name", manifest.parent.name)
    if resolved == "multilabel" and len(classes) < 2:
        raise DataError(f"{manifest.parent / 'dataset.json'}: a multi-label task needs at least 2 classes, the data card "
                        f"of {name!r} has {len(classes)} ({classes})")
    for line, row, labels in _rows(manifest):
        where = f"{manifest}:{line} ({row['path']})"
        wrong = [c for c in labels if not 0 <= c < len(classes)]
        if wrong:
            raise DataError(f"{where}: label {row['label']!r} names class {wrong[0]}, but the data card of "
                            f"{name!r} has {len(classes)} classes (0..{len(classes) - 1}: {classes})")
        if not labels and (resolved == "multiclass" or not empty_label_allowed(info)):
            why = ("a multi-class row needs one class" if resolved == "multiclass"
                   else f"the data card of {name!r} does not allow an empty label set (dataset.json has no "
                        "'empty_label' saying what it means)")
            raise DataError(f"{where}: empty label in the {row['split']} split: {why}; label the row or move it "
                            "to the unlabelled pool")
    return resolved


def resolve_task(task: str, info: dict, manifest: str | Path) -> str:
    """finetune.task -> "multiclass" | "multilabel".

    auto: multi-label when the data card says so (dataset.json task) or any labelled row holds
    more than one class. DataError naming the manifest row when task="multiclass" and a row
    holds several classes.
    """
    manifest = Path(manifest)
    for line, row, labels in _rows(manifest):
        if len(labels) > 1:
            if task == "multiclass":
                raise DataError(f"{manifest}:{line} ({row['path']}): label {row['label']!r} holds "
                                f"{len(labels)} classes, but finetune.task=multiclass; use finetune.task=multilabel "
                                "(or auto)")
            return "multilabel"
    if task != "auto":
        return task
    return "multilabel" if info.get("task") == "multilabel" else "multiclass"


def multilabel_fraction(records: list[Record], fraction: float, seed: int, num_classes: int) -> list[Record]:
    """Keep `fraction` of multi-label rows with the label mix of the whole, and every label.

    The rows are drawn by iterative stratification (Sechidis et al. 2011, iterative-stratification's
    MultilabelStratifiedShuffleSplit), with "no label" as one more column so that empty sets are
    spread alike. A label the draw leaves without a row (a label rarer than 1/fraction rows) then
    gets one: the row holding it with the fewest other labels, first in the manifest. So the
    fraction keeps every label the rows hold, and may exceed `fraction` by one row per such label.
    -> the kept rows, in manifest order; reproducible for a seed.
    """
    if fraction >= 1.0 or len(records) < 2:
        return list(records)
    y = label_matrix(records, num_classes)
    y = np.concatenate([y, ~y.any(1, keepdims=True)], axis=1)  # [N, K + 1]: the last is "no label"
    n_keep = max(1, round(fraction * len(records)))
    if n_keep >= len(records):
        return list(records)
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    split = MultilabelStratifiedShuffleSplit(n_splits=1, train_size=n_keep, test_size=len(records) - n_keep,
                                             random_state=seed)
    keep = set(next(split.split(np.zeros(len(records)), y))[0].tolist())
    for k in range(y.shape[1]):
        rows = np.flatnonzero(y[:, k])
        if len(rows) and not keep & set(rows.tolist()):
            keep.add(int(min(rows, key=lambda i: (y[i].sum(), i))))
    return [records[i] for i in sorted(keep)]
