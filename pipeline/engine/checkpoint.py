"""Weights as safetensors + meta.json, written atomically; the one place files of weights are touched."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
META = "meta.json"


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) then fsync + rename: a kill mid-write never leaves a broken file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save_weights(state: dict[str, torch.Tensor], directory: str | Path, meta: dict) -> Path:
    """-> directory holding model.safetensors and meta.json (meta gains git_sha)."""
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    _atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, tmp))
    meta = {**meta, "git_sha": meta.get("git_sha") or git_sha()}
    _atomic_write(directory / META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return directory


def load_weights(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """safetensors only: loading never executes pickled code."""
    directory = Path(directory)
    for name in (WEIGHTS, META):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: no {name} (expected a mimflow weights folder)")
    return load_file(directory / WEIGHTS), json.loads((directory / META).read_text())
