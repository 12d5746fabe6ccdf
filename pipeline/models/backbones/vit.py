"""timm VisionTransformer with class-token pooling (what MAE's encoder is trained with)."""
from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer

from pipeline.models import fast as fastvit
from pipeline.models.backbones import BackboneSpec, Variant
from pipeline.models.backbones._timm import build_timm


class HeadRowsForward:
    """Mixin for a timm ViT classifier whose head reads its first HEAD_ROWS tokens only: the training
    forward computes the last block at those rows (keys and values still from every token), the
    same logits and gradients with fewer FLOPs (tests/unit/models/test_finetune_fast.py). Eval
    mode, an attention mask, and any model `pipeline.models.fast` does not know exactly
    (FSDP-wrapped blocks, activation checkpointing) run timm's own forward."""

    HEAD_ROWS = 1

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if self.training and attn_mask is None and not is_causal and fastvit.can_run_class_token(self):
            return self.forward_head(fastvit.class_token_features(self, x, self.HEAD_ROWS))
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)


class ClassTokenViT(HeadRowsForward, VisionTransformer):
    """timm's VisionTransformer (the same modules, parameters and state dict) whose training forward
    computes the last block at the class token only, the one row the head reads."""


def build(variant: Variant, *, img_size, patch_size, in_chans, num_classes, window_size=None,
          drop_path_rate=0.0, pretrained_file=None) -> VisionTransformer:
    model = build_timm(variant, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                       num_classes=num_classes, drop_path_rate=drop_path_rate, pretrained_file=pretrained_file,
                       global_pool="token")
    if num_classes and type(model) is VisionTransformer:
        # timm's factory builds (and loads) the instance; only the training forward of the classifier changes
        model.__class__ = ClassTokenViT
    return model


def check_patch_embed(state: dict, model: torch.nn.Module) -> None:
    """The patch embedding [D, C, P, P] must fit as it is: a channel or patch-size change is refused,
    never reshaped (the weights would mean something else)."""
    w, target = state.get("patch_embed.proj.weight"), model.state_dict().get("patch_embed.proj.weight")
    if w is not None and target is not None and w.shape != target.shape:
        raise ValueError(f"encoder patch embedding {tuple(w.shape)} does not fit the model's "
                         f"{tuple(target.shape)} ([D, C, P, P]): channel count or patch size differ")


def split_pos_embed(pe: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[1, prefix + L, D] -> (prefix rows [1, prefix, D], grid rows [1, L, D], grid side)."""
    side = int(round((pe.shape[1] - prefix) ** 0.5))
    if side * side != pe.shape[1] - prefix:
        raise ValueError(f"position embedding of {pe.shape[1]} rows is not {prefix} prefix rows + a square grid")
    return pe[:, :prefix], pe[:, prefix:], side


def resize_grid(grid: torch.Tensor, side: int, model: VisionTransformer) -> torch.Tensor:
    """Grid rows [1, side*side, D] -> the model's grid, bicubic as timm does."""
    new = list(model.patch_embed.grid_size)
    if [side, side] == new:
        return grid
    return resample_abs_pos_embed(grid, new_size=new, old_size=[side, side], num_prefix_tokens=0)


def adapt_encoder(state: dict, model: VisionTransformer) -> dict:
    """A ViT encoder's state for `model`: the position embedding resized to its grid."""
    state = dict(state)
    check_patch_embed(state, model)
    pe = state.get("pos_embed")
    if pe is not None and pe.shape != model.pos_embed.shape:
        prefix, grid, side = split_pos_embed(pe, model.num_prefix_tokens)
        state["pos_embed"] = torch.cat([prefix, resize_grid(grid, side, model)], dim=1)
    return state


def _masked_tokens(model: VisionTransformer, images: torch.Tensor, mask: torch.Tensor,
                   mask_token: torch.Tensor) -> torch.Tensor:
    """-> the blocks' input [B, prefix + L, D]: masked patch embeddings replaced by mask_token
    [1, 1, D] before the position embedding is added (SimMIM, Xie et al. 2022, ViT variant)."""
    x = model.patch_embed(images)  # [B, L, D]
    w = mask.flatten(1).unsqueeze(-1).type_as(x)  # [B, L, 1]
    x = x * (1 - w) + mask_token.type_as(x) * w
    return model.norm_pre(model.patch_drop(model._pos_embed(x)))


def masked_features(model: VisionTransformer, images: torch.Tensor, mask: torch.Tensor,
                    mask_token: torch.Tensor) -> torch.Tensor:
    """images [B, C, H, W], mask [B, h, w] (True = masked) -> patch features [B, D, h, w]."""
    x = _masked_tokens(model, images, mask, mask_token)
    x = checkpoint_seq(model.blocks, x) if model.grad_checkpointing and x.requires_grad else model.blocks(x)
    x = model.norm(x)[:, model.num_prefix_tokens:]  # [B, L, D]
    B, L, D = x.shape
    h, w_ = model.patch_embed.grid_size
    return x.transpose(1, 2).reshape(B, D, h, w_)


def masked_features_at(model: VisionTransformer, images: torch.Tensor, mask: torch.Tensor,
                       mask_token: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
    """`masked_features` at patch rows [B, M] (0..L-1) -> [B, M, D], the last block computed at
    those rows only (pipeline.models.fast.block_rows); None for a last block it does not know
    exactly or under activation checkpointing."""
    if model.grad_checkpointing or not fastvit.can_run_rows(model.blocks[-1]):
        return None
    x = model.blocks[:-1](_masked_tokens(model, images, mask, mask_token))  # [B, prefix + L, D]
    return model.norm(fastvit.block_rows(model.blocks[-1], x, rows + model.num_prefix_tokens))


SPEC = BackboneSpec(
    family="vit",
    variants={
        "vit_debug": Variant("vit_tiny_patch16_224", dict(embed_dim=32, depth=2, num_heads=2)),
        "vit_demo": Variant("vit_tiny_patch16_224", dict(embed_dim=128, depth=4, num_heads=4)),
        "vit_tiny": Variant("vit_tiny_patch16_224"),
        "vit_small": Variant("vit_small_patch16_224"),
        "vit_base": Variant("vit_base_patch16_224"),
        "vit_large": Variant("vit_large_patch16_224"),
    },
    debug="vit_debug",
    build=build,
    encoder_family="vit",
    classifier=("head",),
    adapt_encoder=adapt_encoder,
    block_classes=(Block,),
    masked_features=masked_features,
    masked_features_at=masked_features_at,
    output_stride=lambda model: model.patch_embed.patch_size[0],
)
