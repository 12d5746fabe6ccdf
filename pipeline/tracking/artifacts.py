"""Local folders for references to logged artefacts: a path, a run id, runs:/ or models:/ URIs."""
from __future__ import annotations

import re
from pathlib import Path

import mlflow

from pipeline.config import TrackingConfig

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def fetch(ref: str, artifact_path: str, tracking: TrackingConfig | None = None) -> Path:
    """A local folder for `ref`: a path, a run id (its `artifact_path`), runs:/ or models:/ URI."""
    if Path(ref).exists():
        return Path(ref)
    if tracking is not None:
        mlflow.set_tracking_uri(tracking.uri)
    if RUN_ID.match(ref):
        return Path(mlflow.artifacts.download_artifacts(run_id=ref, artifact_path=artifact_path))
    if ref.startswith(("runs:/", "models:/", "mlflow-artifacts:/", "file:/")):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
    raise FileNotFoundError(f"{ref!r} is neither an existing path, an MLflow run id, "
                            "nor a runs:/ or models:/ URI")
