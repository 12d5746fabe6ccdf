"""Move encoder weights into a classifier (or an encoder), checking that exactly the head (and the
family's declared additions, e.g. DeiT's distillation token) is left to train: MAE's fine-tuning
contract.

Weights from elsewhere come in many layouts. As timm's checkpoint filters do, `clean_encoder_state`
brings the kinds we know to the model's: wrapper prefixes (DDP's `module.`, torch.compile's
`_orig_mod.`, trainers' `model.`), a full masked-image-modelling checkpoint that still holds its
decoder (official MAE; mimflow's own MAE module), a head from another task (a 1000-class ImageNet
head, DeiT's two heads), the pooling norm of a checkpoint fine-tuned with average pooling
(`fc_norm` instead of `norm`), and a distillation token a plain ViT has no place for. What is left
must fit; otherwise the refusal names what differs, summarised by pattern.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import nn

from pipeline.models.backbones import BackboneSpec, classifier_names, head_keys

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, Lightning-style trainers
ENCODER_PREFIXES = ("backbone.vit.", "encoder.", "backbone.")  # an MIM module's encoder inside it
DECODER_PREFIXES = ("decoder", "mask_token")  # official MAE: decoder_embed, decoder_blocks, ...
HEAD_NAMES = ("head", "head_dist")  # timm's head names, also when the model's differ


class Transfer(NamedTuple):
    fresh: set[str]  # keys left at their initialisation (head, additions)
    notes: list[str]  # what was adapted, in words (for the console and MLflow)


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def clean_encoder_state(state: dict[str, torch.Tensor], model: nn.Module,
                        spec: BackboneSpec) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A foreign or full checkpoint's state -> (the encoder state for `model`, notes)."""
    state, notes = dict(state), []
    target = model.state_dict()
    stripped = True
    while stripped and state:  # e.g. DDP around a compiled module: module._orig_mod.
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in target):
                state, stripped = _strip(state, prefix), True
                notes.append(f"stripped the wrapper prefix {prefix!r}")
    for prefix in ENCODER_PREFIXES:
        inner = _strip(state, prefix)
        if inner and not any(k.startswith(prefix) for k in target) and len(inner) < len(state):
            notes.append(f"took the encoder under {prefix!r}, dropped {len(state) - len(inner)} other tensors")
            state = inner
            break
    decoder = [k for k in state if k.startswith(DECODER_PREFIXES) and k not in target]
    if decoder:
        notes.append(f"dropped the pretraining decoder and mask token ({len(decoder)} tensors)")
        state = {k: v for k, v in state.items() if k not in decoder}
    names = set(classifier_names(model, spec)) | set(HEAD_NAMES)
    heads = sorted(k for k in state if any(k.startswith(n + ".") for n in names))
    if heads:
        weights = [state[k] for k in heads if k.endswith("weight") and state[k].ndim == 2]
        size = f"{weights[0].shape[0]} classes" if weights else f"{len(heads)} tensors"
        notes.append(f"dropped the checkpoint's head ({', '.join(sorted({k.rsplit('.', 1)[0] for k in heads}))}: "
                     f"{size}); this task trains its own")
        state = {k: v for k, v in state.items() if k not in heads}
    for have, want in (("fc_norm", "norm"), ("norm", "fc_norm")):
        if (f"{have}.weight" in state and f"{want}.weight" not in state and f"{want}.weight" in target
                and f"{have}.weight" not in target):
            state = {(want + k[len(have):] if k.startswith(have + ".") else k): v for k, v in state.items()}
            notes.append(f"used the checkpoint's {have} as {want} (it was fine-tuned with the other pooling)")
    if "dist_token" in state and "dist_token" not in target:
        state.pop("dist_token")
        pe = state.get("pos_embed")
        if pe is not None and pe.shape[1] == target["pos_embed"].shape[1] + 1:
            state["pos_embed"] = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)  # [cls, dist, grid] -> [cls, grid]
        notes.append("dropped DeiT's distillation token (this classifier has none)")
    buffers = [k for k in state if k.endswith(("relative_position_index", "attn_mask")) and k not in target]
    for k in buffers:  # derived from the window size; rebuilt by the model itself
        state.pop(k)
    return state, notes


def summarise(keys) -> str:
    """Keys grouped by pattern (block numbers as *): 'blocks.*.gamma_1 (x12), ...'."""
    counts: dict[str, int] = {}
    for k in sorted(keys):
        pattern = re.sub(r"\.\d+(?=\.|$)", ".*", k)
        counts[pattern] = counts.get(pattern, 0) + 1
    parts = [f"{p} (x{n})" if n > 1 else p for p, n in counts.items()]
    return ", ".join(parts[:6]) + (f", ... ({len(parts) - 6} more patterns)" if len(parts) > 6 else "")


def load_encoder(model: nn.Module, state: dict[str, torch.Tensor], spec: BackboneSpec) -> Transfer:
    """Load an encoder state dict into `model` (a classifier of family `spec`, or its encoder).

    The state is cleaned (clean_encoder_state), then the family adapts what depends on the geometry
    (position embeddings, relative-position tables). Raises ValueError naming what differs when a
    key is missing that is not the head or a declared addition, when one is left over, or when
    shapes differ (channel count or patch size).
    """
    state, notes = clean_encoder_state(state, model, spec)
    state = spec.adapt_encoder(state, model)
    expected = head_keys(model, spec) | (spec.additions(model) - set(state))
    target = model.state_dict()
    expected &= set(target)
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items()
             if k in target and v.shape != target[k].shape]
    if wrong:
        raise ValueError(f"encoder does not fit the {spec.family} model: shapes differ for {wrong[:4]}")
    result = model.load_state_dict(state, strict=False)
    # torch fills a missing BatchNorm step counter itself (old-format compatibility): not reported
    expected = {k for k in expected if not k.endswith("num_batches_tracked")}
    missing = set(result.missing_keys) - expected
    if set(result.missing_keys) != expected or result.unexpected_keys:
        what = []
        if missing:
            what.append(f"it lacks {summarise(missing)}")
        if result.unexpected_keys:
            what.append(f"it has what this model does not: {summarise(result.unexpected_keys)}")
        raise ValueError(f"encoder does not fit the {spec.family} model: {'; '.join(what) or 'the head is not fresh'}"
                         f" (only {sorted(expected)} may be left to train)")
    return Transfer(expected, notes)
