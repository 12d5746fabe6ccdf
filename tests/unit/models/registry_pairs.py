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


def real_tiles(prepared, n: int, split: str = "unlabelled") -> tuple[torch.Tensor, torch.Tensor]:
    """The first n tiles of a prepared split (falling back to train, as pretraining's pool does),
    normalised as training sees them, at the tiles' own size -> (images [n, C, H, W], labels [n];
    -1 where unlabelled)."""
    from pipeline.data.dataset import ManifestDataset
    from pipeline.data.manifest import load_manifest, select
    from pipeline.data.stats import load_stats
    from pipeline.data.transforms import eval_transform

    records = load_manifest(prepared / "manifest.csv")
    pool = (select(records, split) or select(records, "train"))[:n]
    data = ManifestDataset(pool, load_stats(prepared / "stats.json"), eval_transform(16))
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([r.label if isinstance(r.label, int) else -1 for r in pool])
    return images, labels


def adamw_loss_curve(model, tiles: torch.Tensor, loss_of, steps: int = 200, batch: int = 32,
                     lr: float = 2e-3) -> torch.Tensor:
    """`steps` AdamW steps (weight decay 0.05) over `tiles` batch after batch, wrapping around ->
    the losses [steps]. loss_of(model, images, step) -> that step's loss (drawing the step's masks
    from `step`, so that two models compared see the same ones)."""
    from pipeline.config import OptimizerConfig
    from pipeline.engine.optim import make_optimizer

    optimizer = make_optimizer(model, lr, OptimizerConfig(name="adamw", weight_decay=0.05))
    losses = []
    for step in range(steps):
        at = (step * batch) % len(tiles)
        loss = loss_of(model, tiles[at:at + batch], step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return torch.tensor(losses)
