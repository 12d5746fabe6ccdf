"""timm's optimizers with its parameter groups (no decay on norms, biases and tokens; optional
layer-wise lr decay), and the warmup-cosine schedule stepped once per optimizer step."""
from __future__ import annotations

import math

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from pipeline.config import OptimizerConfig


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """MAE's linear scaling rule: lr = base_lr * global_batch / 256."""
    return base_lr * global_batch_size / 256


def make_optimizer(model: nn.Module, lr: float, opt: OptimizerConfig, fused: bool = True) -> torch.optim.Optimizer:
    """Only parameters that require grad are optimised (a linear probe's frozen encoder is not).
    Layer decay needs timm's group_matcher (timm ViT/DeiT/Swin/BEiT); other models (a torchvision
    ResNet, a masked-image-modelling wrapper) train with one lr.

    fused: AdamW as torch's fused kernel (one pass over each tensor; CPU and CUDA): the same
    update as the for-loop form torch picks on CPU by default, which costs a second or more per
    step at ViT-S + MAE decoder size on 2 cores (scripts/bench_pretrain.py). Off for FSDP's
    sharded parameters."""
    layer_decay = opt.layer_decay if hasattr(model, "group_matcher") else None
    extra = {"betas": tuple(opt.betas)} if opt.name in ("adamw", "lamb") else {"momentum": opt.momentum}
    if opt.name == "adamw" and fused:
        extra["fused"] = True
    optimizer = create_optimizer_v2(model, opt=opt.name, lr=lr, weight_decay=opt.weight_decay,
                                    layer_decay=layer_decay, **extra)
    # timm leaves the per-layer factor in `lr_scale` for its own schedulers; torch's schedulers
    # read `lr`, so bake the factor in before the scheduler records each group's initial lr.
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return optimizer


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
