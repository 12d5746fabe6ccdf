"""Stage 5: register the classifier as an MLflow pyfunc model with lineage tags and an alias."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from pipeline.config import Config
from pipeline.data.manifest import load_manifest, read_record, select
from pipeline.engine.checkpoint import load_weights
from pipeline.tracking.base import Tracker

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PYFUNC_CODE = PACKAGE_DIR / "tracking" / "pyfunc_model.py"


def _signature(meta: dict) -> ModelSignature:
    # any H, W: the model resizes to its img_size as evaluation does
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, meta["in_chans"], -1, -1))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, meta["num_classes"]))]))


def register(cfg: Config, prepared: Path, classifier_dir: Path, tracker: Tracker) -> str:
    """Rank 0 only. -> `models:/<name>@<alias>`; the version is tagged with its lineage."""
    _, meta = load_weights(classifier_dir)
    test = select(load_manifest(prepared / "manifest.csv"), "test")
    example = read_record(test[0], **cfg.data.reader_options)[None]  # [1, C, H, W], raw units
    name = cfg.register.model_name
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(PYFUNC_CODE), artifacts={"classifier": str(classifier_dir)},
        code_paths=[str(PACKAGE_DIR)], signature=_signature(meta), input_example=example,
        registered_model_name=name,
        metadata={"classes": meta["classes"], "channels": meta["channels"]})
    version = str(info.registered_model_version)
    client = MlflowClient()
    lineage = {"pretrain_run_id": meta.get("pretrain_run_id") or "none",
               "finetune_run_id": meta.get("finetune_run_id"), "register_run_id": tracker.run_id,
               "dataset_hash": meta.get("dataset_hash"), "init": meta.get("init"),
               "classes": ",".join(meta["classes"]), "channels": ",".join(meta["channels"])}
    for key, value in lineage.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.set_registered_model_alias(name, cfg.register.alias, version)
    tracker.set_tags({"registered_model": f"{name}/{version}"})
    return f"models:/{name}@{cfg.register.alias}"
