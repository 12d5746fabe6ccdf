"""MLflow runs (rank 0 only), artefact fetching by reference, and the model registry.

Logging never blocks or kills training: every tracker call is queued and delivered in order by
one background thread, which retries with exponential backoff while the server is unreachable.
Nothing is lost: the queue is saved in training checkpoints, flushed at the end of each stage,
and what cannot be delivered in time is spilled to `tracking.backlog_dir` and replayed by the
next mimflow command. A resumed run skips metrics the server already holds for a step, so a
resumed stage has no duplicated steps.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.tracking.base import NullTracker, Tracker

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's log_batch limits


def _log(msg: str) -> None:
    print(f"mimflow: {msg}", file=sys.stderr, flush=True)


def _is_transient(err: Exception) -> bool:
    """Worth retrying: the server is down, slow, overloaded, or a local store is busy."""
    if isinstance(err, MlflowException):
        code = getattr(err, "get_http_status_code", lambda: 500)()
        return code >= 500 or code == 429 or "locked" in str(err).lower() or "connect" in str(err).lower()
    return not isinstance(err, (FileNotFoundError, ValueError, TypeError))


def retrying(fn: Callable, what: str, timeout_s: float, max_backoff_s: float = 30.0):
    """fn() until it succeeds, retrying transient errors with backoff for up to timeout_s."""
    deadline, backoff, warned = time.monotonic() + timeout_s, 0.5, False
    while True:
        try:
            return fn()
        except Exception as err:
            if not _is_transient(err) or time.monotonic() + backoff > deadline:
                raise
            if not warned:
                _log(f"{what} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); retrying")
                warned = True
            time.sleep(backoff)
            backoff = min(2 * backoff, max_backoff_s)


class MlflowTracker:
    """Rank 0's tracker: queued, ordered, retried delivery to one MLflow run (see module doc)."""

    def __init__(self, run_id: str, cfg: TrackingConfig, stored_steps: dict[str, int] | None = None):
        self.run_id, self.cfg = run_id, cfg
        self.client = MlflowClient(cfg.uri)
        self._stored = stored_steps or {}  # metric key -> last step the server already holds
        self._ops: deque[dict] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._spool = Path(cfg.backlog_dir).resolve() / "spool" / run_id  # snapshots of logged files
        self._thread = threading.Thread(target=self._deliver_forever, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()

    # -- the Tracker interface: enqueue only -----------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now, step = int(time.time() * 1000), int(step or 0)
        items = [[k, float(v), now, step] for k, v in metrics.items() if step > self._stored.get(k, -1)]
        for i in range(0, len(items), MAX_METRICS):
            self._put({"op": "metrics", "items": items[i:i + MAX_METRICS]})

    def log_params(self, params: dict[str, Any]) -> None:
        items = [[k, str(v)[:6000]] for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS):
            self._put({"op": "params", "items": items[i:i + MAX_PARAMS]})

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [[k, str(v)] for k, v in tags.items()]
        for i in range(0, len(items), MAX_TAGS):
            self._put({"op": "tags", "items": items[i:i + MAX_TAGS]})

    def log_artifact(self, path, artifact_path=None) -> None:
        # A snapshot: the caller may delete or rewrite the file before it is delivered.
        folder = self._spool / str(time.time_ns())  # the file keeps its name: it is the artefact's
        folder.mkdir(parents=True)
        copy = folder / Path(path).name
        shutil.copy2(path, copy)
        self._put({"op": "artifact", "path": str(copy), "artifact_path": artifact_path, "spooled": True})

    def log_artifacts(self, directory, artifact_path=None) -> None:
        # stage outputs (encoder/, classifier/) stay in place: delivered from where they are
        self._put({"op": "artifacts", "path": str(directory), "artifact_path": artifact_path})

    # -- checkpoints, flushing ------------------------------------------------------------------
    def pending(self) -> list[dict]:
        """Calls not yet acknowledged by the server (JSON-able; a checkpoint keeps them)."""
        with self._cond:
            return [dict(op) for op in self._ops]

    def restore_pending(self, ops: list[dict]) -> None:
        """Re-queue what a checkpoint held undelivered; steps the server has are skipped."""
        for op in ops:
            if op["op"] == "metrics":
                op = {**op, "items": [m for m in op["items"] if m[3] > self._stored.get(m[0], -1)]}
                if not op["items"]:
                    continue
            self._put(op)

    def flush(self, timeout_s: float) -> bool:
        """Wait (retrying at once) until everything queued is delivered -> False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()  # cut a backoff sleep short
            while self._ops and time.monotonic() < deadline:
                self._cond.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            return not self._ops

    def close(self, timeout_s: float, end_status: str | None = None) -> bool:
        """Flush; spill whatever is left (with the run's end status) to the backlog -> delivered?"""
        delivered = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            left = [dict(op) for op in self._ops]
            self._ops.clear()
            self._cond.notify_all()
        if delivered:
            shutil.rmtree(self._spool, ignore_errors=True)
        else:
            path = spill(self.cfg, self.run_id, left, end_status)
            _log(f"MLflow {self.cfg.uri} still unreachable: {len(left)} undelivered call(s) for run "
                 f"{self.run_id} saved to {path}; the next mimflow command using this tracking URI "
                 "delivers them")
        return delivered

    # -- delivery ---------------------------------------------------------------------------------
    def _put(self, op: dict) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"tracker for run {self.run_id} is closed")
            self._ops.append(op)
            self._cond.notify_all()

    def _next_batch(self) -> list[dict]:
        """The head op; consecutive metric ops merge into one request (up to MLflow's limit)."""
        batch = [self._ops[0]]
        if batch[0]["op"] == "metrics":
            n = len(batch[0]["items"])
            for op in list(self._ops)[1:]:
                if op["op"] != "metrics" or n + len(op["items"]) > MAX_METRICS:
                    break
                batch.append(op)
                n += len(op["items"])
        return batch

    def _deliver_forever(self) -> None:
        backoff, down_since = 0.5, None
        while True:
            with self._cond:
                while not self._ops and not self._closed:
                    self._cond.wait()
                if not self._ops:
                    return
                batch = self._next_batch()
            try:
                deliver(self.client, self.run_id, batch)
            except Exception as err:
                if _is_transient(err):
                    if down_since is None:
                        down_since = time.monotonic()
                        _log(f"MLflow {self.cfg.uri} unreachable ({type(err).__name__}); training goes on, "
                             f"{len(self._ops)} call(s) buffered, retrying with backoff")
                    with self._cond:
                        if not self._closed:
                            self._cond.wait(timeout=backoff)
                    backoff = min(2 * backoff, self.cfg.retry_max_backoff_s)
                    continue
                _log(f"MLflow refused {batch[0]['op']} for run {self.run_id}, dropped: "
                     f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
            with self._cond:
                for op in batch:
                    if self._ops and self._ops[0] is op:  # close() may have taken them meanwhile
                        self._ops.popleft()
                self._cond.notify_all()
            if down_since is not None:
                _log(f"MLflow {self.cfg.uri} reachable again after {time.monotonic() - down_since:.0f} s; "
                     f"delivering {len(self._ops)} buffered call(s)")
                down_since, backoff = None, 0.5


def deliver(client: MlflowClient, run_id: str, batch: list[dict]) -> None:
    """One request for a batch of queued calls (raises on failure; nothing is half-applied
    except artefact folders, which are idempotent to resend)."""
    op = batch[0]
    kind = op["op"]
    if kind == "metrics":
        metrics = [Metric(k, v, ts, step) for o in batch for k, v, ts, step in o["items"]]
        client.log_batch(run_id, metrics=metrics, synchronous=True)
    elif kind == "params":
        try:
            client.log_batch(run_id, params=[Param(k, v) for k, v in op["items"]], synchronous=True)
        except MlflowException as err:
            if "Changing param values is not allowed" not in str(err):
                raise
            _log(f"run {run_id}: a param differs from the value logged before the resume; kept the old one")
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["items"]], synchronous=True)
    elif kind == "artifact":
        client.log_artifact(run_id, op["path"], op["artifact_path"])
        if op.get("spooled"):
            shutil.rmtree(Path(op["path"]).parent, ignore_errors=True)
    elif kind == "artifacts":
        client.log_artifacts(run_id, op["path"], op["artifact_path"])
    else:
        raise ValueError(f"unknown tracker call {kind!r}")


# -- the backlog: what a stage could not deliver before it ended ------------------------------------

def spill(cfg: TrackingConfig, run_id: str, ops: list[dict], end_status: str | None) -> Path:
    path = Path(cfg.backlog_dir) / f"{run_id}-{time.time_ns()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # written whole, then renamed: never half a file
    tmp.write_text(json.dumps({"uri": cfg.uri, "run_id": run_id, "end_status": end_status, "ops": ops}))
    os.replace(tmp, path)
    return path


def replay_backlog(cfg: TrackingConfig) -> int:
    """Deliver backlog files left for this tracking URI by earlier commands -> calls delivered."""
    folder = Path(cfg.backlog_dir)
    done = 0
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = json.loads(path.read_text())
        if record.get("uri") != cfg.uri:
            continue
        client = MlflowClient(cfg.uri)
        stored = stored_steps(client, record["run_id"])
        for op in record["ops"]:
            if op["op"] == "metrics":
                op = {**op, "items": [m for m in op["items"] if m[3] > stored.get(m[0], -1)]}
                if not op["items"]:
                    continue
            try:
                deliver(client, record["run_id"], [op])
            except Exception as err:
                if _is_transient(err):
                    raise
                _log(f"backlog {path.name}: {op['op']} refused, dropped: {err}")
            done += 1
        if record.get("end_status"):
            client.set_terminated(record["run_id"], record["end_status"])
        path.unlink()
        _log(f"delivered the tracking backlog {path} ({len(record['ops'])} calls) to run {record['run_id']}")
    return done


def stored_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """Metric key -> the last step the server holds for it (what a resumed run must not resend)."""
    keys = client.get_run(run_id).data.metrics.keys()
    return {k: max((m.step for m in client.get_metric_history(run_id, k)), default=-1) for k in keys}


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
    # Our own retries (above) outlast an outage; MLflow's (7 by default, minutes of backoff per
    # call) would only delay noticing that the server is back.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
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
    replay_backlog(cfg)
    return exp_id


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
            if _is_transient(err):
                raise
            _log(f"cannot reopen MLflow run {run_id} ({str(err).splitlines()[0][:200]}); starting a new run")
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
    start = time.monotonic()
    delivered = tracker.close(timeout_s, end_status=status)
    if delivered:
        try:
            retrying(lambda: tracker.client.set_terminated(tracker.run_id, status), f"ending run {tracker.run_id}",
                     max(0.0, timeout_s - (time.monotonic() - start)), tracker.cfg.retry_max_backoff_s)
        except Exception as err:
            spill(tracker.cfg, tracker.run_id, [], status)
            _log(f"could not mark run {tracker.run_id} {status} ({err}); recorded in the backlog")
    try:
        mlflow.end_run(status)  # pops the fluent run stack (status already set above)
    except Exception:  # the stack is popped before MLflow's own request; that request may fail
        pass


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
