"""An initialisation given by reference that cannot be loaded stops the sweep naming it."""
import pytest
import torch

from pipeline.config import load_config
from pipeline.stages.sweep import SweepError, check_grid, reference_encoders

STATS = {"channels": ["b1", "b2", "b3", "b4", "b5"]}


def _arms(ref: str):
    cfg = load_config("configs/debug/sweep_tiny.yaml", [f"sweep.inits.theirs={ref}"])
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
    cfg, arms = _arms(str(folder))
    got = reference_encoders(cfg, arms, STATS, ["a", "b"])
    assert got == {"theirs-vit": folder, "theirs-probe": folder}
