"""MLflow runs (rank 0 only), artefact fetching by reference, and the model registry."""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.tracking.base import NullTracker, Tracker

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class MlflowTracker:
    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = MlflowClient()

    def log_params(self, params: dict[str, Any]) -> None:
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path, artifact_path=None) -> None:
        mlflow.log_artifact(str(path), artifact_path)

    def log_artifacts(self, directory, artifact_path=None) -> None:
        mlflow.log_artifacts(str(directory), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def check_reachable(uri: str) -> None:
    """Fail early, naming the URI, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
    except requests.RequestException as err:
        raise RuntimeError(f"MLflow tracking server {uri} is unreachable: {err}") from None


def setup(cfg: TrackingConfig) -> str:
    """Point MLflow at cfg.uri and make sure the experiment exists -> experiment id."""
    check_reachable(cfg.uri)
    mlflow.set_tracking_uri(cfg.uri)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        location = None
        if cfg.artifact_location and not cfg.uri.startswith(("http://", "https://")):
            location = Path(cfg.artifact_location).resolve().as_uri()
        exp_id = mlflow.create_experiment(cfg.experiment, artifact_location=location)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextmanager
def tracked_run(cfg: TrackingConfig, is_main: bool, run_name: str,
                tags: dict[str, Any] | None = None) -> Iterator[Tracker]:
    """A (nested, when one is active) MLflow run on rank 0; NullTracker on other ranks."""
    if not is_main:
        yield NullTracker()
        return
    if mlflow.active_run() is None:
        setup(cfg)
    with mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None,
                          tags={k: str(v) for k, v in (tags or {}).items()}) as run:
        yield MlflowTracker(run.info.run_id)


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
