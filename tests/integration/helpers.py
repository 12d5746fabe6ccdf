"""Run the real CLI in a subprocess and read back what it left in MLflow."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def mimflow(*args: str, cwd: Path, timeout: int = 300, launcher: list[str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable, "-m", "pipeline.cli"]) + list(args)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def runs_by_name(client, experiment: str = "mimflow") -> dict:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return {r.info.run_name: r for r in runs}


def held_out(prepared: Path, split: str = "test") -> tuple[np.ndarray, np.ndarray, list]:
    """Raw (unnormalised) held-out tiles [N, C, H, W] and labels, straight from the manifest."""
    from pipeline.data.manifest import load_manifest, select
    from pipeline.data.readers import read_image

    recs = select(load_manifest(prepared / "manifest.csv"), split)
    return np.stack([read_image(r.path) for r in recs]), np.array([r.label for r in recs]), recs
