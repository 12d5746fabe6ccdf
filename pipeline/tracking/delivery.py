"""Rank 0's tracker: every call is queued and delivered in order to one MLflow run by a background
thread, which retries with exponential backoff while the server is unreachable.

Logging never blocks or kills training. Nothing is lost: the queue is saved in training
checkpoints, flushed at the end of each stage, and what cannot be delivered in time is spilled to
`tracking.backlog_dir` (backlog.py) and replayed by the next mimflow command. A resumed run skips
metrics the server already holds for a step, so a resumed stage has no duplicated steps.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.tracking.keys import RENAMED_TAG, KeyMap, fit_value
from pipeline.tracking.retry import LocalStoreError, is_transient, local_error, log

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's log_batch limits


class MlflowTracker:
    """Rank 0's tracker: queued, ordered, retried delivery to one MLflow run (see module doc)."""

    def __init__(self, run_id: str, cfg: TrackingConfig, stored_steps: dict[str, int] | None = None):
        self.run_id, self.cfg = run_id, cfg
        self.client = MlflowClient(cfg.uri)
        self._stored = stored_steps or {}  # metric key -> last step the server already holds
        self._keys = KeyMap()  # our keys -> keys MLflow accepts (keys.py)
        self._ops: deque[dict] = deque()
        self._cond = threading.Condition()
        self._closed = False
        # snapshots of logged files until delivered: beside the system's temporary files (the same
        # folder for a resumed run of this id), never in backlog_dir unless they end up undelivered
        self._spool = Path(tempfile.gettempdir()) / "mimflow-spool" / run_id
        self.fatal: LocalStoreError | None = None  # a local store problem: every later call raises it
        self._thread = threading.Thread(target=self._deliver_forever, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()

    # -- the Tracker interface: enqueue only -----------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now, step = int(time.time() * 1000), int(step or 0)
        key = self._mlflow_keys(metrics, "metric")
        items = [[key[k], float(v), now, step] for k, v in metrics.items() if step > self._stored.get(key[k], -1)]
        for i in range(0, len(items), MAX_METRICS):
            self._put({"op": "metrics", "items": items[i:i + MAX_METRICS]})

    def log_params(self, params: dict[str, Any]) -> None:
        key = self._mlflow_keys(params, "param")
        items = [[key[k], fit_value(k, v, "param")] for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS):
            self._put({"op": "params", "items": items[i:i + MAX_PARAMS]})

    def set_tags(self, tags: dict[str, Any]) -> None:
        key = self._mlflow_keys(tags, "tag")
        items = [[key[k], fit_value(k, v, "tag")] for k, v in tags.items()]
        for i in range(0, len(items), MAX_TAGS):
            self._put({"op": "tags", "items": items[i:i + MAX_TAGS]})

    def _mlflow_keys(self, entries: dict, kind: str) -> dict[str, str]:
        """{our key: the key MLflow gets}; new renames are recorded in the run's RENAMED_TAG."""
        before = len(self._keys.renamed())
        key = self._keys.map(entries, kind)
        renamed = self._keys.renamed()
        if len(renamed) > before:
            self._put({"op": "tags", "items": [[RENAMED_TAG, fit_value(RENAMED_TAG, json.dumps(renamed), "tag")]]})
        return key

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

    def log_dataset(self, manifest, name: str, digest: str, context: str, split: str) -> None:
        """The rows of `split` of the prepared manifest as an MLflow dataset input of this run (the
        UI's Dataset column): named "<name> (<split>)", digest = the dataset hash, context =
        training | validation | test. (MLflow keeps one input per dataset and run, so each split
        is a dataset of its own.)"""
        entity = manifest_dataset(Path(manifest), f"{name} ({split})", digest, split)
        self._put({"op": "inputs", "dataset": entity, "context": context})

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
            if op.get("spooled") and not Path(op["path"]).exists():  # delivered (and cleared) before the restart
                continue
            self._put(op)

    def flush(self, timeout_s: float) -> bool:
        """Wait (retrying at once) until everything queued is delivered -> False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()  # cut a backoff sleep short
            while self._ops and self.fatal is None and time.monotonic() < deadline:
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
            from pipeline.tracking.backlog import spill

            path = spill(self.cfg, self.run_id, left, end_status, self._spool)
            why = ("the store could not be written" if self.fatal is not None
                   else f"MLflow {self.cfg.uri} still unreachable")
            log(f"{why}: {len(left)} undelivered call(s) for run {self.run_id} saved to {path}; the next "
                "mimflow command using this tracking URI delivers them")
        return delivered

    def _artifact_dir(self) -> str | None:
        """The run's artefact folder, when it is on this machine (to name it in an error)."""
        try:
            uri = self.client.get_run(self.run_id).info.artifact_uri
        except Exception:
            return None
        return uri.removeprefix("file://") if uri.startswith(("file:", "/")) else None

    # -- delivery ---------------------------------------------------------------------------------
    def _put(self, op: dict) -> None:
        with self._cond:
            if self.fatal is not None:
                raise self.fatal
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
                if is_transient(err):
                    if down_since is None:
                        down_since = time.monotonic()
                        log(f"MLflow {self.cfg.uri} unreachable ({type(err).__name__}); training goes on, "
                             f"{len(self._ops)} call(s) buffered, retrying with backoff")
                    with self._cond:
                        if not self._closed:
                            self._cond.wait(timeout=backoff)
                    backoff = min(2 * backoff, self.cfg.retry_max_backoff_s)
                    continue
                local = local_error(err, self.cfg.uri, where=self._artifact_dir())
                if local is not None:  # this machine's disk or permissions: stop, and say where
                    log(str(local))
                    with self._cond:
                        self.fatal = local
                        self._cond.notify_all()
                    return
                log(f"MLflow refused {batch[0]['op']} for run {self.run_id}, dropped: "
                     f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
            with self._cond:
                for op in batch:
                    if self._ops and self._ops[0] is op:  # close() may have taken them meanwhile
                        self._ops.popleft()
                self._cond.notify_all()
            if down_since is not None:
                log(f"MLflow {self.cfg.uri} reachable again after {time.monotonic() - down_since:.0f} s; "
                     f"delivering {len(self._ops)} buffered call(s)")
                down_since, backoff = None, 0.5


def deliver(client: MlflowClient, run_id: str, batch: list[dict]) -> None:
    """One request for a batch of queued calls. Raises what is worth retrying (is_transient)
    and an artefact refusal; a metric, param or tag MLflow refuses is dropped alone, with a
    message naming its key (log_entries), and the rest of its batch is delivered. A retried
    batch may resend entries: MLflow keeps one copy of an identical metric, param or tag,
    and artefacts are idempotent to resend."""
    op = batch[0]
    kind = op["op"]
    if kind == "metrics":
        log_entries(client, run_id, "metrics", [Metric(k, v, ts, step) for o in batch for k, v, ts, step in o["items"]])
    elif kind == "params":
        log_entries(client, run_id, "params", [Param(k, v) for k, v in op["items"]])
    elif kind == "tags":
        log_entries(client, run_id, "tags", [RunTag(k, v) for k, v in op["items"]])
    elif kind == "artifact":
        client.log_artifact(run_id, op["path"], op["artifact_path"])
        if op.get("spooled"):
            shutil.rmtree(Path(op["path"]).parent, ignore_errors=True)
    elif kind == "artifacts":
        client.log_artifacts(run_id, op["path"], op["artifact_path"])
    elif kind == "inputs":
        tags = [InputTag("mlflow.data.context", op["context"])]
        client.log_inputs(run_id, datasets=[DatasetInput(Dataset(**op["dataset"]), tags=tags)])
    else:
        raise ValueError(f"unknown tracker call {kind!r}")


def log_entries(client: MlflowClient, run_id: str, kind: str, entries: list) -> None:
    """log_batch(kind=entries); when MLflow refuses it (not an outage), each half again, down to
    single entries: one bad entry costs only itself, found in about 2 log2(n) requests.
    kind: "metrics" | "params" | "tags". A param whose value differs from the one the run
    already holds (a resumed run) keeps the old value; every other refused entry is dropped
    with a message naming its key and MLflow's reason. Transient errors propagate."""
    try:
        client.log_batch(run_id, **{kind: entries}, synchronous=True)
    except MlflowException as err:
        if is_transient(err) or local_error(err) is not None:  # an outage, or this machine's store
            raise
        if len(entries) > 1:
            half = len(entries) // 2
            log_entries(client, run_id, kind, entries[:half])
            log_entries(client, run_id, kind, entries[half:])
        elif kind == "params" and "Changing param values is not allowed" in str(err):
            log(f"run {run_id}: param {entries[0].key!r} differs from the value logged before the resume; "
                "kept the old one")
        else:
            log(f"MLflow refused {kind[:-1]} {entries[0].key!r} for run {run_id}, dropped: "
                f"{str(err).splitlines()[0][:300]}")


def manifest_dataset(manifest: Path, name: str, digest: str, split: str) -> dict:
    """An MLflow Dataset entity of a manifest's `split` rows, as a JSON-able dict (queued ops go
    into checkpoints). MLflow stores digests of at most 36 characters: the hash's first 16."""
    import warnings

    import mlflow.data
    import pandas as pd

    rows = pd.read_csv(manifest)
    with warnings.catch_warnings():  # source-type ambiguity and integer-column hints: not ours to fix
        warnings.simplefilter("ignore")
        entity = mlflow.data.from_pandas(rows[rows["split"] == split], source=str(manifest.resolve()), name=name,
                                         digest=digest[:16])._to_mlflow_entity()
    return {"name": entity.name, "digest": entity.digest, "source_type": entity.source_type,
            "source": entity.source, "schema": entity.schema, "profile": entity.profile}
