"""Visual tokenizers for BEiT, learned on the user's own imagery.

`VisualTokenizer` maps every patch of an image to one of K codes (its visual token):

    images [B, C, H, W] -> encoder (a timm ViT) -> patch features [B, L, D]
      -> encode head (Linear, Tanh, Linear: BEiT v2's encode_task_layer) -> z [B, L, d]
      -> vector quantizer -> codes [B, L] in 0..K-1 and their code vectors [B, L, d]
      -> decoder (Linear d -> Dd, learned position embedding, timm Blocks, LayerNorm,
         decode head Linear, Tanh, Linear) -> prediction [B, L, T]

Two kinds, by what the decoder reconstructs:
- `vqkd` (BEiT v2, Peng et al. 2022, VQ-KD): the patch features [B, L, T] of a frozen **teacher**
  encoder, loss 1 - cosine similarity (eq. 2 of the paper; beit2/modeling_vqkd.py). The teacher
  is any domain encoder (an MAE encoder by default), resampled to the tokenizer's patch grid.
  With `center_targets` (mimflow's addition) the batch's mean feature is subtracted first: a
  domain encoder's patch features can share one dominant direction (an MAE ViT on the Landsat
  pool: mean cosine 0.86 to the mean feature), and then 1 - cosine is small for a handful of
  codes; on that pool centring raised the share of codes in use from 4 % to 17 % and the
  perplexity from 6 to 19 after 160 steps.
- `vqvae`: the normalised pixels of each patch [B, L, P*P*C], mean squared error.

The quantizer is vector-quantize-pytorch's `VectorQuantize`: cosine-similarity codebook
(z and codes l2-normalised, as VQ-KD), codes updated by exponential moving averages of their
assigned vectors, initialised by k-means on the first batch, and codes whose average assignment
count falls below a threshold replaced by vectors of the batch (dead-code replacement); the
commitment loss pulls z towards its code. Under DDP the library all-reduces the codebook
statistics, so every rank keeps the same codebook.

Pure: no I/O; a tokenizer is rebuilt from the `architecture` dict its weights folder records
(`build_tokenizer(**architecture, ...)`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from vector_quantize_pytorch import VectorQuantize

from pipeline.models.frozen import HoldsFrozen

KINDS = ("vqkd", "vqvae")


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, P*P*C], patches in row-major order, each (p, q, c) flattened."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """codes (any shape, values 0..K-1) -> perplexity exp(H(p)) of the code frequencies p (1: one
    code for everything, K: all codes equally often) and the share of the K codes used at least once."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).double()
    p = counts[counts > 0] / counts.sum()
    return {"perplexity": torch.exp(-(p * p.log()).sum()), "codes_used": (counts > 0).double().mean()}


class TeacherFeatures(nn.Module):
    """A frozen domain encoder's patch features on the tokenizer's grid: images [B, C, H, W] ->
    [B, L, T], T = the encoder's feature width. Uses the family's `masked_features` with nothing
    masked; features of another grid (e.g. a Swin's coarser last stage) are resampled bilinearly."""

    def __init__(self, encoder: nn.Module, masked_features, grid: tuple[int, int]):
        super().__init__()
        if masked_features is None:
            raise ValueError(f"a {type(encoder).__name__} teacher has no patch features to distil")
        self.encoder, self._features, self.grid = encoder, masked_features, tuple(grid)
        self.width = encoder.num_features
        self.register_buffer("_no_token", torch.zeros(1, 1, encoder.patch_embed.proj.out_channels), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = self.encoder.patch_embed.grid_size
        mask = torch.zeros(images.shape[0], h, w, dtype=torch.bool, device=images.device)
        feats = self._features(self.encoder, images, mask, self._no_token)  # [B, T, h', w']
        if tuple(feats.shape[-2:]) != self.grid:
            feats = F.interpolate(feats.float(), size=self.grid, mode="bilinear", align_corners=False)
        return feats.flatten(2).transpose(1, 2)  # [B, L, T]


def _task_head(dim_in: int, dim_out: int) -> nn.Sequential:
    """BEiT v2's encode/decode_task_layer: Linear, Tanh, Linear."""
    return nn.Sequential(nn.Linear(dim_in, dim_in), nn.Tanh(), nn.Linear(dim_in, dim_out))


class VisualTokenizer(HoldsFrozen):
    """See the module docstring. `teacher` (vqkd only, for training) is held frozen: not trained,
    not saved. Raises ValueError when the teacher's features or target_dim do not fit."""

    def __init__(self, encoder: nn.Module, kind: str, codebook_size: int, code_dim: int, target_dim: int,
                 decoder_dim: int = 128, decoder_depth: int = 1, decoder_heads: int = 4, decay: float = 0.99,
                 kmeans_init: bool = True, dead_code_threshold: float = 1.0, commitment_weight: float = 1.0,
                 teacher: TeacherFeatures | None = None, center_targets: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind {kind!r}: expected one of {KINDS}")
        self.kind, self.codebook_size, self.target_dim = kind, codebook_size, target_dim
        self.in_chans = encoder.patch_embed.proj.in_channels
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.grid = tuple(encoder.patch_embed.grid_size)
        self.dead_code_threshold, self.center_targets = dead_code_threshold, center_targets
        self.encoder = encoder
        self.encode_head = _task_head(encoder.num_features, code_dim)
        self.quantizer = VectorQuantize(dim=code_dim, codebook_size=codebook_size, use_cosine_sim=True, decay=decay,
                                        kmeans_init=kmeans_init, threshold_ema_dead_code=dead_code_threshold,
                                        commitment_weight=commitment_weight)
        self.decoder_embed = nn.Linear(code_dim, decoder_dim)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], decoder_dim))
        trunc_normal_(self.decoder_pos_embed, std=0.02)
        self.decoder = nn.Sequential(*[Block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decode_head = _task_head(decoder_dim, target_dim)
        if kind == "vqkd" and teacher is not None:  # a trained one loaded to tokenize needs none
            if teacher.width != target_dim or teacher.grid != self.grid:
                raise ValueError(f"teacher features {teacher.grid} x {teacher.width} do not fit the tokenizer's "
                                 f"grid {self.grid} and target width {target_dim}")
            self.hold("teacher", teacher)
        elif kind == "vqvae" and target_dim != self.patch_size**2 * self.in_chans:
            raise ValueError(f"a vqvae tokenizer reconstructs P*P*C = {self.patch_size**2 * self.in_chans} "
                             f"values per patch, not target_dim={target_dim}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> z [B, L, d] (before quantisation)."""
        if images.shape[1] != self.in_chans:
            raise ValueError(f"the tokenizer expects {self.in_chans} channels, got images of shape {tuple(images.shape)}")
        feats = self.encoder.forward_features(images)[:, self.encoder.num_prefix_tokens:]  # [B, L, D]
        return self.encode_head(feats)

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """code vectors [B, L, d] -> prediction [B, L, T]."""
        x = self.decoder_embed(quantized) + self.decoder_pos_embed
        return self.decode_head(self.decoder_norm(self.decoder(x)))

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder reconstructs: [B, L, T]."""
        if self.kind == "vqkd":
            if "teacher" not in self.__dict__.get("_frozen_modules", {}):
                raise ValueError("this vqkd tokenizer holds no teacher: it can tokenize, not train")
            feats = self.frozen("teacher")(images).type_as(images)  # [B, L, T]
            if self.center_targets:  # the batch's mean feature over all its patches
                feats = feats - feats.flatten(0, 1).mean(0)
            return feats
        return patchify(images, self.patch_size)

    def reconstruction_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "vqkd":  # BEiT v2: 1 - cosine similarity to the teacher's features
            return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
        return F.mse_loss(pred, target)

    def forward(self, images: torch.Tensor) -> dict:
        """images [B, C, H, W] -> loss (reconstruction + commitment), codes [B, h, w], pred [B, L, T],
        metrics {recon_loss, commit_loss, perplexity, codes_used} of this batch. In train mode the
        codebook is updated (EMA, k-means init on the first call, dead-code replacement)."""
        z = self.encode(images)
        quantized, codes, commit = self.quantizer(z)  # [B, L, d], [B, L], scalar
        pred = self.decode(quantized)
        recon = self.reconstruction_loss(pred, self.targets(images))
        usage = codebook_usage(codes, self.codebook_size)
        metrics = {"recon_loss": recon.detach(), "commit_loss": commit.detach(), **usage}
        return {"loss": recon + commit, "codes": codes.reshape(-1, *self.grid), "pred": pred, "metrics": metrics}

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> visual tokens [B, h, w] (int64, 0..K-1): each patch's nearest code
        by cosine similarity. Call in eval mode (train mode would update the codebook)."""
        _, codes, _ = self.quantizer(self.encode(images))
        return codes.reshape(-1, *self.grid)

    def dead_codes(self) -> int:
        """Codes assigned at most max(1, dead_code_threshold) vectors per training step on (EMA)
        average: unused ones, and those just replaced by a batch vector (the library resets a
        replaced code's count to the threshold), so replacement does not hide them."""
        counts = self.quantizer._codebook.cluster_size  # [1, K], the library's moving average
        return int((counts <= max(1.0, self.dead_code_threshold)).sum())


def build_tokenizer(encoder: nn.Module, kind: str, codebook_size: int, code_dim: int, target_dim: int,
                    decoder_dim: int, decoder_depth: int, decoder_heads: int, decay: float, kmeans_init: bool,
                    dead_code_threshold: float, commitment_weight: float, teacher: TeacherFeatures | None = None,
                    center_targets: bool = True, **_ignored) -> VisualTokenizer:
    """A tokenizer from its recorded architecture (extra keys, e.g. encoder_backbone, are ignored)."""
    return VisualTokenizer(encoder, kind, codebook_size, code_dim, target_dim, decoder_dim, decoder_depth,
                           decoder_heads, decay, kmeans_init, dead_code_threshold, commitment_weight, teacher,
                           center_targets)


def debug_tokenizer(encoder: nn.Module, codebook_size: int = 16) -> VisualTokenizer:
    """A tiny vqvae tokenizer with a random (not k-means) codebook, so that even untrained it maps
    patches to many different tokens: the tests' stand-in for a trained one."""
    p, c = encoder.patch_embed.patch_size[0], encoder.patch_embed.proj.in_channels
    return VisualTokenizer(encoder, "vqvae", codebook_size, code_dim=8, target_dim=p * p * c, decoder_dim=16,
                           decoder_depth=1, decoder_heads=2, kmeans_init=False)

