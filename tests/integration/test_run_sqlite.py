"""`mimflow run` end to end on the real Landsat data with the embedded SQLite store."""
import json
from pathlib import Path

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


def registered_arm(client) -> tuple[str, str]:
    """(finetune stage, evaluate stage) of the arm the run registered."""
    arm = runs_by_name(client)["landsat_tiny"].data.tags["mimflow.registered_arm"]
    return ("finetune", "evaluate") if arm == "pretrained" else ("finetune_scratch", "evaluate_scratch")


def test_registered_model_has_alias_lineage_and_predicts_raw_tiles(tiny_run):
    tmp, proc = tiny_run
    client = MlflowClient()
    runs = runs_by_name(client)
    finetune, evaluate = registered_arm(client)
    assert f"register: the {runs['landsat_tiny'].data.tags['mimflow.registered_arm']} classifier (validation " \
           "balanced accuracy" in proc.stdout and "cannot tell small differences apart" in proc.stdout
    version = client.get_model_version_by_alias("landsat-tiny", "candidate")
    expected_pretrain = runs["pretrain"].info.run_id if finetune == "finetune" else "none"
    assert version.tags["pretrain_run_id"] == expected_pretrain
    assert version.tags["finetune_run_id"] == runs[finetune].info.run_id
    assert len(version.tags["dataset_hash"]) == 64
    assert "Test metrics: accuracy" in version.description and "classes" in version.description.lower()
    model = mlflow.pyfunc.load_model("models:/landsat-tiny@candidate")
    images, labels, _ = held_out(tmp / "data" / "landsat_landcover")
    probs = model.predict(images.astype(np.float32))
    classes = json.loads((tmp / "data" / "landsat_landcover" / "dataset.json").read_text())["classes"]
    assert list(probs.columns) == classes  # the output names the classes
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    # raw tiles through the registered model == the evaluate stage on the same tiles
    accuracy = float((probs.to_numpy().argmax(1) == labels).mean())
    assert accuracy == pytest.approx(runs[evaluate].data.metrics["test/accuracy"], abs=1e-6)


def test_registered_model_rejects_wrong_input_with_its_own_short_message(tiny_run):
    model = mlflow.pyfunc.load_model("models:/landsat-tiny@candidate")
    with pytest.raises(Exception) as err:
        model.predict(np.zeros((2, 3, 16, 16), np.float32))
    msg = str(err.value)
    assert "expected images of shape [N, 5, H, W] (channels ['B1_blue'" in msg and len(msg) < 400


def test_arms_log_the_same_metric_keys_told_apart_by_run_name_and_tags(tiny_run):
    client = MlflowClient()
    runs = runs_by_name(client)
    for name, arm in (("finetune", "pretrained"), ("finetune_scratch", "scratch")):
        assert runs[name].data.tags["mimflow.arm"] == arm
        assert client.get_metric_history(runs[name].info.run_id, "finetune/loss")
        assert "val/balanced_accuracy" in runs[name].data.metrics


def test_the_ui_shows_a_training_experiment_its_datasets_and_models(tiny_run):
    client = MlflowClient()
    exp = client.get_experiment_by_name("mimflow")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI overview
    runs = runs_by_name(client)
    digest = json.loads((tiny_run[0] / "data" / "landsat_landcover" / "dataset.json").read_text())["dataset_hash"]
    for name, contexts in (("pretrain", {"training"}), ("finetune", {"training", "validation"}),
                           ("evaluate", {"test"})):
        inputs = client.get_run(runs[name].info.run_id).inputs.dataset_inputs
        assert all(i.dataset.name.startswith("landsat_landcover (") for i in inputs)
        assert {i.dataset.digest for i in inputs} == {digest[:16]}
        assert {t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context"} == contexts
    finetune, evaluate = registered_arm(client)
    made = client.get_run(runs[finetune].info.run_id).outputs.model_outputs
    scored = client.get_run(runs[evaluate].info.run_id).inputs.model_inputs
    assert made and scored and made[0].model_id == scored[0].model_id


def test_quiet_logs_have_no_mlflow_info_no_colour_no_progress_bars(tiny_run):
    _, proc = tiny_run
    both = proc.stdout + proc.stderr
    assert " INFO mlflow" not in both and "\x1b[" not in both and "Downloading artifacts" not in both
    assert "\r" not in both and "Add type hints" not in both and "Successfully registered" not in both
    assert "stages: prepare" in proc.stdout  # per-stage wall times in the summary


def test_the_same_command_again_reports_the_finished_run(tiny_run):
    tmp, first = tiny_run
    client = MlflowClient()
    before = len(client.search_runs([client.get_experiment_by_name("mimflow").experiment_id]))
    again = mimflow("run", str(TINY), *tiny_overrides(tmp), "finetune.compare_scratch=true", cwd=tmp)
    assert "run 'landsat_tiny' finished before with this config" in again.stdout
    assert "registered model: models:/landsat-tiny@candidate" in again.stdout  # its results, printed again
    assert len(client.search_runs([client.get_experiment_by_name("mimflow").experiment_id])) == before
    assert [int(v.version) for v in client.search_model_versions("name='landsat-tiny'")] == [1]


def test_evaluate_and_register_take_a_registered_model_uri(tiny_run):
    tmp, _ = tiny_run
    client = MlflowClient()
    _, evaluate = registered_arm(client)
    proc = mimflow("evaluate", str(TINY), *tiny_overrides(tmp), "--classifier", "models:/landsat-tiny@candidate",
                   "run.name=from_uri", cwd=tmp)
    printed = json.loads(proc.stdout[proc.stdout.index("{\n"):proc.stdout.rindex("}") + 1])
    assert printed["test/accuracy"] == pytest.approx(runs_by_name(client)[evaluate].data.metrics["test/accuracy"])


def test_a_changed_config_starts_a_new_run_named_with_a_suffix_and_says_why(tiny_run):
    """Not quiet and not a terminal: one line per epoch, no progress-bar residue."""
    tmp, _ = tiny_run
    proc = mimflow("run", str(TINY), *tiny_overrides(tmp), "finetune.compare_scratch=false", "pretrain.epochs=1",
                   "finetune.epochs=1", "run.quiet=false", "register.model_name=landsat-tiny-2", cwd=tmp)
    assert "run 'landsat_tiny' finished with another config (" in proc.stdout
    assert "pretrain.epochs: 2 -> 1" in proc.stdout and "this is run 'landsat_tiny-2'" in proc.stdout
    assert "pretrain epoch 1/1  pretrain/epoch_loss" in proc.stdout and "\r" not in proc.stdout + proc.stderr
    assert (tmp / "runs" / "landsat_tiny-2" / "run.json").is_file()
    assert "landsat_tiny-2" in runs_by_name(MlflowClient())


def test_the_registered_model_answers_over_http_as_it_does_in_process(tiny_run):
    """`mlflow models serve -m models:/...@candidate --env-manager local` on 127.0.0.1 (the README's call)."""
    import os
    import sys

    import requests

    from conftest import _free_port, http_process

    tmp, _ = tiny_run
    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` runs uvicorn by name
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/landsat-tiny@candidate",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with http_process(cmd, f"http://127.0.0.1:{port}/ping", tmp, tmp / "serve.log", env):
        images = held_out(tmp / "data" / "landsat_landcover")[0][:6].astype(np.float32)
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": images.tolist()}, timeout=60)
        assert answer.status_code == 200, answer.text[:2000]
        over_http = answer.json()["predictions"]
        wrong = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": images[:, :3].tolist()},
                              timeout=60)
    in_process = mlflow.pyfunc.load_model("models:/landsat-tiny@candidate").predict(images)
    assert [list(row) for row in over_http] == [list(in_process.columns)] * len(images)  # class names
    np.testing.assert_allclose([[row[c] for c in in_process.columns] for row in over_http],
                               in_process.to_numpy(), rtol=1e-5, atol=1e-6)
    assert wrong.status_code >= 400 and "expected images of shape [N, 5, H, W]" in wrong.text
    assert "Failed to predict data" not in wrong.text and len(wrong.text) < 5000  # not the input dumped back


def test_unknown_key_fails_before_anything_runs(tmp_path):
    proc = mimflow("run", str(TINY), "pretrain.epochz=3", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "pretrain.epochz: unknown key" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()
