"""Stage 3: fine-tune a classifier (or train a linear probe) on a stratified fraction of the labels.

The classifier is the backbone family's own (timm ViT, distilled DeiT, Swin; a torchvision ResNet
for teachers and baselines), built from the same meta.json that later rebuilds it for evaluation
and the registered model. A distilled DeiT learns from a frozen CNN teacher (hard distillation).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from pipeline.config import Config, config_from_dict, stage_dir
from pipeline.data.manifest import load_dataset_info, load_manifest, select, stratified_fraction
from pipeline.data.stats import load_stats
from pipeline.engine.fit import EpochEnd, Task, fit
from pipeline.engine.loaders import make_loader
from pipeline.engine.loop import predict
from pipeline.engine.state import SeededAugmentation
from pipeline.metrics import classification_metrics
from pipeline.models.backbones import backbone_spec, classifier_names
from pipeline.models.transfer import load_encoder
from pipeline.stages.common import cached_read_fn, geometry_meta, make_dataset
from pipeline.tracking.base import Tracker
from pipeline.weights import build_classifier, load_classifier, load_weights, read_meta, save_weights


def teacher_config(cfg: Config) -> Config:
    """The config a distillation teacher is trained with: the same data, labels, budget and
    augmentations, the teacher backbone, from scratch, without distillation of its own."""
    tree = cfg.to_dict()
    tree["model"]["backbone"] = cfg.finetune.distillation.teacher_backbone
    tree["finetune"].update(init="scratch", mode="full", compare_scratch=False,
                            distillation={**tree["finetune"]["distillation"], "teacher": "none"})
    return config_from_dict(tree, "the teacher's config")


def _init_encoder(model: torch.nn.Module, backbone: str, encoder_dir: Path | None, stats: dict) -> dict:
    """Load the encoder into `model` (unless scratch) -> the stats the model must be fed with."""
    if encoder_dir is None:
        return stats
    state, meta = load_weights(encoder_dir)
    if meta.get("channels", stats["channels"]) != stats["channels"]:
        raise ValueError(f"encoder {encoder_dir} was pretrained on channels {meta['channels']}, "
                         f"the data has {stats['channels']}")
    for note in load_encoder(model, state, backbone_spec(backbone)).notes:
        print(f"finetune: init {encoder_dir}: {note}", flush=True)
    return meta.get("stats", stats)  # normalise exactly as in pretraining (foreign weights: the data's)


def _freeze_all_but_head(model: torch.nn.Module, backbone: str) -> None:
    """Linear probe: only the head trains (MAE's protocol: the encoder is frozen)."""
    heads = classifier_names(model, backbone_spec(backbone))
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(h + ".") for h in heads))


def _load_teacher(teacher_dir: Path, stats: dict, device) -> torch.nn.Module:
    teacher, meta = load_classifier(teacher_dir)
    if meta["stats"] != stats:
        raise ValueError(f"teacher {teacher_dir} was trained on inputs normalised with other channel statistics "
                         "than the student's; train it on the same prepared data (finetune.distillation.teacher=train)")
    return teacher.requires_grad_(False).to(device)


def classification_loss(label_smoothing: float, teacher: torch.nn.Module | None):
    """Cross-entropy; with a teacher, DeiT's hard distillation: the class head learns the labels,
    the distillation head the teacher's argmax, half and half (Touvron et al. 2021, eq. 3)."""
    def loss_fn(model, batch) -> dict:
        images, labels = batch[0], batch[1]
        out = model(images)
        if teacher is None or not isinstance(out, tuple):
            return {"loss": F.cross_entropy(out, labels, label_smoothing=label_smoothing)}
        cls_logits, dist_logits = out
        with torch.no_grad():
            teacher_labels = teacher(images).argmax(dim=1)
        cls = F.cross_entropy(cls_logits, labels, label_smoothing=label_smoothing)
        dist = F.cross_entropy(dist_logits, teacher_labels)
        return {"loss": 0.5 * cls + 0.5 * dist, "loss_cls": cls.detach(), "loss_distill": dist.detach(),
                "teacher_agreement": (dist_logits.argmax(1) == teacher_labels).float().mean()}
    return loss_fn


def _validation(val_loader, num_classes: int):
    def validate(end: EpochEnd) -> dict:
        logits, labels = predict(end.model, val_loader, end.accelerator)
        val = classification_metrics(logits, labels, num_classes)
        return {"val/accuracy": val["accuracy"], "val/balanced_accuracy": val["balanced_accuracy"],
                "val/macro_f1": val["macro_f1"], "score": val["balanced_accuracy"]}
    return validate


def finetune(cfg: Config, prepared: Path, encoder_dir: Path | None, accelerator: Accelerator,
             tracker: Tracker, name: str = "finetune", teacher_dir: Path | None = None, read_fn=None,
             epoch_images: int | None = None) -> Path:
    """-> folder with the best (val balanced accuracy) classifier, logged as artefact `classifier`.
    read_fn: a record reader shared with other stages (e.g. the sweep's one decoded-image cache);
    None: the training images' own cache (data.cache). epoch_images: samples per epoch (the
    images cycled), so that validation and checkpoints come every so many steps."""
    f, probe = cfg.finetune, cfg.finetune.mode == "probe"
    info = load_dataset_info(prepared)
    records = load_manifest(prepared / "manifest.csv")
    train_recs = stratified_fraction(select(records, "train"), f.label_fraction, cfg.run.seed)
    stats = load_stats(prepared / "stats.json")
    meta = {**geometry_meta(cfg, stats), "kind": "classifier", "classes": info["classes"],
            "task": info.get("task", "multiclass"), "num_classes": len(info["classes"]),
            "head": "probe" if probe else "linear"}
    model = build_classifier(meta, drop_path_rate=0.0 if probe else f.drop_path)
    stats = _init_encoder(model, cfg.model.backbone, encoder_dir, stats)
    if probe:
        _freeze_all_but_head(model, cfg.model.backbone)
    teacher = _load_teacher(teacher_dir, stats, accelerator.device) if teacher_dir else None
    if teacher is not None and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)  # train-mode forward -> (class logits, distillation logits)
    read_fn = read_fn or cached_read_fn(cfg, train_recs, accelerator)  # epochs after the first decode nothing
    dataset = SeededAugmentation(make_dataset(cfg, train_recs, stats, train=True, read_fn=read_fn), cfg.run.seed,
                                 length=epoch_images)
    val_loader = accelerator.prepare(make_loader(make_dataset(cfg, select(records, "val"), stats, train=False),
                                                 cfg.evaluate.batch_size, cfg, train=False))
    tracker.log_params({"finetune.init_resolved": str(encoder_dir or "scratch"), "finetune.teacher": str(teacher_dir),
                        "train_images": len(train_recs)})
    task = Task(name=name, prefix="finetune", model=model, dataset=dataset,
                loss=classification_loss(f.label_smoothing, teacher), epochs=f.epochs,
                batch_size_per_device=f.batch_size_per_device, optimizer=f.optimizer,
                log_every_steps=f.log_every_steps, sections=("run", "data", "model", "finetune"),
                on_epoch_end=_validation(val_loader, len(info["classes"])))
    best = fit(cfg, task, accelerator, tracker).best

    out = stage_dir(cfg, name) / "classifier"
    if accelerator.is_main_process:
        seen = [lab for r in train_recs for lab in (r.label if isinstance(r.label, tuple) else (r.label,))]
        meta.update(stats=stats, init=f.init if encoder_dir else "scratch",
                    train_class_counts={c: seen.count(k) for k, c in enumerate(info["classes"])},
                    encoder=str(encoder_dir) if encoder_dir else None, dataset_hash=info.get("dataset_hash"),
                    config=cfg.to_dict(), finetune_run_id=tracker.run_id, best_epoch=best.epoch,
                    val_balanced_accuracy=best.score, teacher=str(teacher_dir) if teacher_dir else None,
                    teacher_run_id=read_meta(teacher_dir).get("finetune_run_id") if teacher_dir else None,
                    pretrain_run_id=read_meta(encoder_dir).get("pretrain_run_id") if encoder_dir else None)
        save_weights(best.weights, out, meta)
        tracker.log_artifacts(out, "classifier")
        tracker.log_metrics({"val/best_balanced_accuracy": best.score, "best_epoch": best.epoch})
    accelerator.free_memory()
    return out
