"""AdamW with timm's parameter groups (no decay on norms/biases, optional layer-wise lr decay)."""
from __future__ import annotations

import math

import torch
from timm.optim import create_optimizer_v2
from torch import nn


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """MAE's linear scaling rule: lr = base_lr * global_batch / 256."""
    return base_lr * global_batch_size / 256


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   layer_decay: float | None = None) -> torch.optim.Optimizer:
    # layer_decay needs timm's group_matcher, which timm ViTs have; MIM wrappers pass None.
    opt = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay,
                              layer_decay=layer_decay, betas=(0.9, 0.95))
    # timm leaves the per-layer factor in `lr_scale` for its own schedulers; torch's schedulers
    # read `lr`, so bake the factor in before the scheduler records each group's initial lr.
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return opt


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int,
                  total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to each group's lr, then cosine to 0; stepped once per optimizer step.

    LambdaLR multiplies each group's initial lr, so timm's per-layer scales are kept.
    """
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
