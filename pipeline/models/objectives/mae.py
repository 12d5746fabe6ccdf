"""MAE (He et al. 2021) around a stock timm ViT, built from lightly's masked-ViT modules.

Two forms of the same step, chosen by `MAE.fast` (on wherever `pipeline.models.fast` knows the
modules): the reference is lightly's (embed all patches, keep 25 %, decode every token, read the
masked ones); the fast form embeds only the kept patches and runs the last decoder block's
queries, MLP and the prediction head only at the masked tokens the loss reads. Both give the same
loss and gradients (tests/unit/models/test_mae_fast.py); `scripts/bench_pretrain.py` times them.
"""
from __future__ import annotations

from typing import Literal

import torch
from lightly.models import utils
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
from pydantic import Field
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from pipeline.configbase import ObjectiveConfig
from pipeline.models import fast as fastvit
from pipeline.models.compiled import call_compiled
from pipeline.models.objectives import ObjectiveSpec


class MAEConfig(ObjectiveConfig):
    """MAE: encode the visible patches only, decode all, regress the masked patches' pixels."""
    name: Literal["mae"] = "mae"  # the objective
    mask_ratio: float = Field(0.75, gt=0, lt=1)  # share of patches hidden from the encoder
    decoder_dim: int = Field(64, ge=8)  # MAE's ViT-B recipe: 512 wide, 8 deep, 16 heads
    decoder_depth: int = Field(2, ge=1)  # transformer blocks of the decoder
    decoder_heads: int = Field(4, ge=1)  # attention heads of the decoder
    norm_pix_loss: bool = True  # per-patch normalised pixel targets (the paper's default)


class MAE(nn.Module):
    def __init__(self, vit: VisionTransformer, mask_ratio: float = 0.75, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, norm_pix_loss: bool = True,
                 fresh: bool = True, fast: bool = True):
        super().__init__()
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = vit.patch_embed.patch_size[0]
        self.in_chans = vit.patch_embed.proj.in_channels
        # The encoder wraps the very ViT object that fine-tuning loads later. lightly re-initialises
        # it (MAE's init, sin-cos position embedding) unless told to skip: continued pretraining
        # (fresh=False) keeps the loaded weights.
        init = "" if fresh else "skip"
        self.backbone = MaskedVisionTransformerTIMM(vit=vit, weight_initialization=init,
                                                    pos_embed_initialization="sincos" if fresh else "skip")
        # MAE drops masked tokens (idx_keep) instead of replacing them, so the encoder's mask
        # token gets no gradient; frozen, DDP does not wait for it.
        self.backbone.mask_token.requires_grad_(False)
        self.sequence_length = self.backbone.sequence_length  # patches + class token
        self.decoder_embed = nn.Linear(vit.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=decoder_dim,
            depth=decoder_depth, num_heads=decoder_heads, num_prefix_tokens=vit.num_prefix_tokens)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * self.in_chans)
        # the fast form where its pieces know the modules exactly (a stock timm ViT and Block)
        self.fast = fast and fastvit.can_embed_kept_patches(vit) and fastvit.can_run_rows(self.decoder.blocks[-1])
        self.compiled_loss_at = None  # compile_step() sets it (run.compile)

    @property
    def encoder(self) -> VisionTransformer:
        return self.backbone.vit

    def random_masking(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> idx_keep [B, 1 + L_keep] (class token first), idx_mask [B, L_mask]."""
        return utils.random_token_mask(size=(batch_size, self.sequence_length),
                                       mask_ratio=self.mask_ratio, device=device)

    def forward_encoder(self, images: torch.Tensor, idx_keep: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W], idx_keep [B, 1 + K] -> encoded kept tokens [B, 1 + K, D]."""
        if not self.fast:
            return self.backbone.encode(images=images, idx_keep=idx_keep)
        vit = self.backbone.vit
        x = fastvit.embed_kept_patches(vit, images, idx_keep)  # [B, 1 + K, D]
        x = checkpoint_seq(vit.blocks, x) if self.backbone.grad_checkpointing and x.requires_grad else vit.blocks(x)
        return vit.norm(x)

    def forward_decoder(self, x_encoded, idx_keep, idx_mask) -> torch.Tensor:
        """-> predicted pixels of the masked patches [B, L_mask, P*P*C] (lightly's patch order)."""
        x = self.decoder_embed(x_encoded)  # [B, 1 + L_keep, Dd]
        tokens = utils.repeat_token(self.decoder.mask_token, (x.shape[0], self.sequence_length))
        tokens = utils.set_at_index(tokens, idx_keep, x.type_as(tokens))  # [B, 1 + L, Dd]
        tokens = self.decoder.add_pos_embed(tokens)
        if not self.fast:
            return self.decoder_pred(utils.get_at_index(self.decoder.decode(tokens), idx_mask))
        # Every block but the last needs all tokens (they are the last one's keys and values);
        # of the last one's output the loss reads the masked tokens only.
        *blocks, last = self.decoder.blocks
        for block in blocks:
            tokens = block(tokens)
        masked = fastvit.block_rows(last, tokens, idx_mask)  # [B, L_mask, Dd]
        return self.decoder_pred(self.decoder.norm(masked))

    def forward_loss(self, images, pred, idx_mask) -> torch.Tensor:
        # idx_mask counts the class token as position 0; patches start at 0.
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)
        if self.norm_pix_loss:  # per-patch normalised target, as in the MAE paper
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return ((pred - target) ** 2).mean()

    def loss_at(self, images: torch.Tensor, idx_keep: torch.Tensor, idx_mask: torch.Tensor):
        """The step's maths for given masks: images [B, C, H, W] -> (loss, pred [B, L_mask, P*P*C]).
        No randomness and no data-dependent shapes: what `run.compile` compiles."""
        pred = self.forward_decoder(self.forward_encoder(images, idx_keep), idx_keep, idx_mask)
        return self.forward_loss(images, pred, idx_mask), pred

    def compile_step(self) -> None:
        """torch.compile `loss_at` (the masks are drawn eagerly, so the random stream is as ever).
        Compilation happens at the first step; if it fails, that step and all later ones run eager."""
        self.compiled_loss_at = torch.compile(self.loss_at)

    def _loss(self, images, idx_keep, idx_mask):
        # plots (no gradients) stay eager: no second compile; a compiler failure falls back to eager
        return call_compiled(self, "compiled_loss_at", self.loss_at, "MAE", images, idx_keep, idx_mask)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images [B, C, H, W] -> loss, pred [B, L_mask, P*P*C], mask [B, L] (1 = masked).
        MAE draws its own masks (torch RNG); `mask` must be None."""
        if mask is not None:
            raise ValueError("MAE draws its own masks; the data pipeline must not pass one")
        B, C = images.shape[:2]
        if C != self.in_chans:
            raise ValueError(f"MAE expects {self.in_chans} channels, got images of shape {tuple(images.shape)}")
        idx_keep, idx_mask = self.random_masking(B, images.device)  # eager: torch's RNG stream, as ever
        loss, pred = self._loss(images, idx_keep, idx_mask)
        mask = torch.zeros(B, self.sequence_length - 1, device=images.device)
        mask.scatter_(1, idx_mask - 1, 1.0)
        return {"loss": loss, "pred": pred, "mask": mask, "idx_mask": idx_mask, "metrics": {}}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """For plots: masked input and reconstruction, both [B, C, H, W] in input units, and the
        patch mask [B, L] (1 = masked)."""
        out = self(images)
        patches = utils.patchify(images, self.patch_size)  # [B, L, P*P*C]
        pred = out["pred"]
        if self.norm_pix_loss:  # undo the per-patch normalisation with the true patch stats
            target = utils.get_at_index(patches, out["idx_mask"] - 1)
            pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        recon = utils.set_at_index(patches.clone(), out["idx_mask"] - 1, pred)
        masked = patches * (1 - out["mask"]).unsqueeze(-1)
        return {"masked": utils.unpatchify(masked, self.patch_size, self.in_chans),
                "recon": utils.unpatchify(recon, self.patch_size, self.in_chans),
                "mask": out["mask"], "loss": out["loss"]}


def build(encoder: VisionTransformer, backbone, section: MAEConfig, fresh: bool = True) -> MAE:
    return MAE(encoder, mask_ratio=section.mask_ratio, decoder_dim=section.decoder_dim,
               decoder_depth=section.decoder_depth, decoder_heads=section.decoder_heads,
               norm_pix_loss=section.norm_pix_loss, fresh=fresh)


SPEC = ObjectiveSpec(name="mae", Config=MAEConfig, build=build, supports=frozenset({"vit"}),
                     block_classes=(Block,), debug=dict(decoder_dim=16, decoder_depth=1, decoder_heads=2))
