"""The MLflow model registry: a classifier logged as a pyfunc model *from code* (never
cloudpickled), registered as a new version with lineage tags and an alias."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PYFUNC_CODE = PACKAGE_DIR / "tracking" / "pyfunc_model.py"


def register_classifier(classifier_dir: Path, name: str, alias: str, signature: ModelSignature,
                        input_example: np.ndarray, tags: dict, metadata: dict) -> str:
    """Log `classifier_dir` as a pyfunc model in the active MLflow run, register it as a new version
    of `name`, tag the version and point `alias` at it -> the version number."""
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(PYFUNC_CODE), artifacts={"classifier": str(classifier_dir)},
        code_paths=[str(PACKAGE_DIR)], signature=signature, input_example=input_example,
        registered_model_name=name, metadata=metadata)
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.set_registered_model_alias(name, alias, version)
    return version
