"""Classical baselines on channel statistics, and the report a sweep writes."""
import csv
import re

import numpy as np
import pytest

from pipeline.sweep import classical
from pipeline.sweep.grid import Arm, Init
from pipeline.sweep.report import CSV_FIELDS, SweepResults, write_report


def test_channel_statistics_by_hand_with_nodata():
    img = np.array([[[1, 2], [3, 4]], [[np.nan, 10], [10, 10]]], np.float32)  # 2 channels, 2 x 2
    f = classical.channel_statistics(img).reshape(2, 7)
    assert f[0].tolist() == pytest.approx([2.5, np.sqrt(1.25), *np.percentile([1, 2, 3, 4], [5, 25, 50, 75, 95])])
    assert f[1].tolist() == pytest.approx([10, 0, 10, 10, 10, 10, 10])  # the NaN pixel is not a value
    assert classical.feature_names(["red", "nir"])[:2] == ["red_mean", "red_std"]
    assert np.isnan(classical.channel_statistics(np.full((1, 2, 2), np.nan))).all()


@pytest.mark.parametrize("name", ["logistic_regression", "random_forest"])
def test_estimators_separate_separable_classes_and_pad_missing_ones(name):
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, (30, 4)), rng.normal(5, 1, (30, 4))]
    y = np.r_[np.zeros(30, int), np.full(30, 2)]  # class 1 of 3 never seen in training
    probs = classical.fit_predict(name, 0, x, y, x, num_classes=3)
    assert probs.shape == (60, 3) and (probs[:, 1] == 0).all()
    assert (probs.argmax(1) == y).mean() > 0.95
    with pytest.raises(ValueError, match="unknown classical baseline 'svm'"):
        classical.make_estimator("svm", 0)


def _results(tmp_path) -> SweepResults:
    """Two repetitions x two seeds; arm `good` right on 90% of the items, `weak` on 50%."""
    rng = np.random.default_rng(0)
    arms = [Arm("good", "good net", "network", Init("mae", "pretrain", "mae"), "vit", "vit_debug"),
            Arm("weak", "weak net", "network", None, "vit", "vit_debug"),
            Arm("logistic_regression", "logistic regression", "classical", estimator="logistic_regression",
                baseline=True)]
    labels = [rng.integers(0, 2, 200), rng.integers(0, 2, 180)]
    rows = []
    for a, p in zip(arms, (0.9, 0.5, 0.7)):
        for r, y in enumerate(labels):
            for s in (0, 1):
                for f in (0.1, 1.0):
                    pred = np.where(rng.random(len(y)) < p, y, 1 - y)
                    rows.append({"trial": f"{a.key}/rep{r}-frac{f:g}-seed{s}", "arm": a.key, "arm_label": a.label,
                                 "fraction": f, "repetition": r, "seed": s, "status": "finished",
                                 "balanced_accuracy": 0.0, "predicted": pred.tolist()})
    rows[-1].update(status="failed", predicted=None, error="NonFiniteLossError: step 3")
    counts = {f: {"train": [10, 12], "val": [3, 3], "per_class": {"a": [5, 6], "b": [5, 6]},
                  "raised": [(0, "b", "validation")] if f == 0.1 else []} for f in (0.1, 1.0)}
    return SweepResults("unit", arms, [0.1, 1.0], [0, 1], ["a", "b"], labels, rows, counts, "balanced_accuracy",
                        500, 0.95, 0.8, facts=["Data: synthetic"], skipped=[("mae-swin", "MAE drops tokens")])


def test_report_table_verdicts_csv_and_plot(tmp_path):
    paths = write_report(_results(tmp_path), tmp_path / "report")
    text = paths["report.md"].read_text()
    table = {m[0]: m[1:] for m in re.findall(r"^\| (good net|weak net|logistic regression[^|]*) \| (.+?) \| (.+?) \|$",
                                                text, re.M)}
    good = float(table["good net"][0].split()[0])
    assert 85 < good < 95 and "(n=4)" in table["good net"][0]
    assert "(n=3)" in table["logistic regression *(baseline)*"][1]  # the failed trial is left out
    assert "good net beats weak net by" in text and "good net beats logistic regression by" in text
    assert "### 0.1 of the labels (11 (10-12) train + 3 validation labels)" in text
    assert "fraction 0.1, repetition 0: `b` (validation)" in text
    assert "`mae-swin`: MAE drops tokens" in text and "NonFiniteLossError: step 3" in text
    rows = list(csv.DictReader(paths["results.csv"].open()))
    assert len(rows) == 24 and list(rows[0]) == list(CSV_FIELDS)
    assert paths["label_efficiency.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_figure_has_a_panel_per_head_each_with_every_baseline():
    from pipeline.sweep.report import panels

    arms = [Arm("scratch-vit", "ViT", "network", None, "vit", "vit_debug"),
            Arm("mae-vit", "ViT + MAE", "network", Init("mae", "pretrain", "mae"), "vit", "vit_debug"),
            Arm("scratch-swin", "Swin", "network", None, "swin", "swin_debug"),
            Arm("resnet18", "ResNet", "network", None, None, "resnet18", baseline=True),
            Arm("logistic_regression", "LR", "classical", estimator="logistic_regression", baseline=True)]
    assert panels(arms) == [("head `vit`", [0, 1, 3, 4]), ("head `swin`", [2, 3, 4])]
    assert panels(arms[:2] + arms[3:]) == [("", [0, 1, 2, 3])]  # one head: one panel, as before
