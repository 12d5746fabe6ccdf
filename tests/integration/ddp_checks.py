"""Launched by torchrun in tests: the training loop's cross-rank agreements on 2 real gloo processes.

Each rank trains a small linear model on its own data through train_one_epoch, with a recording
tracker on both ranks, and rank 0 writes a JSON report:
  reduce:    the logged per-step loss and the epoch loss are the means over both ranks' losses
  nonfinite: a NaN loss on rank 1 only skips that step on both ranks (weights stay identical)
  sigterm:   SIGTERM on rank 1 only stops both ranks at the same step; rank 0 writes one checkpoint
             holding both ranks' RNG states
"""
import json
import signal
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline.config import CheckpointConfig, RunConfig
from pipeline.distributed import make_accelerator, seed_per_rank
from pipeline.engine import preempt
from pipeline.engine.checkpoint import CheckpointDir, read_checkpoint, unflatten_state
from pipeline.engine.loop import TrainStep, train_one_epoch
from pipeline.engine.state import Checkpointer, EpochData, LoopState, ModelState, OptimizerState, RankState


class Recorder:
    run_id = "ddp"

    def __init__(self):
        self.metrics = {}

    def log_metrics(self, metrics, step=None):
        for k, v in metrics.items():
            self.metrics.setdefault(k, {})[step] = v


def setup(acc, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(64, 4)
    data = TensorDataset(x, x.sum(1))
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=gen)
    model, opt, loader = acc.prepare(model, opt, loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, loader, sched, gen


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def check_reduce(acc):
    model, opt, loader, sched, _ = setup(acc)
    local = []

    def loss_fn(m, b):
        loss = ((m(b[0]).squeeze(1) - b[1]) ** 2).mean()
        local.append(loss.item())
        return loss

    tracker, state = Recorder(), LoopState()
    epoch_loss = train_one_epoch(TrainStep(model, opt, sched, acc, loss_fn, tracker, "ddp", 1), loader, state)
    per_rank = acc.gather(torch.tensor(local)[None]).tolist()  # [2, steps]
    logged = [tracker.metrics["ddp/loss"][s] for s in range(1, state.step + 1)]
    expected = [(a + b) / 2 for a, b in zip(*per_rank)]
    return {"max_step_error": max(abs(a - b) for a, b in zip(logged, expected)),
            "ranks_differ": per_rank[0] != per_rank[1],
            "epoch_error": abs(epoch_loss - sum(map(sum, per_rank)) / (2 * len(local)))}


def check_nonfinite(acc):
    model, opt, loader, sched, _ = setup(acc, seed=1)
    calls, snapshots = [], []

    def loss_fn(m, b):
        calls.append(1)
        loss = ((m(b[0]).squeeze(1) - b[1]) ** 2).mean()
        return loss * float("nan") if (len(calls) == 2 and acc.process_index == 1) else loss

    state = LoopState()
    train_one_epoch(TrainStep(model, opt, sched, acc, loss_fn, Recorder(), "ddp", 1,
                              after_step=lambda s: snapshots.append(params(model).clone())), loader, state)
    per_rank = acc.gather(params(model)[None])
    return {"skipped_on_this_rank": state.nonfinite_steps,
            "step2_unchanged": bool(torch.equal(snapshots[1], snapshots[0])),
            "rank_diff": (per_rank[0] - per_rank[1]).abs().max().item()}


def check_sigterm(acc, root: Path):
    model, opt, loader, sched, gen = setup(acc, seed=2)
    seed_per_rank(acc, 2)
    state, data = LoopState(), EpochData(loader, None, gen)
    states = {"model": ModelState(model, acc), "optimizer": OptimizerState(model, opt, acc), "scheduler": sched,
              "loop": state, "rank": RankState(state, data)}
    ckpt = Checkpointer(CheckpointConfig(every_steps=0), root, "ddp", acc, Recorder(), states, {},
                        batches_per_epoch=len(loader))
    ckpt.restore()
    calls = []

    def loss_fn(m, b):
        calls.append(1)
        if len(calls) == 3 and acc.process_index == 1:
            signal.raise_signal(signal.SIGTERM)
        return ((m(b[0]).squeeze(1) - b[1]) ** 2).mean()

    stopped_at = None
    try:
        train_one_epoch(TrainStep(model, opt, sched, acc, loss_fn, Recorder(), "ddp", 1, after_step=ckpt.after_step),
                        data.batches(state), state)
    except preempt.Preempted as stop:
        stopped_at = stop.step
    preempt.reset()
    steps = acc.gather(torch.tensor([stopped_at or -1]))
    out = {"stopped_at": steps.tolist()}
    if acc.is_main_process:
        tensors, saved = read_checkpoint(CheckpointDir(root).latest())
        ranks = unflatten_state(saved["tree"], tensors)["ranks"]
        out.update(checkpoint_step=saved["step"], rng_ranks=len(ranks),
                   rng_differ=not torch.equal(ranks[0]["rank"]["rng"]["torch"], ranks[1]["rank"]["rng"]["torch"]))
    return out


def main(out: str, root: str) -> None:
    acc = make_accelerator(RunConfig(device="cpu"))
    report = {"world": acc.num_processes, "reduce": check_reduce(acc), "nonfinite": check_nonfinite(acc),
              "sigterm": check_sigterm(acc, Path(root))}
    if acc.is_main_process:
        Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:3])
