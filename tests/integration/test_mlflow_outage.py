"""A real `mlflow server` dies in the middle of a pretraining run and comes back on the same port
and store: training never stops, and every step's metric arrives exactly once."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from mlflow.tracking import MlflowClient

from resume_helpers import checkpoint_index, history, pretrain_args, spawn_cli, wait_for

pytestmark = pytest.mark.slow
STEPS = 40  # 8 epochs x 5 steps of the tiny config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root, port) -> subprocess.Popen:
    log = open(root / "server.log", "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def healthy():
        assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
        try:
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_for(healthy, 120, "mlflow server /health", interval=0.5)
    return proc


def kill_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the server and its workers, without warning
    proc.wait()


def test_training_survives_a_server_outage_and_loses_no_metric(prepared_landsat, tmp_path):
    store, work = tmp_path / "store", tmp_path / "work"
    store.mkdir(), work.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(store, port)
    args = pretrain_args(prepared_landsat, work, "pretrain.epochs=8", "checkpoint.every_steps=5",
                         "tracking.retry_max_backoff_s=2", uri=uri)
    log = work / "train.log"
    train = spawn_cli(args, cwd=work, fault="pretrain:sleep:0.25", log=log)  # >= 10 s of steps
    try:
        client = MlflowClient(uri)

        def pretrain_run():
            exp = client.get_experiment_by_name("mimflow")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            return runs[0] if runs else None

        run_id = wait_for(pretrain_run, 120, "the pretrain run").info.run_id
        wait_for(lambda: len(history(client, run_id, "pretrain/loss")) >= 3, 120, "the first metrics")
        kill_server(server)
        killed_at = time.time()
        # training goes on without the server: checkpoints keep coming
        start = max([c["step"] for c in checkpoint_index(work)["checkpoints"]], default=0)
        wait_for(lambda: max([c["step"] for c in checkpoint_index(work)["checkpoints"]], default=0) >= start + 10,
                 120, "training progress during the outage")
        assert train.poll() is None, log.read_text()[-3000:]
        assert time.time() - killed_at > 2
        server = start_server(store, port)  # same port, same store
        assert train.wait(timeout=300) == 0, log.read_text()[-5000:]
    finally:
        if train.poll() is None:
            train.kill()
        if server.poll() is None:
            kill_server(server)

    text = log.read_text()
    assert f"MLflow {uri} unreachable" in text and f"MLflow {uri} reachable again" in text
    local = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    run = local.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [s for s, _ in history(local, run_id, "pretrain/loss")] == list(range(1, STEPS + 1))
    assert [s for s, _ in history(local, run_id, "pretrain/epoch_loss")] == list(range(1, STEPS // 5 + 1))  # epochs
    assert run.data.params["pretrain.steps_per_epoch"] == "5"
    recon = sorted(p.name for p in (store / "artifacts").rglob("recon_epoch*.png"))
    assert recon == [f"recon_epoch{e:03d}.png" for e in range(1, 9)]  # every epoch's figure, too
    assert (next((store / "artifacts").rglob("encoder")) / "model.safetensors").is_file()
    assert not list((work / "backlog").glob("*.json"))  # nothing left undelivered
