"""Small pieces every stage uses: output folders, loaders, metadata."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.config import Config
from pipeline.data.dataset import ManifestDataset
from pipeline.data.manifest import Record
from pipeline.data.transforms import eval_transform, train_transform


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


def make_dataset(cfg: Config, records: list[Record], stats: dict, train: bool,
                 img_size: int | None = None, read_fn=None) -> ManifestDataset:
    """Records -> Dataset with the config's reader options and train/eval transform."""
    size = img_size or cfg.model.img_size
    transform = (train_transform(cfg.data.augment, size, cfg.data.augment_options) if train
                 else eval_transform(size))
    return ManifestDataset(records, stats, transform, cfg.data.reader_options, read_fn)


def cached_read_fn(cfg: Config, records: list[Record], accelerator):
    """With data.cache, decode `records` once into memory-mapped shards (one process per node
    builds, the others open it) -> a record reader for ManifestDataset; else None.
    Images of any mix of sizes are cached, each with its own shape."""
    if not cfg.data.cache:
        return None
    from pipeline.data.cache import cached_reader

    root = Path(cfg.data.root) / ".cache"
    if accelerator.is_local_main_process:
        cached_reader(records, root, reader_options=cfg.data.reader_options, quiet=cfg.run.quiet)
    accelerator.wait_for_everyone()
    return cached_reader(records, root, reader_options=cfg.data.reader_options, quiet=True)
