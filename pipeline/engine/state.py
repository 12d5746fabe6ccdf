"""Everything a training stage needs to stop at any step and continue as if it had not.

A Checkpointer holds a dict of named components, each with state_dict() / load_state_dict()
(torchtitan's CheckpointManager(states=...)): the model, optimizer, scheduler, grad scaler, the
loop position, every rank's RNG states and the data loader's shuffling generator as it was at
the start of the epoch, and whatever a stage adds (the best weights so far). A component with
`per_rank = True` is saved once per rank and each rank restores its own. Resuming restores all of
it and skips the batches the epoch already consumed, so the resumed run sees the same batches,
masks and augmentations as an uninterrupted one.

Augmentations (and data-side masks) are stateless (`SeededAugmentation`): a sample's random
transform is a pure function of (seed, epoch, index), and so is the shuffle (accelerate's seedable
sampler, set up in pipeline/distributed.py), so skipping batches, prefetching and data-loader
workers cannot shift them.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from accelerate.utils import DistributedType, gather_object
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.utils.data import Dataset

from pipeline.config import CheckpointConfig, flatten, resume_safe_keys
from pipeline.engine import preempt
from pipeline.engine.checkpoint import CheckpointDir, CheckpointError, flatten_state, read_checkpoint, unflatten_state


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


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
    last_epoch_loss: float = float("nan")  # mean loss of the last finished epoch

    # per-rank vs shared fields: the loss totals differ between ranks (saved by RankState)
    PER_RANK = ("loss_sum", "loss_batches")

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done, self.loss_sum, self.loss_batches = epoch, 0, 0.0, 0

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.PER_RANK}

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


class SeededAugmentation(Dataset):
    """Wraps a dataset whose `.transform` is an albumentations Compose: before each sample, the
    transform's generators are reseeded from (seed, epoch, index). The epoch lives in shared memory
    so that persistent data-loader workers see `set_epoch` too.

    mask_fn(rng) -> bool [h, w]: also draw a mask per sample (SimMIM, BEiT) from its own stream of
    the same seed; samples then are (image, label, mask).
    length: samples per epoch when it differs from the number of images: an epoch of a fixed number
    of steps whatever the label count. The images are then taken in one seeded order, round after
    round, each epoch continuing where the last stopped (fewer images than samples: each is seen
    about length / n times an epoch, every time with its own augmentation; more: an epoch sees a
    share of them, and the next epochs the others)."""

    MASK_STREAM = 1  # a second SeedSequence key: masks never share draws with augmentations
    ORDER_STREAM = 2  # the order of the images when an epoch has a length of its own

    def __init__(self, dataset: Dataset, seed: int, mask_fn: Callable[[np.random.Generator], np.ndarray] | None = None,
                 length: int | None = None):
        self.dataset, self.seed, self.mask_fn = dataset, seed, mask_fn
        self.images = len(dataset)  # distinct images (len(self) counts samples per epoch)
        self.length = length or self.images
        self._order = None if self.length == self.images else \
            np.random.default_rng([seed, self.ORDER_STREAM]).permutation(self.images)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:  # also called by accelerate's DataLoaderShard
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        transform = getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            seq = np.random.SeedSequence([self.seed, int(self._epoch), int(i)])
            transform.set_random_state(np.random.Generator(np.random.PCG64(seq)),
                                       random.Random(int(seq.generate_state(1)[0])))
        if self._order is not None:  # sample i of this epoch -> the next image of the seeded rounds
            i = int(self._order[(int(self._epoch) * self.length + i) % self.images])
        sample = self.dataset[i]
        if self.mask_fn is None:
            return sample
        rng = np.random.default_rng([self.seed, int(self._epoch), int(i), self.MASK_STREAM])
        return (*sample, torch.from_numpy(self.mask_fn(rng)))


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


def restore_rng(state: dict) -> torch.Tensor | None:
    """Restore this process's RNGs -> the loader generator's state at the start of the epoch."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return state.get("loader_epoch_start")


# -- the components ------------------------------------------------------------------------------

def sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def raw_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> torch optimizer


def full_state_dict(model, accelerator: Accelerator, submodule: torch.nn.Module | None = None,
                    copy: bool = False) -> dict:
    """Collective (every rank calls it; FSDP gathers shards) -> the full state dict on rank 0 (CPU
    under FSDP), {} elsewhere. `submodule`: only its entries, with its prefix stripped (e.g. MAE's
    encoder). copy: detached from the live parameters, which the entries otherwise share."""
    inner = accelerator.unwrap_model(model)
    if sharded(accelerator):
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


class ModelState:
    """The (possibly DDP/FSDP-wrapped) model: full weights on rank 0, loaded on every rank."""

    def __init__(self, model, accelerator: Accelerator):
        self.model, self.acc = model, accelerator

    def state_dict(self) -> dict:  # collective
        return full_state_dict(self.model, self.acc)

    def load_state_dict(self, state: dict) -> None:
        if sharded(self.acc):  # every rank passes the full dict, torch shards it
            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
        else:
            self.acc.unwrap_model(self.model).load_state_dict(state)


class OptimizerState:
    def __init__(self, model, optimizer, accelerator: Accelerator):
        self.model, self.optimizer, self.acc = model, optimizer, accelerator

    def state_dict(self) -> dict:  # collective under FSDP: gathered to rank 0, keyed by parameter name
        if sharded(self.acc):
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.model, raw_optimizer(self.optimizer), options=opts)
        return raw_optimizer(self.optimizer).state_dict() if self.acc.is_main_process else {}

    def load_state_dict(self, state: dict) -> None:
        if sharded(self.acc):
            set_optimizer_state_dict(self.model, raw_optimizer(self.optimizer), state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            raw_optimizer(self.optimizer).load_state_dict(state)


class ScalerState:
    """fp16's grad scaler (nothing under fp32/bf16)."""

    def __init__(self, accelerator: Accelerator):
        self.acc = accelerator

    def state_dict(self) -> dict:
        return self.acc.scaler.state_dict() if self.acc.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(state)


class EpochData:
    """The training loader's epochs: sets the epoch for shuffles and augmentations, remembers the
    shuffling generator's state at each epoch start, and skips what a resumed epoch consumed."""

    def __init__(self, loader, dataset: SeededAugmentation | None, generator: torch.Generator | None):
        self.loader, self.dataset, self.generator = loader, dataset, generator
        self.epoch_start: torch.Tensor | None = None

    def batches(self, state: LoopState):
        """The loader for `state.epoch`, less the batches a resumed epoch already consumed."""
        if self.dataset is not None:
            self.dataset.set_epoch(state.epoch)
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(state.epoch)
        if state.batches_done == 0:
            self.epoch_start = self.generator.get_state() if self.generator is not None else None
            return self.loader
        if self.generator is not None and self.epoch_start is not None:
            self.generator.set_state(self.epoch_start)  # the epoch's shuffle, drawn again
        return skip_first_batches(self.loader, state.batches_done)

    def start_state(self, state: LoopState) -> torch.Tensor | None:
        # between epochs (batches_done == 0) the next epoch's shuffle is drawn from the state now
        if state.batches_done == 0 and self.generator is not None:
            return self.generator.get_state()
        return self.epoch_start


class RankState:
    """This rank's own state: its RNGs, the loader's epoch-start generator state, its loss totals."""
    per_rank = True

    def __init__(self, loop: LoopState, data: EpochData):
        self.loop, self.data = loop, data

    def state_dict(self) -> dict:
        return {"loop": {k: getattr(self.loop, k) for k in LoopState.PER_RANK},
                "rng": capture_rng(self.data.start_state(self.loop))}

    def load_state_dict(self, state: dict) -> None:
        self.loop.load_state_dict(state["loop"])
        self.data.epoch_start = restore_rng(state["rng"])
        if self.data.epoch_start is not None and self.data.generator is not None:
            self.data.generator.set_state(self.data.epoch_start)


# -- config compatibility ----------------------------------------------------------------------

def config_differences(saved: dict, current: dict, sections: tuple[str, ...] | None = None) -> list[str]:
    """Dotted keys whose values differ (within `sections`), except those marked resume_safe."""
    if sections is not None:
        saved = {k: v for k, v in saved.items() if k in sections}
        current = {k: v for k, v in current.items() if k in sections}
    a, b, safe = flatten(saved), flatten(current), resume_safe_keys()
    return sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and not any(k == s or k.startswith(s + ".") for s in safe))


# -- the checkpointer ----------------------------------------------------------------------------

class Checkpointer:
    """Saves and restores one stage's training state under `root` (<stage dir>/checkpoints).

    states: named components with state_dict()/load_state_dict(); "loop" must be the LoopState.
    All ranks call save()/restore() (state dicts may be gathered collectively, which FSDP needs);
    rank 0 alone writes files. `sections`: the config sections a resumed run must share.
    """

    def __init__(self, ck: CheckpointConfig, root: Path, stage: str, accelerator: Accelerator, tracker,
                 states: dict[str, Stateful], config: dict, batches_per_epoch: int,
                 sections: tuple[str, ...] | None = None):
        if not isinstance(states.get("loop"), LoopState):
            raise ValueError("Checkpointer states need the LoopState under 'loop'")
        self.ck, self.stage, self.acc, self.tracker = ck, stage, accelerator, tracker
        self.dir = CheckpointDir(root, ck.keep_last)
        self.states, self.loop = states, states["loop"]
        self.config, self.batches_per_epoch, self.sections = config, batches_per_epoch, sections
        self.last_path: Path | None = None
        preempt.install(ck.sigterm_grace_s)

    def resume_path(self) -> Path | None:
        r = self.ck.resume
        if r == "never":
            return None
        if r == "auto":
            return None if self.dir.index().get("completed") else self.dir.latest()
        path = Path(r)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume={r!r}: no such checkpoint folder")
        return path

    def restore(self) -> LoopState:
        """Load the checkpoint chosen by checkpoint.resume into every component (all ranks), or
        start clean -> the loop state."""
        path = self.resume_path()
        if path is None:
            self.acc.wait_for_everyone()  # every rank has decided before rank 0 clears
            if self.acc.is_main_process:
                self.dir.clear()  # a finished or abandoned earlier run: start clean
            self.acc.wait_for_everyone()
            return self.loop
        tensors, saved = read_checkpoint(path)
        self._check_compatible(path, saved)
        tree = unflatten_state(saved["tree"], tensors)
        mine = tree["ranks"][self.acc.process_index]
        for name, component in self.states.items():
            source = mine if getattr(component, "per_rank", False) else tree["shared"]
            if name not in source:
                raise CheckpointError(f"{path}: holds no {name!r} state (it was written by other code)")
            component.load_state_dict(source[name])
        restore_pending = getattr(self.tracker, "restore_pending", None)
        if restore_pending is not None:
            restore_pending(saved.get("tracker_pending", []))
        self.last_path = path
        if self.acc.is_main_process:
            s = self.loop
            print(f"{self.stage}: resumed from {path} (epoch {s.epoch}, step {s.step}, "
                  f"{s.batches_done} batches into the epoch)", flush=True)
        return self.loop

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

    def save(self) -> Path | None:
        """Collective: every rank must call it. -> the checkpoint folder (on rank 0)."""
        shared = {name: c.state_dict() for name, c in self.states.items() if not getattr(c, "per_rank", False)}
        mine = {name: c.state_dict() for name, c in self.states.items() if getattr(c, "per_rank", False)}
        ranks = gather_object([mine]) if self.acc.num_processes > 1 else [mine]
        path = None
        if self.acc.is_main_process:
            tensors: dict[str, torch.Tensor] = {}
            tree = flatten_state({"shared": shared, "ranks": ranks}, tensors, "s")
            pending = getattr(self.tracker, "pending", None)
            meta = {"stage": self.stage, "step": self.loop.step, "epoch": self.loop.epoch, "time": time.time(),
                    "world_size": self.acc.num_processes, "batches_per_epoch": self.batches_per_epoch,
                    "run_id": self.tracker.run_id, "config": self.config, "loop": asdict(self.loop),
                    "tracker_pending": pending() if pending is not None else [], "tree": tree}
            path = self.dir.save(self.loop.step, _unshare(tensors), meta)
        self.acc.wait_for_everyone()
        self.last_path = path
        return path

    def after_step(self, state: LoopState) -> None:
        """Called by the loop after every optimizer step: test faults, SIGTERM, periodic saves."""
        preempt.inject_test_fault(self.stage, state.step)
        stop = torch.tensor([1.0 if preempt.requested() else 0.0], device=self.acc.device)
        if self.acc.reduce(stop, reduction="sum").item() > 0:  # any rank signalled: all stop here
            path = self.save()
            raise preempt.Preempted(self.stage, state.step, path)
        every = self.ck.every_steps
        mid_epoch = state.batches_done < self.batches_per_epoch  # the epoch-end save follows anyway
        if every and state.step % every == 0 and mid_epoch and state.nonfinite_streak == 0:
            self.save()

    def complete(self) -> None:
        """The stage finished: its checkpoints are kept but no longer resumed automatically."""
        if self.acc.is_main_process and (self.dir.root / "index.json").exists():
            self.dir.mark_completed()
        self.acc.wait_for_everyone()


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (e.g. tied weights): copy the repeats."""
    seen, out = set(), {}
    for k, t in tensors.items():
        key = t.untyped_storage().data_ptr() if t.numel() else None
        out[k] = t.clone() if key in seen else t
        if key is not None:
            seen.add(key)
    return out
