"""Short, shared loops: one optimisation epoch, one prediction pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm import tqdm

from pipeline.engine.state import LoopState
from pipeline.tracking.base import Tracker

LossFn = Callable[[torch.nn.Module, tuple], "torch.Tensor | dict[str, torch.Tensor]"]


class NonFiniteLossError(FloatingPointError):
    """Too many optimizer steps in a row had a non-finite loss."""


@dataclass
class TrainStep:
    """What one optimisation step needs (built once per stage by engine/fit.py).

    loss_fn(model, batch) -> the loss, or {"loss": loss, name: scalar, ...}: the other scalars
    (e.g. token accuracy) are averaged over ranks and logging windows like the loss.
    after_step(state) runs after every optimizer step (checkpoints, preemption).
    """
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accelerator: Accelerator
    loss_fn: LossFn
    tracker: Tracker
    prefix: str  # metric namespace: <prefix>/loss, <prefix>/lr, ...
    log_every: int = 10
    progress: bool = False
    clip_grad_norm: float | None = None
    max_nonfinite: int = 5
    after_step: Callable[[LoopState], None] | None = None


def train_one_epoch(step: TrainStep, batches, state: LoopState, desc: str = "") -> float:
    """Train over `batches` (the rest of `state.epoch`), advancing `state` in place.

    A non-finite loss on any rank skips its optimizer step on every rank (no update, counted in
    `<prefix>/nonfinite_steps`); `step.max_nonfinite` such steps in a row raise NonFiniteLossError.
    -> mean loss over the whole epoch across ranks.
    """
    acc, model, optimizer = step.accelerator, step.model, step.optimizer
    model.train()
    window = torch.zeros(3, dtype=torch.float64, device=acc.device)  # [loss sum, n, non-finite]
    extras: dict[str, torch.Tensor] = {}  # other logged scalars, summed over the window
    total = len(batches) + state.batches_done if hasattr(batches, "__len__") else None
    for batch in tqdm(batches, desc=desc, disable=not step.progress, leave=False, initial=state.batches_done,
                      total=total):
        with acc.accumulate(model):
            out = step.loss_fn(model, batch)
            loss = out["loss"] if isinstance(out, dict) else out
            # one small collective: every rank must take the same branch (backward all-reduces)
            bad = acc.reduce(torch.isfinite(loss.detach()).logical_not().double()[None], reduction="sum")
            if bad.item() == 0:
                acc.backward(loss)
                state.loss_sum += loss.item()
                state.loss_batches += 1
                window += torch.stack([loss.detach().double(), window.new_ones(()), window.new_zeros(())])
                for k, v in (out.items() if isinstance(out, dict) else ()):
                    if k != "loss":
                        extras[k] = extras.get(k, 0) + v.detach().double()
            else:
                window[2] += 1
            state.batches_done += 1
            if not acc.sync_gradients:
                continue
            grad_norm = None
            if window[2] == 0:
                if step.clip_grad_norm is not None:
                    # global norm over the synchronised gradients (accelerate unscales fp16 ones first)
                    grad_norm = acc.clip_grad_norm_(model.parameters(), step.clip_grad_norm)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # Stepped by hand: accelerate's wrapper would step it once per process.
        step.scheduler.step()
        state.step += 1
        _count_nonfinite(state, window[2] > 0, step.tracker, step.prefix, step.max_nonfinite, acc.is_main_process)
        if state.step % step.log_every == 0:
            _log_window(step, state, window, extras, grad_norm)
        window.zero_()
        extras.clear()
        if step.after_step is not None:
            step.after_step(state)
    totals = acc.reduce(torch.tensor([state.loss_sum, state.loss_batches], dtype=torch.float64,
                                     device=acc.device), reduction="sum")
    return (totals[0] / totals[1].clamp(min=1)).item()


def _log_window(step: TrainStep, state: LoopState, window, extras: dict, grad_norm) -> None:
    names = sorted(extras)  # the same on every rank: the loss function returns the same keys
    sums = torch.cat([window[:2], torch.stack([extras[k] for k in names]).to(window)]) if names else window[:2]
    sums = step.accelerator.reduce(sums.clone(), reduction="sum")  # [loss sum, n, extras...] over ranks
    metrics = {f"{step.prefix}/lr": step.optimizer.param_groups[0]["lr"]}
    if sums[1] > 0:
        metrics[f"{step.prefix}/loss"] = (sums[0] / sums[1]).item()
        metrics.update({f"{step.prefix}/{k}": (sums[2 + i] / sums[1]).item() for i, k in enumerate(names)})
    if grad_norm is not None:
        metrics[f"{step.prefix}/grad_norm"] = float(grad_norm)
    step.tracker.log_metrics(metrics, step=state.step)


def _count_nonfinite(state: LoopState, skipped, tracker: Tracker, prefix: str, limit: int, main: bool) -> None:
    if not skipped:
        state.nonfinite_streak = 0
        return
    state.nonfinite_steps += 1
    state.nonfinite_streak += 1
    tracker.log_metrics({f"{prefix}/nonfinite_steps": state.nonfinite_steps}, step=state.step)
    if main:
        print(f"{prefix}: non-finite loss at step {state.step}: optimizer step skipped "
              f"({state.nonfinite_streak} in a row, {state.nonfinite_steps} in total)", flush=True)
    if state.nonfinite_streak >= limit:
        first = state.step - state.nonfinite_streak + 1
        raise NonFiniteLossError(
            f"{prefix}: non-finite loss at step {state.step}, {state.nonfinite_streak} steps in a row "
            f"(steps {first}-{state.step}, run.max_consecutive_nonfinite={limit}); stopping. "
            "The last checkpoint, written before these steps, is kept.")


@torch.no_grad()
def predict(model, loader, accelerator: Accelerator, progress: bool = False,
            desc: str = "predict") -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logits [N, K], labels [N]) for the whole (sharded) loader, gathered on every rank."""
    model.eval()
    logits, labels = [], []
    for images, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        out, y = accelerator.gather_for_metrics((model(images), y))
        logits.append(out.float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits), torch.cat(labels)
