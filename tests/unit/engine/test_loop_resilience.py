"""The training loop: non-finite losses, gradient accumulation and clipping, SIGTERM, resume state."""
import math
import signal

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader, TensorDataset

from pipeline.config import CheckpointConfig, RunConfig
from pipeline.distributed import make_accelerator, set_activation_checkpointing
from pipeline.engine import preempt
from pipeline.engine.checkpoint import CheckpointDir, read_checkpoint
from pipeline.engine.loop import NonFiniteLossError, TrainStep, train_one_epoch
from pipeline.engine.state import (Checkpointer, EpochData, LoopState, ModelState, OptimizerState, RankState,
                                   SeededAugmentation)
from pipeline.models.backbones import create_backbone


class Recorder:
    run_id = "toy"

    def __init__(self):
        self.metrics: dict[str, list] = {}

    def log_metrics(self, metrics, step=None):
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, v))

    def log_params(self, params): pass
    def log_artifact(self, path, artifact_path=None): pass
    def log_artifacts(self, directory, artifact_path=None): pass
    def set_tags(self, tags): pass


@pytest.fixture
def make_acc():
    def make(**kwargs) -> Accelerator:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return Accelerator(cpu=True, **kwargs)

    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def sigterm_restored():
    before = signal.getsignal(signal.SIGTERM)
    yield
    preempt.reset()
    signal.signal(signal.SIGTERM, before)


def toy(n=40, batch=4, shuffle=False, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n, 4)
    data = TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1)
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Linear(4, 1), DataLoader(data, batch_size=batch, shuffle=shuffle, generator=gen), gen


def mse(m, b):
    return ((m(b[0]).squeeze(1) - b[1]) ** 2).mean()


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def run_epoch(acc, model, loader, loss_fn=mse, lr=0.05, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model, opt, loader = acc.prepare(model, opt, loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state, tracker = LoopState(), Recorder()
    loss = train_one_epoch(TrainStep(model, opt, sched, acc, loss_fn, tracker, "toy", 1, **kwargs), loader, state)
    return state, tracker, loss, model


class Toy:
    """The toy model prepared by `acc`, its scheduler, epochs and a Checkpointer under `root`."""

    def __init__(self, acc, root, ckpt_cfg, config=None, shuffle=False, opt_cls=torch.optim.SGD,
                 lr_lambda=lambda s: 1.0):
        model, loader, gen = toy(shuffle=shuffle)
        opt = opt_cls(model.parameters(), lr=0.05)
        self.acc = acc
        self.model, self.opt, self.loader = acc.prepare(model, opt, loader)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda)
        self.state, self.data = LoopState(), EpochData(self.loader, None, gen)
        states = {"model": ModelState(self.model, acc), "optimizer": OptimizerState(self.model, self.opt, acc),
                  "scheduler": self.sched, "loop": self.state, "rank": RankState(self.state, self.data)}
        self.ckpt = Checkpointer(ckpt_cfg, root, "toy", acc, Recorder(), states, config or {},
                                 batches_per_epoch=len(self.loader))

    def epoch(self, loss_fn, after_step=None, **kwargs):
        step = TrainStep(self.model, self.opt, self.sched, self.acc, loss_fn, Recorder(), "toy", 1,
                         after_step=after_step or self.ckpt.after_step, **kwargs)
        return train_one_epoch(step, self.data.batches(self.state), self.state)


def test_a_nonfinite_loss_skips_its_update_on_and_is_counted(make_acc):
    model, loader, _ = toy()
    calls, snapshots = [], []

    def loss_fn(m, b):
        calls.append(1)
        loss = mse(m, b)
        return loss * float("nan") if len(calls) == 3 else loss

    state, tracker, loss, model = run_epoch(make_acc(), model, loader, loss_fn,
                                            after_step=lambda s: snapshots.append(flat(model)))
    assert state.step == 10 and state.nonfinite_steps == 1 and state.nonfinite_streak == 0
    assert torch.equal(snapshots[2], snapshots[1])  # step 3: no optimizer update
    assert not torch.equal(snapshots[3], snapshots[2])  # training went on
    assert all(torch.isfinite(s).all() for s in snapshots)
    assert tracker.metrics["toy/nonfinite_steps"] == [(3, 1.0)]
    assert [s for s, _ in tracker.metrics["toy/loss"]] == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert math.isfinite(loss) and state.loss_batches == 9


def test_nonfinite_steps_in_a_row_stop_naming_the_step_and_keep_the_last_good_checkpoint(make_acc, tmp_path):
    t = Toy(make_acc(), tmp_path, CheckpointConfig(every_steps=1, keep_last=3))
    t.ckpt.restore()
    calls = []

    def loss_fn(m, b):
        calls.append(1)
        return mse(m, b) * (float("inf") if len(calls) >= 4 else 1.0)

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 6, 3 steps in a row \(steps 4-6"):
        t.epoch(loss_fn, max_nonfinite=3)
    latest = CheckpointDir(tmp_path).latest()
    tensors, saved = read_checkpoint(latest)
    assert saved["step"] == 3  # nothing was written during the bad streak
    weights = {k: v for k, v in tensors.items() if ".model." in k}
    assert weights.keys() == {"s.shared.model.weight", "s.shared.model.bias"}
    assert weights and all(torch.isfinite(v).all() for v in weights.values())


def test_gradient_accumulation_equals_the_larger_batch(make_acc):
    model_a, loader_a, _ = toy(batch=8)
    model_b, _, _ = toy(batch=8)
    _, loader_b, _ = toy(batch=4)
    state_a, *_ , model_a = run_epoch(make_acc(), model_a, loader_a)
    state_b, *_ , model_b = run_epoch(make_acc(gradient_accumulation_steps=2), model_b, loader_b)
    assert state_a.step == state_b.step == 5
    torch.testing.assert_close(flat(model_a), flat(model_b))


def test_a_partial_last_window_is_an_optimizer_step(make_acc):
    model, loader, _ = toy(n=20, batch=4)  # 5 micro-batches, accumulating 2: steps at 2, 4 and 5
    state, tracker, *_ = run_epoch(make_acc(gradient_accumulation_steps=2), model, loader)
    assert state.step == math.ceil(5 / 2) and state.batches_done == 5
    assert [s for s, _ in tracker.metrics["toy/lr"]] == [1, 2, 3]


def test_gradient_clipping_bounds_the_update_and_logs_the_norm(make_acc):
    model, loader, _ = toy(n=4, batch=4)
    before = flat(model)
    state, tracker, _, model = run_epoch(make_acc(), model, loader, lr=1.0, clip_grad_norm=0.01)
    assert (flat(model) - before).norm().item() == pytest.approx(0.01, rel=1e-4)  # SGD, lr 1: step = grad
    assert tracker.metrics["toy/grad_norm"][0][1] > 0.01  # the norm before clipping


def test_sigterm_checkpoints_at_the_next_step_and_raises_preempted(make_acc, tmp_path):
    t = Toy(make_acc(), tmp_path, CheckpointConfig(every_steps=0, sigterm_grace_s=30))
    t.ckpt.restore()
    calls = []

    def loss_fn(m, b):
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGTERM)  # the real signal, through the installed handler
        return mse(m, b)

    with pytest.raises(preempt.Preempted, match="stopped on SIGTERM at step 4") as stop:
        t.epoch(loss_fn)
    assert stop.value.mlflow_status == "KILLED" and 0 < stop.value.flush_timeout_s <= 30
    _, saved = read_checkpoint(CheckpointDir(tmp_path).latest())
    assert saved["step"] == 4 and saved["loop"]["batches_done"] == 4


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_resuming_mid_epoch_replays_the_same_batches_and_weights(make_acc, tmp_path, precision):
    """In-process version of the SIGKILL test: stop 4 batches into the second shuffled epoch,
    restore into fresh objects, finish; the result equals an uninterrupted run bit for bit
    (also under bf16 autocast, which CPUs support)."""
    def fresh(root, every):
        return Toy(make_acc(mixed_precision=precision), root, CheckpointConfig(every_steps=every), shuffle=True,
                   opt_cls=torch.optim.AdamW, lr_lambda=lambda s: 1.0 / (1 + s))

    def noisy(m, b):  # uses the global RNG, like MAE's masking
        return mse(m, b) + 0.01 * torch.rand(()) * m.weight.sum()

    def epochs(t, stop_at=None):
        state = t.ckpt.restore()
        for epoch in range(state.epoch, 3):
            def after(s):
                t.ckpt.after_step(s)
                if s.step == stop_at:
                    raise KeyboardInterrupt  # "killed" right after the checkpoint of this step
            t.epoch(noisy, after_step=after)
            state.start_epoch(epoch + 1)
            t.ckpt.save()
        return flat(t.model)

    reference = epochs(fresh(tmp_path / "a", every=0))
    with pytest.raises(KeyboardInterrupt):
        epochs(fresh(tmp_path / "b", every=2), stop_at=14)  # epoch 2, 4 batches in
    torch.manual_seed(123)  # a fresh process would have other RNG states: restore must fix them
    resumed = epochs(fresh(tmp_path / "b", every=2))
    assert torch.equal(resumed, reference)


def test_augmentations_depend_on_seed_epoch_and_index_only(prepared_landsat):
    from pipeline.config import load_config
    from pipeline.data.manifest import load_manifest, select
    from pipeline.data.stats import load_stats
    from pipeline.stages.common import make_dataset

    cfg = load_config(None, ["model.img_size=16", "model.patch_size=4"])  # sizes are left to the data by default
    pool = select(load_manifest(prepared_landsat / "manifest.csv"), "unlabelled")[:24]
    ds = SeededAugmentation(make_dataset(cfg, pool, load_stats(prepared_landsat / "stats.json"), train=True), 0)
    ds.set_epoch(1)
    first = [ds[i][0] for i in (5, 3, 5)]
    assert torch.equal(first[0], first[2])  # order of access does not matter
    ds.set_epoch(2)
    assert not torch.equal(ds[5][0], first[0])  # a new epoch, new augmentations

    def batches(workers):
        loader = DataLoader(ds, batch_size=6, num_workers=workers, persistent_workers=workers > 0)
        out = []
        for epoch in (1, 2):
            ds.set_epoch(epoch)  # reaches persistent workers through shared memory
            out += [b[0] for b in loader]
        return torch.cat(out)

    assert torch.equal(batches(0), batches(2))


@pytest.mark.parametrize("kind", ["classifier", "mae"])
def test_activation_checkpointing_saves_memory_not_gradients(kind):
    from pipeline.config import load_config
    from pipeline.stages.pretrain import build_mim_model

    cfg = load_config(None, ["model.backbone=vit_debug", "model.img_size=16", "model.patch_size=4"])

    def build():
        torch.manual_seed(0)
        if kind == "mae":
            return build_mim_model(cfg, in_chans=5)[0], lambda m, x: m(x)["loss"]
        return create_backbone("vit_debug", 16, 4, 5, num_classes=3), lambda m, x: m(x).square().mean()

    def saved_bytes_and_grads(checkpointing):
        model, loss_fn = build()
        assert set_activation_checkpointing(model, checkpointing) >= 1
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            torch.manual_seed(1)
            loss = loss_fn(model, torch.randn(4, 5, 16, 16))
        loss.backward()
        return sum(saved), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    plain, grads = saved_bytes_and_grads(False)
    light, grads_ckpt = saved_bytes_and_grads(True)
    assert light < plain
    torch.testing.assert_close(grads_ckpt, grads)


def test_fsdp_is_refused_on_cpu_with_a_clear_message():
    with pytest.raises(RuntimeError, match="run.fsdp=true needs CUDA"):
        make_accelerator(RunConfig(device="cpu", fsdp=True))


def test_a_changed_config_blocks_auto_resume_but_not_a_named_checkpoint(make_acc, tmp_path, capsys):
    from pipeline.engine.checkpoint import CheckpointError

    def checkpointer(resume, clip):
        config = {"pretrain": {"optimizer": {"clip_grad_norm": clip}}, "tracking": {"uri": "x"}}
        return Toy(make_acc(), tmp_path, CheckpointConfig(resume=resume), config).ckpt

    first = checkpointer("auto", None)
    first.restore()
    first.loop.step, first.loop.batches_done = 3, 3
    saved = first.save()
    with pytest.raises(CheckpointError, match=r"different config \(pretrain.optimizer.clip_grad_norm\)"):
        checkpointer("auto", 1.0).restore()  # e.g. after a divergence, clipping switched on
    state = checkpointer(str(saved), 1.0).restore()  # named explicitly: the user's decision
    assert state.step == 3 and "with a changed config: pretrain.optimizer.clip_grad_norm" in capsys.readouterr().out
