"""BEiT (Bao et al. 2021): masked image modelling by predicting visual tokens.

A frozen visual tokenizer (pipeline/models/tokenizer.py, trained on the domain's own imagery)
maps every patch to one of K codes. The encoder sees the image with block-wise masked patch
embeddings replaced by a learned mask token; a linear head over the codebook predicts, at each
masked position, the code the tokenizer gives the unmasked patch; the loss is cross-entropy on
masked positions only (modeling_pretrain.py and engine_for_pretraining.py of the BEiT code).
Masks are drawn in the data pipeline by BEiT's block-wise generator (pipeline/data/masking.py).

The tokenizer is held frozen (pipeline/models/frozen.py): it is not trained, not in the
optimizer and not in the state dict.
"""
from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.layers import trunc_normal_
from torch import nn

from pipeline.configbase import ObjectiveConfig
from pipeline.data.masking import blockwise_mask
from pipeline.models.backbones import BackboneSpec
from pipeline.models.frozen import HoldsFrozen
from pipeline.models.objectives import ObjectiveSpec
from pipeline.models.tokenizer import VisualTokenizer


class BEiTConfig(ObjectiveConfig):
    name: Literal["beit"] = "beit"
    # the visual tokenizer: a weights folder, MLflow run id, runs:/ or models:/ URI (`mimflow tokenizer`);
    # None: `mimflow run` trains one first (the `tokenizer` section), `mimflow pretrain` refuses
    tokenizer: str | None = None
    mask_ratio: float = Field(0.4, gt=0, lt=1)  # BEiT: 75 of 196 patches
    min_block_patches: int | None = Field(None, ge=1)  # None: BEiT's 16 of 196, scaled to the grid
    min_aspect: float = Field(0.3, gt=0, le=1)  # block height / width in [min_aspect, 1 / min_aspect]


class BEiT(HoldsFrozen):
    def __init__(self, encoder: nn.Module, backbone: BackboneSpec, tokenizer: VisualTokenizer, fast: bool = True):
        super().__init__()
        if backbone.masked_features is None:
            raise ValueError(f"BEiT needs masked features from the {backbone.family} family; it has none")
        grid = tuple(encoder.patch_embed.grid_size)
        in_chans = encoder.patch_embed.proj.in_channels
        if tokenizer.grid != grid or tokenizer.in_chans != in_chans:
            raise ValueError(f"the tokenizer's token grid {tokenizer.grid} of {tokenizer.in_chans}-channel images "
                             f"does not fit the encoder's patch grid {grid} of {in_chans}-channel images")
        self.encoder = encoder
        self._features = backbone.masked_features  # a function, not a module: not in the state dict
        # the encoder's last block at the masked patches only, where the family can (the same maths)
        self._features_at = backbone.masked_features_at if fast else None
        self.in_chans, self.grid = in_chans, grid
        dim = encoder.patch_embed.proj.out_channels
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.lm_head = nn.Linear(encoder.num_features, tokenizer.codebook_size)  # one logit per code
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)
        self.hold("tokenizer", tokenizer)

    @property
    def tokenizer(self) -> VisualTokenizer:
        return self.frozen("tokenizer")

    def logits(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W], mask [B, h, w] (True = masked) -> code logits at every patch [B, L, K]."""
        feats = self._features(self.encoder, images, mask, self.mask_token)  # [B, D, h, w]
        return self.lm_head(feats.flatten(2).transpose(1, 2))

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """images [B, C, H, W], mask [B, h, w] over the patch grid (True = masked) -> loss
        (cross-entropy on masked patches), pred [N_masked, K] logits, mask [B, L] (1 = masked),
        tokens [B, h, w] (the tokenizer's), metrics {token_accuracy on masked patches}."""
        if mask is None:
            raise ValueError("BEiT needs a block-wise mask [B, h, w] from the data pipeline")
        if images.shape[1] != self.in_chans:
            raise ValueError(f"BEiT expects {self.in_chans} channels, got images of shape {tuple(images.shape)}")
        mask = mask.bool()
        tokens = self.tokenizer.tokenize(images)  # [B, h, w], no gradient
        masked = mask.flatten(1)  # [B, L]
        # only the masked positions go through the head (BEiT's lm_head(x[bool_masked_pos]))
        pred = self.lm_head(self._masked_patch_features(images, mask))  # [N_masked, K]
        target = tokens.flatten(1)[masked]  # [N_masked]
        loss = F.cross_entropy(pred, target)
        accuracy = (pred.detach().argmax(-1) == target).float().mean()
        return {"loss": loss, "pred": pred, "mask": masked.float(), "tokens": tokens,
                "metrics": {"token_accuracy": accuracy}}

    def _masked_patch_features(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """-> the encoder's features at the masked patches [N_masked, D], image by image in raster
        order (x[bool_masked_pos]). Fast form: the last block runs at each image's masked rows only,
        padded to the largest count per image (the padding rows are dropped after)."""
        masked = mask.flatten(1)  # [B, L]
        counts = masked.sum(1)  # [B]
        if self._features_at is not None and int(counts.max()) > 0:
            # each image's masked positions first, in raster order (a stable sort), then padding
            rows = torch.sort((~masked).to(torch.uint8), dim=1, stable=True).indices[:, :int(counts.max())]  # [B, M]
            feats = self._features_at(self.encoder, images, mask, self.mask_token, rows)  # [B, M, D]
            if feats is not None:
                return feats[torch.arange(rows.shape[1], device=rows.device) < counts[:, None]]
        feats = self._features(self.encoder, images, mask, self.mask_token)  # [B, D, h, w]
        return feats.flatten(2).transpose(1, 2)[masked]

    @torch.no_grad()
    def predict_tokens(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        """For figures: the tokenizer's tokens [B, h, w], the predicted tokens [B, h, w] (the
        tokenizer's at visible patches), the mask [B, h, w], loss and token accuracy on masked patches."""
        mask = mask.bool()
        tokens = self.tokenizer.tokenize(images)
        pred = self.logits(images, mask).argmax(-1).reshape(tokens.shape)
        out = self(images, mask)
        return {"tokens": tokens, "pred": torch.where(mask, pred, tokens), "mask": mask, "loss": out["loss"],
                "accuracy": out["metrics"]["token_accuracy"]}


def check(section: BEiTConfig, encoder: nn.Module, backbone: BackboneSpec, img_size: int) -> None:
    """One visual token per patch: the family's features must come on the patch grid, and the
    mask must cover at least one patch. Raises ValueError naming the values."""
    if backbone.masked_features is None or backbone.output_stride is None:
        raise ValueError(f"BEiT on {backbone.family}: the family has no masked patch features")
    h, w = encoder.patch_embed.grid_size
    if round(h * w * section.mask_ratio) < 1:
        raise ValueError(f"mask_ratio={section.mask_ratio} masks no patch of the {h} x {w} patch grid")
    patch, stride = encoder.patch_embed.patch_size[0], backbone.output_stride(encoder)
    if stride != patch:
        raise ValueError(f"BEiT predicts one visual token per patch: the {backbone.family} encoder's features "
                         f"come every {stride} px, not every patch ({patch} px)")


def mask_generator(section: BEiTConfig, encoder: nn.Module, backbone: BackboneSpec, img_size: int):
    return partial(blockwise_mask, tuple(encoder.patch_embed.grid_size), section.mask_ratio,
                   min_block_patches=section.min_block_patches, min_aspect=section.min_aspect)


def build(encoder: nn.Module, backbone: BackboneSpec, section: BEiTConfig, fresh: bool = True,
          tokenizer: VisualTokenizer | None = None) -> BEiT:
    """fresh is moot: BEiT initialises only its own mask token and head, never the encoder."""
    if tokenizer is None:
        raise ValueError("BEiT needs a visual tokenizer (pretrain.objective.tokenizer, or `mimflow run`, "
                         "which trains one first)")
    return BEiT(encoder, backbone, tokenizer)


# BEiT's fine-tuning recipe (Bao et al. 2021, appendix): AdamW, betas (0.9, 0.999), weight decay 0.05,
# layer decay 0.65 for the 12-block base model (0.75 large; shallow models take up to 0.9)
FINETUNE = dict(name="adamw", base_lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), layer_decay=0.65)

SPEC = ObjectiveSpec(name="beit", Config=BEiTConfig, build=build, supports=frozenset({"beit", "vit"}),
                     mask_generator=mask_generator, check=check, targets="tokens", finetune_optimizer=FINETUNE)
