"""Stage 4: score a classifier on the held-out split; metrics, per-class table and plots logged."""
from __future__ import annotations

import json
import math
from pathlib import Path

from accelerate import Accelerator

from pipeline.config import Config, stage_dir
from pipeline.data.manifest import load_dataset_info, load_manifest, select
from pipeline.data.splits import split_counts
from pipeline.distributed import show_progress
from pipeline.engine.loaders import make_loader
from pipeline.engine.loop import predict
from pipeline.metrics import classification_metrics
from pipeline.plots import confusion_matrix_plot
from pipeline.stages.common import make_dataset
from pipeline.tracking.base import Tracker
from pipeline.weights import load_classifier


def evaluate(cfg: Config, prepared: Path, classifier_dir: Path, accelerator: Accelerator,
             tracker: Tracker, name: str = "evaluate") -> dict:
    """-> scalar metrics (prefixed with the split), e.g. {"test/balanced_accuracy": ...}."""
    split = cfg.evaluate.split
    model, meta = load_classifier(classifier_dir)
    every = load_manifest(prepared / "manifest.csv")
    records = select(every, split)
    ds = make_dataset(cfg, records, meta["stats"], train=False, img_size=meta["img_size"])
    loader = accelerator.prepare(make_loader(ds, cfg.evaluate.batch_size, cfg, train=False))
    model = accelerator.prepare(model)
    logits, labels = predict(model, loader, accelerator, show_progress(accelerator, cfg.run), desc=split)
    m = classification_metrics(logits, labels, meta["num_classes"])
    classes = meta["classes"]
    scalars = {f"{split}/{k}": m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")}
    scalars.update({f"{split}/auroc_{c}": a for c, a in zip(classes, m["auroc_per_class"]) if not math.isnan(a)})
    per_class = _per_class(m, classes, split_counts(every, classes), split)
    if accelerator.is_main_process:
        print(_table(name, split, per_class), flush=True)
        out = stage_dir(cfg, name)
        out.mkdir(parents=True, exist_ok=True)
        tracker.log_params({"classifier": str(classifier_dir), "split": split, "n_images": m["n"]})
        info = load_dataset_info(prepared)
        tracker.log_dataset(prepared / "manifest.csv", cfg.data.name, info["dataset_hash"],
                            "test" if split == "test" else "validation" if split == "val" else split, split)
        # class names as written (metric keys MLflow refuses are renamed by the tracker, which
        # maps them back in its mimflow.renamed_keys tag; metrics.json keeps the original keys)
        tracker.set_tags({"classes": json.dumps(classes)})
        tracker.log_metrics(scalars)
        report = {"split": split, "classes": classes, "n": m["n"], **scalars,
                  "macro_over": f"all classes of the data card; a class without a {split} image counts as 0",
                  "per_class": per_class, "confusion_matrix": m["confusion_matrix"].tolist()}
        (out / "metrics.json").write_text(json.dumps(report, indent=2))
        tracker.log_artifact(out / "metrics.json", "evaluation")
        plot = confusion_matrix_plot(m["confusion_matrix"], classes, out / "confusion_matrix.png",
                                     title=f"{split} (n={m['n']}) bal.acc {m['balanced_accuracy']:.3f}")
        tracker.log_artifact(plot, "evaluation")
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return scalars


def _per_class(m: dict, classes: list[str], counts: dict, split: str) -> list[dict]:
    """Per class: images per split next to its metrics, and flags for what makes them partial."""
    rows = []
    for k, name in enumerate(classes):
        n = {s: counts[name][s]["images"] for s in ("train", "val", "test")}
        flags = [f"no {s} image" for s in ("train", split) if not n[s]]
        if not n["train"] and n[split]:
            flags.append("the classifier was trained without it")
        if k in m["absent"]:
            flags.append("not scored: counts as 0 in every macro metric")
        rows.append({"class": name, **{f"{s}_images": c for s, c in n.items()},
                     **{key: m[f"{key}_per_class"][k] for key in ("recall", "precision", "f1", "auroc")},
                     "flags": list(dict.fromkeys(flags))})
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
