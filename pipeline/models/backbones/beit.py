"""timm's BEiT (Bao et al. 2021) at any channel count and image size: a ViT with a relative
position bias in every block (no absolute position embedding) and layer scale, pooled by the mean
of the patch tokens (BEiT's fine-tuning default).

The relative position bias tables depend on the patch grid: an encoder moved to another image
size has them resized with timm's own checkpoint filter, or is refused naming the sizes. Its final
LayerNorm is timm's `fc_norm`: BEiT pretraining normalises every token with it before the visual
token head, fine-tuning normalises the mean of the tokens (BEiT's reference code starts `fc_norm`
afresh instead; keeping it is what makes "exactly the head is missing" hold here).
"""
from __future__ import annotations

import torch
from timm.models.beit import Beit, Block, checkpoint_filter_fn

from pipeline.models.backbones import BackboneSpec, Variant
from pipeline.models.backbones._timm import build_timm
from pipeline.models.backbones.vit import check_patch_embed

TABLE = "relative_position_bias_table"


def build(variant: Variant, *, img_size, patch_size, in_chans, num_classes, window_size=None,
          drop_path_rate=0.0, pretrained_file=None) -> Beit:
    return build_timm(variant, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                      num_classes=num_classes, drop_path_rate=drop_path_rate, pretrained_file=pretrained_file)


def _tables(state: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items() if k.endswith(TABLE)}


def adapt_encoder(state: dict, model: Beit) -> dict:
    """A BEiT encoder's state for `model`: relative position bias tables [(2h-1)(2w-1) + 3, heads]
    resized to its patch grid (timm's checkpoint_filter_fn, bicubic). Raises ValueError naming the
    tables and the grids when they cannot be resized (another head count, a table of no grid)."""
    check_patch_embed(state, model)
    grid = tuple(model.patch_embed.grid_size)
    target = _tables(model.state_dict())
    if _tables(state) == {k: v for k, v in target.items() if k in state}:
        return dict(state)
    try:
        out = checkpoint_filter_fn(dict(state), model)
    except Exception as err:
        raise ValueError(f"cannot resize the encoder's relative position bias tables {sorted(set(_tables(state).values()))} "
                         f"to this model's {grid[0]} x {grid[1]} patch grid {sorted(set(target.values()))}: "
                         f"{type(err).__name__}: {err}") from None
    wrong = {k: (shape, target[k]) for k, shape in _tables(out).items() if k in target and shape != target[k]}
    if wrong:
        k, (got, want) = next(iter(wrong.items()))
        raise ValueError(f"cannot resize the encoder's relative position bias tables to this model's {grid[0]} x "
                         f"{grid[1]} patch grid: {k} is {got} after resizing, the model needs {want} "
                         "(the head counts differ)")
    return out


def masked_features(model: Beit, images: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """images [B, C, H, W], mask [B, h, w] (True = masked) -> patch features [B, D, h, w].

    Masked patch embeddings are replaced by mask_token [1, 1, D] before the class token is
    prepended (BEiT, modeling_pretrain.py: `x * (1 - w) + mask_token * w`); the blocks add their
    relative position bias; every token is normalised by the encoder's final LayerNorm."""
    x = model.patch_embed(images)  # [B, L, D]
    w = mask.flatten(1).unsqueeze(-1).type_as(x)  # [B, L, 1]
    x = x * (1 - w) + mask_token.type_as(x) * w
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # [B, 1 + L, D]
    if model.pos_embed is not None:
        x = x + model.pos_embed
    x = model.pos_drop(x)
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    for block in model.blocks:
        if model.grad_checkpointing and x.requires_grad:
            x = torch.utils.checkpoint.checkpoint(block, x, shared_rel_pos_bias=shared, use_reentrant=False)
        else:
            x = block(x, shared_rel_pos_bias=shared)
    x = model.fc_norm(model.norm(x))[:, model.num_prefix_tokens:]  # [B, L, D]; one of the two norms is Identity
    B, L, D = x.shape
    h, w_ = model.patch_embed.grid_size
    return x.transpose(1, 2).reshape(B, D, h, w_)


SPEC = BackboneSpec(
    family="beit",
    variants={
        "beit_debug": Variant("beit_base_patch16_224", dict(embed_dim=32, depth=2, num_heads=2)),
        "beit_demo": Variant("beit_base_patch16_224", dict(embed_dim=128, depth=4, num_heads=4)),
        "beit_base": Variant("beit_base_patch16_224"),
        "beit_large": Variant("beit_large_patch16_224"),
    },
    debug="beit_debug",
    build=build,
    encoder_family="beit",
    classifier=("head",),
    adapt_encoder=adapt_encoder,
    block_classes=(Block,),
    masked_features=masked_features,
    output_stride=lambda model: model.patch_embed.patch_size[0],
)
