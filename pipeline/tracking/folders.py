"""Weights folders that are not classifiers (a visual tokenizer) in the MLflow model registry.

MLflow 3's `register_model` only registers logged models; a plain artefact folder is registered
as a model version whose source is the folder's artefact URI, so that `models:/<name>@<alias>`
downloads exactly that folder (pipeline/tracking/artifacts.py:fetch).
"""
from __future__ import annotations

from mlflow.tracking import MlflowClient


def register_folder(client: MlflowClient, run_id: str, artifact_path: str, name: str, alias: str,
                    tags: dict) -> str:
    """Register the artefact folder `artifact_path` of run `run_id` as a new version of `name`,
    tag it and point `alias` at it -> the version number. The folder may still be on its way to
    the store: the version records where it will be, and is read only later."""
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    try:
        client.create_registered_model(name)
    except Exception:  # it exists already (the store says so in its own words)
        client.get_registered_model(name)
    version = client.create_model_version(name, source=source, run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()})
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)
