"""Every objective x every debug backbone whose family it supports, built as the stages build them."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.models.backbones import BACKBONES, DEBUG_BACKBONES, FAMILIES, create_encoder
from pipeline.models.objectives import OBJECTIVES
from pipeline.models.tokenizer import debug_tokenizer

PAIRS = [(o, b) for o in sorted(OBJECTIVES) for b in DEBUG_BACKBONES
         if BACKBONES[b].encoder_family in OBJECTIVES[o].supports]
PIXEL_PAIRS = [(o, b) for o, b in PAIRS if OBJECTIVES[o].targets == "pixels"]


def build_pair(objective: str, backbone: str, in_chans: int, img: int, patch: int, fresh: bool = True,
               encoder: torch.nn.Module | None = None):
    """-> (training module, spec, section, the encoder family's spec)."""
    spec = OBJECTIVES[objective]
    family = FAMILIES[BACKBONES[backbone].encoder_family]
    section = spec.Config(**spec.debug)
    encoder = encoder if encoder is not None else create_encoder(backbone, img, patch, in_chans)
    spec.check(section, encoder, family, img)
    # an objective that predicts visual tokens gets a tiny (untrained, random-codebook) tokenizer
    extra = {"tokenizer": debug_tokenizer(create_encoder("vit_debug", img, patch, in_chans))} \
        if spec.targets == "tokens" else {}
    return spec.build(encoder, family, section, fresh=fresh, **extra), spec, section, family


def masks_for(model, spec, section, family, img: int, batch: int, seed: int = 0):
    """Data-pipeline masks [B, h, w] when the objective takes them, else None."""
    if spec.mask_generator is None:
        return None
    draw = spec.mask_generator(section, spec.encoder(model), family, img)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([draw(rng) for _ in range(batch)]))
