"""SimMIM (Xie et al. 2022) for ViT and Swin: masked patch embeddings are replaced by a learned mask
token, a one-layer head (1x1 convolution + pixel shuffle) predicts the raw pixels, and the loss is
L1 on the masked pixels only. Follows the SimMIM reference code (models/simmim.py,
data/data_simmim.py): masks are drawn over groups of patches in the data pipeline."""
from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.layers import trunc_normal_
from torch import nn

from pipeline.configbase import ObjectiveConfig
from pipeline.data.masking import grouped_patch_mask
from pipeline.models.backbones import BackboneSpec
from pipeline.models.objectives import ObjectiveSpec


class SimMIMConfig(ObjectiveConfig):
    """SimMIM: mask tokens in place of masked patches, a linear head, L1 on the masked pixels."""
    name: Literal["simmim"] = "simmim"  # the objective
    mask_ratio: float = Field(0.6, gt=0, lt=1)  # share of mask squares hidden
    # side of a masked square in pixels, a multiple of the patch size that divides img_size;
    # None: max(2 x patch_size, the encoder's output stride), as SimMIM's 32 px over 16 px ViT
    # patches and over Swin-B's stride of 32
    mask_patch_size: int | None = Field(None, ge=1)
    norm_pix_loss: bool = False  # SimMIM predicts the (normalised) input pixels as they are


class SimMIM(nn.Module):
    def __init__(self, encoder: nn.Module, backbone: BackboneSpec, in_chans: int, norm_pix_loss: bool = False):
        super().__init__()
        if backbone.masked_features is None:
            raise ValueError(f"SimMIM needs masked features from the {backbone.family} family; it has none")
        self.encoder = encoder
        self._features = backbone.masked_features  # a function, not a module: not in the state dict
        self.in_chans = in_chans
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.stride = backbone.output_stride(encoder)
        self.norm_pix_loss = norm_pix_loss
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.patch_embed.proj.out_channels))
        trunc_normal_(self.mask_token, std=0.02)
        # the one-layer prediction head: [B, D, h', w'] -> [B, stride^2 * C, h', w'] -> [B, C, H, W]
        self.decoder = nn.Sequential(nn.Conv2d(encoder.num_features, self.stride**2 * in_chans, kernel_size=1),
                                     nn.PixelShuffle(self.stride))

    def pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Patch mask [B, h, w] -> pixel mask [B, 1, H, W]."""
        p = self.patch_size
        return mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """images [B, C, H, W], mask [B, h, w] over the patch grid (True = masked) -> loss,
        pred [B, C, H, W] (the reconstruction), mask [B, L] (1 = masked)."""
        if mask is None:
            raise ValueError("SimMIM needs a mask [B, h, w] from the data pipeline")
        if images.shape[1] != self.in_chans:
            raise ValueError(f"SimMIM expects {self.in_chans} channels, got images of shape {tuple(images.shape)}")
        mask = mask.bool()
        recon = self.decoder(self._features(self.encoder, images, mask, self.mask_token))  # [B, C, H, W]
        if recon.shape != images.shape:
            raise ValueError(f"reconstruction {tuple(recon.shape)} does not match the images {tuple(images.shape)}: "
                             f"img_size must be a multiple of the encoder's output stride {self.stride}")
        target = images
        if self.norm_pix_loss:  # per-patch normalised target (SimMIM's ViT option), as MAE's
            target = _normalise_patches(images, self.patch_size)
        weight = self.pixel_mask(mask).type_as(recon)  # [B, 1, H, W]
        l1 = F.l1_loss(recon, target, reduction="none")  # [B, C, H, W]
        loss = (l1 * weight).sum() / (weight.sum() + 1e-5) / self.in_chans
        return {"loss": loss, "pred": recon, "mask": mask.flatten(1).float(), "metrics": {}}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """For plots: masked input and reconstruction [B, C, H, W] (visible pixels kept), patch mask [B, L]."""
        out = self(images, mask)
        weight = self.pixel_mask(mask.bool()).type_as(images)
        pred = out["pred"]
        if self.norm_pix_loss:
            pred = _denormalise_patches(pred, images, self.patch_size)
        return {"masked": images * (1 - weight), "recon": images * (1 - weight) + pred * weight,
                "mask": out["mask"], "loss": out["loss"]}


def _patch_stats(images: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> per-patch mean and std over pixels and channels, each [B, 1, H, W] (broadcast back)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)
    mean = x.mean(dim=(1, 3, 5), keepdim=True)
    std = (x.var(dim=(1, 3, 5), keepdim=True) + 1e-6).sqrt()
    expand = lambda t: t.expand(B, 1, H // p, p, W // p, p).reshape(B, 1, H, W)  # noqa: E731
    return expand(mean), expand(std)


def _normalise_patches(images, p):
    mean, std = _patch_stats(images, p)
    return (images - mean) / std


def _denormalise_patches(pred, images, p):
    mean, std = _patch_stats(images, p)
    return pred * std + mean


def mask_patch_size(section: SimMIMConfig, encoder: nn.Module, backbone: BackboneSpec) -> int:
    patch = encoder.patch_embed.patch_size[0]
    return section.mask_patch_size or max(2 * patch, backbone.output_stride(encoder))


def check(section: SimMIMConfig, encoder: nn.Module, backbone: BackboneSpec, img_size: int) -> None:
    patch, stride = encoder.patch_embed.patch_size[0], backbone.output_stride(encoder)
    size = mask_patch_size(section, encoder, backbone)
    if size % patch or img_size % size:
        raise ValueError(f"pretrain.objective.mask_patch_size={size} must be a multiple of model.patch_size={patch} "
                         f"and divide model.img_size={img_size}")
    if img_size % stride:
        raise ValueError(f"SimMIM on {backbone.family}: model.img_size={img_size} must be a multiple of the "
                         f"encoder's output stride {stride} (patch size x 2^(stages - 1))")


def mask_generator(section: SimMIMConfig, encoder: nn.Module, backbone: BackboneSpec, img_size: int):
    grid = tuple(encoder.patch_embed.grid_size)
    group = mask_patch_size(section, encoder, backbone) // encoder.patch_embed.patch_size[0]
    return partial(grouped_patch_mask, grid, group, section.mask_ratio)


def build(encoder: nn.Module, backbone: BackboneSpec, section: SimMIMConfig, fresh: bool = True) -> SimMIM:
    return SimMIM(encoder, backbone, encoder.patch_embed.proj.in_channels, norm_pix_loss=section.norm_pix_loss)


SPEC = ObjectiveSpec(name="simmim", Config=SimMIMConfig, build=build, supports=frozenset({"vit", "swin"}),
                     mask_generator=mask_generator, check=check)
