"""Stage 4: score a classifier on the held-out split; metrics, per-class table and plots logged.

Multi-class: accuracy, balanced accuracy, macro-F1, per-class and macro AUROC, a confusion matrix.
Multi-label: per-label and macro/micro AUROC, mAP, F1 at the thresholds fine-tuning chose on the
val split (meta.json), example-based F1, Hamming loss, a per-label ROC figure and a label
co-occurrence / error figure; a label without a positive (or negative) in the split is reported
as not scored and left out of the macro means (pipeline/metrics.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from accelerate import Accelerator

from pipeline.config import Config, stage_dir
from pipeline.data.manifest import load_dataset_info, load_manifest, select
from pipeline.data.splits import split_counts
from pipeline.distributed import show_progress
from pipeline.engine.loaders import make_loader
from pipeline.engine.loop import predict
from pipeline.metrics import classification_metrics, multilabel_metrics, probabilities
from pipeline.plots import confusion_matrix_plot, label_errors_plot, roc_curves_plot
from pipeline.stages.common import make_dataset
from pipeline.tracking.base import Tracker
from pipeline.weights import load_classifier

MULTILABEL_SCALARS = ("macro_auroc", "micro_auroc", "map", "micro_ap", "macro_f1", "micro_f1", "example_f1",
                      "hamming_loss", "subset_accuracy")
# the columns `mimflow run` prints at the end (multi-class: the first four; multi-label: the rest + macro_f1)
SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "micro_auroc", "map", "example_f1",
                   "hamming_loss")


@dataclass
class Report:
    """What evaluation logs for one task: scalars (logged as metrics), the per-class table
    (printed), metrics.json's further entries, and the figures, each drawn into a folder."""
    scalars: dict[str, float]
    table: str
    body: dict
    figures: list[Callable[[Path], Path]] = field(default_factory=list)


def evaluate(cfg: Config, prepared: Path, classifier_dir: Path, accelerator: Accelerator,
             tracker: Tracker, name: str = "evaluate") -> dict:
    """-> scalar metrics (prefixed with the split), e.g. {"test/balanced_accuracy": ...} or, for
    a multi-label classifier, {"test/macro_auroc": ..., "test/map": ...}."""
    split = cfg.evaluate.split
    model, meta = load_classifier(classifier_dir)
    task = meta.get("task", "multiclass")
    every = load_manifest(prepared / "manifest.csv")
    records = select(every, split)
    ds = make_dataset(cfg, records, meta["stats"], train=False, img_size=meta["img_size"],
                      num_labels=meta["num_classes"] if task == "multilabel" else None)
    loader = accelerator.prepare(make_loader(ds, cfg.evaluate.batch_size, cfg, train=False))
    model = accelerator.prepare(model)
    logits, labels = predict(model, loader, accelerator, show_progress(accelerator, cfg.run), desc=split)
    counts = split_counts(every, meta["classes"])
    report = (_multilabel(logits, labels, meta, counts, split, name, len(select(every, "val")))
              if task == "multilabel" else _multiclass(logits, labels, meta, counts, split, name))
    if accelerator.is_main_process:
        print(report.table, flush=True)
        out = stage_dir(cfg, name)
        out.mkdir(parents=True, exist_ok=True)
        tracker.log_params({"classifier": str(classifier_dir), "split": split, "n_images": len(labels)})
        info = load_dataset_info(prepared)
        tracker.log_dataset(prepared / "manifest.csv", cfg.data.name, info["dataset_hash"],
                            "test" if split == "test" else "validation" if split == "val" else split, split)
        # class names as written (metric keys MLflow refuses are renamed by the tracker, which
        # maps them back in its mimflow.renamed_keys tag; metrics.json keeps the original keys)
        tracker.set_tags({"classes": json.dumps(meta["classes"]), "task": task})
        tracker.log_metrics(report.scalars)
        body = {"split": split, "task": task, "classes": meta["classes"], "n": len(labels), **report.scalars,
                **report.body}
        (out / "metrics.json").write_text(json.dumps(body, indent=2))
        tracker.log_artifact(out / "metrics.json", "evaluation")
        for draw in report.figures:
            tracker.log_artifact(draw(out), "evaluation")
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return report.scalars


def _multiclass(logits, labels, meta: dict, counts: dict, split: str, name: str) -> Report:
    m = classification_metrics(logits, labels, meta["num_classes"])
    classes = meta["classes"]
    scalars = {f"{split}/{k}": m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")}
    scalars.update({f"{split}/auroc_{c}": a for c, a in zip(classes, m["auroc_per_class"]) if not math.isnan(a)})
    per_class = _per_class(m, classes, counts, split)
    body = {"macro_over": f"all classes of the data card; a class without a {split} image counts as 0",
            "per_class": per_class, "confusion_matrix": m["confusion_matrix"].tolist()}
    title = f"{split} (n={m['n']}) bal.acc {m['balanced_accuracy']:.3f}"

    def figure(out: Path) -> Path:
        return confusion_matrix_plot(m["confusion_matrix"], classes, out / "confusion_matrix.png", title=title)
    return Report(scalars, _table(name, split, per_class), body, [figure])


def _multilabel(logits, labels, meta: dict, counts: dict, split: str, name: str, n_val: int) -> Report:
    probs, y = probabilities(logits, "multilabel"), labels.numpy().astype(int)  # [N, K] each
    m = multilabel_metrics(probs, y, meta["thresholds"])
    classes = meta["classes"]
    scalars = {f"{split}/{k}": m[k] for k in MULTILABEL_SCALARS}
    scalars[f"{split}/labels_scored"] = len(classes) - len(m["unscored"])
    for key in ("auroc", "ap", "f1"):
        scalars.update({f"{split}/{key}_{c}": v for c, v in zip(classes, m[f"{key}_per_label"]) if not math.isnan(v)})
    rows = _per_label(m, classes, counts, split, n_val)
    unscored = ", ".join(f"{classes[k]} ({why} in {split})" for k, why in m["unscored"].items())
    body = {"macro_over": (f"the {len(classes) - len(m['unscored'])} of {len(classes)} labels with a positive and a "
                           f"negative in the {split} split" + (f"; not scored: {unscored}" if unscored else "")),
            "thresholds": dict(zip(classes, meta["thresholds"])), "threshold_rule": meta.get("threshold_rule"),
            "per_label": rows, "cooccurrence": m["cooccurrence"].tolist(),
            "predicted_given_true": m["predicted_given_true"].tolist()}
    title = f"{split} (n={m['n']}) macro AUROC {m['macro_auroc']:.3f}  mAP {m['map']:.3f}"

    def roc(out: Path) -> Path:
        return roc_curves_plot(probs, y, classes, out / "roc_per_label.png", title=title)

    def errors(out: Path) -> Path:
        return label_errors_plot(m["cooccurrence"], m["predicted_given_true"], classes,
                                 out / "label_cooccurrence_errors.png", title=title)
    return Report(scalars, _label_table(name, split, rows), body, [roc, errors])


def _counts_and_flags(per_split: dict, split: str, what: str) -> tuple[dict[str, int], list[str]]:
    """A class's {split: {"images": n}} -> ({split: n}, flags: no train / no scored-split `what`)."""
    n = {s: per_split[s]["images"] for s in ("train", "val", "test")}
    flags = [f"no {s} {what}" for s in ("train", split) if not n[s]]
    if not n["train"] and n[split]:
        flags.append("the classifier was trained without it")
    return n, flags


def _per_class(m: dict, classes: list[str], counts: dict, split: str) -> list[dict]:
    """Per class: images per split next to its metrics, and flags for what makes them partial."""
    rows = []
    for k, name in enumerate(classes):
        n, flags = _counts_and_flags(counts[name], split, "image")
        if k in m["absent"]:
            flags.append("not scored: counts as 0 in every macro metric")
        rows.append({"class": name, **{f"{s}_images": c for s, c in n.items()},
                     **{key: m[f"{key}_per_class"][k] for key in ("recall", "precision", "f1", "auroc")},
                     "flags": list(dict.fromkeys(flags))})
    return rows


def _per_label(m: dict, classes: list[str], counts: dict, split: str, n_val: int) -> list[dict]:
    """Per label: positives per split next to its metrics and threshold, and flags."""
    rows = []
    for k, name in enumerate(classes):
        n, flags = _counts_and_flags(counts[name], split, "positive")
        if k in m["unscored"]:
            flags.append(f"not scored ({m['unscored'][k]} in {split}): left out of the macro means")
        if not n["val"] or n["val"] == n_val:
            missing = "positive" if not n["val"] else "negative"
            flags.append(f"threshold {m['threshold_per_label'][k]:g}: no val {missing} to choose one")
        rows.append({"label": name, **{f"{s}_positives": c for s, c in n.items()},
                     **{key: m[f"{key}_per_label"][k] for key in ("auroc", "ap", "precision", "recall", "f1")},
                     "threshold": m["threshold_per_label"][k], "flags": list(dict.fromkeys(flags))})
    return rows


def _table(name: str, split: str, per_class: list[dict]) -> str:
    """Per class: images in each split next to the split's recall, F1 and AUROC, and flags."""
    width = max(12, *(len(r["class"]) for r in per_class))
    lines = [f"{name}: {split} metrics per class (macro metrics average all {len(per_class)})",
             f"  {'class':<{width}} {'train':>6}{'val':>6}{'test':>6}{'recall':>8}{'f1':>8}{'auroc':>8}"]
    for r in per_class:
        lines.append(f"  {r['class']:<{width}} {r['train_images']:>6}{r['val_images']:>6}{r['test_images']:>6}"
                     + "".join(f"{r[k]:8.3f}" for k in ("recall", "f1", "auroc"))
                     + (f"   WARNING: {'; '.join(r['flags'])}" if r["flags"] else ""))
    return "\n".join(lines)


def _label_table(name: str, split: str, rows: list[dict]) -> str:
    """Per label: positives in each split next to the split's AUROC, AP, F1 and the threshold."""
    width = max(12, *(len(r["label"]) for r in rows))
    scored = sum(not math.isnan(r["auroc"]) for r in rows)
    lines = [f"{name}: {split} metrics per label (positives per split; macro metrics average the {scored} of "
             f"{len(rows)} labels with a {split} positive and negative)",
             f"  {'label':<{width}} {'train':>6}{'val':>6}{'test':>6}{'auroc':>8}{'ap':>8}{'f1':>8}{'thresh':>8}"]
    for r in rows:
        lines.append(f"  {r['label']:<{width}} {r['train_positives']:>6}{r['val_positives']:>6}{r['test_positives']:>6}"
                     + "".join(f"{r[k]:8.3f}" for k in ("auroc", "ap", "f1", "threshold"))
                     + (f"   WARNING: {'; '.join(r['flags'])}" if r["flags"] else ""))
    return "\n".join(lines)
