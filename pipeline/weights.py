"""Weights folders (model.safetensors + meta.json), foreign torch files, and classifiers rebuilt
from their meta.json. Stages, tracking and the registered model all load weights through here.

Nothing here unpickles code: weights are safetensors plus JSON, and the only torch.load (foreign
.pt/.pth/.bin files) uses weights_only=True.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.fsutil import atomic_write, atomic_write_text, sha256_file
from pipeline.models.backbones import backbone_spec, classifier_names, create_backbone

WEIGHTS = "model.safetensors"
META = "meta.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class UnsafeCheckpointError(RuntimeError):
    """A file would need pickle code execution to load; it is refused, never run."""


class WeightsIntegrityError(ValueError):
    """A weights folder's model.safetensors is not the file its meta.json was written with."""


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save_weights(state: dict[str, torch.Tensor], directory: str | Path, meta: dict) -> Path:
    """-> directory holding model.safetensors and meta.json (meta gains git_sha and the weights'
    sha256, checked by every load)."""
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, tmp))
    meta = {**meta, "git_sha": meta.get("git_sha") or git_sha(), "weights_sha256": sha256_file(directory / WEIGHTS)}
    atomic_write_text(directory / META, json.dumps(meta, indent=2))
    return directory


def load_weights(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A mimflow weights folder (safetensors + meta.json), or a foreign .pt/.pth/.bin file
    (weights only, empty meta). Loading never executes pickled code.
    Raises FileNotFoundError naming what is missing, WeightsIntegrityError when the weights are not
    the bytes meta.json recorded, UnsafeCheckpointError for a file that is not plain weights."""
    directory = Path(directory)
    if directory.is_file() and directory.suffix in TORCH_SUFFIXES:
        return foreign_state(directory), {}
    if directory.is_file() and directory.suffix == ".safetensors":  # e.g. timm's released weights
        return load_file(directory), {}
    meta = verify_weights(directory)
    return load_file(directory / WEIGHTS), meta


def verify_weights(directory: str | Path) -> dict:
    """Check a weights folder against the sha256 its meta.json recorded -> meta.
    Raises FileNotFoundError or WeightsIntegrityError naming the path."""
    directory = Path(directory)
    for name in (WEIGHTS, META):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: no {name} (expected a mimflow weights folder)")
    meta = json.loads((directory / META).read_text())
    expected = meta.get("weights_sha256")
    if expected is not None and sha256_file(directory / WEIGHTS) != expected:
        raise WeightsIntegrityError(f"{directory / WEIGHTS}: changed since it was written (sha256 mismatch "
                                    "with meta.json); it cannot be trusted")
    return meta


def read_meta(directory: str | Path) -> dict:
    """meta.json of a weights folder ({} for a foreign file)."""
    path = Path(directory) / META
    return json.loads(path.read_text()) if path.is_file() else {}


def foreign_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a torch file, also inside {"model": ...} (MAE's and DeiT's releases),
    {"state_dict": ...} (Lightning, DDP scripts) or {"module": ...} (DeepSpeed)."""
    obj = load_torch_file(path)
    for key in ("model", "state_dict", "module"):
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


# -- classifiers ---------------------------------------------------------------------------------

def add_probe_head(model: nn.Module, backbone: str) -> nn.Module:
    """MAE's linear-probe head: each classifier Linear becomes BatchNorm1d(affine=False) + Linear
    (He et al. 2021, main_linprobe.py), so the frozen features are standardised per dimension."""
    for name in classifier_names(model, backbone_spec(backbone)):
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = getattr(owner, leaf)
        setattr(owner, leaf, nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear))
    return model


def build_classifier(meta: dict, drop_path_rate: float = 0.0) -> nn.Module:
    """The classifier a meta.json describes (backbone, geometry, classes, head), freshly initialised.
    Raises KeyError naming an unknown backbone."""
    model = create_backbone(meta["backbone"], meta["img_size"], meta.get("patch_size") or 1, meta["in_chans"],
                            num_classes=meta["num_classes"], window_size=meta.get("window_size"),
                            drop_path_rate=drop_path_rate)
    if meta.get("head") == "probe":
        add_probe_head(model, meta["backbone"])
    return model


def load_classifier(directory: str | Path) -> tuple[nn.Module, dict]:
    """A classifier weights folder -> (model in eval mode, meta). The weights must fit exactly."""
    state, meta = load_weights(directory)
    if meta.get("kind") != "classifier":
        raise ValueError(f"{directory}: a {meta.get('kind', 'foreign')!r} weights folder, not a classifier")
    model = build_classifier(meta)
    model.load_state_dict(state)  # strict: a classifier folder must match exactly
    return model.eval(), meta
