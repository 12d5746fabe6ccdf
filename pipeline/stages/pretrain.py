"""Stage 2: masked-image-model pretraining of a ViT encoder on the unlabelled pool."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import Accelerator

from pipeline.config import Config
from pipeline.data.manifest import load_dataset_info, load_manifest, select
from pipeline.data.stats import load_stats
from pipeline.distributed import seed_per_rank, set_activation_checkpointing, show_progress
from pipeline.engine.checkpoint import save_weights
from pipeline.engine.loop import train_one_epoch
from pipeline.engine.state import Checkpointer, SeededAugmentation, full_state_dict
from pipeline.engine.optim import make_optimizer, scaled_lr, warmup_cosine
from pipeline.models.backbones import create_backbone
from pipeline.models.objectives import OBJECTIVES
from pipeline.plots import reconstruction_grid
from pipeline.stages.common import cached_read_fn, geometry_meta, make_dataset, make_loader, stage_dir
from pipeline.tracking.base import Tracker


def build_mim_model(cfg: Config, in_chans: int) -> torch.nn.Module:
    p = cfg.pretrain
    vit = create_backbone(cfg.model.backbone, cfg.model.img_size, cfg.model.patch_size, in_chans)
    return OBJECTIVES[p.objective](vit, mask_ratio=p.mask_ratio, decoder_dim=p.decoder_dim,
                                   decoder_depth=p.decoder_depth, decoder_heads=p.decoder_heads,
                                   norm_pix_loss=p.norm_pix_loss)


def _log_reconstructions(model, images: torch.Tensor, epoch: int, out: Path, tracker: Tracker, seed: int,
                         main: bool) -> None:
    # Every rank runs the forward (under FSDP it is collective); rank 0 plots.
    # The plots draw their own masks (the same every epoch), leaving training's RNG stream untouched.
    with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
        torch.manual_seed(seed)
        r = model.reconstruct(images)
    if not main:
        return
    out.mkdir(parents=True, exist_ok=True)
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
    read_fn = cached_read_fn(cfg, pool, accelerator)  # epochs after the first decode nothing
    dataset = SeededAugmentation(make_dataset(cfg, pool, stats, train=True, read_fn=read_fn), cfg.run.seed)
    loader = make_loader(dataset, p.batch_size_per_device, cfg, train=True, world_size=accelerator.num_processes)
    generator = loader.generator  # the shuffle's; a checkpoint holds its state at the epoch start
    fixed = torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))])  # same tiles in every grid
    model = build_mim_model(cfg, in_chans=len(stats["channels"]))
    set_activation_checkpointing(model, cfg.run.activation_checkpointing)
    global_batch = p.batch_size_per_device * accelerator.num_processes * cfg.run.gradient_accumulation_steps
    lr = scaled_lr(p.base_lr, global_batch)
    optimizer = make_optimizer(model, lr, p.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    seed_per_rank(accelerator, cfg.run.seed)
    # accelerate syncs at the end of the loader too, so a partial accumulation window is a step
    steps_per_epoch = math.ceil(len(loader) / cfg.run.gradient_accumulation_steps)
    scheduler = warmup_cosine(optimizer, round(p.warmup_epochs * steps_per_epoch), p.epochs * steps_per_epoch)
    tracker.log_params({"pretrain.global_batch_size": global_batch, "pretrain.lr": lr,
                        "pretrain.steps_per_epoch": steps_per_epoch, "pool_size": len(pool),
                        "world_size": accelerator.num_processes})

    out = stage_dir(cfg, "pretrain")
    ckpt = Checkpointer(cfg.checkpoint, out / "checkpoints", "pretrain", accelerator, tracker, model, optimizer,
                        scheduler, generator, dataset, cfg.to_dict(), batches_per_epoch=len(loader),
                        sections=("run", "data", "model", "pretrain"))
    state = ckpt.restore()  # fresh, or where the newest checkpoint left off
    loss, progress = ckpt.extra.get("epoch_loss", float("nan")), show_progress(accelerator, cfg.run)
    for epoch in range(state.epoch, p.epochs + 1):
        loss = train_one_epoch(model, ckpt.epoch_loader(loader, state), optimizer, scheduler, accelerator,
                               lambda m, b: m(b[0])["loss"], tracker, state, "pretrain", p.log_every_steps,
                               progress, desc=f"pretrain {epoch}/{p.epochs}", clip_grad_norm=p.clip_grad_norm,
                               max_nonfinite=cfg.run.max_consecutive_nonfinite, after_step=ckpt.after_step)
        tracker.log_metrics({"pretrain/epoch_loss": loss}, step=state.step)
        if progress:
            print(f"pretrain epoch {epoch}/{p.epochs}  loss {loss:.4f}", flush=True)
        if epoch % p.recon_every_epochs == 0 or epoch == p.epochs:
            _log_reconstructions(accelerator.unwrap_model(model), fixed.to(accelerator.device), epoch, out,
                                 tracker, cfg.run.seed, accelerator.is_main_process)
        state.start_epoch(epoch + 1)
        ckpt.extra["epoch_loss"] = loss
        ckpt.save(state)

    unwrapped = accelerator.unwrap_model(model)
    encoder_state = full_state_dict(model, accelerator, submodule=unwrapped.encoder)  # collective
    if accelerator.is_main_process:
        meta = {**geometry_meta(cfg, stats), "kind": "encoder", "objective": p.objective,
                "dataset_hash": info.get("dataset_hash"), "config": cfg.to_dict(),
                "pretrain_run_id": tracker.run_id, "final_loss": loss}
        save_weights(encoder_state, out / "encoder", meta)
        tracker.log_artifacts(out / "encoder", "encoder")
        tracker.log_metrics({"pretrain/final_loss": loss}, step=state.step)
    ckpt.complete()
    accelerator.free_memory()
    return out / "encoder"
