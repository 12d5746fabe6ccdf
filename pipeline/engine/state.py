"""Everything a training stage needs to stop at any step and continue as if it had not.

A checkpoint holds the model, optimizer, scheduler and grad-scaler states, every rank's RNG states
(python, numpy, torch, CUDA) and the data loader's shuffling generator as it was at the start of
the epoch, the position within the epoch, the resolved config and the MLflow run id. Resuming
restores all of it and skips the batches the epoch already consumed, so the resumed run sees the
same batches, masks and augmentations as an uninterrupted one.

Augmentations are made stateless (`SeededAugmentation`): a sample's random transform is a pure
function of (seed, epoch, index), and so is the shuffle (accelerate's seedable sampler, set up in
pipeline/distributed.py), so skipping batches, prefetching and data-loader workers cannot shift
them. The generator state is saved all the same, for loaders built without that sampler.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from accelerate.utils import DistributedType, gather_object
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.utils.data import Dataset

from pipeline.config import CheckpointConfig
from pipeline.engine import preempt
from pipeline.engine.checkpoint import CheckpointDir, CheckpointError, flatten_state, read_checkpoint, unflatten_state


@dataclass
class LoopState:
    """Where training stands. `step` counts optimizer steps, skipped non-finite ones included,
    so that a step number always names the same data and learning rate."""
    epoch: int = 1  # the epoch in progress, 1-based
    step: int = 0
    batches_done: int = 0  # batches of `epoch` consumed (per rank; ranks move in lockstep)
    loss_sum: float = 0.0  # this rank's sum of finite losses in `epoch` (for the epoch mean)
    loss_batches: int = 0
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss, in total
    nonfinite_streak: int = 0  # ... in a row, up to the last step

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done, self.loss_sum, self.loss_batches = epoch, 0, 0.0, 0

    # per-rank vs shared fields: the loss totals differ between ranks
    PER_RANK = ("loss_sum", "loss_batches")


class SeededAugmentation(Dataset):
    """Wraps a dataset whose `.transform` is an albumentations Compose: before each sample, the
    transform's generators are reseeded from (seed, epoch, index). The epoch lives in shared memory
    so that persistent data-loader workers see `set_epoch` too."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:  # also called by accelerate's DataLoaderShard
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        transform = getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            seq = np.random.SeedSequence([self.seed, int(self._epoch), int(i)])
            transform.set_random_state(np.random.Generator(np.random.PCG64(seq)),
                                       random.Random(int(seq.generate_state(1)[0])))
        return self.dataset[i]


# -- RNG states, as JSON + tensors (no pickle) ------------------------------------------------

def capture_rng(epoch_start_state: torch.Tensor | None) -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if epoch_start_state is not None:
        state["loader_epoch_start"] = epoch_start_state
    return state


def restore_rng(state: dict, loader_generator: torch.Generator | None) -> torch.Tensor | None:
    """Restore this process's RNGs -> the loader generator's state at the start of the epoch."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    epoch_start = state.get("loader_epoch_start")
    if epoch_start is not None and loader_generator is not None:
        loader_generator.set_state(epoch_start)
    return epoch_start


# -- config compatibility ----------------------------------------------------------------------

# keys that may change between a run and its resumption without changing what is computed
_HARMLESS = ("run.quiet", "run.num_workers", "run.output_dir", "run.device", "run.activation_checkpointing",
             "run.max_consecutive_nonfinite", "tracking.", "checkpoint.", "evaluate.", "register.",
             "finetune.compare_scratch", "pretrain.recon_every_epochs", "pretrain.log_every_steps",
             "finetune.log_every_steps", "data.root")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "options":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: dict, sections: tuple[str, ...] | None = None) -> list[str]:
    """Dotted keys whose values differ (within `sections`), except the harmless ones."""
    if sections is not None:
        saved = {k: v for k, v in saved.items() if k in sections}
        current = {k: v for k, v in current.items() if k in sections}
    a, b = _flat(saved), _flat(current)
    return sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and not k.startswith(_HARMLESS))


# -- the checkpointer ----------------------------------------------------------------------------

class Checkpointer:
    """Saves and restores one stage's training state under <stage dir>/checkpoints.

    All ranks call save()/restore() (the state dicts are gathered collectively, which FSDP needs);
    rank 0 alone writes files. Every rank reads its own RNG states back.
    """

    def __init__(self, ck: CheckpointConfig, root: Path, stage: str, accelerator: Accelerator, tracker,
                 model, optimizer, scheduler, loader_generator: torch.Generator | None,
                 dataset: SeededAugmentation | None, config: dict, batches_per_epoch: int,
                 sections: tuple[str, ...] | None = None):
        self.ck, self.stage, self.acc, self.tracker = ck, stage, accelerator, tracker
        self.dir = CheckpointDir(root, ck.keep_last)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.generator, self.dataset = loader_generator, dataset
        self.config, self.batches_per_epoch = config, batches_per_epoch
        self.sections = sections  # the config sections a resumed run must share with its checkpoint
        self.epoch_start_state: torch.Tensor | None = None
        self.extra_tensors: dict[str, torch.Tensor] = {}  # e.g. fine-tuning's best weights
        self.extra: dict = {}
        self.last_path: Path | None = None
        preempt.install(ck.sigterm_grace_s)

    # -- which checkpoint ----------------------------------------------------------------------
    def resume_path(self) -> Path | None:
        r = self.ck.resume
        if r == "never":
            return None
        if r == "auto":
            index = self.dir.index()
            return None if index.get("completed") else self.dir.latest()
        path = Path(r)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume={r!r}: no such checkpoint folder")
        return path

    # -- restore -------------------------------------------------------------------------------
    def restore(self) -> LoopState:
        """Fresh state, or the state of the checkpoint chosen by checkpoint.resume (all ranks)."""
        path = self.resume_path()
        if path is None:
            self.acc.wait_for_everyone()  # every rank has decided before rank 0 clears
            if self.acc.is_main_process:
                self.dir.clear()  # a finished or abandoned earlier run: start clean
            self.acc.wait_for_everyone()
            return LoopState()
        tensors, saved = read_checkpoint(path)
        self._check_compatible(path, saved)
        tree = unflatten_state(saved["tree"], tensors)
        if _sharded(self.acc):  # FSDP: every rank passes the full dicts, torch shards them
            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, tree["model"], options=opts)
            set_optimizer_state_dict(self.model, _raw(self.optimizer), tree["optimizer"], options=opts)
        else:
            self.acc.unwrap_model(self.model).load_state_dict(tree["model"])
            _raw(self.optimizer).load_state_dict(tree["optimizer"])
        self.scheduler.load_state_dict(tree["scheduler"])
        if tree.get("scaler") is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(tree["scaler"])
        ranks = tree["ranks"]
        mine = ranks[self.acc.process_index]
        state = LoopState(**{**tree["loop"], **mine["loop"]})
        self.epoch_start_state = restore_rng(mine["rng"], self.generator)
        self.extra_tensors, self.extra = tree.get("extra_tensors", {}), tree.get("extra", {})
        restore_pending = getattr(self.tracker, "restore_pending", None)
        if restore_pending is not None:
            restore_pending(saved.get("tracker_pending", []))
        self.last_path = path
        if self.acc.is_main_process:
            print(f"{self.stage}: resumed from {path} (epoch {state.epoch}, step {state.step}, "
                  f"{state.batches_done} batches into the epoch)", flush=True)
        return state

    def _check_compatible(self, path: Path, saved: dict) -> None:
        if saved.get("stage") != self.stage:
            raise CheckpointError(f"{path}: a {saved.get('stage')!r} checkpoint, not {self.stage!r}")
        if saved["world_size"] != self.acc.num_processes:
            raise CheckpointError(
                f"{path} was written by {saved['world_size']} processes, this run has "
                f"{self.acc.num_processes}: exact resume needs the same world size "
                "(or start over with checkpoint.resume=never)")
        if saved["batches_per_epoch"] != self.batches_per_epoch:
            raise CheckpointError(f"{path}: {saved['batches_per_epoch']} batches per epoch, this run has "
                                  f"{self.batches_per_epoch}: the data or batch size changed")
        diff = config_differences(saved["config"], self.config, self.sections)
        if diff and self.ck.resume == "auto":
            raise CheckpointError(f"{path} was trained with a different config ({', '.join(diff)}); "
                                  "restore those values, start over with checkpoint.resume=never, or name "
                                  "the checkpoint (checkpoint.resume=PATH) to continue it with the new values")
        if diff and self.acc.is_main_process:  # an explicitly named checkpoint: the user's call
            print(f"{self.stage}: resuming {path} with a changed config: {', '.join(diff)} (the optimizer "
                  "and scheduler state, learning rates included, come from the checkpoint)", flush=True)

    # -- the epoch's batches -------------------------------------------------------------------
    def epoch_loader(self, loader, state: LoopState):
        """The loader for `state.epoch`, less the batches a resumed epoch already consumed."""
        if self.dataset is not None:
            self.dataset.set_epoch(state.epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(state.epoch)
        if state.batches_done == 0:
            self.epoch_start_state = self.generator.get_state() if self.generator is not None else None
            return loader
        if self.generator is not None and self.epoch_start_state is not None:
            self.generator.set_state(self.epoch_start_state)  # the epoch's shuffle, drawn again
        return skip_first_batches(loader, state.batches_done)

    # -- save ----------------------------------------------------------------------------------
    def save(self, state: LoopState) -> Path | None:
        """Collective: every rank must call it. -> the checkpoint folder (on rank 0)."""
        model_sd = full_state_dict(self.model, self.acc)
        if _sharded(self.acc):  # gathered to rank 0, keyed by parameter name
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            optim_sd = get_optimizer_state_dict(self.model, _raw(self.optimizer), options=opts)
        else:
            optim_sd = _raw(self.optimizer).state_dict() if self.acc.is_main_process else {}
        loop = asdict(state)
        # between epochs (batches_done == 0) the next epoch's shuffle is drawn from the state now
        epoch_start = self.epoch_start_state
        if state.batches_done == 0 and self.generator is not None:
            epoch_start = self.generator.get_state()
        mine = {"loop": {k: loop.pop(k) for k in LoopState.PER_RANK},
                "rng": capture_rng(epoch_start)}
        ranks = gather_object([mine]) if self.acc.num_processes > 1 else [mine]
        path = None
        if self.acc.is_main_process:
            scaler = self.acc.scaler.state_dict() if self.acc.scaler is not None else None
            tensors: dict[str, torch.Tensor] = {}
            tree = flatten_state({"model": model_sd, "optimizer": optim_sd,
                                  "scheduler": self.scheduler.state_dict(), "scaler": scaler,
                                  "loop": loop, "ranks": ranks, "extra_tensors": self.extra_tensors,
                                  "extra": self.extra}, tensors, "s")
            pending = getattr(self.tracker, "pending", None)
            meta = {"stage": self.stage, "step": state.step, "epoch": state.epoch, "time": time.time(),
                    "world_size": self.acc.num_processes, "batches_per_epoch": self.batches_per_epoch,
                    "run_id": self.tracker.run_id, "config": self.config, "loop": asdict(state),
                    "tracker_pending": pending() if pending is not None else [], "tree": tree}
            path = self.dir.save(state.step, _unshare(tensors), meta)
        self.acc.wait_for_everyone()
        self.last_path = path
        return path

    def after_step(self, state: LoopState) -> None:
        """Called by the loop after every optimizer step: test faults, SIGTERM, periodic saves."""
        preempt.inject_test_fault(self.stage, state.step)
        stop = torch.tensor([1.0 if preempt.requested() else 0.0], device=self.acc.device)
        if self.acc.reduce(stop, reduction="sum").item() > 0:  # any rank signalled: all stop here
            path = self.save(state)
            raise preempt.Preempted(self.stage, state.step, path)
        every = self.ck.every_steps
        mid_epoch = state.batches_done < self.batches_per_epoch  # the epoch-end save follows anyway
        if every and state.step % every == 0 and mid_epoch and state.nonfinite_streak == 0:
            self.save(state)

    def complete(self) -> None:
        """The stage finished: its checkpoints are kept but no longer resumed automatically."""
        if self.acc.is_main_process and (self.dir.root / "index.json").exists():
            self.dir.mark_completed()
        self.acc.wait_for_everyone()


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> torch optimizer


def _sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (e.g. tied weights): copy the repeats."""
    seen, out = set(), {}
    for k, t in tensors.items():
        key = t.untyped_storage().data_ptr() if t.numel() else None
        out[k] = t.clone() if key in seen else t
        if key is not None:
            seen.add(key)
    return out


def full_state_dict(model, accelerator: Accelerator, submodule: torch.nn.Module | None = None,
                    copy: bool = False) -> dict:
    """Collective (every rank calls it; FSDP gathers shards) -> the full state dict on rank 0 (CPU
    under FSDP), {} elsewhere. `submodule`: only its entries, with its prefix stripped (e.g. MAE's
    encoder). copy: detached from the live parameters, which the entries otherwise share."""
    inner = accelerator.unwrap_model(model)
    if _sharded(accelerator):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = inner.state_dict() if accelerator.is_main_process else {}
    if copy:
        state = {k: v.detach().clone() for k, v in state.items()}
    if submodule is None or not state:
        return state
    name = next(n for n, m in inner.named_modules() if m is submodule)
    prefix = f"{name}." if name else ""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
