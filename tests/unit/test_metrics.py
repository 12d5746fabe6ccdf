import math

import numpy as np
import pytest
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


# ---------------------------------------------------------------- multi-label (issue 12)

from pipeline.metrics import choose_thresholds, multilabel_metrics, probabilities  # noqa: E402

# 4 examples x 3 labels; label 2 has no positive (as a finding absent from a small test split)
TARGETS = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
PROBS = np.array([[0.9, 0.2, 0.1], [0.6, 0.7, 0.6], [0.4, 0.8, 0.2], [0.1, 0.75, 0.3]])


def test_multilabel_metrics_by_hand_with_a_label_absent_from_the_split():
    m = multilabel_metrics(PROBS, TARGETS, [0.5, 0.5, 0.5])
    # label 0 separates perfectly; label 1: positives {0.7, 0.8} vs negatives {0.2, 0.75} -> 3 of 4
    # pairs ordered; AP: ranks 1 (pos), 2 (neg), 3 (pos) -> (1 + 2/3) / 2
    assert m["auroc_per_label"][:2] == [1.0, 0.75]
    assert m["ap_per_label"][:2] == pytest.approx([1.0, 5 / 6])
    # predictions at 0.5: label 1 has a false positive (example 3) -> P 2/3, R 1, F1 0.8
    assert m["f1_per_label"][:2] == pytest.approx([1.0, 0.8])
    # label 2 has no positive: reported as such, left out of every macro mean (not NaN, 0 or 0.5)
    assert m["unscored"] == {2: "no positive"} and m["support"] == [2, 2, 0]
    assert all(math.isnan(m[k][2]) for k in ("auroc_per_label", "ap_per_label", "f1_per_label"))
    assert m["macro_auroc"] == pytest.approx((1 + 0.75) / 2)
    assert m["map"] == pytest.approx((1 + 5 / 6) / 2)
    assert m["macro_f1"] == pytest.approx((1 + 0.8) / 2)
    # micro: all 12 decisions; 4 positives vs 8 negatives, 29.5 of 32 pairs ordered (one tie at 0.6)
    assert m["micro_auroc"] == pytest.approx(29.5 / 32)
    assert m["micro_ap"] == pytest.approx(0.25 + 0.25 + 0.25 * 3 / 4 + 0.25 * 4 / 6)
    assert m["micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 2))  # tp 4, fp 2, fn 0
    # per example 2|Y & P| / (|Y| + |P|): 1, 2*2/5, 1, and 0 for {} vs {1}
    assert m["example_f1"] == pytest.approx((1 + 0.8 + 1 + 0) / 4)
    assert m["hamming_loss"] == pytest.approx(2 / 12) and m["subset_accuracy"] == 0.5
    assert m["cooccurrence"].tolist() == [[2, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert m["predicted_given_true"].tolist() == [[2, 1, 1], [1, 2, 1], [0, 0, 0]]


def test_an_empty_true_and_predicted_set_is_a_perfect_example():
    m = multilabel_metrics(np.array([[0.1, 0.2], [0.9, 0.1]]), np.array([[0, 0], [1, 0]]), [0.5, 0.5])
    assert m["example_f1"] == 1.0 and m["subset_accuracy"] == 1.0 and m["unscored"] == {1: "no positive"}


def test_thresholds_maximise_each_labels_f1_and_default_without_a_positive():
    thresholds, notes = choose_thresholds(PROBS, TARGETS)
    # label 0: >= 0.6 keeps both positives and no negative (F1 1); label 1: >= 0.7 gives P 2/3, R 1
    assert thresholds == [0.6, 0.7, 0.5] and notes == [None, None, "no positive"]
    m = multilabel_metrics(PROBS, TARGETS, thresholds)
    assert m["f1_per_label"][:2] == pytest.approx([1.0, 0.8]) and m["threshold_per_label"] == thresholds


def test_probabilities_by_task():
    logits = torch.tensor([[0.0, 0.0], [2.0, -2.0]])
    assert np.allclose(probabilities(logits, "multiclass").sum(1), 1)
    assert np.allclose(probabilities(logits, "multilabel"), torch.sigmoid(logits).numpy())
    with pytest.raises(ValueError, match="task"):
        probabilities(logits, "regression")
