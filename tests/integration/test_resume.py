"""Kill a pretraining run at any moment, start the same command again: it ends as if never killed."""
import signal
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY, tiny_overrides
from helpers import runs_by_name
from resume_helpers import (checkpoint_index, encoder, history, ok, pretrain_args, run_cli, spawn_cli,
                            wait_for)

pytestmark = pytest.mark.slow
EVERY_2 = "checkpoint.every_steps=2"  # tiny config: 5 steps per epoch, 2 epochs -> steps 1..10


def client_for(tmp):
    return MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")


@pytest.fixture(scope="module")
def reference(prepared_landsat, tmp_path_factory):
    """The uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    ok(run_cli(pretrain_args(prepared_landsat, tmp, EVERY_2), cwd=tmp))
    run = runs_by_name(client_for(tmp))["pretrain"]
    return {"weights": encoder(tmp), "loss": history(client_for(tmp), run.info.run_id, "pretrain/loss")}


def assert_same_weights(weights, reference):
    assert weights.keys() == reference.keys()
    for k in reference:
        assert torch.equal(weights[k], reference[k]), k  # bit for bit


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_mid_epoch_then_resume_is_bitwise_the_uninterrupted_run(prepared_landsat, reference, tmp_path,
                                                                        workers):
    # data-loader workers change nothing: shuffles and augmentations depend on (seed, epoch, index)
    args = pretrain_args(prepared_landsat, tmp_path, EVERY_2, f"run.num_workers={workers}")
    killed = run_cli(args, cwd=tmp_path, fault="pretrain:kill:7")  # SIGKILL right after step 7
    assert killed.returncode == -signal.SIGKILL
    index = checkpoint_index(tmp_path)
    assert [c["step"] for c in index["checkpoints"]] == [5, 6] and not index["completed"]  # epoch 2, 1 batch in

    resumed = ok(run_cli(args, cwd=tmp_path))
    assert "resumed from" in resumed.stdout and "(epoch 2, step 6, 1 batches into the epoch)" in resumed.stdout
    assert_same_weights(encoder(tmp_path), reference["weights"])

    client = client_for(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("mimflow").experiment_id])
    assert [r.info.run_name for r in runs] == ["pretrain"]  # the same MLflow run, continued
    run = runs[0]
    assert run.info.status == "FINISHED"
    loss = history(client, run.info.run_id, "pretrain/loss")
    assert [s for s, _ in loss] == list(range(1, 11))  # every step once: none missing, none twice
    assert loss == reference["loss"]  # and the same values as without the kill
    assert [s for s, _ in history(client, run.info.run_id, "pretrain/epoch_loss")] == [1, 2]  # per epoch
    assert checkpoint_index(tmp_path)["completed"]


def test_sigterm_writes_a_checkpoint_exits_zero_and_resumes_exactly(prepared_landsat, reference, tmp_path):
    args = pretrain_args(prepared_landsat, tmp_path, EVERY_2, "checkpoint.sigterm_grace_s=20")
    stopped = run_cli(args, cwd=tmp_path, fault="pretrain:term:7")  # SIGTERM right after step 7
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "SIGTERM received" in stopped.stderr and "stopped on SIGTERM at step 7" in stopped.stderr
    assert checkpoint_index(tmp_path)["checkpoints"][-1]["step"] == 7  # written on the way out
    client = client_for(tmp_path)
    assert runs_by_name(client)["pretrain"].info.status == "KILLED"

    ok(run_cli(args, cwd=tmp_path))
    assert_same_weights(encoder(tmp_path), reference["weights"])
    run = runs_by_name(client)["pretrain"]
    assert run.info.status == "FINISHED"
    assert history(client, run.info.run_id, "pretrain/loss") == reference["loss"]


def test_an_external_sigterm_is_honoured_within_the_grace_period(prepared_landsat, tmp_path):
    grace = 15
    args = pretrain_args(prepared_landsat, tmp_path, EVERY_2, "pretrain.epochs=4",
                         f"checkpoint.sigterm_grace_s={grace}")
    proc = spawn_cli(args, cwd=tmp_path, fault="pretrain:sleep:0.2", log=tmp_path / "log.txt")  # >= 4 s of steps
    wait_for(lambda: checkpoint_index(tmp_path)["checkpoints"], 120, "the first checkpoint")
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=grace + 10) == 0
    assert time.time() - sent < grace
    stopped_at = checkpoint_index(tmp_path)["checkpoints"][-1]["step"]
    assert 2 <= stopped_at < 20

    ok(run_cli(args, cwd=tmp_path))
    client = client_for(tmp_path)
    run = runs_by_name(client)["pretrain"]
    assert [s for s, _ in history(client, run.info.run_id, "pretrain/loss")] == list(range(1, 21))


def test_a_changed_config_is_not_resumed_silently_and_resume_never_starts_over(prepared_landsat, tmp_path):
    args = pretrain_args(prepared_landsat, tmp_path, EVERY_2)
    assert run_cli(args, cwd=tmp_path, fault="pretrain:kill:3").returncode == -signal.SIGKILL
    changed = run_cli(args + ["pretrain.objective.mask_ratio=0.5"], cwd=tmp_path)
    assert changed.returncode == 1
    assert "different config (pretrain.objective.mask_ratio)" in changed.stderr and "checkpoint.resume=never" in changed.stderr
    fresh = ok(run_cli(args + ["pretrain.objective.mask_ratio=0.5", "checkpoint.resume=never"], cwd=tmp_path))
    assert "resumed from" not in fresh.stdout
    client = client_for(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("mimflow").experiment_id])
    # the killed run (reopened by the refused attempt, which failed it) and the fresh one
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]


def test_killed_pipeline_reopens_its_parent_and_child_runs(tmp_path):
    args = ["run", str(TINY), *tiny_overrides(tmp_path), "finetune.compare_scratch=false", EVERY_2,
            f"tracking.backlog_dir={tmp_path / 'backlog'}"]
    first = run_cli(args, cwd=tmp_path, fault="pretrain:kill:7")
    assert first.returncode == -signal.SIGKILL
    second = run_cli(args, cwd=tmp_path, fault="finetune:kill:4")  # pretrain finishes, fine-tuning dies
    assert second.returncode == -signal.SIGKILL
    assert "prepare: finished before the restart" in second.stdout
    third = ok(run_cli(args, cwd=tmp_path))
    assert "pretrain: finished before the restart" in third.stdout
    assert "registered model: models:/landsat-tiny@candidate" in third.stdout

    client = client_for(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("mimflow").experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(["landsat_tiny", "prepare", "pretrain", "finetune", "evaluate", "register"])
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["landsat_tiny"].info.run_id
    for name, run in by_name.items():
        assert run.info.status == "FINISHED", name
        if name != "landsat_tiny":
            assert run.data.tags["mlflow.parentRunId"] == parent
    assert [s for s, _ in history(client, by_name["pretrain"].info.run_id, "pretrain/loss")] == list(range(1, 11))
    ft = history(client, by_name["finetune"].info.run_id, "finetune/loss")
    assert [s for s, _ in ft] == sorted(set(s for s, _ in ft)) == list(range(1, len(ft) + 1))
    assert [s for s, _ in history(client, by_name["finetune"].info.run_id, "val/accuracy")] == [1, 2]


def test_a_flipped_newest_checkpoint_and_a_lost_index_still_resume_exactly(prepared_landsat, reference, tmp_path):
    """Bytes flipped in the newest checkpoint's tensors (a disk error after the commit) and
    index.json deleted: the index is rebuilt from the folders, the damaged folder is skipped by its
    checksum, and the run resumes from the one before, bit for bit the uninterrupted run."""
    args = pretrain_args(prepared_landsat, tmp_path, EVERY_2)
    assert run_cli(args, cwd=tmp_path, fault="pretrain:kill:7").returncode == -signal.SIGKILL
    root = tmp_path / "runs" / "landsat_tiny" / "pretrain" / "checkpoints"
    newest = root / checkpoint_index(tmp_path)["checkpoints"][-1]["dir"]
    data = bytearray((newest / "tensors.safetensors").read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # bits flipped; still parses: only the checksum can tell
    (newest / "tensors.safetensors").write_bytes(bytes(data))
    (root / "index.json").unlink()

    resumed = ok(run_cli(args, cwd=tmp_path))
    assert "index.json is missing: rebuilt from the 2 checkpoint folder(s)" in resumed.stderr
    assert "tensors.safetensors changed since it was written (sha256 mismatch)" in resumed.stderr
    assert "(epoch 2, step 5, 0 batches into the epoch)" in resumed.stdout  # the epoch-1 checkpoint
    assert_same_weights(encoder(tmp_path), reference["weights"])
