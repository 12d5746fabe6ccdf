"""Faster forms of timm ViT pieces that compute the same maths (same parameters, same formulas; only
the order of floating-point operations may differ). Each has a `can_*` predicate: a module it does
not know exactly (another block type, layer scale, gated or normed attention) takes the stock
path instead, so these never change what a model computes.

- `embed_kept_patches`: the patch embedding of the kept patches only. timm's PatchEmbed is a
  stride-P convolution, i.e. one linear map of each flattened [C, P, P] patch; MAE (He et al.
  2021) and lightly embed all L patches and then drop 75 % of them. Here the dropped ones are
  never embedded (the same numbers for the kept ones).
- `block_rows`: a pre-norm transformer block whose outputs are needed only at some rows (MAE's
  last decoder block: the loss reads the masked patches only). Keys and values still come from
  every row; queries, the attention projection, the MLP and the residuals only from the rows
  asked for. The rows returned are those the full block would give.
- `class_token_features`: a ViT classifier whose head reads the class token only (timm's
  global_pool "token", what mimflow's ViT classifiers use) needs its last block at that one row:
  `block_rows` of the last block at row 0 (about 1/12 of a ViT-S's training FLOPs saved).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], index [B, M] -> x[b, index[b]] [B, M, D]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def can_embed_kept_patches(vit: nn.Module) -> bool:
    """A timm ViT with a plain stride-P patch convolution, one class token, no register tokens,
    position embeddings that cover the class token, and a fixed image size."""
    if not isinstance(vit, VisionTransformer) or not isinstance(vit.patch_embed, PatchEmbed):
        return False
    pe = vit.patch_embed
    conv = pe.proj
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == conv.stride == pe.patch_size
            and conv.padding == (0, 0) and conv.groups == 1 and conv.dilation == (1, 1)
            and isinstance(pe.norm, nn.Identity) and pe.flatten and not pe.dynamic_img_pad
            and not getattr(vit, "dynamic_img_size", False) and pe.img_size is not None
            and vit.cls_token is not None and vit.reg_token is None and vit.num_prefix_tokens == 1
            and not vit.no_embed_class and vit.pos_embed is not None
            and isinstance(vit.patch_drop, nn.Identity))


def patchify_chw(images: torch.Tensor, p: int) -> torch.Tensor:
    """images [B, C, H, W] -> patches [B, L, C*p*p], each patch flattened in (c, i, j) order: the
    order of a convolution weight [D, C, p, p] flattened to [D, C*p*p]; rows in raster order."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, p, p]
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def embed_kept_patches(vit: VisionTransformer, images: torch.Tensor, idx_keep: torch.Tensor) -> torch.Tensor:
    """images [B, C, H, W], idx_keep [B, 1 + K] (sequence positions, the class token's 0 first) ->
    tokens [B, 1 + K, D]: the class token and the K kept patch embeddings, each plus its position
    embedding, then `norm_pre` (what lightly's `MaskedVisionTransformerTIMM.preprocess` +
    `norm_pre` give for the kept rows, without embedding the dropped patches)."""
    pe = vit.patch_embed
    if tuple(images.shape[-2:]) != tuple(pe.img_size):
        raise ValueError(f"images of shape {tuple(images.shape)}: the encoder takes {tuple(pe.img_size)} px")
    p = pe.patch_size[0]
    patches = gather_rows(patchify_chw(images, p), idx_keep[:, 1:] - 1)  # [B, K, C*p*p]
    weight = pe.proj.weight.flatten(1)  # [D, C, p, p] -> [D, C*p*p]
    x = F.linear(patches, weight, pe.proj.bias)  # [B, K, D]
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1 + K, D]
    pos = vit.pos_embed[0][idx_keep]  # [1 + L, D] at [B, 1 + K] -> [B, 1 + K, D]
    return vit.norm_pre(vit.pos_drop(x + pos))


def can_run_rows(block: nn.Module) -> bool:
    """timm's plain pre-norm Block with its plain Attention (no layer scale, qk-norm, gate or
    attention norm)."""
    if type(block) is not Block or type(block.attn) is not Attention:
        return False
    attn = block.attn
    return (isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity)
            and isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
            and isinstance(attn.norm, nn.Identity) and attn.gate is None)


def block_rows(block: Block, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] into a timm Block, of whose output only rows [B, M] are needed ->
    block(x)[b, rows[b]] as [B, M, D]. Attention keys and values use all N rows."""
    attn = block.attn
    B, N, D = x.shape
    M, H, hd = rows.shape[1], attn.num_heads, attn.head_dim
    A = attn.attn_dim
    h = block.norm1(x)  # [B, N, D]
    w, b = attn.qkv.weight, attn.qkv.bias  # [3A, D], [3A]: q, k, v stacked
    q = F.linear(gather_rows(h, rows), w[:A], None if b is None else b[:A])  # [B, M, A]
    kv = F.linear(h, w[A:], None if b is None else b[A:])  # [B, N, 2A]
    k, v = kv.reshape(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, hd]
    q = q.reshape(B, M, H, hd).transpose(1, 2)  # [B, H, M, hd]
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    o = attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(B, M, A)))  # [B, M, D]
    y = gather_rows(x, rows) + block.drop_path1(o)
    return y + block.drop_path2(block.mlp(block.norm2(y)))


def can_run_class_token(vit: nn.Module) -> bool:
    """A timm ViT whose head reads the class token only (global_pool "token", no attention
    pooling), with a plain last Block (not wrapped, e.g. by FSDP) and no activation checkpointing."""
    return (isinstance(vit, VisionTransformer) and vit.global_pool == "token" and vit.attn_pool is None
            and vit.cls_token is not None and not vit.grad_checkpointing and len(vit.blocks) > 0
            and can_run_rows(vit.blocks[-1]))


def class_token_features(vit: VisionTransformer, images: torch.Tensor, rows: int = 1) -> torch.Tensor:
    """images [B, C, H, W] -> vit.forward_features(images)[:, :rows], [B, rows, D]: the first
    `rows` prefix tokens (the class token; DeiT's class and distillation tokens: rows=2) after the
    final norm, the last block computed at those rows only."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))  # [B, N, D], prefix tokens first
    x = vit.blocks[:-1](x)
    at = torch.arange(rows, device=x.device).expand(x.shape[0], rows)  # [B, rows]
    return vit.norm(block_rows(vit.blocks[-1], x, at))
