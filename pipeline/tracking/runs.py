"""MLflow runs on rank 0: pointing MLflow at the store, starting or reopening a run, ending it.
Every other rank gets the do-nothing NullTracker."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.fsutil import os_error_line
from pipeline.tracking.backlog import replay_backlog, spill, stored_steps
from pipeline.tracking.base import NullTracker, Tracker
from pipeline.tracking.delivery import MlflowTracker
from pipeline.tracking.retry import is_transient, log, retrying


def check_reachable(uri: str) -> None:
    """Fail early, naming the URI, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
    except requests.RequestException as err:
        raise RuntimeError(f"MLflow tracking server {uri} is unreachable: {err}") from None


STORE_LOCK_TIMEOUT_S = 600.0  # a fresh store's migrations take seconds; a live holder is stuck


def setup(cfg: TrackingConfig) -> str:
    """Point MLflow at cfg.uri and make sure the store and the experiment exist -> experiment id.

    A SQLite store is opened (and, the first time, created by MLflow's schema migrations) and
    its experiment created under a file lock beside the database (`mlflow.db.lock`): MLflow's
    migrations are not safe to run twice at once, so simultaneous first commands on a fresh
    store used to crash. Transient errors (a busy database) are retried for flush_timeout_s.
    RuntimeError naming the lock file when another process holds it for STORE_LOCK_TIMEOUT_S.
    """
    check_reachable(cfg.uri)
    # Our own retries (above) outlast an outage; MLflow's (7 by default, minutes of backoff per
    # call) would only delay noticing that the server is back.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    mlflow.set_tracking_uri(cfg.uri)
    with _store_lock(cfg.uri):
        exp_id = retrying(lambda: _experiment_id(cfg), f"opening MLflow store {cfg.uri}", cfg.flush_timeout_s,
                          cfg.retry_max_backoff_s, uri=cfg.uri)
    mlflow.set_experiment(experiment_id=exp_id)
    replay_backlog(cfg)
    return exp_id


# MLflow 3's UI opens an experiment by its kind; without the tag it guesses, and shows a GenAI
# overview to a model-training experiment
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(cfg: TrackingConfig) -> str:
    """The experiment's id, creating it when missing (another process may create it meanwhile),
    marked as a model-training experiment."""
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") is None:
            for key, value in EXPERIMENT_KIND.items():
                MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    location = None
    if cfg.artifact_location and not cfg.uri.startswith(("http://", "https://")):
        location = Path(cfg.artifact_location).resolve().as_uri()
    try:
        return mlflow.create_experiment(cfg.experiment, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow.get_experiment_by_name(cfg.experiment).experiment_id


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock on `<database>.lock` for a SQLite file store; nothing for other stores
    (a server serialises its own store) or a folder that does not exist (MLflow reports that)."""
    from filelock import FileLock, Timeout
    from sqlalchemy.engine import make_url

    database = make_url(uri).database if uri.startswith("sqlite:") else None
    if not database or database == ":memory:" or not Path(database).resolve().parent.is_dir():
        yield
        return
    lock = Path(database).resolve().with_name(Path(database).name + ".lock")
    try:
        with FileLock(lock, timeout=STORE_LOCK_TIMEOUT_S):
            yield
    except Timeout:
        raise RuntimeError(f"MLflow store {uri}: another process has held {lock} for over "
                           f"{STORE_LOCK_TIMEOUT_S:g} s while opening the store") from None


@contextmanager
def tracked_run(cfg: TrackingConfig, is_main: bool, run_name: str, tags: dict[str, Any] | None = None,
                run_id: str | None = None) -> Iterator[Tracker]:
    """A (nested, when one is active) MLflow run on rank 0; NullTracker on other ranks.

    run_id: reopen that run (a resumed stage) instead of starting a new one.
    On exit the tracker is flushed and the run ended FINISHED, FAILED, or, for an exception with
    `mlflow_status` (preemption), that status, flushing within the exception's `flush_timeout_s`.
    """
    if not is_main:
        yield NullTracker()
        return
    if mlflow.active_run() is None:
        setup(cfg)
    nested = mlflow.active_run() is not None
    if run_id is not None:
        try:
            run = retrying(lambda: mlflow.start_run(run_id=run_id, nested=nested), f"reopening MLflow run {run_id}",
                           cfg.flush_timeout_s, cfg.retry_max_backoff_s)
        except MlflowException as err:  # e.g. deleted, or another tracking URI than before
            if is_transient(err):
                raise
            log(f"cannot reopen MLflow run {run_id} ({str(err).splitlines()[0][:200]}); starting a new run")
            run_id = None
    if run_id is not None:
        tracker = MlflowTracker(run.info.run_id, cfg, stored_steps(MlflowClient(cfg.uri), run_id))
    else:
        run = retrying(lambda: mlflow.start_run(run_name=run_name, nested=nested,
                                                tags={k: str(v) for k, v in (tags or {}).items()}),
                       f"starting MLflow run {run_name!r}", cfg.flush_timeout_s, cfg.retry_max_backoff_s)
        tracker = MlflowTracker(run.info.run_id, cfg)
    status, timeout = "FINISHED", cfg.flush_timeout_s
    try:
        yield tracker
    except BaseException as err:
        status = getattr(err, "mlflow_status", "FAILED")
        # a failing command should not hang on a dead server: the backlog keeps what is left
        timeout = getattr(err, "flush_timeout_s", min(timeout, 60.0))
        raise
    finally:
        _end(tracker, status, timeout)


def _end(tracker: MlflowTracker, status: str, timeout_s: float) -> None:
    """Flush and end the run; a local store problem met on the way fails the stage (LocalStoreError)."""
    start = time.monotonic()
    ok = status == "FINISHED"
    status = "FAILED" if tracker.fatal is not None else status
    try:
        delivered = tracker.close(timeout_s, end_status=status)
    except OSError as err:  # the backlog folder itself cannot be written
        log(f"could not keep the undelivered calls of run {tracker.run_id}: {os_error_line(err)}")
        delivered = False
    if delivered:
        try:
            retrying(lambda: tracker.client.set_terminated(tracker.run_id, status), f"ending run {tracker.run_id}",
                     max(0.0, timeout_s - (time.monotonic() - start)), tracker.cfg.retry_max_backoff_s)
        except Exception as err:
            spill(tracker.cfg, tracker.run_id, [], status)
            log(f"could not mark run {tracker.run_id} {status} ({err}); recorded in the backlog")
    try:
        mlflow.end_run(status)  # pops the fluent run stack (status already set above)
    except Exception:  # the stack is popped before MLflow's own request; that request may fail
        pass
    if ok and tracker.fatal is not None:
        raise tracker.fatal
