"""Classification metrics for imbalanced domain data (balanced accuracy, macro-F1, OvR AUROC)."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             roc_auc_score)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """logits [N, K], labels [N] -> scalar metrics, per-class AUROC and the confusion matrix.

    A class absent from `labels` has no defined AUROC: it is NaN and left out of the macro mean.
    """
    probs = torch.softmax(logits.float(), dim=1).numpy()
    y = labels.numpy()
    pred = probs.argmax(1)
    classes = list(range(num_classes))
    auroc = []
    for k in classes:
        positives = (y == k)
        auroc.append(float(roc_auc_score(positives, probs[:, k])) if 0 < positives.sum() < len(y) else float("nan"))
    valid = [a for a in auroc if not np.isnan(a)]
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=classes, average="macro", zero_division=0)),
        "macro_auroc": float(np.mean(valid)) if valid else float("nan"),
        "auroc_per_class": auroc,
        "confusion_matrix": confusion_matrix(y, pred, labels=classes),
        "n": int(len(y)),
    }
