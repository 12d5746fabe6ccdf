"""Move encoder weights into a classifier, checking that exactly the head (and the family's
declared additions, e.g. DeiT's distillation token) is left to train: MAE's fine-tuning contract."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.models.backbones import BackboneSpec, head_keys


def load_encoder(model: nn.Module, state: dict[str, torch.Tensor], spec: BackboneSpec) -> set[str]:
    """Load an encoder state dict into the classifier `model` of family `spec`.

    The family adapts what depends on the geometry (position embeddings, relative-position
    tables). Raises ValueError when a key is missing that is not the head or a declared
    addition, when a key is left over, or when shapes differ (channel count or patch size).
    -> the keys left at their fresh initialisation (head + additions).
    """
    state = spec.adapt_encoder(state, model)
    expected = head_keys(model, spec) | (spec.additions(model) - set(state))
    expected &= set(model.state_dict())
    target = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items()
             if k in target and v.shape != target[k].shape]
    if wrong:
        raise ValueError(f"encoder does not fit the {spec.family} classifier: shapes differ for {wrong[:4]}")
    result = model.load_state_dict(state, strict=False)
    # torch fills a missing BatchNorm step counter itself (old-format compatibility): not reported
    expected = {k for k in expected if not k.endswith("num_batches_tracked")}
    if set(result.missing_keys) != expected or result.unexpected_keys:
        missing = sorted(set(result.missing_keys) - expected)
        raise ValueError(f"encoder does not fit the {spec.family} classifier: missing {missing[:8]}"
                         f"{f' (+{len(missing) - 8} more)' if len(missing) > 8 else ''} (only "
                         f"{sorted(expected)} may be), unexpected {sorted(result.unexpected_keys)[:8]}")
    return expected
