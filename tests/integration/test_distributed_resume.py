"""2 real CPU processes (torchrun + gloo): cross-rank agreement, rank 0 alone writing, kill + resume."""
import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY, tiny_overrides
from helpers import REPO, runs_by_name
from resume_helpers import TORCHRUN, checkpoint_index, encoder, history, ok, pretrain_args, run_cli

pytestmark = pytest.mark.slow
HERE = REPO / "tests" / "integration"


def test_ranks_agree_on_metrics_nonfinite_skips_and_preemption(tmp_path):
    report = tmp_path / "report.json"
    ok(run_cli([str(report), str(tmp_path / "ck")], cwd=tmp_path, launcher=TORCHRUN + [str(HERE / "ddp_checks.py")]))
    r = json.loads(report.read_text())
    assert r["world"] == 2
    # every logged step's loss is the mean over both ranks (which saw different data), and so is the epoch's
    assert r["reduce"]["ranks_differ"] and r["reduce"]["max_step_error"] < 1e-6 and r["reduce"]["epoch_error"] < 1e-6
    # a NaN on rank 1 alone skips that step everywhere: no update, both ranks still identical
    assert r["nonfinite"]["skipped_on_this_rank"] == 1 and r["nonfinite"]["step2_unchanged"]
    assert r["nonfinite"]["rank_diff"] == 0.0
    # SIGTERM on rank 1 alone: both stop after the same step; one checkpoint with both ranks' RNG states
    assert r["sigterm"]["stopped_at"] == [3, 3]
    assert r["sigterm"]["checkpoint_step"] == 3 and r["sigterm"]["rng_ranks"] == 2 and r["sigterm"]["rng_differ"]


def test_only_rank_0_writes_files_in_a_two_process_pipeline(tmp_path):
    work, reports = tmp_path / "work", tmp_path / "reports"
    work.mkdir()
    args = [str(reports), str(work), "run", str(TINY), *tiny_overrides(work), "finetune.compare_scratch=false",
            "checkpoint.every_steps=1", f"tracking.backlog_dir={work / 'backlog'}"]
    ok(run_cli(args, cwd=work, launcher=TORCHRUN + [str(HERE / "audited_cli.py")], timeout=600))
    rank0 = json.loads((reports / "rank0.json").read_text())
    rank1 = json.loads((reports / "rank1.json").read_text())
    kinds0 = {e for e, _ in rank0}
    assert {"tempfile.mkstemp", "os.rename", "sqlite3.connect"} <= kinds0  # the audit sees rank 0's writes...
    assert any("checkpoints" in p for _, p in rank0) and any("encoder" in p for _, p in rank0)
    assert rank1 == []  # ...and rank 1 wrote nothing: no file, no checkpoint, no MLflow store access


def test_two_process_kill_and_resume_matches_the_uninterrupted_run(prepared_landsat, tmp_path):
    # 32 per device x 2 ranks: 5 steps per epoch, steps 1..10; checkpoints every 2 steps
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref.mkdir(), cut.mkdir()
    overrides = ("pretrain.batch_size_per_device=32", "checkpoint.every_steps=2")
    ok(run_cli(pretrain_args(prepared_landsat, ref, *overrides), cwd=ref, launcher=TORCHRUN + ["-m", "pipeline.cli"]))
    args = pretrain_args(prepared_landsat, cut, *overrides)
    killed = run_cli(args, cwd=cut, launcher=TORCHRUN + ["-m", "pipeline.cli"], fault="pretrain:kill:8")
    assert killed.returncode != 0  # rank 0 SIGKILLed after step 8: torchrun tears the job down
    assert checkpoint_index(cut)["checkpoints"][-1]["step"] == 6  # epoch 2, one batch in
    resumed = ok(run_cli(args, cwd=cut, launcher=TORCHRUN + ["-m", "pipeline.cli"]))
    assert "(epoch 2, step 6, 1 batches into the epoch)" in resumed.stdout

    a, b = encoder(ref), encoder(cut)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    print(f"largest weight difference, 2 processes, resumed vs uninterrupted: {worst:.3g}")
    ra = runs_by_name(MlflowClient(f"sqlite:///{ref / 'mlflow.db'}"))["pretrain"]
    client = MlflowClient(f"sqlite:///{cut / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mimflow").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.params["world_size"] == "2"
    got = history(client, runs[0].info.run_id, "pretrain/loss")
    want = history(MlflowClient(f"sqlite:///{ref / 'mlflow.db'}"), ra.info.run_id, "pretrain/loss")
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 11))
    assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6)
