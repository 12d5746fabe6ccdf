"""The pipeline against a real `mlflow server` over HTTP, then the registered model from it."""
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY, tiny_overrides
from helpers import held_out, mimflow, runs_by_name

pytestmark = pytest.mark.slow


def test_pipeline_over_http_and_load_candidate(mlflow_server, tmp_path):
    mimflow("run", str(TINY), *tiny_overrides(tmp_path, mlflow_server), "finetune.compare_scratch=false",
            "register.model_name=landsat-http", cwd=tmp_path)
    client = MlflowClient(mlflow_server)
    runs = runs_by_name(client)
    assert {"landsat_tiny", "prepare", "pretrain", "finetune", "evaluate", "register"} <= set(runs)
    mlflow.set_tracking_uri(mlflow_server)
    try:
        model = mlflow.pyfunc.load_model("models:/landsat-http@candidate")
        images, labels, _ = held_out(tmp_path / "data" / "landsat_landcover")
        probs = model.predict(images.astype(np.float32))
    finally:
        mlflow.set_tracking_uri(None)
    assert probs.shape == (len(labels), 4)
    accuracy = float((probs.to_numpy().argmax(1) == labels).mean())
    assert accuracy == pytest.approx(runs["evaluate"].data.metrics["test/accuracy"], abs=1e-6)
    version = client.get_model_version_by_alias("landsat-http", "candidate")
    assert version.tags["finetune_run_id"] == runs["finetune"].info.run_id
    assert list(probs.columns)[0] == "developed"  # outputs named by class
    # what the UI shows, read from the server: a model-training experiment, datasets, model links
    assert client.get_experiment_by_name("mimflow").tags["mlflow.experimentKind"] == "custom_model_development"
    contexts = {t.value for i in client.get_run(runs["finetune"].info.run_id).inputs.dataset_inputs
                for t in i.tags if t.key == "mlflow.data.context"}
    assert contexts == {"training", "validation"}
    made = client.get_run(runs["finetune"].info.run_id).outputs.model_outputs
    assert made and made[0].model_id == client.get_run(runs["evaluate"].info.run_id).inputs.model_inputs[0].model_id


def test_unreachable_server_is_named_at_start(tmp_path):
    uri = "http://127.0.0.1:9"  # discard port: nothing listens
    proc = mimflow("run", str(TINY), *tiny_overrides(tmp_path, uri), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert f"MLflow tracking server {uri} is unreachable" in proc.stderr
