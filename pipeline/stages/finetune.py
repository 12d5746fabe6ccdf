"""Stage 3: fine-tune a classifier (or train a linear probe) on a stratified fraction of the labels.

The classifier is the backbone family's own (timm ViT, distilled DeiT, Swin; a torchvision ResNet
for teachers and baselines), built from the same meta.json that later rebuilds it for evaluation
and the registered model. A distilled DeiT learns from a frozen CNN teacher (hard distillation).

Two tasks (finetune.task, resolved against the data by data/labels.py): multi-class (softmax
cross-entropy, best epoch by val balanced accuracy) and multi-label (one sigmoid per label, BCE or
the asymmetric loss, positives weighted by the training labels, best epoch by val mAP, and per
label the F1-optimal threshold on val stored in meta.json for evaluation and the registered model).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from pipeline.config import Config, FinetuneConfig, MultilabelConfig, changed_keys, config_from_dict, stage_dir
from pipeline.data.labels import check_labels, label_matrix, multilabel_fraction
from pipeline.data.manifest import Record, load_dataset_info, load_manifest, select, stratified_fraction
from pipeline.data.stats import load_stats
from pipeline.engine.fit import EpochEnd, Task, fit
from pipeline.engine.loaders import make_loader
from pipeline.engine.loop import predict
from pipeline.engine.state import SeededAugmentation
from pipeline.metrics import (DEFAULT_THRESHOLD, choose_thresholds, classification_metrics, multilabel_metrics,
                              probabilities)
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


def _load_teacher(teacher_dir: Path, stats: dict, device, task: str) -> tuple[torch.nn.Module, torch.Tensor | None]:
    """-> (frozen teacher, its per-label thresholds [K] for a multi-label task, else None)."""
    teacher, meta = load_classifier(teacher_dir)
    if meta["stats"] != stats:
        raise ValueError(f"teacher {teacher_dir} was trained on inputs normalised with other channel statistics "
                         "than the student's; train it on the same prepared data (finetune.distillation.teacher=train)")
    if meta.get("task", "multiclass") != task:
        raise ValueError(f"teacher {teacher_dir} is a {meta.get('task', 'multiclass')} classifier and the student is "
                         f"{task}; train the teacher on the same task (finetune.distillation.teacher=train)")
    thresholds = torch.tensor(meta["thresholds"], device=device) if task == "multilabel" else None
    return teacher.requires_grad_(False).to(device), thresholds


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


def positive_weights(records: list[Record], num_labels: int, cap: float) -> torch.Tensor:
    """Per label negatives / positives among `records` (BCE's pos_weight), capped at `cap`;
    1 for a label without a positive or a negative. -> float32 [num_labels]."""
    y = label_matrix(records, num_labels)
    pos, neg = y.sum(0), (~y).sum(0)
    weight = np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0)
    return torch.tensor(np.minimum(weight, cap), dtype=torch.float32)


def multilabel_loss(ml: MultilabelConfig, label_smoothing: float, pos_weight: torch.Tensor | None,
                    teacher: torch.nn.Module | None = None, teacher_thresholds: torch.Tensor | None = None):
    """One sigmoid per label: binary cross-entropy, or the asymmetric loss (timm's
    AsymmetricLossMultiLabel, mean over labels and images); `pos_weight` [K] scales each label's
    positive term. Targets [B, K] in {0, 1} move towards 0.5 by `label_smoothing`.

    With a teacher, hard distillation for multi-label: the teacher's decision is its predicted
    label set, sigmoid(teacher logits) >= its own val thresholds; the distillation head learns that
    set with the same loss (no smoothing), the class head the true labels, half and half (the
    multi-label form of Touvron et al. 2021, eq. 3, where the hard label is the teacher's argmax).
    teacher_agreement: share of label decisions (distillation head at 0.5) equal to the teacher's.
    """
    if ml.loss == "asymmetric":
        from timm.loss import AsymmetricLossMultiLabel

        asl = AsymmetricLossMultiLabel(gamma_neg=ml.gamma_neg, gamma_pos=ml.gamma_pos, clip=ml.clip,
                                       reduction="mean", pos_weight=pos_weight)

        def criterion(logits, targets):
            return asl.to(logits.device)(logits, targets)
    else:
        def criterion(logits, targets):
            weight = pos_weight.to(logits.device) if pos_weight is not None else None
            return F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=weight)

    def loss_fn(model, batch) -> dict:
        images, targets = batch[0], batch[1].float()  # [B, C, H, W], [B, K]
        smoothed = targets * (1 - label_smoothing) + 0.5 * label_smoothing
        out = model(images)
        if teacher is None or not isinstance(out, tuple):
            return {"loss": criterion(out, smoothed)}
        cls_logits, dist_logits = out
        with torch.no_grad():
            teacher_sets = (torch.sigmoid(teacher(images).float()) >= teacher_thresholds).float()  # [B, K]
        cls, dist = criterion(cls_logits, smoothed), criterion(dist_logits, teacher_sets)
        return {"loss": 0.5 * cls + 0.5 * dist, "loss_cls": cls.detach(), "loss_distill": dist.detach(),
                "teacher_agreement": ((dist_logits >= 0).float() == teacher_sets).float().mean()}
    return loss_fn


def _validation(val_loader, num_classes: int):
    def validate(end: EpochEnd) -> dict:
        logits, labels = predict(end.model, val_loader, end.accelerator)
        val = classification_metrics(logits, labels, num_classes)
        return {"val/accuracy": val["accuracy"], "val/balanced_accuracy": val["balanced_accuracy"],
                "val/macro_f1": val["macro_f1"], "score": val["balanced_accuracy"]}
    return validate


class ValThresholds:
    """Per epoch, the per-label thresholds chosen on the val split (a checkpointed component: a
    resumed run still knows the best epoch's)."""

    def __init__(self):
        self.by_epoch: dict[int, list[float]] = {}

    def state_dict(self) -> dict:
        return {"by_epoch": dict(self.by_epoch)}

    def load_state_dict(self, state: dict) -> None:
        self.by_epoch = {int(e): list(t) for e, t in state["by_epoch"].items()}


def _multilabel_validation(val_loader, thresholds: ValThresholds):
    """Epoch end: val probabilities -> F1-optimal thresholds per label, metrics at them; the best
    epoch is the one with the highest val mAP (0 when no label has a val positive and negative)."""
    def validate(end: EpochEnd) -> dict:
        logits, targets = predict(end.model, val_loader, end.accelerator)  # [N, K], [N, K]
        probs, y = probabilities(logits, "multilabel"), targets.numpy()
        chosen, _ = choose_thresholds(probs, y)
        thresholds.by_epoch[end.epoch] = chosen
        val = multilabel_metrics(probs, y, chosen)
        return {**{f"val/{k}": val[k] for k in ("map", "macro_auroc", "macro_f1", "example_f1", "hamming_loss")},
                "score": 0.0 if np.isnan(val["map"]) else val["map"]}
    return validate


@dataclass
class Objective:
    """What a task trains towards: the loss, the epoch-end validation, the val metric that picks
    the best epoch (`val/<score>`), components to checkpoint, and params to log."""
    loss: Callable
    validate: Callable[[EpochEnd], dict]
    score: str
    states: dict = field(default_factory=dict)
    thresholds: ValThresholds | None = None  # multi-label: per epoch, the val thresholds
    params: dict = field(default_factory=dict)


def _objective(f: FinetuneConfig, task: str, train_recs: list[Record], classes: list[str], val_loader,
               teacher: torch.nn.Module | None, teacher_thresholds: torch.Tensor | None) -> Objective:
    if task != "multilabel":
        # keys that differ from the defaults (a config rebuilt from a dict has every key "set")
        changed = sorted(changed_keys(f.multilabel))
        if changed:
            print(f"finetune: finetune.multilabel ({', '.join(changed)}) is not used: "
                  "the task is multiclass", flush=True)
        return Objective(classification_loss(f.label_smoothing, teacher), _validation(val_loader, len(classes)),
                         "balanced_accuracy")
    ml, thresholds = f.multilabel, ValThresholds()
    pos_weight = positive_weights(train_recs, len(classes), ml.max_pos_weight) if ml.pos_weight else None
    params = {f"pos_weight.{c}": round(float(w), 4) for c, w in zip(classes, pos_weight)} if ml.pos_weight else {}
    return Objective(multilabel_loss(ml, f.label_smoothing, pos_weight, teacher, teacher_thresholds),
                     _multilabel_validation(val_loader, thresholds), "map", {"thresholds": thresholds},
                     thresholds, params)


def label_fraction(records: list[Record], fraction: float, seed: int, task: str, num_labels: int) -> list[Record]:
    """The training rows fine-tuning uses: `fraction` of them, keeping every class (multi-class:
    per class; multi-label: iterative stratification, every label kept)."""
    if task == "multilabel":
        return multilabel_fraction(records, fraction, seed, num_labels)
    return stratified_fraction(records, fraction, seed)


def finetune(cfg: Config, prepared: Path, encoder_dir: Path | None, accelerator: Accelerator,
             tracker: Tracker, name: str = "finetune", teacher_dir: Path | None = None, read_fn=None,
             epoch_images: int | None = None) -> Path:
    """-> folder with the best classifier (by val balanced accuracy; multi-label: val mAP), logged
    as artefact `classifier`. DataError naming the manifest row when the labels do not fit
    finetune.task (data/labels.py). read_fn: a record reader shared with other stages (e.g. the
    sweep's one decoded-image cache); None: the training images' own cache (data.cache).
    epoch_images: samples per epoch (the images cycled), so that validation and checkpoints come
    every so many steps."""
    f, probe = cfg.finetune, cfg.finetune.mode == "probe"
    info = load_dataset_info(prepared)
    task = check_labels(prepared / "manifest.csv", info, f.task)
    records, k = load_manifest(prepared / "manifest.csv"), len(info["classes"])
    train_recs = label_fraction(select(records, "train"), f.label_fraction, cfg.run.seed, task, k)
    num_labels = k if task == "multilabel" else None  # targets multi-hot [K] instead of class indices
    stats = load_stats(prepared / "stats.json")
    meta = {**geometry_meta(cfg, stats), "kind": "classifier", "classes": info["classes"],
            "task": task, "num_classes": k, "head": "probe" if probe else "linear"}
    model = build_classifier(meta, drop_path_rate=0.0 if probe else f.drop_path)
    stats = _init_encoder(model, cfg.model.backbone, encoder_dir, stats)
    if probe:
        _freeze_all_but_head(model, cfg.model.backbone)
    teacher, teacher_thresholds = (_load_teacher(teacher_dir, stats, accelerator.device, task) if teacher_dir
                                   else (None, None))
    if teacher is not None and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)  # train-mode forward -> (class logits, distillation logits)
    read_fn = read_fn or cached_read_fn(cfg, train_recs, accelerator)  # epochs after the first decode nothing
    dataset = SeededAugmentation(make_dataset(cfg, train_recs, stats, train=True, read_fn=read_fn,
                                              num_labels=num_labels), cfg.run.seed, length=epoch_images)
    val_loader = accelerator.prepare(make_loader(make_dataset(cfg, select(records, "val"), stats, train=False,
                                                              num_labels=num_labels),
                                                 cfg.evaluate.batch_size, cfg, train=False))
    for context, split in (("training", "train"), ("validation", "val")):
        tracker.log_dataset(prepared / "manifest.csv", cfg.data.name, info["dataset_hash"], context, split)
    tracker.log_params({"finetune.init_resolved": str(encoder_dir or "scratch"), "finetune.teacher": str(teacher_dir),
                        "train_images": len(train_recs), "finetune.task_resolved": task})
    goal = _objective(f, task, train_recs, info["classes"], val_loader, teacher, teacher_thresholds)
    tracker.log_params(goal.params)
    job = Task(name=name, prefix="finetune", model=model, dataset=dataset, loss=goal.loss, epochs=f.epochs,
               batch_size_per_device=f.batch_size_per_device, optimizer=f.optimizer,
               log_every_steps=f.log_every_steps, sections=("run", "data", "model", "finetune"),
               on_epoch_end=goal.validate, states=goal.states)
    best = fit(cfg, job, accelerator, tracker).best

    out = stage_dir(cfg, name) / "classifier"
    if accelerator.is_main_process:
        seen = label_matrix(train_recs, k).sum(0)  # images (multi-label: positives) per class
        meta.update(stats=stats, init=f.init if encoder_dir else "scratch",
                    train_class_counts={c: int(n) for c, n in zip(info["classes"], seen)},
                    encoder=str(encoder_dir) if encoder_dir else None, dataset_hash=info.get("dataset_hash"),
                    config=cfg.to_dict(), finetune_run_id=tracker.run_id, best_epoch=best.epoch,
                    **{f"val_{goal.score}": best.score}, teacher=str(teacher_dir) if teacher_dir else None,
                    teacher_run_id=read_meta(teacher_dir).get("finetune_run_id") if teacher_dir else None,
                    pretrain_run_id=read_meta(encoder_dir).get("pretrain_run_id") if encoder_dir else None)
        if goal.thresholds is not None:
            meta.update(thresholds=goal.thresholds.by_epoch[best.epoch],
                        threshold_rule=f"per label, the F1-optimal probability threshold on the val split at the best "
                                       f"epoch ({best.epoch}); {DEFAULT_THRESHOLD} for a label without a val positive "
                                       "or negative")
        save_weights(best.weights, out, meta)
        tracker.log_artifacts(out, "classifier")
        tracker.log_metrics({f"val/best_{goal.score}": best.score, "best_epoch": best.epoch})
    accelerator.free_memory()
    return out
