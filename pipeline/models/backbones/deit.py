"""Distilled DeiT (Touvron et al. 2021): timm's ViT with a distillation token and a second head.

It is pretrained as the plain ViT of the same size (masked image modelling knows no
distillation token); fine-tuning adds exactly the distillation token and the two heads. The
distillation token's position-embedding row starts as a copy of the class token's.
"""
from __future__ import annotations

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block

from pipeline.models.backbones import BackboneSpec, Variant
from pipeline.models.backbones._timm import build_timm
from pipeline.models.backbones.vit import HeadRowsForward, check_patch_embed, resize_grid, split_pos_embed


class ClassTokenDeiT(HeadRowsForward, VisionTransformerDistilled):
    """timm's distilled DeiT (the same modules, parameters and state dict) whose training forward
    computes the last block at the class and distillation tokens only, the two rows its heads read."""

    HEAD_ROWS = 2


def build(variant: Variant, *, img_size, patch_size, in_chans, num_classes, window_size=None,
          drop_path_rate=0.0, pretrained_file=None) -> VisionTransformerDistilled:
    model = build_timm(variant, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                       num_classes=num_classes, drop_path_rate=drop_path_rate, pretrained_file=pretrained_file)
    if num_classes and type(model) is VisionTransformerDistilled:
        model.__class__ = ClassTokenDeiT  # as ViT's: only the classifier's training forward changes
    return model


def adapt_encoder(state: dict, model: VisionTransformerDistilled) -> dict:
    """A ViT encoder (class token only) or a distilled DeiT's state for `model`."""
    state = dict(state)
    check_patch_embed(state, model)
    pe = state.get("pos_embed")
    if pe is not None and pe.shape != model.pos_embed.shape:
        prefix_n = 2 if "dist_token" in state else 1
        prefix, grid, side = split_pos_embed(pe, prefix_n)
        if prefix_n == 1:  # [cls] -> [cls, dist]: the new token starts where the class token is
            prefix = torch.cat([prefix, prefix], dim=1)
        state["pos_embed"] = torch.cat([prefix, resize_grid(grid, side, model)], dim=1)
    return state


def _tiny(arch: str, encoder: str, **overrides) -> Variant:
    return Variant(arch, overrides, encoder_arch=encoder)


SPEC = BackboneSpec(
    family="deit",
    variants={
        "deit_debug": _tiny("deit_tiny_distilled_patch16_224", "deit_tiny_patch16_224",
                            embed_dim=32, depth=2, num_heads=2),
        "deit_demo": _tiny("deit_tiny_distilled_patch16_224", "deit_tiny_patch16_224",
                           embed_dim=128, depth=4, num_heads=4),
        "deit_tiny": _tiny("deit_tiny_distilled_patch16_224", "deit_tiny_patch16_224"),
        "deit_small": _tiny("deit_small_distilled_patch16_224", "deit_small_patch16_224"),
        "deit_base": _tiny("deit_base_distilled_patch16_224", "deit_base_patch16_224"),
    },
    debug="deit_debug",
    build=build,
    encoder_family="vit",
    classifier=("head", "head_dist"),
    additions=lambda model: {"dist_token"},
    adapt_encoder=adapt_encoder,
    block_classes=(Block,),
)
