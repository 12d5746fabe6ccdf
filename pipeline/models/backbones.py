"""timm ViT/DeiT factory for any channel count and image/patch size.

Every family has a debug-size variant for the tests. Pure: no I/O except timm's optional
local-file weight loading (`pretrained_file`), never a download.
"""
from __future__ import annotations

import timm
from torch import nn

# name -> (timm architecture, overrides). Overrides shrink the arch without forking timm.
BACKBONES: dict[str, tuple[str, dict]] = {
    "vit_debug": ("vit_tiny_patch16_224", dict(embed_dim=32, depth=2, num_heads=2)),
    "vit_demo": ("vit_tiny_patch16_224", dict(embed_dim=128, depth=4, num_heads=4)),
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    "vit_small": ("vit_small_patch16_224", {}),
    "vit_base": ("vit_base_patch16_224", {}),
    "vit_large": ("vit_large_patch16_224", {}),
    "deit_debug": ("deit_tiny_patch16_224", dict(embed_dim=32, depth=2, num_heads=2)),
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit_small": ("deit_small_patch16_224", {}),
}


def create_backbone(name: str, img_size: int, patch_size: int, in_chans: int,
                    num_classes: int = 0, drop_path_rate: float = 0.0,
                    pretrained_file: str | None = None) -> nn.Module:
    """A timm VisionTransformer with class-token pooling (what MAE's encoder is trained with).

    num_classes=0 gives an encoder (head = Identity); the same call with num_classes=K gives
    the classifier whose only extra parameters are `head.weight` and `head.bias`.
    """
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    arch, overrides = BACKBONES[name]
    kwargs = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                  num_classes=num_classes, drop_path_rate=drop_path_rate,
                  global_pool="token", **overrides)
    if pretrained_file:  # timm's own loader, adapting in_chans/pos-embed, from a local file
        return timm.create_model(arch, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=pretrained_file), **kwargs)
    return timm.create_model(arch, pretrained=False, **kwargs)


def head_keys(model: nn.Module) -> set[str]:
    """Parameter names of the classification head (what fine-tuning adds to an encoder)."""
    return {f"head.{k}" for k, _ in model.get_classifier().named_parameters()}
