"""Stage 3: fine-tune a ViT classifier on (a stratified fraction of) the labelled tiles."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import Accelerator

from pipeline.config import Config
from pipeline.data.manifest import load_dataset_info, load_manifest, select, stratified_fraction
from pipeline.data.stats import load_stats
from pipeline.distributed import seed_per_rank, set_activation_checkpointing, show_progress
from pipeline.engine.checkpoint import load_weights, save_weights
from pipeline.engine.loop import predict, train_one_epoch
from pipeline.engine.state import Checkpointer, SeededAugmentation, full_state_dict
from pipeline.engine.optim import make_optimizer, scaled_lr, warmup_cosine
from pipeline.metrics import classification_metrics
from pipeline.models.backbones import create_backbone
from pipeline.models.transfer import load_encoder
from pipeline.stages.common import cached_read_fn, geometry_meta, make_dataset, make_loader, stage_dir
from pipeline.tracking.base import Tracker


def _init_encoder(cfg: Config, model: torch.nn.Module, encoder_dir: Path | None, stats: dict) -> dict:
    """Load the encoder into `model` (unless scratch) -> the stats the model must be fed with."""
    if encoder_dir is None:
        return stats
    state, meta = load_weights(encoder_dir)
    if meta.get("channels", stats["channels"]) != stats["channels"]:
        raise ValueError(f"encoder {encoder_dir} was pretrained on channels {meta['channels']}, "
                         f"the data has {stats['channels']}")
    load_encoder(model, state)
    return meta.get("stats", stats)  # normalise exactly as in pretraining (foreign weights: the data's)


def finetune(cfg: Config, prepared: Path, encoder_dir: Path | None, accelerator: Accelerator,
             tracker: Tracker, name: str = "finetune") -> Path:
    """-> folder with the best (val balanced accuracy) classifier, logged as artefact `classifier`."""
    f = cfg.finetune
    info = load_dataset_info(prepared)
    records = load_manifest(prepared / "manifest.csv")
    train_recs = stratified_fraction(select(records, "train"), f.label_fraction, cfg.run.seed)
    model = create_backbone(cfg.model.backbone, cfg.model.img_size, cfg.model.patch_size,
                            len(info["channels"]), num_classes=len(info["classes"]), drop_path_rate=f.drop_path)
    stats = _init_encoder(cfg, model, encoder_dir, load_stats(prepared / "stats.json"))
    set_activation_checkpointing(model, cfg.run.activation_checkpointing)
    world = accelerator.num_processes
    read_fn = cached_read_fn(cfg, train_recs, accelerator)  # epochs after the first decode nothing
    dataset = SeededAugmentation(make_dataset(cfg, train_recs, stats, train=True, read_fn=read_fn), cfg.run.seed)
    train_loader = make_loader(dataset, f.batch_size_per_device, cfg, train=True, world_size=world)
    generator = train_loader.generator  # the shuffle's; a checkpoint holds its state at the epoch start
    val_loader = make_loader(make_dataset(cfg, select(records, "val"), stats, train=False),
                             cfg.evaluate.batch_size, cfg, train=False)
    global_batch = f.batch_size_per_device * world * cfg.run.gradient_accumulation_steps
    lr = scaled_lr(f.base_lr, global_batch)
    optimizer = make_optimizer(model, lr, f.weight_decay, layer_decay=f.layer_decay)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    seed_per_rank(accelerator, cfg.run.seed)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.run.gradient_accumulation_steps)
    scheduler = warmup_cosine(optimizer, round(f.warmup_epochs * steps_per_epoch), f.epochs * steps_per_epoch)
    tracker.log_params({"finetune.init_resolved": str(encoder_dir or "scratch"), "finetune.lr": lr,
                        "finetune.global_batch_size": global_batch, "train_images": len(train_recs),
                        "world_size": world})

    criterion = torch.nn.CrossEntropyLoss(label_smoothing=f.label_smoothing)
    ckpt = Checkpointer(cfg.checkpoint, stage_dir(cfg, name) / "checkpoints", name, accelerator, tracker, model,
                        optimizer, scheduler, generator, dataset, cfg.to_dict(), batches_per_epoch=len(train_loader),
                        sections=("run", "data", "model", "finetune"))
    state = ckpt.restore()  # fresh, or where the newest checkpoint left off (with the best so far)
    best, best_score = ckpt.extra_tensors, ckpt.extra.get("best_score", -1.0)
    best_epoch, progress = ckpt.extra.get("best_epoch"), show_progress(accelerator, cfg.run)
    for epoch in range(state.epoch, f.epochs + 1):
        loss = train_one_epoch(model, ckpt.epoch_loader(train_loader, state), optimizer, scheduler, accelerator,
                               lambda m, b: criterion(m(b[0]), b[1]), tracker, state, name, f.log_every_steps,
                               progress, desc=f"{name} {epoch}/{f.epochs}", clip_grad_norm=f.clip_grad_norm,
                               max_nonfinite=cfg.run.max_consecutive_nonfinite, after_step=ckpt.after_step)
        logits, labels = predict(model, val_loader, accelerator)
        val = classification_metrics(logits, labels, len(info["classes"]))
        tracker.log_metrics({f"{name}/epoch_loss": loss, "val/accuracy": val["accuracy"],
                             "val/balanced_accuracy": val["balanced_accuracy"],
                             "val/macro_f1": val["macro_f1"]}, step=epoch)
        if progress:
            print(f"{name} epoch {epoch}/{f.epochs}  loss {loss:.4f}  val bal.acc "
                  f"{val['balanced_accuracy']:.3f}", flush=True)
        if val["balanced_accuracy"] > best_score:  # identical on every rank: metrics are gathered
            best_score = val["balanced_accuracy"]
            best = full_state_dict(model, accelerator, copy=True)  # collective; lands on rank 0
            best_epoch = epoch
        state.start_epoch(epoch + 1)
        ckpt.extra_tensors, ckpt.extra = best, {"best_score": best_score, "best_epoch": best_epoch}
        ckpt.save(state)

    out = stage_dir(cfg, name) / "classifier"
    if accelerator.is_main_process:
        meta = {**geometry_meta(cfg, stats), "kind": "classifier", "classes": info["classes"],
                "task": info.get("task", "multiclass"), "num_classes": len(info["classes"]),
                "init": f.init if encoder_dir else "scratch", "encoder": str(encoder_dir) if encoder_dir else None,
                "dataset_hash": info.get("dataset_hash"), "config": cfg.to_dict(),
                "finetune_run_id": tracker.run_id, "best_epoch": best_epoch,
                "val_balanced_accuracy": best_score}
        if encoder_dir is not None:
            meta["pretrain_run_id"] = load_weights(encoder_dir)[1].get("pretrain_run_id")
        save_weights(best, out, meta)
        tracker.log_artifacts(out, "classifier")
        tracker.log_metrics({"val/best_balanced_accuracy": best_score, "best_epoch": best_epoch})
    ckpt.complete()
    accelerator.free_memory()
    return out
