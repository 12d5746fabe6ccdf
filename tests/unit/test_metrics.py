import math

import numpy as np
import torch

from pipeline.metrics import classification_metrics


def test_metrics_on_a_known_case():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = torch.tensor([[5, 0, 0], [5, 0, 0], [0, 5, 0], [0, 5, 0], [0, 5, 0], [0, 0, 5]], dtype=torch.float)
    m = classification_metrics(logits, labels, 3)
    assert m["accuracy"] == 5 / 6
    assert m["balanced_accuracy"] == (2 / 3 + 1 + 1) / 3
    assert m["confusion_matrix"][0].tolist() == [2, 1, 0]
    assert m["auroc_per_class"][2] == 1.0 and m["support"] == [3, 2, 1] and m["absent"] == []
    assert math.isclose(m["macro_f1"], np.mean([0.8, 0.8, 1.0]))


def test_every_macro_metric_is_over_the_cards_classes_with_absent_ones_flagged():
    """Issue 8 case 10: before, balanced accuracy averaged the classes present, macro-F1 all of
    them and AUROC the present ones; an absent class now counts as 0 in all three."""
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = torch.tensor([[5, 0, 0, 0], [5, 0, 0, 0], [0, 5, 0, 0], [0, 5, 0, 0], [0, 5, 0, 0], [0, 0, 5, 0]],
                          dtype=torch.float)
    three = classification_metrics(logits[:, :3], labels, 3)
    m = classification_metrics(logits, labels, 4)
    assert m["absent"] == [3] and math.isnan(m["recall_per_class"][3]) and math.isnan(m["auroc_per_class"][3])
    for key in ("balanced_accuracy", "macro_f1", "macro_auroc"):
        assert math.isclose(m[key], three[key] * 3 / 4), key
    assert m["accuracy"] == three["accuracy"] == 5 / 6
