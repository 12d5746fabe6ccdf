import math

import numpy as np
import torch

from pipeline.metrics import classification_metrics


def test_metrics_on_a_known_case():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = torch.tensor([[5, 0, 0], [5, 0, 0], [0, 5, 0], [0, 5, 0], [0, 5, 0], [0, 0, 5]], dtype=torch.float)
    m = classification_metrics(logits, labels, 4)
    assert m["accuracy"] == 5 / 6
    assert m["balanced_accuracy"] == (2 / 3 + 1 + 1) / 3
    assert m["confusion_matrix"][0].tolist() == [2, 1, 0, 0]
    assert m["auroc_per_class"][2] == 1.0
    assert math.isnan(m["auroc_per_class"][3])  # class 3 absent: undefined, not 0.5
    assert m["macro_auroc"] == np.mean(m["auroc_per_class"][:3])
