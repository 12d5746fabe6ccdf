"""Weights and training checkpoints as safetensors + JSON, written atomically.

The one place files of weights are touched. Nothing here unpickles: checkpoints are safetensors
(no code) plus JSON, and the only torch.load (foreign .pt/.pth files) uses weights_only=True.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.fsutil import fsync_path

WEIGHTS = "model.safetensors"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
META = "meta.json"


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) then fsync + rename: a kill mid-write never leaves a broken file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would; mkstemp's 0600 hides results on shared disks
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


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
    """A mimflow weights folder (safetensors + meta.json), or a foreign .pt/.pth/.bin file
    (weights only, empty meta). Loading never executes pickled code."""
    directory = Path(directory)
    if directory.is_file() and directory.suffix in TORCH_SUFFIXES:
        return _foreign_state(directory), {}
    for name in (WEIGHTS, META):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: no {name} (expected a mimflow weights folder)")
    return load_file(directory / WEIGHTS), json.loads((directory / META).read_text())


# ---------------------------------------------------------------------------------------------
# Foreign torch files: the one place torch.load is called, and only with weights_only=True.

class UnsafeCheckpointError(RuntimeError):
    """A file would need pickle code execution to load; it is refused, never run."""


TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _foreign_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a torch file, also inside {"model": ...} (MAE's releases) or {"state_dict": ...}."""
    obj = load_torch_file(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UnsafeCheckpointError(f"{path}: not a state dict of tensors")
    return obj


def load_torch_file(path: str | Path) -> dict:
    """A torch-pickled file (.pt/.pth/.bin) loaded with weights_only=True: tensors and plain
    containers only. Anything else (e.g. a pickle whose __reduce__ runs code) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, ...: all mean "not plain weights"
        raise UnsafeCheckpointError(f"{path}: refused to load: it is not a plain-weights torch file "
                                    f"(torch.load weights_only=True said: {str(err).splitlines()[0]})") from None


# ---------------------------------------------------------------------------------------------
# Training checkpoints: a folder per checkpoint (tensors.safetensors + state.json) and one
# atomically replaced index.json listing them, newest last. "Latest" is read from the index,
# never from folder names; a folder appears in the index only after it was written completely.

INDEX = "index.json"
TENSORS = "tensors.safetensors"
STATE = "state.json"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the path."""


def flatten_state(tree, tensors: dict[str, torch.Tensor], prefix: str):
    """Nested dicts/lists with tensors -> JSON-able tree; tensors go to `tensors` under dotted keys.

    Tuples are kept (`{"__tuple__": [...]}`) so that e.g. AdamW's betas round-trip exactly.
    """
    if isinstance(tree, torch.Tensor):
        if prefix in tensors:  # dotted keys can collide ("a.b" + "c" vs "a" + "b.c"): the JSON holds the name
            prefix = f"{prefix}#{len(tensors)}"
        tensors[prefix] = tree.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        if not all(isinstance(k, (str, int)) for k in tree):
            raise TypeError(f"{prefix}: only str/int keys can be checkpointed, got {list(tree)[:3]}")
        return {"__dict__": [[k, flatten_state(v, tensors, f"{prefix}.{k}")] for k, v in tree.items()]}
    if isinstance(tree, tuple):
        return {"__tuple__": [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"{prefix}: cannot checkpoint a {type(tree).__name__} without pickle")


def unflatten_state(tree, tensors: dict[str, torch.Tensor]):
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__tuple__" in tree:
            return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in tree["__dict__"]}
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    return tree



class CheckpointDir:
    """<stage>/checkpoints: write, list, prune, read. Only rank 0 writes; every rank may read."""

    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    # -- the index ---------------------------------------------------------------------------
    def index(self) -> dict:
        path = self.root / INDEX
        if not path.is_file():
            return {"format": FORMAT, "checkpoints": [], "completed": False}
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}: unreadable checkpoint index ({err})") from None
        if index.get("format") != FORMAT:
            raise CheckpointError(f"{path}: checkpoint index format {index.get('format')!r}, expected {FORMAT}")
        return index

    def _write_index(self, index: dict) -> None:
        _atomic_write(self.root / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
        fsync_path(self.root)

    def clear(self) -> None:
        """Forget every checkpoint: a fresh start."""
        if self.root.exists():
            shutil.rmtree(self.root)

    def mark_completed(self, completed: bool = True) -> None:
        """A completed stage's checkpoints are kept for inspection but never auto-resumed."""
        index = self.index()
        index["completed"] = completed
        self._write_index(index)

    # -- writing -----------------------------------------------------------------------------
    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict) -> Path:
        """Write a checkpoint folder completely, then list it in the index, then prune."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step:09d}-{os.urandom(4).hex()}"  # unique: never overwritten
        tmp = self.root / f".tmp-{final.name}"
        tmp.mkdir()
        try:
            _atomic_write(tmp / TENSORS, lambda p: save_file(tensors, p))
            _atomic_write(tmp / STATE, lambda p: Path(p).write_text(json.dumps({"format": FORMAT, **state})))
            fsync_path(tmp)
            os.rename(tmp, final)
            fsync_path(self.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        index = self.index()
        index["completed"] = False
        index["checkpoints"] = [*index["checkpoints"], {"dir": final.name, "step": step,
                                                        "epoch": state.get("loop", {}).get("epoch")}]
        dropped = index["checkpoints"][:-self.keep_last]
        index["checkpoints"] = index["checkpoints"][-self.keep_last:]
        self._write_index(index)  # the commit point: before this, the new folder is invisible
        listed = {c["dir"] for c in index["checkpoints"]}
        for c in dropped:
            shutil.rmtree(self.root / c["dir"], ignore_errors=True)
        for leftover in self.root.iterdir():  # folders of writes killed before their commit point
            if leftover.is_dir() and leftover.name not in listed:
                shutil.rmtree(leftover, ignore_errors=True)
        return final

    # -- reading -----------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The newest listed checkpoint that reads back; older ones are fallbacks with a warning."""
        for entry in reversed(self.index()["checkpoints"]):
            path = self.root / entry["dir"]
            try:
                _check_readable(path)
                return path
            except CheckpointError as err:
                warnings.warn(f"skipping checkpoint: {err}", stacklevel=2)
        return None


def _check_readable(path: Path) -> None:
    for name in (TENSORS, STATE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: incomplete checkpoint, no {name}")
    try:
        json.loads((path / STATE).read_text())
        with safe_open(path / TENSORS, framework="pt") as f:
            f.keys()
    except Exception as err:  # a truncated or foreign file; safetensors never runs code
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors, state). safetensors + JSON only: reading a checkpoint never executes code."""
    path = Path(path)
    _check_readable(path)
    state = json.loads((path / STATE).read_text())
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT}")
    return load_file(path / TENSORS), state
