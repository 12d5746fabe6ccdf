"""Small pieces every stage uses: output folders, loaders, metadata."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.data.dataset import ManifestDataset
from pipeline.data.manifest import Record
from pipeline.data.transforms import eval_transform, train_transform
from pipeline.models.backbones import FAMILIES, backbone_spec
from pipeline.models.objectives import OBJECTIVES


def block_names(cfg: Config) -> tuple[str, ...]:
    """Class names of every transformer block the run trains (FSDP shard units): the backbone's,
    its encoder family's, and the objective's own (e.g. MAE's decoder)."""
    spec = backbone_spec(cfg.model.backbone)
    classes = (*spec.block_classes, *FAMILIES[spec.encoder_family].block_classes,
               *OBJECTIVES[cfg.pretrain.objective.name].block_classes)
    return tuple(sorted({c.__name__ for c in classes})) or ("Block",)


def geometry_meta(cfg: Config, stats: dict) -> dict:
    """What a later stage (or the registered model) needs to rebuild the network."""
    return {"backbone": cfg.model.backbone, "img_size": cfg.model.img_size,
            "patch_size": cfg.model.patch_size, "window_size": cfg.model.window_size,
            "in_chans": len(stats["channels"]), "channels": stats["channels"], "stats": stats}


def make_dataset(cfg: Config, records: list[Record], stats: dict, train: bool,
                 img_size: int | None = None, read_fn=None, num_labels: int | None = None) -> ManifestDataset:
    """Records -> Dataset with the config's reader options and train/eval transform; with
    `num_labels` (multi-label) its targets are multi-hot [num_labels]."""
    size = img_size or cfg.model.img_size
    transform = (train_transform(cfg.data.augment, size, cfg.data.augment_options) if train
                 else eval_transform(size))
    return ManifestDataset(records, stats, transform, cfg.data.reader_options, read_fn, num_labels)


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
