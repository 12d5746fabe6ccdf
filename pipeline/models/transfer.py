"""Move encoder weights between pretraining and fine-tuning, checking what does not fit."""
from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from pipeline.models.backbones import head_keys


def adapt_encoder_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resize the position embedding to `model`'s grid; refuse a channel-count mismatch."""
    state = dict(state)
    target = model.state_dict()
    w = state.get("patch_embed.proj.weight")
    if w is not None and w.shape != target["patch_embed.proj.weight"].shape:
        raise ValueError(f"encoder patch embedding {tuple(w.shape)} does not fit the model's "
                         f"{tuple(target['patch_embed.proj.weight'].shape)} ([D, C, P, P]): "
                         "channel count or patch size differ")
    pe = state.get("pos_embed")
    if pe is not None and pe.shape != target["pos_embed"].shape:
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(pe, new_size=list(grid),
                                                    num_prefix_tokens=model.num_prefix_tokens)
    return state


def load_encoder(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a pretrained encoder into a classifier; exactly the head may be missing (MAE contract)."""
    result = model.load_state_dict(adapt_encoder_state(state, model), strict=False)
    expected = head_keys(model)
    if set(result.missing_keys) != expected or result.unexpected_keys:
        raise ValueError(f"encoder does not fit the classifier: missing {sorted(result.missing_keys)} "
                         f"(expected exactly {sorted(expected)}), unexpected {sorted(result.unexpected_keys)}")
