"""Integrity under faults, injected into real small runs: one writer per run, checksummed weights,
a register that is safe to repeat, and local disk/permission/store errors that fail fast."""
import json
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY, tiny_overrides
from helpers import runs_by_name
from resume_helpers import ok, pretrain_args, run_cli, spawn_cli, wait_for

pytestmark = pytest.mark.slow


def lock_holder(tmp, name="landsat_tiny") -> dict:
    path = tmp / "runs" / name / ".mimflow.lock"
    try:
        return json.loads(path.read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return {}


def test_a_second_writer_of_the_same_run_is_refused_at_once_naming_the_holder(prepared_landsat, tmp_path):
    args = pretrain_args(prepared_landsat, tmp_path, "pretrain.epochs=50", "checkpoint.sigterm_grace_s=20")
    first = spawn_cli(args, cwd=tmp_path, fault="pretrain:sleep:0.5", log=tmp_path / "first.log")  # minutes
    try:
        holder = wait_for(lambda: lock_holder(tmp_path), 300, "the first command's lock")
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = run_cli(args, cwd=tmp_path)
        assert first.poll() is None  # refused while the first still writes, not after it
        assert second.returncode == 1
        assert f"is being written by PID {first.pid} on {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        # another run on the same store and data is fine while the first one writes
        other = ok(run_cli(["prepare", str(TINY), *tiny_overrides(tmp_path), "run.name=other",
                            f"data.root={prepared_landsat.parent}"], cwd=tmp_path))
        assert "being written" not in other.stderr
        first.send_signal(signal.SIGTERM)  # a clean stop (checkpoint, exit 0) releases the lock
        assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert lock_holder(tmp_path) == {}  # released on a clean exit
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [r.info.run_name for r in client.search_runs([client.get_experiment_by_name("mimflow").experiment_id])
            if r.info.run_name == "pretrain"] == ["pretrain"]  # the refused writer made no run


def test_a_pipeline_with_a_corrupted_finished_encoder_redoes_it_from_its_checkpoint(tmp_path):
    """Killed in fine-tuning after pretraining finished, the encoder's bytes flipped on disk: the
    restart does not skip pretraining on broken weights, nor train it again; and it takes over the
    dead process's lock, saying from whom."""
    args = ["run", str(TINY), *tiny_overrides(tmp_path), "finetune.compare_scratch=false",
            f"tracking.backlog_dir={tmp_path / 'backlog'}"]
    killed = run_cli(args, cwd=tmp_path, fault="finetune:kill:2")
    assert killed.returncode == -signal.SIGKILL
    dead = lock_holder(tmp_path)
    encoder = tmp_path / "runs" / "landsat_tiny" / "pretrain" / "encoder"
    good = json.loads((encoder / "meta.json").read_text())["weights_sha256"]
    data = bytearray((encoder / "model.safetensors").read_bytes())
    data[-20:] = bytes(b ^ 0xFF for b in data[-20:])  # the last tensor's bits flipped: still a readable file
    (encoder / "model.safetensors").write_bytes(bytes(data))

    done = ok(run_cli(args, cwd=tmp_path))
    assert "took over the lock of run 'landsat_tiny'" in done.stderr and f"PID {dead['pid']}" in done.stderr
    assert "pretrain: its recorded result failed verification" in done.stdout
    assert "pretrain: resumed from" in done.stdout and "(epoch 3, step 10, 0 batches into the epoch)" in done.stdout
    from pipeline.fsutil import sha256_file

    assert sha256_file(encoder / "model.safetensors") == good  # rewritten from the final checkpoint
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    pre = runs_by_name(client)["pretrain"]
    steps = [m.step for m in client.get_metric_history(pre.info.run_id, "pretrain/loss")]
    assert steps == list(range(1, 11))  # no step trained (or logged) twice


def test_finetuning_from_a_changed_weights_folder_fails_naming_it(prepared_landsat, tmp_path):
    from pipeline.models.backbones import create_encoder
    from pipeline.weights import save_weights

    folder = save_weights(create_encoder("vit_debug", 16, 4, 5).state_dict(), tmp_path / "enc", {"kind": "encoder"})
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[-4:] = b"\xff\xff\xff\x7f"
    (folder / "model.safetensors").write_bytes(bytes(raw))
    proc = run_cli(["finetune", str(TINY), "--prepared", str(prepared_landsat), "--init", str(folder),
                    *tiny_overrides(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"mimflow: {folder / 'model.safetensors'}: changed since it was written" in proc.stderr


@pytest.fixture
def classifier(prepared_landsat, tmp_path):
    from pipeline.data.manifest import load_dataset_info
    from pipeline.data.stats import load_stats
    from pipeline.models.backbones import create_backbone
    from pipeline.weights import save_weights

    info, stats = load_dataset_info(prepared_landsat), load_stats(prepared_landsat / "stats.json")
    meta = {"kind": "classifier", "backbone": "vit_debug", "img_size": 16, "patch_size": 4, "in_chans": 5,
            "channels": stats["channels"], "stats": stats, "classes": info["classes"],
            "num_classes": len(info["classes"]), "finetune_run_id": "f" * 32}
    torch.manual_seed(0)
    return save_weights(create_backbone("vit_debug", 16, 4, 5, num_classes=len(info["classes"])).state_dict(),
                        tmp_path / "clf", meta)


def test_register_killed_after_the_version_exists_completes_it_on_rerun(prepared_landsat, classifier, tmp_path):
    args = ["register", str(TINY), "--prepared", str(prepared_landsat), "--classifier", str(classifier),
            *tiny_overrides(tmp_path)]
    killed = run_cli(args, cwd=tmp_path, fault="register:kill:1")
    assert killed.returncode == -signal.SIGKILL
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    versions = client.search_model_versions("name='landsat-tiny'")
    assert len(versions) == 1 and not client.get_registered_model("landsat-tiny").aliases  # no alias yet

    again = ok(run_cli(args, cwd=tmp_path))
    assert "already holds these weights; completing it" in again.stdout
    ok(run_cli(args, cwd=tmp_path))  # and once more: still one version
    versions = client.search_model_versions("name='landsat-tiny'")
    assert len(versions) == 1
    v = client.get_model_version_by_alias("landsat-tiny", "candidate")
    assert v.version == versions[0].version and v.tags["finetune_run_id"] == "f" * 32


@contextmanager
def small_fs(path, size="64k", read_only=False):
    """A real tmpfs at `path` (full or read-only on demand); skips where mounting is not allowed."""
    path.mkdir(parents=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path):
    """Use up every byte of the file system at `path`."""
    with open(path / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_a_local_artifact_store_problem_fails_fast_naming_the_path_not_as_an_outage(prepared_landsat, tmp_path,
                                                                                      fault):
    with small_fs(tmp_path / "store", read_only=fault == "read-only") as store:
        if fault == "full":
            fill(store)
        started = time.time()
        proc = run_cli(pretrain_args(prepared_landsat, tmp_path, f"tracking.artifact_location={store / 'art'}"),
                       cwd=tmp_path)
        assert proc.returncode == 1 and time.time() - started < 400  # not tracking.flush_timeout_s (600 s) + the run
        what = "read-only file system" if fault == "read-only" else "no space left on the device"
        assert f"mimflow: cannot write MLflow data at {store / 'art'}" in proc.stderr and what in proc.stderr
        assert "unreachable" not in proc.stderr and "Traceback" not in proc.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert runs_by_name(client)["pretrain"].info.status == "FAILED"


def test_an_unwritable_backlog_dir_does_not_matter_while_the_server_is_healthy(prepared_landsat, tmp_path):
    with small_fs(tmp_path / "backlog", read_only=True) as backlog:
        proc = ok(run_cli(pretrain_args(prepared_landsat, tmp_path) + [f"tracking.backlog_dir={backlog}"],
                          cwd=tmp_path))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = runs_by_name(client)["pretrain"]
    assert run.info.status == "FINISHED" and "unreachable" not in proc.stderr
    assert {a.path for a in client.list_artifacts(run.info.run_id, "reconstructions")}  # files were logged


def test_a_full_output_folder_is_one_line_naming_the_path(prepared_landsat, tmp_path):
    with small_fs(tmp_path / "out") as out:
        fill(out)
        proc = run_cli(pretrain_args(prepared_landsat, tmp_path, f"run.output_dir={out}"), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"mimflow: {out}" in proc.stderr and "no space left on the device" in proc.stderr


def test_a_damaged_sqlite_store_is_one_line_naming_it(tmp_path):
    (tmp_path / "mlflow.db").write_bytes(b"this is no SQLite database" * 100)
    proc = run_cli(["prepare", str(TINY), f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                    f"data.root={tmp_path / 'data'}", f"run.output_dir={tmp_path / 'runs'}"], cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"mimflow: MLflow store sqlite:///{tmp_path / 'mlflow.db'}: file is not a database" in proc.stderr


def test_recipes_with_yaml_errors_or_nothing_in_them_are_refused(tmp_path):
    bad, empty = tmp_path / "bad.yaml", tmp_path / "empty.yaml"
    bad.write_text("run:\n  name: [unclosed\n")
    empty.write_text("# only a comment\n")
    for recipe, expected in ((bad, f"{bad}: line 3, column 1: not valid YAML"), (empty, f"{empty}: the recipe is empty")):
        proc = run_cli(["run", str(recipe)], cwd=tmp_path)
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything ran


def test_weights_and_checkpoints_are_written_readable_by_others(tmp_path):
    from pipeline.engine.checkpoint import CheckpointDir
    from pipeline.weights import save_weights

    old = os.umask(0o022)
    try:
        folder = save_weights({"w": torch.zeros(2)}, tmp_path / "w", {})
        ck = CheckpointDir(tmp_path / "ck").save(1, {"w": torch.zeros(2)}, {"loop": {"epoch": 1}})
    finally:
        os.umask(old)
    for path in (folder / "model.safetensors", folder / "meta.json", ck / "tensors.safetensors", ck / "state.json"):
        assert oct(path.stat().st_mode & 0o777) == "0o644", path


def test_a_classifier_that_never_saw_a_class_is_not_registered_unless_allowed(prepared_landsat, classifier,
                                                                              tmp_path):
    meta = json.loads((classifier / "meta.json").read_text())
    meta["train_class_counts"] = {c: (0 if i == 1 else 5) for i, c in enumerate(meta["classes"])}
    (classifier / "meta.json").write_text(json.dumps(meta))
    args = ["register", str(TINY), "--prepared", str(prepared_landsat), "--classifier", str(classifier),
            *tiny_overrides(tmp_path)]
    refused = run_cli(args, cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"never saw class(es) ['{meta['classes'][1]}'] in training" in refused.stderr
    allowed = ok(run_cli(args + ["register.allow_missing_classes=true"], cwd=tmp_path))
    # the fixture's fine-tune run lives in no store: registered all the same, and said
    assert f"run {'f' * 32} is not in this tracking store" in allowed.stdout
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_model_version_by_alias("landsat-tiny", "candidate")
