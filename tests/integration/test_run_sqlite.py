"""`mimflow run` end to end on the real Landsat data with the embedded SQLite store."""
import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY, tiny_overrides
from helpers import held_out, mimflow, runs_by_name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sqlite_run")
    proc = mimflow("run", str(TINY), *tiny_overrides(tmp), "finetune.compare_scratch=true", cwd=tmp)
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    yield tmp, proc
    mlflow.set_tracking_uri(None)


def test_prints_model_uri_metrics_and_ui_command(tiny_run):
    _, proc = tiny_run
    out = proc.stdout
    assert "registered model: models:/landsat-tiny@candidate" in out
    assert "init=pretrained" in out and "init=scratch" in out and "balanced_accuracy" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out


def test_one_parent_run_with_a_child_per_stage(tiny_run):
    client = MlflowClient()
    runs = runs_by_name(client)
    parent = runs["landsat_tiny"]
    children = {"prepare", "pretrain", "finetune", "evaluate", "finetune_scratch", "evaluate_scratch", "register"}
    assert children <= set(runs)
    for name in children:
        assert runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert runs[name].info.status == "FINISHED"
    # the resolved config is logged as params and as a file
    assert parent.data.params["pretrain.objective.mask_ratio"] == "0.75"
    assert parent.data.params["model.backbone"] == "vit_debug"


def test_pretrain_logs_loss_per_step_reconstructions_and_encoder(tiny_run, tmp_path):
    client = MlflowClient()
    pre = runs_by_name(client)["pretrain"]
    history = client.get_metric_history(pre.info.run_id, "pretrain/loss")
    assert len(history) >= 2 and [m.step for m in history] == sorted(m.step for m in history)
    assert all(np.isfinite(m.value) for m in history)
    files = {a.path for a in client.list_artifacts(pre.info.run_id, "reconstructions")}
    assert "reconstructions/recon_epoch002.png" in files
    enc = mlflow.artifacts.download_artifacts(run_id=pre.info.run_id, artifact_path="encoder", dst_path=str(tmp_path))
    meta = json.loads(open(f"{enc}/meta.json").read())
    assert meta["in_chans"] == 5 and meta["channels"][0] == "B1_blue" and meta["stats"]["mean"]
    assert meta["config"]["pretrain"]["objective"]["mask_ratio"] == 0.75 and meta["git_sha"]


def test_evaluation_metrics_and_confusion_matrix_are_logged(tiny_run):
    client = MlflowClient()
    ev = runs_by_name(client)["evaluate"]
    for key in ("test/accuracy", "test/balanced_accuracy", "test/macro_f1", "test/macro_auroc",
                "test/auroc_forest"):
        assert 0.0 <= ev.data.metrics[key] <= 1.0
    files = {a.path for a in client.list_artifacts(ev.info.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/metrics.json"} <= files


def test_registered_model_has_alias_lineage_and_predicts_raw_tiles(tiny_run):
    tmp, _ = tiny_run
    client = MlflowClient()
    runs = runs_by_name(client)
    version = client.get_model_version_by_alias("landsat-tiny", "candidate")
    assert version.tags["pretrain_run_id"] == runs["pretrain"].info.run_id
    assert version.tags["finetune_run_id"] == runs["finetune"].info.run_id
    assert len(version.tags["dataset_hash"]) == 64
    model = mlflow.pyfunc.load_model("models:/landsat-tiny@candidate")
    images, labels, _ = held_out(tmp / "data" / "landsat_landcover")
    probs = model.predict(images.astype(np.float32))
    assert probs.shape == (len(labels), 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    # raw tiles through the registered model == the evaluate stage on the same tiles
    accuracy = float((probs.argmax(1) == labels).mean())
    assert accuracy == pytest.approx(runs["evaluate"].data.metrics["test/accuracy"], abs=1e-6)


def test_registered_model_rejects_wrong_input_clearly(tiny_run):
    model = mlflow.pyfunc.load_model("models:/landsat-tiny@candidate")
    with pytest.raises(Exception, match=r"shape|schema"):
        model.predict(np.zeros((2, 3, 16, 16), np.float32))


def test_unknown_key_fails_before_anything_runs(tmp_path):
    proc = mimflow("run", str(TINY), "pretrain.epochz=3", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "pretrain.epochz: unknown key" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()
