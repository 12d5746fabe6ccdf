"""What the sweep stage checks and derives before a trial runs: references that cannot load stop
it naming them; each trial's config is the recipe with the trial's seed, head, mode and budget."""
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.stages.sweep import SweepError, check_grid, reference_encoders, trial_config
from pipeline.sweep.grid import trials

STATS = {"channels": ["b1", "b2", "b3", "b4", "b5"]}
SWEEP_TINY = Path(__file__).resolve().parents[3] / "configs" / "debug" / "sweep_tiny.yaml"


def _arms(ref: str, *extra: str):
    cfg = load_config(SWEEP_TINY, [f"sweep.inits.theirs={ref}", *extra])
    return cfg, check_grid(cfg)[0]


def test_a_missing_reference_is_named(tmp_path):
    ref = str(tmp_path / "nowhere" / "encoder.pth")
    cfg, arms = _arms(ref)
    with pytest.raises(SweepError, match=rf"^sweep.inits.theirs: cannot load '{ref}' into head 'vit' \(vit_debug\): "
                                         r".*neither an existing path"):
        reference_encoders(cfg, arms, STATS, ["a", "b"])


def test_weights_that_do_not_fit_the_head_are_named(tmp_path):
    ref = tmp_path / "vit_b.pth"  # a 3-channel ViT-B patch embedding: not this 5-channel debug ViT
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}}, ref)
    cfg, arms = _arms(str(ref))
    with pytest.raises(SweepError, match=rf"sweep.inits.theirs: cannot load '{ref}' into head 'vit' .*patch embedding"):
        reference_encoders(cfg, arms, STATS, ["a", "b"])


def test_a_mimflow_encoder_loads_into_every_head_it_is_crossed_with(tmp_path):
    from pipeline.models.backbones import create_encoder
    from pipeline.weights import save_weights

    enc = create_encoder("vit_debug", 16, 4, 5)
    folder = save_weights(enc.state_dict(), tmp_path / "encoder", {"channels": STATS["channels"], "kind": "encoder"})
    cfg, arms = _arms(str(folder), "sweep.heads.probe={backbone: vit_debug, mode: probe}")
    got = reference_encoders(cfg, arms, STATS, ["a", "b"])
    assert got == {"theirs-vit": folder, "theirs-probe": folder}


def test_a_trial_config_is_the_recipe_with_the_trials_seed_head_mode_and_budget():
    cfg = load_config(SWEEP_TINY, ["sweep.heads.probe={backbone: vit_debug, mode: probe}", "finetune.epochs=50",
                                   "finetune.distillation.teacher=train"])
    arms = {a.key: a for a in check_grid(cfg)[0]}
    probe = next(t for t in trials([arms["mae-probe"]], 1, [0.25], [3]))
    tcfg = trial_config(cfg, probe, Path("/enc"), epochs=2)
    assert (tcfg.run.seed, tcfg.run.quiet, tcfg.model.backbone, tcfg.finetune.mode) == (3, True, "vit_debug", "probe")
    assert (tcfg.finetune.init, tcfg.finetune.epochs, tcfg.finetune.label_fraction) == ("/enc", 2, 1.0)
    assert tcfg.finetune.optimizer.name == "lars"  # the probe's own optimizer, not the recipe's full one
    assert tcfg.finetune.distillation.teacher == "none"  # a teacher trained on all labels would leak them
    assert tcfg.finetune.batch_size_per_device == cfg.sweep.batch_size
    full = trial_config(cfg, next(iter(trials([arms["scratch-vit"]], 1, [0.25], [3]))), None, epochs=2)
    assert full.finetune.init == "scratch" and full.finetune.optimizer == cfg.finetune.optimizer
