"""The only place an Accelerator is built: CPU, one GPU, DDP or multi-node, same code."""
from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn

from pipeline.config import RunConfig


def make_accelerator(run: RunConfig, blocks: tuple[str, ...] = ("Block",)) -> Accelerator:
    """blocks: class names of the transformer blocks, FSDP's shard units (the backbone and
    objective specs' block_classes)."""
    cpu = run.device == "cpu" or (run.device == "auto" and not torch.cuda.is_available())
    if run.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible")
    if run.fsdp and cpu:
        raise RuntimeError("run.fsdp=true needs CUDA devices (accelerate runs plain DDP on CPU)")
    if cpu and run.cpu_threads:
        torch.set_num_threads(run.cpu_threads)
    # Shuffles are a function of (seed, epoch): the same on every rank, and a resumed epoch draws
    # the same order again, whatever data-loader workers did with the loader's generator.
    loaders = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=run.seed)
    accelerator = Accelerator(cpu=cpu, mixed_precision=run.mixed_precision,
                              gradient_accumulation_steps=run.gradient_accumulation_steps,
                              fsdp_plugin=fsdp_plugin(blocks) if run.fsdp else None, dataloader_config=loaders)
    # Same seed on every rank: identical initial weights (stages then call seed_per_rank); the
    # sampler shards the data.
    set_seed(run.seed)
    return accelerator


def fsdp_plugin(blocks: tuple[str, ...] = ("Block",)):
    """FSDP2, one shard unit per transformer block (timm's and lightly's ViT blocks are `Block`,
    Swin's `SwinTransformerBlock`: the specs name them).

    `accelerate launch --config_file scripts/accelerate_fsdp.yaml` sets the same up from the
    environment for ViTs; run.fsdp=true does it under torchrun for every family.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=sorted(set(blocks)),
        reshard_after_forward=True, state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)


def set_activation_checkpointing(model: nn.Module, enable: bool) -> int:
    """Recompute transformer-block activations in backward (timm ViTs and lightly's masked ViT
    wrappers both expose set_grad_checkpointing) -> how many modules were switched."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "set_grad_checkpointing"):
            module.set_grad_checkpointing(enable)
            switched += 1
    if enable and not switched:
        raise ValueError(f"run.activation_checkpointing=true, but {type(model).__name__} has no "
                         "set_grad_checkpointing")
    return switched


def seed_per_rank(accelerator: Accelerator, seed: int) -> None:
    """Once the model is built (identically on every rank): one random stream per rank, so that
    ranks draw different MAE masks and drop-path patterns for their different images."""
    set_seed(seed, device_specific=accelerator.num_processes > 1)


def show_progress(accelerator: Accelerator, run: RunConfig) -> bool:
    """Progress bars: on rank 0, unless quiet, and only on a terminal (a log file would keep
    every redraw); fit prints one line per epoch instead."""
    return accelerator.is_main_process and not run.quiet and sys.stderr.isatty()
