"""A real 2-process CPU run (torchrun + gloo + Accelerator(cpu=True))."""
import json
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY, tiny_overrides
from helpers import REPO, mimflow, runs_by_name

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_two_ranks_hold_identical_weights_after_training(prepared_landsat, tmp_path):
    report = tmp_path / "report.json"
    mimflow(str(prepared_landsat), str(report), str(TINY), cwd=tmp_path,
            launcher=TORCHRUN + [str(REPO / "tests" / "integration" / "ddp_step.py")])
    r = json.loads(report.read_text())
    assert r["world"] == 2
    for stage in ("pretrain", "simmim_swin", "beit", "tokenizer", "finetune", "swin"):  # 3 objectives, VQ-KD, 2 heads
        assert r[stage]["moved"] > 0  # the weights were trained...
        assert r[stage]["max_rank_diff"] == 0.0  # ...identically on both ranks
        assert r[stage]["distinct_batches"]  # while each rank read its own shard


def test_two_process_pipeline_logs_one_mlflow_run_tree(tmp_path):
    proc = mimflow("run", str(TINY), *tiny_overrides(tmp_path), "finetune.compare_scratch=false",
                   cwd=tmp_path, launcher=TORCHRUN + ["-m", "pipeline.cli"])
    assert proc.stdout.count("registered model: models:/landsat-tiny@candidate") == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mimflow")
    runs = client.search_runs([exp.experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(["landsat_tiny", "prepare", "pretrain", "finetune", "evaluate", "register"])
    pre = runs_by_name(client)["pretrain"]
    assert pre.data.params["world_size"] == "2"
    assert pre.data.params["pretrain.global_batch_size"] == "128"  # 64 per device x 2
