"""Data loaders for training and prediction, built alike by every stage."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.config import Config


def make_loader(ds: Dataset, batch_size: int, cfg: Config, train: bool, world_size: int = 1) -> DataLoader:
    """Raises ValueError on an empty dataset (a split with no images)."""
    if len(ds) == 0:
        raise ValueError("empty dataset: check the manifest's splits")
    # Dropping the last partial batch keeps MAE's per-batch masking statistics stable, but
    # only when there is more than one global batch to draw from.
    drop_last = train and len(ds) >= 2 * batch_size * world_size
    return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=drop_last,
                      num_workers=cfg.run.num_workers, persistent_workers=cfg.run.num_workers > 0,
                      generator=torch.Generator().manual_seed(cfg.run.seed) if train else None)
