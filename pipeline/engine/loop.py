"""Short, shared loops: one optimisation epoch, one prediction pass."""
from __future__ import annotations

from typing import Callable

import torch
from accelerate import Accelerator
from tqdm import tqdm

from pipeline.engine.state import LoopState
from pipeline.tracking.base import Tracker

LossFn = Callable[[torch.nn.Module, tuple], torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """Too many optimizer steps in a row had a non-finite loss."""


def train_one_epoch(model, loader, optimizer, scheduler, accelerator: Accelerator, loss_fn: LossFn,
                    tracker: Tracker, state: LoopState, prefix: str, log_every: int, progress: bool,
                    desc: str = "", clip_grad_norm: float | None = None, max_nonfinite: int = 5,
                    after_step: Callable[[LoopState], None] | None = None) -> float:
    """Train over `loader` (the rest of `state.epoch`), advancing `state` in place.

    A non-finite loss on any rank skips its optimizer step on every rank (no update, counted in
    `<prefix>/nonfinite_steps`); `max_nonfinite` such steps in a row raise NonFiniteLossError.
    `after_step(state)` runs after every optimizer step (checkpoints, preemption).
    -> mean loss over the whole epoch across ranks.
    """
    model.train()
    window = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # [loss sum, n, non-finite]
    total = len(loader) + state.batches_done if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, initial=state.batches_done, total=total):
        with accelerator.accumulate(model):
            loss = loss_fn(model, batch)
            # one small collective: every rank must take the same branch (backward all-reduces)
            bad = accelerator.reduce(torch.isfinite(loss.detach()).logical_not().double()[None], reduction="sum")
            if bad.item() == 0:
                accelerator.backward(loss)
                state.loss_sum += loss.item()
                state.loss_batches += 1
                window += torch.stack([loss.detach().double(), window.new_ones(()), window.new_zeros(())])
            else:
                window[2] += 1
            state.batches_done += 1
            if not accelerator.sync_gradients:
                continue
            grad_norm = None
            if window[2] == 0:
                if clip_grad_norm is not None:
                    # global norm over the synchronised gradients (accelerate unscales fp16 ones first)
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # Stepped by hand: accelerate's wrapper would step it once per process.
        scheduler.step()
        state.step += 1
        _count_nonfinite(state, window[2] > 0, tracker, prefix, max_nonfinite, accelerator.is_main_process)
        if state.step % log_every == 0:
            sums = accelerator.reduce(window[:2].clone(), reduction="sum")  # [loss sum, n] over ranks
            metrics = {f"{prefix}/lr": optimizer.param_groups[0]["lr"]}
            if sums[1] > 0:
                metrics[f"{prefix}/loss"] = (sums[0] / sums[1]).item()
            if grad_norm is not None:
                metrics[f"{prefix}/grad_norm"] = float(grad_norm)
            tracker.log_metrics(metrics, step=state.step)
        window.zero_()
        if after_step is not None:
            after_step(state)
    totals = accelerator.reduce(torch.tensor([state.loss_sum, state.loss_batches], dtype=torch.float64,
                                             device=accelerator.device), reduction="sum")
    return (totals[0] / totals[1].clamp(min=1)).item()


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
