"""Training checkpoint folders as safetensors + JSON, written atomically and checksummed
(weights folders: pipeline/weights.py).

A folder holds tensors.safetensors, state.json and checksums.json (the sha256 of both), written
completely before index.json lists it. Reading verifies the checksums: a folder whose bytes changed
after it was written (a flipped bit, a truncated copy) is skipped with a warning and the previous
one is used, as a folder that does not parse is. A lost index.json is rebuilt from the folders'
own state.json. Nothing here unpickles: checkpoints are safetensors (no code) plus JSON.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.fsutil import atomic_write, atomic_write_text, fsync_path, sha256_file

# A folder per checkpoint (tensors.safetensors + state.json) and one
# atomically replaced index.json listing them, newest last. "Latest" is read from the index,
# never from folder names; a folder appears in the index only after it was written completely.

INDEX = "index.json"
TENSORS = "tensors.safetensors"
STATE = "state.json"
CHECKSUMS = "checksums.json"
FORMAT = 2  # 2: a tree of named components (Checkpointer states)


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
        """The index; when index.json is gone but checkpoint folders are there, rebuilt from
        their own state.json (in memory: the next save writes it)."""
        path = self.root / INDEX
        if not path.is_file():
            return self._rebuilt_index()
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}: unreadable checkpoint index ({err})") from None
        if index.get("format") != FORMAT:
            raise CheckpointError(f"{path}: checkpoint index format {index.get('format')!r}, expected {FORMAT}")
        return index

    def _rebuilt_index(self) -> dict:
        entries = []
        for folder in sorted(self.root.glob("step_*")) if self.root.is_dir() else []:
            try:
                state = json.loads((folder / STATE).read_text())
                entries.append({"dir": folder.name, "step": state["step"], "epoch": state.get("epoch")})
            except (OSError, ValueError, KeyError):
                continue  # not a checkpoint folder (or a damaged one): never listed, never deleted here
        if entries:
            warnings.warn(f"{self.root / INDEX} is missing: rebuilt from the {len(entries)} checkpoint "
                          "folder(s) found there", stacklevel=3)
        return {"format": FORMAT, "checkpoints": sorted(entries, key=lambda e: e["step"]), "completed": False}

    def _write_index(self, index: dict) -> None:
        atomic_write(self.root / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
        fsync_path(self.root)

    def clear(self) -> None:
        """Forget every checkpoint: a fresh start."""
        if self.root.exists():
            shutil.rmtree(self.root)

    def reopen(self) -> None:
        """A completed stage's output must be made again: its newest checkpoint becomes resumable
        (training resumes at its end, so nothing is trained twice)."""
        if (self.root / INDEX).is_file():
            self.mark_completed(False)

    def mark_completed(self, completed: bool = True) -> None:
        """A completed stage's checkpoints are kept for inspection but never auto-resumed."""
        index = self.index()
        index["completed"] = completed
        self._write_index(index)

    # -- writing -----------------------------------------------------------------------------
    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict) -> Path:
        """Write a checkpoint folder completely, then list it in the index, then prune."""
        self.root.mkdir(parents=True, exist_ok=True)
        index = self.index()  # before the new folder exists (a lost index is rebuilt from the others)
        final = self.root / f"step_{step:09d}-{os.urandom(4).hex()}"  # unique: never overwritten
        tmp = self.root / f".tmp-{final.name}"
        tmp.mkdir()
        try:
            atomic_write(tmp / TENSORS, lambda p: save_file(tensors, p))
            atomic_write_text(tmp / STATE, json.dumps({"format": FORMAT, "step": step, **state}))
            sums = {name: sha256_file(tmp / name) for name in (TENSORS, STATE)}  # what is on disk now
            atomic_write_text(tmp / CHECKSUMS, json.dumps(sums))
            fsync_path(tmp)
            os.rename(tmp, final)
            fsync_path(self.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        index["completed"] = False
        index["checkpoints"] = [*index["checkpoints"], {"dir": final.name, "step": step,
                                                        "epoch": state.get("loop", {}).get("epoch"),
                                                        "sha256": sums}]
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
    """Complete, unchanged since it was written (checksums), and parseable; else CheckpointError."""
    for name in (TENSORS, STATE, CHECKSUMS):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: incomplete checkpoint, no {name}")
    try:
        sums = json.loads((path / CHECKSUMS).read_text())
        changed = [name for name in (TENSORS, STATE) if sha256_file(path / name) != sums.get(name)]
        if changed:
            raise CheckpointError(f"{path}: {', '.join(changed)} changed since it was written (sha256 mismatch)")
        json.loads((path / STATE).read_text())
        with safe_open(path / TENSORS, framework="pt") as f:
            f.keys()
    except CheckpointError:
        raise
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
