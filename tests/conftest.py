"""Shared fixtures: the real bundled dataset prepared once, MLflow stores and a real server."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import requests

# One torch thread per process (inherited by every CLI subprocess and torchrun rank): the tests'
# debug-size models are dominated by per-op overhead, and on a 2-core machine whose other core is
# busy a second thread mostly waits for it (measured here: a debug ViT step 15 ms on one thread,
# 1.1 s on two; ViT-S 1.8x faster on one, scripts/bench_pretrain.py --threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "debug" / "landsat_tiny.yaml"


_STORE_TEMPLATE: list[Path] = []


def seed_sqlite_store(path: Path) -> None:
    """Copy an empty, already-migrated MLflow SQLite store to `path` (unless one is there): creating
    the tables costs ~3 s per fresh store, paid once per session instead of once per CLI run."""
    if path.exists():
        return
    if not _STORE_TEMPLATE:
        import tempfile

        from mlflow.tracking import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()  # runs MLflow's migrations
        _STORE_TEMPLATE.append(template)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_STORE_TEMPLATE[0], path)


def tiny_overrides(tmp: Path, tracking_uri: str | None = None) -> list[str]:
    """Overrides that keep every output of a tiny run inside `tmp` (with a ready SQLite store)."""
    if tracking_uri is None:
        seed_sqlite_store(tmp / "mlflow.db")
    uri = tracking_uri or f"sqlite:///{tmp / 'mlflow.db'}"
    return [f"run.output_dir={tmp / 'runs'}", f"tracking.uri={uri}",
            f"tracking.artifact_location={tmp / 'mlartifacts'}", f"data.root={tmp / 'data'}"]


@pytest.fixture(scope="session")
def prepared_landsat(tmp_path_factory) -> Path:
    """The real Landsat-7 task, cut with the tiny config's options, once per session."""
    from pipeline.config import load_config
    from pipeline.stages.prepare import _build

    root = tmp_path_factory.mktemp("prepared")
    cfg = load_config(TINY, [f"data.root={root}"])
    out = root / cfg.data.dataset
    _build(cfg, out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def http_process(cmd: list[str], url: str, cwd: Path, log_path: Path, env: dict | None = None,
                 timeout: float = 180) -> Iterator[subprocess.Popen]:
    """A server process (an `mlflow server`, an `mlflow models serve`) that answers `url` with 200
    before the block runs, and is stopped after it."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[2:5]} exited: {log_path.read_text()[-2000:]}")
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout} s")
            time.sleep(1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on 127.0.0.1 with a SQLite store -> its http URI."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    with http_process(cmd, f"{uri}/health", root, root / "server.log", timeout=120):
        yield uri


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread. Two threads on a loaded 2-core machine cost ~80x here
    (every small op waits for the second thread to be scheduled)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
