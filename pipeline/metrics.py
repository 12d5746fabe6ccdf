"""Classification metrics for imbalanced domain data.

Multi-class (`classification_metrics`): balanced accuracy, macro-F1, one-vs-rest AUROC. Every
macro metric is the mean over the same classes: all K classes of the data card, not only
those that happen to be in the scored split. A class with no image in the split cannot be
scored; it counts as 0 in every macro metric and is listed in `absent`, so a split that lacks
a class can never look better than one that has it.

Multi-label (`multilabel_metrics`, thresholds from `choose_thresholds`): per-label and
macro/micro AUROC, average precision (macro: mAP), F1 at per-label thresholds, example-based F1,
Hamming loss, subset accuracy. A label's AUROC and AP are defined only when the split holds a
positive and a negative of it: a label without one is listed in `unscored` with the reason and
left out of every macro mean (not averaged in as NaN, 0 or 0.5); micro and example-based metrics
cover every label. All computed by scikit-learn.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix, f1_score, hamming_loss,
                             precision_recall_curve, precision_recall_fscore_support, roc_auc_score)

TASKS = ("multiclass", "multilabel")
DEFAULT_THRESHOLD = 0.5  # a label whose validation split cannot choose one (no positive or no negative)


def probabilities(logits: torch.Tensor, task: str) -> np.ndarray:
    """logits [N, K] -> float32 [N, K]: softmax over the classes ("multiclass") or an independent
    sigmoid per label ("multilabel"). ValueError for another task."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {TASKS}")
    logits = torch.as_tensor(logits).float()
    probs = torch.softmax(logits, dim=1) if task == "multiclass" else torch.sigmoid(logits)
    return probs.numpy().astype(np.float32)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """logits [N, K], labels [N] (class indices 0..K-1) -> metrics over all K classes.

    Returns accuracy; balanced_accuracy (macro recall), macro_f1, macro_auroc (one-vs-rest), each
    the mean over K classes with an absent class as 0; per-class lists (length K) recall,
    precision, f1, auroc (NaN for an absent class; AUROC also NaN when no image is of another
    class), support (images per class); absent (class indices without an image);
    confusion_matrix [K, K] (rows true, columns predicted); n.
    """
    probs = torch.softmax(logits.float(), dim=1).numpy()
    y = labels.numpy()
    pred = probs.argmax(1)
    classes = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
    absent = [k for k in classes if support[k] == 0]
    auroc = [float(roc_auc_score(y == k, probs[:, k])) if 0 < support[k] < len(y) else float("nan")
             for k in classes]

    def per_class(values) -> list[float]:
        return [float("nan") if k in absent else float(v) for k, v in zip(classes, values)]

    def macro(values) -> float:  # over all K classes; unscored (NaN) counts as 0
        return float(np.mean(np.nan_to_num(np.asarray(values, float), nan=0.0))) if classes else float("nan")

    recall, precision, f1 = per_class(recall), per_class(precision), per_class(f1)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": macro(recall),
        "macro_f1": macro(f1),
        "macro_auroc": macro(auroc),
        "recall_per_class": recall,
        "precision_per_class": precision,
        "f1_per_class": f1,
        "auroc_per_class": auroc,
        "support": support.astype(int).tolist(),
        "absent": absent,
        "confusion_matrix": confusion_matrix(y, pred, labels=classes),
        "n": int(len(y)),
    }


def _scorable(targets: np.ndarray) -> list[str | None]:
    """Per label: None when the split has a positive and a negative, else why it cannot be scored."""
    pos = targets.sum(0)
    return [None if 0 < p < len(targets) else ("no positive" if p == 0 else "no negative") for p in pos]


def choose_thresholds(probs: np.ndarray, targets: np.ndarray) -> tuple[list[float], list[str | None]]:
    """Per label, the probability threshold (predict the label when prob >= threshold) that
    maximises its F1 on (probs, targets), from scikit-learn's precision_recall_curve; the lowest such
    threshold on ties. probs [N, K] in 0..1, targets [N, K] in {0, 1}.
    -> (thresholds [K], per label None, or why DEFAULT_THRESHOLD (0.5) was kept: no positive or
    no negative to choose with)."""
    thresholds, notes = [], []
    for k, why in enumerate(_scorable(targets)):
        if why is not None:
            thresholds.append(DEFAULT_THRESHOLD)
            notes.append(why)
            continue
        precision, recall, cuts = precision_recall_curve(targets[:, k], probs[:, k])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        thresholds.append(float(cuts[int(np.argmax(f1))]))
        notes.append(None)
    return thresholds, notes


def multilabel_metrics(probs: np.ndarray, targets: np.ndarray, thresholds) -> dict:
    """probs [N, K] (sigmoid outputs), targets [N, K] in {0, 1}, thresholds [K] -> metrics.

    Scalars: macro_auroc, map (macro average precision), macro_f1, each the mean over the labels
    with a positive and a negative in the split (NaN when there is none); micro_auroc, micro_ap,
    micro_f1 over every (example, label) pair; example_f1 (per example 2|Y & P| / (|Y| + |P|),
    1 when both sets are empty, averaged); hamming_loss (share of wrong label decisions);
    subset_accuracy (exact set matches); n. Per label (lists of K): support (positives), auroc,
    ap, precision, recall, f1 (NaN for an unscored label), threshold. unscored: {label index:
    "no positive" | "no negative"}. cooccurrence [K, K]: examples with true labels i and j;
    predicted_given_true [K, K]: examples with true label i predicted as j.
    """
    probs, y = np.asarray(probs, np.float64), np.asarray(targets).astype(int)
    pred = (probs >= np.asarray(thresholds, np.float64)[None]).astype(int)
    why = _scorable(y)
    unscored = {k: w for k, w in enumerate(why) if w is not None}
    scored = [k for k in range(y.shape[1]) if k not in unscored]
    auroc = [float(roc_auc_score(y[:, k], probs[:, k])) if k in scored else float("nan") for k in range(y.shape[1])]
    ap = [float(average_precision_score(y[:, k], probs[:, k])) if k in scored else float("nan")
          for k in range(y.shape[1])]
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, average=None, zero_division=0)

    def per_label(values) -> list[float]:
        return [float(v) if k in scored else float("nan") for k, v in enumerate(values)]

    def macro(values) -> float:
        return float(np.mean([values[k] for k in scored])) if scored else float("nan")

    both = 0 < y.sum() < y.size
    precision, recall, f1 = per_label(precision), per_label(recall), per_label(f1)
    return {
        "macro_auroc": macro(auroc),
        "map": macro(ap),
        "macro_f1": macro(f1),
        "micro_auroc": float(roc_auc_score(y.ravel(), probs.ravel())) if both else float("nan"),
        "micro_ap": float(average_precision_score(y.ravel(), probs.ravel())) if y.sum() else float("nan"),
        "micro_f1": float(f1_score(y, pred, average="micro", zero_division=0)),
        "example_f1": float(f1_score(y, pred, average="samples", zero_division=1)),
        "hamming_loss": float(hamming_loss(y, pred)),
        "subset_accuracy": float(accuracy_score(y, pred)),
        "auroc_per_label": auroc, "ap_per_label": ap, "precision_per_label": precision,
        "recall_per_label": recall, "f1_per_label": f1, "support": support.astype(int).tolist(),
        "threshold_per_label": [float(t) for t in thresholds], "unscored": unscored,
        "cooccurrence": y.T @ y, "predicted_given_true": y.T @ pred, "n": int(len(y)),
    }
