"""Stage 4: score a classifier on the held-out split; metrics, per-class table and plots logged."""
from __future__ import annotations

import json
import math
from pathlib import Path

from accelerate import Accelerator

from pipeline.config import Config, stage_dir
from pipeline.data.manifest import load_manifest, select
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
    records = select(load_manifest(prepared / "manifest.csv"), split)
    ds = make_dataset(cfg, records, meta["stats"], train=False, img_size=meta["img_size"])
    loader = accelerator.prepare(make_loader(ds, cfg.evaluate.batch_size, cfg, train=False))
    model = accelerator.prepare(model)
    logits, labels = predict(model, loader, accelerator, show_progress(accelerator, cfg.run), desc=split)
    m = classification_metrics(logits, labels, meta["num_classes"])
    classes = meta["classes"]
    scalars = {f"{split}/{k}": m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")}
    scalars.update({f"{split}/auroc_{c}": a for c, a in zip(classes, m["auroc_per_class"]) if not math.isnan(a)})
    if accelerator.is_main_process:
        out = stage_dir(cfg, name)
        out.mkdir(parents=True, exist_ok=True)
        tracker.log_params({"classifier": str(classifier_dir), "split": split, "n_images": m["n"]})
        tracker.log_metrics(scalars)
        report = {"split": split, "classes": classes, "n": m["n"], **scalars,
                  "confusion_matrix": m["confusion_matrix"].tolist(),
                  "per_class_support": m["confusion_matrix"].sum(1).tolist()}
        (out / "metrics.json").write_text(json.dumps(report, indent=2))
        tracker.log_artifact(out / "metrics.json", "evaluation")
        plot = confusion_matrix_plot(m["confusion_matrix"], classes, out / "confusion_matrix.png",
                                     title=f"{split} (n={m['n']}) bal.acc {m['balanced_accuracy']:.3f}")
        tracker.log_artifact(plot, "evaluation")
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return scalars
