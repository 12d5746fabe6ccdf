"""Classification metrics for imbalanced domain data (balanced accuracy, macro-F1, OvR AUROC).

Every macro metric is the mean over the same classes: all K classes of the data card, not only
those that happen to be in the scored split. A class with no image in the split cannot be
scored; it counts as 0 in every macro metric and is listed in `absent`, so a split that lacks
a class can never look better than one that has it.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score


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
