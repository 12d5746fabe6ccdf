"""The buffered MLflow tracker: ordered delivery, no duplicated steps after a resume, and a backlog
that outlives the process when the server stays away (replayed by the next command)."""
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.tracking.backlog import replay_backlog
from pipeline.tracking.delivery import MlflowTracker
from pipeline.tracking.runs import setup


@pytest.fixture
def store(tmp_path):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "art"),
                         backlog_dir=str(tmp_path / "backlog"), retry_max_backoff_s=0.2)
    exp = setup(cfg)
    client = MlflowClient(cfg.uri)
    return cfg, client, client.create_run(exp).info.run_id


def steps(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_calls_are_delivered_in_order_and_resumed_steps_are_not_sent_twice(store, tmp_path):
    cfg, client, run_id = store
    t = MlflowTracker(run_id, cfg)
    for s in (1, 2, 3):
        t.log_metrics({"loss": float(s)}, step=s)
    t.log_params({"a": 1})
    assert t.close(timeout_s=30)
    resumed = MlflowTracker(run_id, cfg, stored_steps={"loss": 3})  # what tracked_run reads when reopening
    resumed.restore_pending([{"op": "metrics", "items": [["loss", 3.0, 0, 3]]}])  # delivered before the kill
    for s in (2, 3, 4):  # replayed steps since the checkpoint, then a new one
        resumed.log_metrics({"loss": 10.0 * s}, step=s)
    resumed.log_params({"a": 2})  # a changed param after a resume is reported, not fatal
    assert resumed.close(timeout_s=30)
    assert steps(client, run_id, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert client.get_run(run_id).data.params["a"] == "1"


def test_what_cannot_be_delivered_is_spilled_and_replayed_by_the_next_command(store, tmp_path, monkeypatch):
    cfg, client, run_id = store
    t = MlflowTracker(run_id, cfg)

    def down(*args, **kwargs):
        raise ConnectionError("server down")

    monkeypatch.setattr(t.client, "log_batch", down)
    monkeypatch.setattr(t.client, "log_artifact", down)
    figure = tmp_path / "figure.png"
    figure.write_bytes(b"png")
    t.log_metrics({"loss": 1.0}, step=1)
    t.log_artifact(figure, "plots")
    figure.unlink()  # the tracker keeps its own copy until delivered
    t.log_metrics({"loss": 2.0}, step=2)
    assert [op["op"] for op in t.pending()] == ["metrics", "artifact", "metrics"]  # what a checkpoint keeps
    assert not t.close(timeout_s=1.0, end_status="FINISHED")
    backlog = list((tmp_path / "backlog").glob("*.json"))
    assert len(backlog) == 1 and steps(client, run_id, "loss") == []

    assert replay_backlog(cfg) == 3  # e.g. at the start of the next mimflow command
    assert steps(client, run_id, "loss") == [(1, 1.0), (2, 2.0)]
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/figure.png"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not list((tmp_path / "backlog").glob("*.json"))
