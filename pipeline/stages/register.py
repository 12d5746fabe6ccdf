"""Stage 5: register the classifier as an MLflow pyfunc model with lineage tags and an alias."""
from __future__ import annotations

from pathlib import Path

from mlflow.models import ModelSignature

from pipeline.config import Config
from pipeline.data.manifest import load_manifest, read_record, select
from pipeline.tracking.base import Tracker
from pipeline.tracking.outputs import output_schema, task_metadata, task_tags
from pipeline.tracking.registry import register_classifier
from pipeline.weights import verify_weights


class RegisterRefused(ValueError):
    """The classifier is not fit to be registered (e.g. it never saw a class); the message says why."""


def _signature(meta: dict) -> ModelSignature:
    """Outputs by task (tracking/outputs.py): a float column per class, or per label plus the
    predicted label sets. Inputs are checked by the model itself (pyfunc_model: [N, C, H, W] or
    [C, H, W], numeric, C = the channels, any H, W): MLflow's own input-schema check would answer a
    wrong input by printing the whole input back (in process and over HTTP); the expected input is
    stated in the model's metadata and description instead."""
    return ModelSignature(inputs=None, outputs=output_schema(meta))


def describe(meta: dict, data_name: str, metrics: dict | None) -> str:
    """The model version's description: what it is, on what, how good, made by which runs."""
    multilabel = meta.get("task") == "multilabel"
    what, score = ("multi-label classifier", "map") if multilabel else ("classifier", "balanced_accuracy")
    lines = [f"{meta['backbone']} {what} ({meta.get('head', 'linear')} head) of {len(meta['classes'])} "
             f"{'labels' if multilabel else 'classes'} on {data_name} ({meta['in_chans']} channels: "
             f"{', '.join(meta['channels'])}; {meta['img_size']} x {meta['img_size']} px input, raw units; resized as "
             "evaluation does).",
             f"{'Labels' if multilabel else 'Classes'}: {', '.join(meta['classes'])}.",
             f"Initialised from: {meta.get('init')}; best epoch {meta.get('best_epoch')} by validation "
             f"{score.replace('_', ' ')} {meta.get('val_' + score, float('nan')):.4f}."]
    if metrics:  # the summary scalars, not the per-class / per-label ones
        lines.append("Test metrics: " + ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in metrics.items()
                                                   if not any(f"/{p}_" in k for p in ("auroc", "ap", "f1"))) + ".")
    lines.append(f"Runs: fine-tune {meta.get('finetune_run_id')}, pretrain {meta.get('pretrain_run_id') or 'none'}; "
                 f"dataset hash {str(meta.get('dataset_hash'))[:16]}.")
    return "\n".join(lines)


def register(cfg: Config, prepared: Path, classifier_dir: Path, tracker: Tracker, metrics: dict | None = None,
             evaluate_run_id: str | None = None) -> str:
    """Rank 0 only. -> `models:/<name>@<alias>`; the version is tagged with its lineage and
    described (metrics: the test metrics evaluate logged, when known)."""
    meta = verify_weights(classifier_dir)  # the weights registered are the ones fine-tuning wrote
    unseen = [c for c, n in meta.get("train_class_counts", {}).items() if n == 0]
    if unseen and not cfg.register.allow_missing_classes:
        raise RegisterRefused(f"{classifier_dir} never saw class(es) {unseen} in training and cannot predict "
                              "them; not registered (register.allow_missing_classes=true registers it anyway)")
    test = select(load_manifest(prepared / "manifest.csv"), "test")
    example = read_record(test[0], **cfg.data.reader_options)[None]  # [1, C, H, W], raw units
    name = cfg.register.model_name
    lineage = {"pretrain_run_id": meta.get("pretrain_run_id") or "none",
               "finetune_run_id": meta.get("finetune_run_id"), "register_run_id": tracker.run_id,
               "teacher_run_id": meta.get("teacher_run_id") or "none",
               "dataset_hash": meta.get("dataset_hash"), "init": meta.get("init"),
               "backbone": meta["backbone"], "head": meta.get("head", "linear"),
               "classes": ",".join(meta["classes"]), "channels": ",".join(meta["channels"]), **task_tags(meta)}
    schema = {"classes": meta["classes"], "channels": meta["channels"], "img_size": meta["img_size"],
              "task": meta.get("task", "multiclass")}
    metadata = {"classes": meta["classes"], "channels": meta["channels"], **task_metadata(meta),
                "input": f"raw images [N, {meta['in_chans']}, H, W] (or one [{meta['in_chans']}, H, W]), "
                         "any numeric dtype and size"}
    version = register_classifier(classifier_dir, name, cfg.register.alias, _signature(meta), example, lineage,
                                  metadata=metadata, weights_sha256=meta["weights_sha256"], schema=schema,
                                  allow_schema_change=cfg.register.allow_schema_change,
                                  description=describe(meta, cfg.data.name, metrics),
                                  linked_runs={"output": meta.get("finetune_run_id"), "input": evaluate_run_id})
    tracker.set_tags({"registered_model": f"{name}/{version}"})
    return f"models:/{name}@{cfg.register.alias}"
