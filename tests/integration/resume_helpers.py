"""Helpers for the kill / resume / outage tests: CLI runs with fault injection, weights, metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from conftest import TINY, tiny_overrides
from helpers import REPO

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def env_with(fault: str | None = None, **extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}
    env.pop("MIMFLOW_TEST_FAULT", None)
    if fault:
        env["MIMFLOW_TEST_FAULT"] = fault
    return env


def pretrain_args(prepared: Path, tmp: Path, *overrides: str, uri: str | None = None) -> list[str]:
    """`mimflow pretrain` on the tiny config, everything kept inside `tmp`."""
    return ["pretrain", str(TINY), "--prepared", str(prepared), *tiny_overrides(tmp, uri),
            f"tracking.backlog_dir={tmp / 'backlog'}", *overrides]


def run_cli(args: list[str], cwd: Path, fault: str | None = None, launcher: list[str] | None = None,
            timeout: int = 300, **env) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable, "-m", "pipeline.cli"]) + args
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env_with(fault, **env))


def spawn_cli(args: list[str], cwd: Path, fault: str | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli"] + args, cwd=cwd, env=env_with(fault),
                            stdout=out, stderr=subprocess.STDOUT)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def encoder(tmp: Path, name: str = "landsat_tiny") -> dict:
    return load_file(tmp / "runs" / name / "pretrain" / "encoder" / "model.safetensors")


def checkpoint_index(tmp: Path, stage: str = "pretrain", name: str = "landsat_tiny") -> dict:
    path = tmp / "runs" / name / stage / "checkpoints" / "index.json"
    return json.loads(path.read_text()) if path.is_file() else {"checkpoints": []}


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
