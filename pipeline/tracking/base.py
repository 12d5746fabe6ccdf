"""Tracker interface; every rank but 0 gets the do-nothing NullTracker."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_dataset(self, manifest: str | Path, name: str, digest: str, context: str, split: str) -> None: ...


class NullTracker:
    run_id = None

    def log_params(self, params): pass
    def log_metrics(self, metrics, step=None): pass
    def log_artifact(self, path, artifact_path=None): pass
    def log_artifacts(self, directory, artifact_path=None): pass
    def set_tags(self, tags): pass
    def log_dataset(self, manifest, name, digest, context, split): pass
