"""The one training skeleton every training stage shares.

A stage says *what* it trains (a `Task`: the model, the data, the loss, what to do at each epoch
end); `fit` does the rest the same way for all: optimizer and schedule from the task's optimizer
section, Accelerate prepare, per-rank seeding, checkpoints of every component, exact resume, the
epoch loop, per-epoch metrics, and the best-epoch selection when the task has a validation score.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate import Accelerator

from pipeline.config import Config, OptimizerConfig, stage_dir
from pipeline.distributed import seed_per_rank, set_activation_checkpointing, show_progress
from pipeline.engine.loaders import make_loader
from pipeline.engine.loop import LossFn, TrainStep, train_one_epoch
from pipeline.engine.optim import make_optimizer, scaled_lr, warmup_cosine
from pipeline.engine.state import (Checkpointer, EpochData, LoopState, ModelState, OptimizerState, RankState,
                                   ScalerState, SeededAugmentation, Stateful, full_state_dict)
from pipeline.models.compiled import compile_forward
from pipeline.tracking.base import Tracker


@dataclass
class EpochEnd:
    """What an epoch-end hook sees: the prepared model, the epoch just finished and its loss."""
    epoch: int
    model: torch.nn.Module
    loss: float
    accelerator: Accelerator


@dataclass
class Task:
    """One training stage's job.

    name: the stage (its output folder, checkpoints, console lines); prefix: the metric namespace.
    dataset: the training set, a SeededAugmentation (samples (image, label) or (image, label, mask)).
    loss: loss_fn(model, batch) -> loss or {"loss": ..., other scalars to log}.
    on_epoch_end(EpochEnd) -> metrics to log at the epoch (e.g. validation); it may return
        "score" (higher is better) to keep the best epoch's weights (Fitted.best).
    states: further components to checkpoint (name -> state_dict()/load_state_dict()).
    sections: the config sections a resumed run must share with its checkpoint.
    """
    name: str
    prefix: str
    model: torch.nn.Module
    dataset: SeededAugmentation
    loss: LossFn
    epochs: int
    batch_size_per_device: int
    optimizer: OptimizerConfig
    log_every_steps: int
    sections: tuple[str, ...]
    on_epoch_end: Callable[[EpochEnd], dict[str, float]] | None = None
    states: dict[str, Stateful] = field(default_factory=dict)


class BestWeights:
    """The weights of the best epoch by a validation score (higher is better); rank 0 holds them."""

    def __init__(self, model, accelerator: Accelerator):
        self.model, self.acc = model, accelerator
        self.score, self.epoch, self.weights = -math.inf, None, {}

    def update(self, score: float, epoch: int) -> bool:
        """Collective (the copy is gathered under FSDP); `score` must be equal on every rank."""
        if score <= self.score:
            return False
        self.score, self.epoch = score, epoch
        self.weights = full_state_dict(self.model, self.acc, copy=True)
        return True

    def state_dict(self) -> dict:
        return {"score": self.score, "epoch": self.epoch, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.score, self.epoch, self.weights = state["score"], state["epoch"], state["weights"]


@dataclass
class Fitted:
    model: torch.nn.Module  # prepared (wrapped); accelerator.unwrap_model for the module itself
    state: LoopState
    loss: float  # the last epoch's mean loss
    best: BestWeights | None  # when on_epoch_end returned a "score"


def compile_step(model: torch.nn.Module, run) -> bool:
    """run.compile: compile the objective's step where the module offers one (`compile_step()`;
    MAE compiles its maths, its masks stay eager), else the module's whole forward
    (`models.compiled.CompiledForward`: SimMIM, BEiT, the classifiers) -> whether compilation is on."""
    module = getattr(model, "module", model)  # under DDP
    if not run.compile:
        return False
    if hasattr(module, "compile_step"):
        module.compile_step()
    else:
        compile_forward(module)
    return True


def fit(cfg: Config, task: Task, accelerator: Accelerator, tracker: Tracker) -> Fitted:
    """Train `task` to its last epoch, resuming from the stage's newest checkpoint when there is one."""
    acc, opt = accelerator, task.optimizer
    set_activation_checkpointing(task.model, cfg.run.activation_checkpointing)
    loader = make_loader(task.dataset, task.batch_size_per_device, cfg, train=True, world_size=acc.num_processes)
    generator = loader.generator  # the shuffle's; a checkpoint holds its state at the epoch start
    global_batch = task.batch_size_per_device * acc.num_processes * cfg.run.gradient_accumulation_steps
    lr = scaled_lr(opt.base_lr, global_batch)
    optimizer = make_optimizer(task.model, lr, opt, fused=not cfg.run.fsdp)
    model, optimizer, loader = acc.prepare(task.model, optimizer, loader)
    compile_step(model, cfg.run)
    seed_per_rank(acc, cfg.run.seed)
    # accelerate syncs at the end of the loader too, so a partial accumulation window is a step
    steps_per_epoch = math.ceil(len(loader) / cfg.run.gradient_accumulation_steps)
    scheduler = warmup_cosine(optimizer, round(opt.warmup_epochs * steps_per_epoch), task.epochs * steps_per_epoch)
    tracker.log_params({f"{task.prefix}.global_batch_size": global_batch, f"{task.prefix}.lr": lr,
                        f"{task.prefix}.steps_per_epoch": steps_per_epoch, "train_images": task.dataset.images,
                        "world_size": acc.num_processes})

    state, data, best = LoopState(), EpochData(loader, task.dataset, generator), BestWeights(model, acc)
    states = {"model": ModelState(model, acc), "optimizer": OptimizerState(model, optimizer, acc),
              "scheduler": scheduler, "scaler": ScalerState(acc), "loop": state, "rank": RankState(state, data),
              "best": best, **task.states}
    ckpt = Checkpointer(cfg.checkpoint, stage_dir(cfg, task.name) / "checkpoints", task.name, acc, tracker, states,
                        cfg.to_dict(), batches_per_epoch=len(loader), sections=task.sections)
    ckpt.restore()  # fresh, or where the newest checkpoint left off (the best epoch so far included)
    progress = show_progress(acc, cfg.run)
    step = TrainStep(model, optimizer, scheduler, acc, task.loss, tracker, task.prefix, task.log_every_steps,
                     progress, opt.clip_grad_norm, cfg.run.max_consecutive_nonfinite, ckpt.after_step)
    for epoch in range(state.epoch, task.epochs + 1):
        loss = train_one_epoch(step, data.batches(state), state, desc=f"{task.name} {epoch}/{task.epochs}")
        state.last_epoch_loss = loss
        metrics = {f"{task.prefix}/epoch_loss": loss}
        if task.on_epoch_end is not None:
            metrics.update(task.on_epoch_end(EpochEnd(epoch, model, loss, acc)))
        if "score" in metrics:
            best.update(metrics.pop("score"), epoch)  # identical on every rank: metrics are gathered
        tracker.log_metrics(metrics, step=epoch)
        if acc.is_main_process and not cfg.run.quiet:  # one line per epoch, terminal or log file
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"{task.name} epoch {epoch}/{task.epochs}  {shown}", flush=True)
        state.start_epoch(epoch + 1)
        ckpt.save()
    ckpt.complete()
    return Fitted(model, state, state.last_epoch_loss, best if best.epoch is not None else None)
