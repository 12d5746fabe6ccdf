"""Stage 2: masked-image-model pretraining of a ViT encoder on the unlabelled pool."""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from pipeline.config import Config
from pipeline.data.manifest import load_dataset_info, load_manifest, select
from pipeline.data.stats import load_stats
from pipeline.distributed import show_progress
from pipeline.engine.checkpoint import save_weights
from pipeline.engine.loop import train_one_epoch
from pipeline.engine.optim import make_optimizer, scaled_lr, warmup_cosine
from pipeline.models.backbones import create_backbone
from pipeline.models.objectives import OBJECTIVES
from pipeline.plots import reconstruction_grid
from pipeline.stages.common import geometry_meta, make_dataset, make_loader, stage_dir
from pipeline.tracking.base import Tracker


def build_mim_model(cfg: Config, in_chans: int) -> torch.nn.Module:
    p = cfg.pretrain
    vit = create_backbone(cfg.model.backbone, cfg.model.img_size, cfg.model.patch_size, in_chans)
    return OBJECTIVES[p.objective](vit, mask_ratio=p.mask_ratio, decoder_dim=p.decoder_dim,
                                   decoder_depth=p.decoder_depth, decoder_heads=p.decoder_heads,
                                   norm_pix_loss=p.norm_pix_loss)


def _log_reconstructions(model, images: torch.Tensor, epoch: int, out: Path, tracker: Tracker) -> None:
    out.mkdir(parents=True, exist_ok=True)
    r = model.reconstruct(images)
    rgb = (2, 1, 0) if images.shape[1] >= 3 else None  # bands 3-2-1 ~ true colour for Landsat
    path = reconstruction_grid(images.cpu().numpy(), r["masked"].cpu().numpy(), r["recon"].cpu().numpy(),
                               out / f"recon_epoch{epoch:03d}.png", rgb=rgb,
                               title=f"epoch {epoch}: input / masked / reconstruction (loss {r['loss']:.3f})")
    tracker.log_artifact(path, "reconstructions")


def pretrain(cfg: Config, prepared: Path, accelerator: Accelerator, tracker: Tracker) -> Path:
    """-> folder with the encoder (model.safetensors + meta.json), also logged as artefact `encoder`."""
    p = cfg.pretrain
    stats = load_stats(prepared / "stats.json")
    info = load_dataset_info(prepared)
    records = load_manifest(prepared / "manifest.csv")
    pool = select(records, "unlabelled") or select(records, "train")
    loader = make_loader(make_dataset(cfg, pool, stats, train=True),
                         p.batch_size_per_device, cfg, train=True, world_size=accelerator.num_processes)
    model = build_mim_model(cfg, in_chans=len(stats["channels"]))
    global_batch = p.batch_size_per_device * accelerator.num_processes * cfg.run.gradient_accumulation_steps
    lr = scaled_lr(p.base_lr, global_batch)
    optimizer = make_optimizer(model, lr, p.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = max(1, len(loader) // cfg.run.gradient_accumulation_steps)
    scheduler = warmup_cosine(optimizer, round(p.warmup_epochs * steps_per_epoch), p.epochs * steps_per_epoch)
    tracker.log_params({"pretrain.global_batch_size": global_batch, "pretrain.lr": lr,
                        "pretrain.steps_per_epoch": steps_per_epoch, "pool_size": len(pool),
                        "world_size": accelerator.num_processes})

    out = stage_dir(cfg, "pretrain")
    fixed = next(iter(loader))[0][:8]  # the same tiles in every reconstruction grid
    step, progress = 0, show_progress(accelerator, cfg.run)
    for epoch in range(1, p.epochs + 1):
        step, loss = train_one_epoch(model, loader, optimizer, scheduler, accelerator,
                                     lambda m, b: m(b[0])["loss"], tracker, step, "pretrain",
                                     p.log_every_steps, progress, desc=f"pretrain {epoch}/{p.epochs}")
        tracker.log_metrics({"pretrain/epoch_loss": loss}, step=step)
        if progress:
            print(f"pretrain epoch {epoch}/{p.epochs}  loss {loss:.4f}", flush=True)
        if accelerator.is_main_process and (epoch % p.recon_every_epochs == 0 or epoch == p.epochs):
            _log_reconstructions(accelerator.unwrap_model(model), fixed, epoch, out, tracker)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        encoder = accelerator.unwrap_model(model).encoder
        meta = {**geometry_meta(cfg, stats), "kind": "encoder", "objective": p.objective,
                "dataset_hash": info.get("dataset_hash"), "config": cfg.to_dict(),
                "pretrain_run_id": tracker.run_id, "final_loss": loss}
        save_weights(encoder.state_dict(), out / "encoder", meta)
        tracker.log_artifacts(out / "encoder", "encoder")
        tracker.log_metrics({"pretrain/final_loss": loss}, step=step)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return out / "encoder"
