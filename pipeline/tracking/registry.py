"""The MLflow model registry: a classifier logged as a pyfunc model *from code* (never
cloudpickled), registered as a new version with lineage tags and an alias."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import faults

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PYFUNC_CODE = PACKAGE_DIR / "tracking" / "pyfunc_model.py"


KEY_TAG = "mimflow.classifier_sha256"  # which weights a version holds: the registration's identity


def register_classifier(classifier_dir: Path, name: str, alias: str, signature: ModelSignature,
                        input_example: np.ndarray, tags: dict, metadata: dict, weights_sha256: str) -> str:
    """Log `classifier_dir` as a pyfunc model in the active MLflow run, register it as a version
    of `name` created with its tags, and point `alias` at it -> the version number.

    Safe to repeat: a version already holding these weights (same sha256; e.g. created by a run
    killed before it set the alias) is completed and reused, never duplicated."""
    client = MlflowClient()
    tags = {**{k: str(v) for k, v in tags.items()}, KEY_TAG: weights_sha256}
    existing = existing_version(client, name, weights_sha256)
    if existing is None:
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE), artifacts={"classifier": str(classifier_dir)},
            code_paths=[str(PACKAGE_DIR)], signature=signature, input_example=input_example, metadata=metadata,
            pip_requirements=pip_requirements())
        version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)  # tags in the same call
        faults.inject("register", 1)  # tests: killed here, the version exists without its alias
    else:
        version = existing
        print(f"register: version {version} of {name!r} already holds these weights; completing it, "
              "not registering a duplicate", flush=True)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, alias, version)
    return version


def pip_requirements() -> list[str]:
    """mimflow's own runtime dependencies, pinned to the installed versions. Given explicitly,
    MLflow need not infer them by loading the model in a subprocess (~20 s per registration)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    out = []
    for text in requires("mimflow") or []:
        req = Requirement(text)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        try:
            out.append(f"{req.name}=={version(req.name)}")
        except PackageNotFoundError:
            out.append(str(req))
    return out


def existing_version(client: MlflowClient, name: str, weights_sha256: str) -> str | None:
    """The newest version of `name` registered with these weights, or None."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    hits = [v for v in versions if v.tags.get(KEY_TAG) == weights_sha256]
    return str(max(int(v.version) for v in hits)) if hits else None
