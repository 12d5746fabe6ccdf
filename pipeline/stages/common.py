"""Small pieces every stage uses: output folders, loaders, metadata."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import Config, config_from_dict
from pipeline.data.dataset import ManifestDataset
from pipeline.data.manifest import Record, load_dataset_info
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


MAX_AUTO_IMG = 224  # px: the largest image size chosen from the data (ViT-B's)
AUTO_PATCHES = (2, 4, 8, 16, 32)


def resolve_geometry(cfg: Config, prepared: Path, say: bool = True) -> Config:
    """model.img_size / patch_size left to the data (None) -> a config with both set from the
    prepared data's median image size (capped at MAX_AUTO_IMG, a multiple of 8 from 16 px up), said
    once in the console, as is any resize of the images to the model's size. Raises ConfigError
    when the resulting geometry cannot be built (config_from_dict checks it as for a recipe)."""
    info = load_dataset_info(prepared)
    size = info.get("image_size") or {}
    tree, said = cfg.to_dict(), []
    if cfg.model.img_size is None:
        median = min(size.get("median") or [cfg.data.options.get("tile_size", 32)])
        img = min(median, MAX_AUTO_IMG)
        img = img if img < 16 else img - img % 8
        tree["model"]["img_size"] = img
        said.append(f"model.img_size={img} (the median image is {_hw(size.get('median'))} px"
                    + (f", capped at {MAX_AUTO_IMG}" if median > MAX_AUTO_IMG else "") + ")")
    img = tree["model"]["img_size"]
    if cfg.model.patch_size is None:
        fits = [p for p in AUTO_PATCHES if img % p == 0 and img // p <= 16] or [p for p in (1, *AUTO_PATCHES) if img % p == 0]
        tree["model"]["patch_size"] = fits[0]
        said.append(f"model.patch_size={fits[0]} ({img // fits[0]} x {img // fits[0]} patches)")
    if say and said:
        print(f"{cfg.run.name}: from the data: {'; '.join(said)}; set them in the recipe to choose", flush=True)
    if say and size and (size["min"] != [img, img] or size["max"] != [img, img]):
        print(f"{cfg.run.name}: images of {_hw(size['min'])} to {_hw(size['max'])} px are resized to "
              f"{img} x {img} px for the model", flush=True)
    return config_from_dict(tree, "the config with sizes from the data") if said else cfg


def _hw(hw) -> str:
    return f"{hw[0]} x {hw[1]}" if hw else "?"
