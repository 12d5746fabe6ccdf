"""The only place an Accelerator is built: CPU, one GPU, DDP or multi-node, same code."""
from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from pipeline.config import RunConfig


def make_accelerator(run: RunConfig) -> Accelerator:
    cpu = run.device == "cpu" or (run.device == "auto" and not torch.cuda.is_available())
    if run.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible")
    accelerator = Accelerator(cpu=cpu, mixed_precision=run.mixed_precision,
                              gradient_accumulation_steps=run.gradient_accumulation_steps)
    # Same seed on every rank: identical initial weights; the sampler shards the data.
    set_seed(run.seed)
    return accelerator


def show_progress(accelerator: Accelerator, run: RunConfig) -> bool:
    return accelerator.is_main_process and not run.quiet
