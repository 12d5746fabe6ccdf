"""timm SwinTransformer at any channel count, image, patch and window size.

Its relative-position bias tables depend on the window size: a pretrained encoder moved to
another window size has them resized with timm's own checkpoint filter (bicubic).
"""
from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, checkpoint_filter_fn

from pipeline.models.backbones import BackboneSpec, Variant
from pipeline.models.backbones._timm import build_timm
from pipeline.models.backbones.vit import check_patch_embed


def build(variant: Variant, *, img_size, patch_size, in_chans, num_classes, window_size=None,
          drop_path_rate=0.0, pretrained_file=None) -> SwinTransformer:
    return build_timm(variant, img_size=img_size, patch_size=patch_size, window_size=window_size,
                      in_chans=in_chans, num_classes=num_classes, drop_path_rate=drop_path_rate,
                      pretrained_file=pretrained_file)


def adapt_encoder(state: dict, model: SwinTransformer) -> dict:
    """A Swin encoder's state for `model`: relative-position tables resized to its windows."""
    check_patch_embed(state, model)
    try:
        return checkpoint_filter_fn(dict(state), model)
    except Exception as err:
        tables = {k: tuple(v.shape) for k, v in state.items() if k.endswith("relative_position_bias_table")}
        windows = sorted({b.window_size for layer in model.layers for b in layer.blocks})
        raise ValueError(f"cannot resize the encoder's relative-position tables {sorted(set(tables.values()))} "
                         f"to this model's windows {windows}: {err}") from None


def masked_features(model: SwinTransformer, images: torch.Tensor, mask: torch.Tensor,
                    mask_token: torch.Tensor) -> torch.Tensor:
    """images [B, C, H, W], mask [B, h, w] over the patch grid (True = masked) -> the last
    stage's features [B, D, h / 2^(S-1), w / 2^(S-1)]. Masked patch embeddings are replaced by
    mask_token [1, 1, D] (SimMIM, Xie et al. 2022, Swin variant)."""
    x = model.patch_embed(images)  # [B, h, w, D] (timm's Swin is channels-last)
    w = mask.unsqueeze(-1).type_as(x)
    x = x * (1 - w) + mask_token.reshape(1, 1, 1, -1).type_as(x) * w
    x = model.norm(model.layers(x))  # [B, h', w', D']
    return x.permute(0, 3, 1, 2)


SPEC = BackboneSpec(
    family="swin",
    variants={
        "swin_debug": Variant("swin_tiny_patch4_window7_224",
                              dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4)),
        "swin_demo": Variant("swin_tiny_patch4_window7_224",
                             dict(embed_dim=64, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=4)),
        "swin_tiny": Variant("swin_tiny_patch4_window7_224"),
        "swin_small": Variant("swin_small_patch4_window7_224"),
        "swin_base": Variant("swin_base_patch4_window7_224"),
    },
    debug="swin_debug",
    build=build,
    encoder_family="swin",
    classifier=("head.fc",),
    adapt_encoder=adapt_encoder,
    block_classes=(SwinTransformerBlock,),
    masked_features=masked_features,
    output_stride=lambda model: model.patch_embed.patch_size[0] * 2 ** (len(model.layers) - 1),
    uses_window_size=True,
)
