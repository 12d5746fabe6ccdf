"""Issue 12 end to end with the real CLI: the bundled multi-label Landsat task through register, and
the ChestX-ray14 and BigEarthNet data cards on small files written in their real formats. Each
registered model's predictions on the raw held-out images reproduce the metrics evaluate logged."""
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from card_files import write_ben_patch, write_chestxray
from conftest import REPO, tiny_overrides
from helpers import mimflow, runs_by_name
from pipeline.data.labels import label_matrix
from pipeline.data.manifest import load_manifest, read_record, select
from pipeline.metrics import multilabel_metrics

pytestmark = pytest.mark.slow
RECIPE = REPO / "configs" / "debug" / "landsat_multilabel_tiny.yaml"
REPRODUCED = ("macro_auroc", "micro_auroc", "map", "macro_f1", "micro_f1", "example_f1", "hamming_loss",
              "subset_accuracy", "labels_scored")


def registered(tmp: Path, name: str):
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    try:
        return mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    finally:
        mlflow.set_tracking_uri(None)


def assert_registered_model_reproduces_evaluate(tmp: Path, prepared: Path, name: str, evaluate_run) -> dict:
    """The registered model on raw test images -> per-label probabilities and label sets that give
    exactly the logged test metrics; -> the version's tags."""
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    version = client.get_model_version_by_alias(name, "candidate")
    labels, thresholds = json.loads(version.tags["labels"]), json.loads(version.tags["thresholds"])
    model = registered(tmp, name)
    outputs = [s.name for s in model.metadata.signature.outputs.inputs]
    assert version.tags["task"] == "multilabel" and outputs == [*labels, "predicted_labels"]
    records = select(load_manifest(prepared / "manifest.csv"), "test")
    out = model.predict(np.stack([read_record(r) for r in records]).astype(np.float32))  # raw units
    probs = out[labels].to_numpy()
    cut = np.array([thresholds[c] for c in labels])
    assert [set(s) for s in out["predicted_labels"]] == [{c for c, p, t in zip(labels, row, cut) if p >= t}
                                                         for row in probs]
    m = multilabel_metrics(probs, label_matrix(records, len(labels)), list(cut))
    m["labels_scored"] = len(labels) - len(m["unscored"])
    logged = evaluate_run.data.metrics
    for key in REPRODUCED:
        assert m[key] == pytest.approx(logged[f"test/{key}"], abs=1e-5), key
    return version.tags


def test_bundled_multilabel_task_through_register(tmp_path):
    # register.arm=pretrained: the registered model is the one `evaluate` (not `evaluate_scratch`) scored
    proc = mimflow("run", str(RECIPE), *tiny_overrides(tmp_path), "register.arm=pretrained", cwd=tmp_path, timeout=900)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = runs_by_name(client)
    assert {"prepare", "pretrain", "finetune", "evaluate", "finetune_scratch", "evaluate_scratch", "register"} <= set(runs)
    prepared = tmp_path / "data" / "landsat_landcover"
    info = json.loads((prepared / "dataset.json").read_text())
    assert info["task"] == "multilabel" and info["label_rule"].startswith("every land-cover class covering")
    ft = runs["finetune"]
    assert ft.data.params["finetune.task_resolved"] == "multilabel"
    assert {f"pos_weight.{c}" for c in info["classes"]} <= set(ft.data.params)
    assert client.get_metric_history(ft.info.run_id, "val/map") and "val/best_map" in ft.data.metrics
    meta = json.loads((tmp_path / "runs" / "landsat_multilabel_tiny" / "finetune" / "classifier" / "meta.json")
                      .read_text())
    assert meta["task"] == "multilabel" and len(meta["thresholds"]) == len(info["classes"]) == meta["num_classes"]
    ev = runs["evaluate"]
    figures = {a.path for a in client.list_artifacts(ev.info.run_id, "evaluation")}
    assert figures == {"evaluation/metrics.json", "evaluation/roc_per_label.png",
                       "evaluation/label_cooccurrence_errors.png"}
    for arm in ("init=pretrained", "init=scratch"):  # the closing table compares both arms
        assert any(line.strip().startswith(arm) for line in proc.stdout.splitlines())
    assert "map" in proc.stdout and "hamming_loss" in proc.stdout
    tags = assert_registered_model_reproduces_evaluate(tmp_path, prepared, "landsat-multilabel-tiny", ev)
    assert tags["pretrain_run_id"] == runs["pretrain"].info.run_id and json.loads(tags["labels"]) == info["classes"]


def _common(tmp: Path, name: str) -> list[str]:
    return [*tiny_overrides(tmp), f"run.name={name}", "run.quiet=true", "run.device=cpu", "model.backbone=vit_debug",
            "model.img_size=16", "model.patch_size=4", "finetune.init=scratch", "finetune.compare_scratch=false",
            "finetune.epochs=2", "finetune.batch_size_per_device=16", "finetune.label_fraction=1.0",
            "finetune.label_smoothing=0", "data.allow_missing_classes=true", "register.allow_missing_classes=true",
            f"register.model_name={name}"]


def _check_unscored_reported(tmp: Path, name: str, prepared: Path, ev) -> dict:
    """Labels without a test positive are named as not scored, and the macro means skip them."""
    report = json.loads((tmp / "runs" / name / "evaluate" / "metrics.json").read_text())
    info = json.loads((prepared / "dataset.json").read_text())
    y = label_matrix(select(load_manifest(prepared / "manifest.csv"), "test"), len(info["classes"]))
    absent = [c for c, n in zip(info["classes"], y.sum(0)) if n == 0]
    assert ev.data.metrics["test/labels_scored"] == sum(0 < n < len(y) for n in y.sum(0))
    for row in report["per_label"]:
        if row["label"] in absent:
            assert any(f.startswith("not scored (no positive in test)") for f in row["flags"]), row
            assert f"test/auroc_{row['label']}" not in ev.data.metrics
    if absent:
        assert "not scored: " + f"{absent[0]} (no positive in test)" in report["macro_over"]
    return report


CXR_FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def test_chestxray14_card_end_to_end(tmp_path):
    rows = []
    for p in range(1, 43):  # 42 patients, 1-2 images each; every 5th "No Finding"
        findings = "No Finding" if p % 5 == 0 else f"{CXR_FINDINGS[p % 14]}|{CXR_FINDINGS[(3 * p + 1) % 14]}"
        rows.append((f"{p:08d}_000.png", findings, str(p), "PA"))
        if p % 3 == 0:
            rows.append((f"{p:08d}_001.png", findings.split("|")[0], str(p), "AP"))
    rng = np.random.default_rng(0)
    write_chestxray(tmp_path / "src", rows, rgba=rows[3][0], pixels=lambda i, row: rng.integers(0, 256, (32, 32),
                                                                                                 dtype=np.uint8))
    name = "cxr-tiny"
    mimflow("run", "data.dataset=chestxray14", "data.augment=medical",
            f"data.options={{src_dir: {tmp_path / 'src'}, official_split: false, split_fractions: [0.6, 0.2, 0.2]}}",
            *_common(tmp_path, name), cwd=tmp_path, timeout=900)
    runs = runs_by_name(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    prepared = tmp_path / "data" / "chestxray14"
    records = load_manifest(prepared / "manifest.csv")
    assert any(r.label == -1 and r.split != "unlabelled" for r in records)  # "No Finding": an empty set, trained on
    patients = {}
    for r in records:
        assert patients.setdefault(r.group, r.split) == r.split  # no patient straddles splits
    _check_unscored_reported(tmp_path, name, prepared, runs["evaluate"])
    tags = assert_registered_model_reproduces_evaluate(tmp_path, prepared, name, runs["evaluate"])
    assert json.loads(tags["labels"]) == CXR_FINDINGS


BEN_LABELS = [["Coniferous forest", "Water bodies"], ["Discontinuous urban fabric", "Pastures"],
              ["Broad-leaved forest", "Coniferous forest"], ["Non-irrigated arable land"], ["Pastures", "Water bodies"],
              ["Non-irrigated arable land", "Broad-leaved forest", "Pastures"]]


def test_bigearthnet_card_end_to_end(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(36):  # 12 km apart: each patch is its own spatial group
        write_ben_patch(tmp_path / "src", f"S2A_MSIL2A_20170613T101031_{i}_0", BEN_LABELS[i % 6], 400000 + 12000 * i,
                        bands=lambda band, size: rng.integers(200, 3000, (size, size), dtype=np.uint16))
    name = "ben-tiny"
    mimflow("run", "data.dataset=bigearthnet", f"data.options={{src_dir: {tmp_path / 'src'}, size: 16}}",
            *_common(tmp_path, name), cwd=tmp_path, timeout=900)
    runs = runs_by_name(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    prepared = tmp_path / "data" / "bigearthnet"
    report = _check_unscored_reported(tmp_path, name, prepared, runs["evaluate"])
    assert runs["evaluate"].data.metrics["test/labels_scored"] <= 6 < len(report["classes"]) == 19
    tags = assert_registered_model_reproduces_evaluate(tmp_path, prepared, name, runs["evaluate"])
    assert "Land principally occupied by agriculture, with significant areas of natural vegetation" in \
        json.loads(tags["labels"])  # a name with a comma survives as JSON


def test_distilled_deit_learns_from_a_multilabel_teacher(tmp_path):
    """A ResNet teacher trained on the same multi-label task; the DeiT's distillation head learns the
    teacher's predicted label sets at the teacher's own thresholds."""
    mimflow("run", str(RECIPE), *tiny_overrides(tmp_path), "run.name=ml_deit", "model.backbone=deit_debug",
            "finetune.init=scratch", "finetune.compare_scratch=false", "finetune.distillation.teacher=train",
            "finetune.distillation.teacher_backbone=resnet_debug", "register.model_name=ml-deit", cwd=tmp_path,
            timeout=900)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = runs_by_name(client)
    folder = tmp_path / "runs" / "ml_deit"
    teacher = json.loads((folder / "teacher" / "classifier" / "meta.json").read_text())
    student = json.loads((folder / "finetune" / "classifier" / "meta.json").read_text())
    assert teacher["task"] == student["task"] == "multilabel" and len(teacher["thresholds"]) == 5
    assert student["teacher_run_id"] == runs["teacher"].info.run_id
    for key in ("finetune/loss_cls", "finetune/loss_distill", "finetune/teacher_agreement"):
        history = client.get_metric_history(runs["finetune"].info.run_id, key)
        assert history and all(np.isfinite(m.value) for m in history), key
    assert 0 <= runs["evaluate_teacher"].data.metrics["test/macro_auroc"] <= 1
    assert_registered_model_reproduces_evaluate(tmp_path, tmp_path / "data" / "landsat_landcover", "ml-deit",
                                                runs["evaluate"])
