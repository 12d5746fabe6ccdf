"""Stage 5: register the classifier as an MLflow pyfunc model with lineage tags and an alias."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline.config import Config
from pipeline.data.manifest import load_manifest, read_record, select
from pipeline.tracking.base import Tracker
from pipeline.tracking.outputs import output_schema, task_metadata, task_tags
from pipeline.tracking.registry import register_classifier
from pipeline.weights import verify_weights


class RegisterRefused(ValueError):
    """The classifier is not fit to be registered (e.g. it never saw a class); the message says why."""


def _signature(meta: dict) -> ModelSignature:
    # any H, W: the model resizes to its img_size as evaluation does
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, meta["in_chans"], -1, -1))]),
                          outputs=output_schema(meta))  # by task (tracking/outputs.py)


def register(cfg: Config, prepared: Path, classifier_dir: Path, tracker: Tracker) -> str:
    """Rank 0 only. -> `models:/<name>@<alias>`; the version is tagged with its lineage."""
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
    metadata = {"classes": meta["classes"], "channels": meta["channels"], **task_metadata(meta)}
    version = register_classifier(classifier_dir, name, cfg.register.alias, _signature(meta), example, lineage,
                                  metadata=metadata,
                                  weights_sha256=meta["weights_sha256"])
    tracker.set_tags({"registered_model": f"{name}/{version}"})
    return f"models:/{name}@{cfg.register.alias}"
