"""Every objective x every debug backbone it supports, at several channel counts."""
import pytest
import torch

from pipeline.models.backbones import BACKBONES, create_backbone
from pipeline.models.objectives import OBJECTIVES

DEBUG_BACKBONES = [name for name in BACKBONES if name.endswith("_debug")]


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("backbone", DEBUG_BACKBONES)
@pytest.mark.parametrize("in_chans,img,patch", [(1, 32, 4), (5, 16, 4), (13, 16, 2)])
def test_objective_contract(objective, backbone, in_chans, img, patch):
    torch.manual_seed(0)
    vit = create_backbone(backbone, img, patch, in_chans)
    model = OBJECTIVES[objective](vit, mask_ratio=0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    images = torch.randn(3, in_chans, img, img)
    out = model(images)
    L = (img // patch) ** 2
    n_masked = L - int(L * 0.25)
    assert set(out) >= {"loss", "pred", "mask"}
    assert out["pred"].shape == (3, n_masked, patch * patch * in_chans)
    assert out["mask"].shape == (3, L) and (out["mask"].sum(1) == n_masked).all()
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    out["loss"].backward()
    assert vit.patch_embed.proj.weight.grad is not None
    assert vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_wrong_channel_count_names_the_shape():
    model = OBJECTIVES["mae"](create_backbone("vit_debug", 16, 4, 5), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    with pytest.raises(ValueError, match=r"expects 5 channels.*\(2, 3, 16, 16\)"):
        model(torch.randn(2, 3, 16, 16))


def test_reconstruction_keeps_visible_patches_and_fills_masked_ones():
    torch.manual_seed(0)
    model = OBJECTIVES["mae"](create_backbone("vit_debug", 16, 4, 2), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    images = torch.randn(2, 2, 16, 16)
    r = model.reconstruct(images)
    assert r["recon"].shape == r["masked"].shape == images.shape
    visible = r["masked"] != 0
    torch.testing.assert_close(r["recon"][visible], images[visible])
    assert (r["recon"] != images).any()  # masked patches are predictions, not copies


def test_mask_ratio_controls_tokens_seen():
    model = OBJECTIVES["mae"](create_backbone("vit_debug", 16, 2, 1), mask_ratio=0.9,
                              decoder_dim=16, decoder_depth=1, decoder_heads=2)
    keep, mask = model.random_masking(4, "cpu")
    assert keep.shape == (4, 1 + int(64 * 0.1)) and mask.shape == (4, 64 - int(64 * 0.1))
    assert (keep[:, 0] == 0).all()  # the class token is always kept
