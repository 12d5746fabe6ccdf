"""Small pieces every stage uses: output folders, loaders, metadata."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.config import Config


def stage_dir(cfg: Config, stage: str) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name / stage


def make_loader(ds: Dataset, batch_size: int, cfg: Config, train: bool, world_size: int = 1) -> DataLoader:
    if len(ds) == 0:
        raise ValueError("empty dataset: check the manifest's splits")
    # Dropping the last partial batch keeps MAE's per-batch masking statistics stable, but
    # only when there is more than one global batch to draw from.
    drop_last = train and len(ds) >= 2 * batch_size * world_size
    return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=drop_last,
                      num_workers=cfg.run.num_workers, persistent_workers=cfg.run.num_workers > 0,
                      generator=torch.Generator().manual_seed(cfg.run.seed) if train else None)


def geometry_meta(cfg: Config, stats: dict) -> dict:
    """What a later stage (or the registered model) needs to rebuild the network."""
    return {"backbone": cfg.model.backbone, "img_size": cfg.model.img_size,
            "patch_size": cfg.model.patch_size, "in_chans": len(stats["channels"]),
            "channels": stats["channels"], "stats": stats}
