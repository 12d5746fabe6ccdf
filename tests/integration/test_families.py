"""End to end on the bundled Landsat data, one recipe per family (debug sizes): SimMIM + Swin ->
Swin classifier; MAE + ViT -> distilled DeiT with a ResNet-18 teacher; MAE -> linear probe;
MAE teacher -> VQ-KD tokenizer -> BEiT -> BEiT classifier.
Each registered pyfunc model predicts raw held-out tiles exactly as its evaluate stage scored them."""
import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, tiny_overrides
from helpers import held_out, mimflow, runs_by_name

pytestmark = pytest.mark.slow
DEBUG = REPO / "configs" / "debug"


def run_recipe(name: str, tmp, prepared, *overrides):
    """`mimflow run` of a debug recipe, on the session's prepared Landsat data -> (stdout, client)."""
    args = [*tiny_overrides(tmp), f"data.root={prepared.parent}", *overrides]
    proc = mimflow("run", str(DEBUG / f"{name}.yaml"), *args, cwd=tmp, timeout=600)
    return proc.stdout, MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")


def assert_registered_model_reproduces_evaluate(client, tmp, prepared, model_name, evaluate_run):
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model(f"models:/{model_name}@candidate")
    finally:
        mlflow.set_tracking_uri(None)
    images, labels, _ = held_out(prepared)
    probs = model.predict(images.astype(np.float32))
    assert probs.shape == (len(labels), 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    accuracy = float((probs.to_numpy().argmax(1) == labels).mean())
    assert accuracy == pytest.approx(evaluate_run.data.metrics["test/accuracy"], abs=1e-6)


def classifier_meta(tmp, run_name: str, stage: str) -> dict:
    return json.loads((tmp / "runs" / run_name / stage / "classifier" / "meta.json").read_text())


def test_simmim_swin_to_swin_classifier(prepared_landsat, tmp_path):
    out, client = run_recipe("landsat_simmim_swin_tiny", tmp_path, prepared_landsat, "finetune.compare_scratch=false")
    runs = runs_by_name(client)
    assert {"pretrain", "finetune", "evaluate", "register"} <= set(runs)
    pre = runs["pretrain"]
    assert pre.data.params["pretrain.objective.name"] == "simmim" and pre.data.params["model.backbone"] == "swin_debug"
    assert client.get_metric_history(pre.info.run_id, "pretrain/loss")
    assert "reconstructions/recon_epoch002.png" in {a.path for a in client.list_artifacts(pre.info.run_id,
                                                                                           "reconstructions")}
    encoder = json.loads((tmp_path / "runs" / "landsat_simmim_swin_tiny" / "pretrain" / "encoder" / "meta.json")
                         .read_text())
    assert encoder["objective"] == "simmim" and encoder["family"] == "swin" and encoder["window_size"] == 4
    assert classifier_meta(tmp_path, "landsat_simmim_swin_tiny", "finetune")["backbone"] == "swin_debug"
    version = client.get_model_version_by_alias("landsat-simmim-swin-tiny", "candidate")
    assert version.tags["backbone"] == "swin_debug" and version.tags["pretrain_run_id"] == pre.info.run_id
    assert_registered_model_reproduces_evaluate(client, tmp_path, prepared_landsat, "landsat-simmim-swin-tiny",
                                                runs["evaluate"])


def test_mae_vit_to_distilled_deit_with_a_resnet18_teacher(prepared_landsat, tmp_path):
    out, client = run_recipe("landsat_deit_tiny", tmp_path, prepared_landsat)
    runs = runs_by_name(client)
    assert {"pretrain", "teacher", "evaluate_teacher", "finetune", "evaluate", "register"} <= set(runs)
    assert "teacher resnet18" in out  # the teacher's test metrics are printed beside the student's
    for key in ("test/accuracy", "test/balanced_accuracy"):
        assert 0 <= runs["evaluate_teacher"].data.metrics[key] <= 1
    assert runs["teacher"].data.tags["mimflow.arm"] == "teacher"
    student = runs["finetune"]
    for key in ("finetune/loss_cls", "finetune/loss_distill", "finetune/teacher_agreement"):
        assert client.get_metric_history(student.info.run_id, key), key
    meta = classifier_meta(tmp_path, "landsat_deit_tiny", "finetune")
    assert meta["backbone"] == "deit_debug" and meta["teacher_run_id"] == runs["teacher"].info.run_id
    assert classifier_meta(tmp_path, "landsat_deit_tiny", "teacher")["backbone"] == "resnet18"
    version = client.get_model_version_by_alias("landsat-deit-tiny", "candidate")
    assert version.tags["teacher_run_id"] == runs["teacher"].info.run_id
    assert_registered_model_reproduces_evaluate(client, tmp_path, prepared_landsat, "landsat-deit-tiny",
                                                runs["evaluate"])


def test_linear_probe_trains_only_the_head(prepared_landsat, tmp_path):
    out, client = run_recipe("landsat_probe_tiny", tmp_path, prepared_landsat, "finetune.compare_scratch=false")
    runs = runs_by_name(client)
    assert "(probe)" in out and runs["finetune"].data.params["finetune.mode"] == "probe"
    from safetensors.torch import load_file

    run_dir = tmp_path / "runs" / "landsat_probe_tiny"
    encoder = load_file(run_dir / "pretrain" / "encoder" / "model.safetensors")
    classifier = load_file(run_dir / "finetune" / "classifier" / "model.safetensors")
    assert {k for k in classifier if k not in encoder} == {"head.0.running_mean", "head.0.running_var",
                                                           "head.0.num_batches_tracked", "head.1.weight",
                                                           "head.1.bias"}
    for k, v in encoder.items():
        assert np.array_equal(classifier[k].numpy(), v.numpy()), k  # the encoder did not move
    assert classifier_meta(tmp_path, "landsat_probe_tiny", "finetune")["head"] == "probe"
    assert_registered_model_reproduces_evaluate(client, tmp_path, prepared_landsat, "landsat-probe-tiny",
                                                runs["evaluate"])


def test_beit_with_a_tokenizer_learned_on_the_pool(prepared_landsat, tmp_path):
    from pipeline.engine.checkpoint import CheckpointDir, read_checkpoint, unflatten_state
    from pipeline.stages.tokenizer import weights_sha256
    from pipeline.tracking.artifacts import fetch

    out, client = run_recipe("landsat_beit_tiny", tmp_path, prepared_landsat, "finetune.compare_scratch=false")
    runs = runs_by_name(client)
    assert {"teacher_pretrain", "tokenizer", "pretrain", "finetune", "evaluate", "register"} <= set(runs)
    tok = runs["tokenizer"]
    for key in ("codebook/perplexity", "codebook/usage", "codebook/dead_codes", "codebook/recon_loss"):
        assert [m.step for m in client.get_metric_history(tok.info.run_id, key)] == [1, 2], key  # per epoch
    assert client.get_metric_history(tok.info.run_id, "codebook/perplexity")[-1].value > 1
    assert tok.data.tags["mimflow.codebook_collapse"] == "false"
    assert "token_maps/token_maps_epoch002.png" in {a.path for a in client.list_artifacts(tok.info.run_id, "token_maps")}
    assert "codes used, perplexity" in out
    run_dir = tmp_path / "runs" / "landsat_beit_tiny"
    meta = json.loads((run_dir / "tokenizer" / "tokenizer" / "meta.json").read_text())
    assert meta["kind"] == "tokenizer" and meta["tokenizer_kind"] == "vqkd" and meta["architecture"]["codebook_size"] == 16
    assert meta["teacher"]["pretrain_run_id"] == runs["teacher_pretrain"].info.run_id
    # the registered tokenizer is the logged folder
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        fetched = fetch("models:/landsat-beit-tiny-tokenizer@candidate", "tokenizer")
    finally:
        mlflow.set_tracking_uri(None)
    assert weights_sha256(fetched) == weights_sha256(run_dir / "tokenizer" / "tokenizer")

    pre = runs["pretrain"]
    accuracy = client.get_metric_history(pre.info.run_id, "pretrain/token_accuracy")
    assert accuracy and all(0 <= m.value <= 1 for m in accuracy)
    assert "token_predictions/tokens_epoch002.png" in {a.path for a in client.list_artifacts(pre.info.run_id,
                                                                                              "token_predictions")}
    # the checkpoint holds the tokenizer's reference and hash, not its weights
    tensors, state = read_checkpoint(CheckpointDir(run_dir / "pretrain" / "checkpoints").latest())
    shared = unflatten_state(state["tree"], tensors)["shared"]
    assert set(shared["model"]) >= {"mask_token", "lm_head.weight"}
    assert not any("tokenizer" in k or "quantizer" in k for k in shared["model"])
    assert shared["tokenizer"]["sha256"] == weights_sha256(run_dir / "tokenizer" / "tokenizer")
    encoder = json.loads((run_dir / "pretrain" / "encoder" / "meta.json").read_text())
    assert encoder["objective"] == "beit" and encoder["family"] == "beit"
    assert encoder["tokenizer"]["run_id"] == tok.info.run_id
    clf = classifier_meta(tmp_path, "landsat_beit_tiny", "finetune")
    assert clf["backbone"] == "beit_debug" and clf["pretrain_run_id"] == pre.info.run_id
    assert runs["finetune"].data.params["finetune.optimizer.layer_decay"] == "0.65"  # BEiT's recipe
    version = client.get_model_version_by_alias("landsat-beit-tiny", "candidate")
    assert version.tags["backbone"] == "beit_debug" and version.tags["pretrain_run_id"] == pre.info.run_id
    assert_registered_model_reproduces_evaluate(client, tmp_path, prepared_landsat, "landsat-beit-tiny",
                                                runs["evaluate"])
