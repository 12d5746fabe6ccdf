"""Local folders for references to logged artefacts: a path, a run id, runs:/ or models:/ URIs."""
from __future__ import annotations

import os
import re
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.config import TrackingConfig

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
WEIGHTS_FILES = ("model.safetensors", "meta.json")


def fetch(ref: str, artifact_path: str, tracking: TrackingConfig | None = None) -> Path:
    """A local folder for `ref`: a path, a run id (its `artifact_path`), a runs:/ URI, or a
    registered or logged model (models:/name@alias, models:/name/3, models:/m-<id>).

    A model registered by mimflow is a pyfunc model holding the classifier's weights folder: the
    weights folder inside it is returned, so `--classifier models:/name@alias` works like a path.
    Raises FileNotFoundError naming the reference when it resolves to nothing usable.
    """
    if Path(ref).exists():
        return weights_folder(Path(ref))
    if tracking is not None:
        mlflow.set_tracking_uri(tracking.uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in logs
    try:
        if RUN_ID.match(ref):
            local = mlflow.artifacts.download_artifacts(run_id=ref, artifact_path=artifact_path)
        elif ref.startswith(("runs:/", "models:/", "mlflow-artifacts:/", "file:/")):
            local = mlflow.artifacts.download_artifacts(artifact_uri=ref)
        else:
            raise FileNotFoundError(f"{ref!r} is neither an existing path, an MLflow run id, "
                                    "nor a runs:/ or models:/ URI")
    except MlflowException as err:
        raise FileNotFoundError(f"{ref!r}: MLflow has nothing there ({str(err).splitlines()[0][:200]})") from None
    return weights_folder(Path(local), ref)


def weights_folder(folder: Path, ref: str | None = None) -> Path:
    """`folder` itself when it is a weights folder (or a file), else the one weights folder inside
    it (a pyfunc model's artifacts/classifier/); otherwise `folder` unchanged."""
    if folder.is_file() or all((folder / f).is_file() for f in WEIGHTS_FILES):
        return folder
    inside = sorted({p.parent for p in folder.rglob("meta.json") if (p.parent / "model.safetensors").is_file()})
    if len(inside) == 1:
        return inside[0]
    if len(inside) > 1:
        raise FileNotFoundError(f"{ref or folder}: holds {len(inside)} weights folders ({[str(p) for p in inside]}); "
                                "name one")
    return folder
