"""What the timm families share: building a timm model at any geometry, from a local file or none."""
from __future__ import annotations

import timm
from torch import nn


def build_timm(variant, *, img_size: int, in_chans: int, num_classes: int, drop_path_rate: float,
               pretrained_file: str | None = None, **geometry) -> nn.Module:
    """timm.create_model(variant.arch, ...) with the variant's overrides; `geometry` holds the
    family's own size arguments (patch_size, window_size). pretrained_file: timm's own loader
    (it adapts in_chans and position embeddings) reads that local file; nothing is downloaded."""
    kwargs = {**variant.overrides, **{k: v for k, v in geometry.items() if v is not None},
              "img_size": img_size, "in_chans": in_chans, "num_classes": num_classes,
              "drop_path_rate": drop_path_rate}
    if pretrained_file:
        return timm.create_model(variant.arch, pretrained=True, pretrained_cfg_overlay=dict(file=pretrained_file),
                                 **kwargs)
    return timm.create_model(variant.arch, pretrained=False, **kwargs)
