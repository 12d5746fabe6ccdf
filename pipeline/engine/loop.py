"""Short, shared loops: one optimisation epoch, one prediction pass."""
from __future__ import annotations

from typing import Callable

import torch
from accelerate import Accelerator
from tqdm import tqdm

from pipeline.tracking.base import Tracker

LossFn = Callable[[torch.nn.Module, tuple], torch.Tensor]


def train_one_epoch(model, loader, optimizer, scheduler, accelerator: Accelerator, loss_fn: LossFn,
                    tracker: Tracker, step: int, prefix: str, log_every: int,
                    progress: bool, desc: str = "") -> tuple[int, float]:
    """-> (global optimizer step after the epoch, mean loss over the epoch across ranks)."""
    model.train()
    total = torch.zeros(2, device=accelerator.device)  # [sum of losses, batches]
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        with accelerator.accumulate(model):
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{prefix}: non-finite loss {loss.item()} at step {step}")
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total += torch.stack([loss.detach(), torch.ones((), device=total.device)])
        if accelerator.sync_gradients:
            # Stepped by hand: accelerate's wrapper would step it once per process.
            scheduler.step()
            step += 1
            if step % log_every == 0:
                mean = accelerator.reduce(loss.detach(), reduction="mean").item()
                tracker.log_metrics({f"{prefix}/loss": mean,
                                     f"{prefix}/lr": optimizer.param_groups[0]["lr"]}, step=step)
    total = accelerator.reduce(total, reduction="sum")
    return step, (total[0] / total[1].clamp(min=1)).item()


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
