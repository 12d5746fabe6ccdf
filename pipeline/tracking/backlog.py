"""The backlog: what a stage could not deliver to MLflow before it ended, kept in
`tracking.backlog_dir` and delivered by the next mimflow command that uses the same tracking URI."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.fsutil import atomic_write_text
from pipeline.tracking.delivery import deliver
from pipeline.tracking.retry import is_transient, log


def spill(cfg: TrackingConfig, run_id: str, ops: list[dict], end_status: str | None,
          spool: Path | None = None) -> Path:
    """Keep undelivered calls (and the snapshots of files they log, moved out of `spool`) in
    backlog_dir -> the backlog file, written whole then renamed: never half a file."""
    path = Path(cfg.backlog_dir) / f"{run_id}-{time.time_ns()}.json"
    kept = Path(cfg.backlog_dir) / "spool" / run_id
    for op in ops:
        if op.get("spooled") and spool is not None and Path(op["path"]).is_relative_to(spool):
            target = kept / Path(op["path"]).relative_to(spool)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(op["path"], target)
            op["path"] = str(target)
    atomic_write_text(path, json.dumps({"uri": cfg.uri, "run_id": run_id, "end_status": end_status, "ops": ops}))
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
                if is_transient(err):
                    raise
                log(f"backlog {path.name}: {op['op']} refused, dropped: {err}")
            done += 1
        if record.get("end_status"):
            client.set_terminated(record["run_id"], record["end_status"])
        path.unlink()
        log(f"delivered the tracking backlog {path} ({len(record['ops'])} calls) to run {record['run_id']}")
    return done


def stored_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """Metric key -> the last step the server holds for it (what a resumed run must not resend)."""
    keys = client.get_run(run_id).data.metrics.keys()
    return {k: max((m.step for m in client.get_metric_history(run_id, k)), default=-1) for k in keys}
