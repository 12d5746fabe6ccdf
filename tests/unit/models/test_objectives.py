"""Every objective x every debug backbone it supports, at several channel counts and sizes."""
import pytest
import torch

from pipeline.models.backbones import BACKBONES, FAMILIES, create_backbone, create_encoder
from pipeline.models.objectives import OBJECTIVES
from registry_pairs import PAIRS, PIXEL_PAIRS, build_pair, masks_for


def test_the_registries_hold_what_the_users_were_promised():
    assert {"mae", "simmim", "beit"} <= set(OBJECTIVES)
    assert {"vit", "deit", "swin", "beit", "resnet"} <= set(FAMILIES)
    assert ("simmim", "swin_debug") in PAIRS and ("mae", "deit_debug") in PAIRS and ("mae", "vit_debug") in PAIRS
    assert ("beit", "beit_debug") in PAIRS and ("beit", "vit_debug") in PAIRS and ("beit", "swin_debug") not in PAIRS
    assert not any(b == "resnet_debug" for _, b in PAIRS)  # no masked-image objective for a CNN


@pytest.mark.parametrize("objective,backbone", PAIRS)
@pytest.mark.parametrize("in_chans,img,patch", [(1, 32, 4), (5, 16, 2), (13, 16, 4)])
def test_objective_contract(objective, backbone, in_chans, img, patch):
    torch.manual_seed(0)
    model, spec, section, family = build_pair(objective, backbone, in_chans, img, patch)
    images = torch.randn(3, in_chans, img, img)
    out = model(images, masks_for(model, spec, section, family, img, 3))
    L = (img // patch) ** 2
    assert set(out) >= {"loss", "pred", "mask", "metrics"}
    assert out["mask"].shape == (3, L) and 0 < out["mask"].mean() < 1
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    out["loss"].backward()
    grad = spec.encoder(model).patch_embed.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("objective,backbone", PAIRS)
def test_loss_decreases_on_a_fixed_batch(objective, backbone):
    torch.manual_seed(0)
    model, spec, section, family = build_pair(objective, backbone, 3, 16, 4)
    images = torch.randn(4, 3, 16, 16)
    masks = masks_for(model, spec, section, family, 16, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        torch.manual_seed(1)  # the same masks every step where the module draws them itself
        loss = model(images, masks)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("objective,backbone", PAIRS)
def test_the_trained_encoder_loads_into_its_family_classifier_with_exactly_the_head_missing(objective, backbone):
    from pipeline.models.transfer import load_encoder

    model, spec, *_ = build_pair(objective, backbone, 5, 16, 4)
    encoder_state = spec.encoder(model).state_dict()
    clf = create_backbone(backbone, 16, 4, 5, num_classes=3)
    fresh = load_encoder(clf, encoder_state, BACKBONES[backbone]).fresh
    assert all(k.startswith(("head", "dist_token")) for k in fresh) and fresh
    for k, v in encoder_state.items():
        if k != "pos_embed":  # a distilled DeiT adds a row for its token
            torch.testing.assert_close(clf.state_dict()[k], v)
    assert clf.eval()(torch.randn(2, 5, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize("objective,backbone", PAIRS)
def test_continued_pretraining_keeps_the_loaded_weights(objective, backbone):
    """pretrain.init: the wrapped encoder is not re-initialised by the objective (lightly's MAE
    wrapper would, by default)."""
    torch.manual_seed(0)
    loaded = create_encoder(backbone, 16, 4, 3)
    with torch.no_grad():
        for p in loaded.parameters():
            p.add_(0.5)  # weights no initialiser would produce
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    model, spec, *_ = build_pair(objective, backbone, 3, 16, 4, fresh=False, encoder=loaded)
    after = spec.encoder(model).state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    fresh, *_ = build_pair(objective, backbone, 3, 16, 4, fresh=True, encoder=create_encoder(backbone, 16, 4, 3))
    assert any(not torch.equal(OBJECTIVES[objective].encoder(fresh).state_dict()[k], v) for k, v in before.items())


def test_wrong_channel_count_names_the_shape():
    model, *_ = build_pair("mae", "vit_debug", 5, 16, 4)
    with pytest.raises(ValueError, match=r"expects 5 channels.*\(2, 3, 16, 16\)"):
        model(torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("objective,backbone", PIXEL_PAIRS)
def test_reconstruction_keeps_visible_patches_and_fills_masked_ones(objective, backbone):
    torch.manual_seed(0)
    model, spec, section, family = build_pair(objective, backbone, 2, 16, 4)
    images = torch.randn(2, 2, 16, 16)
    r = model.reconstruct(images, masks_for(model, spec, section, family, 16, 2))
    assert r["recon"].shape == r["masked"].shape == images.shape
    visible = r["masked"] != 0
    torch.testing.assert_close(r["recon"][visible], images[visible])
    assert (r["recon"] != images).any()  # masked patches are predictions, not copies


def test_mae_mask_ratio_controls_tokens_seen():
    from pipeline.models.objectives.mae import MAE

    model = MAE(create_encoder("vit_debug", 16, 2, 1), mask_ratio=0.9, decoder_dim=16, decoder_depth=1,
                decoder_heads=2)
    keep, mask = model.random_masking(4, "cpu")
    assert keep.shape == (4, 1 + int(64 * 0.1)) and mask.shape == (4, 64 - int(64 * 0.1))
    assert (keep[:, 0] == 0).all()  # the class token is always kept


def test_simmim_loss_is_l1_over_masked_pixels_only():
    torch.manual_seed(0)
    model, spec, section, family = build_pair("simmim", "vit_debug", 3, 16, 4)
    images = torch.randn(2, 3, 16, 16)
    masks = masks_for(model, spec, section, family, 16, 2)
    with torch.no_grad():
        out = model(images, masks)
    pixel = model.pixel_mask(masks.bool())  # [B, 1, H, W]
    assert 0 < pixel.float().mean() < 1
    expected = ((out["pred"] - images).abs() * pixel).sum() / (pixel.sum() + 1e-5) / 3
    torch.testing.assert_close(out["loss"], expected)
