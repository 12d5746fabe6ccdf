"""BEiT specifics beyond the registry contract tests: cross-entropy on masked visual tokens only,
a frozen tokenizer that is neither trained nor saved, and a tokenizer that does not fit refused."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.backbones import BACKBONES, FAMILIES, create_encoder
from pipeline.models.objectives import OBJECTIVES
from pipeline.models.tokenizer import debug_tokenizer
from registry_pairs import build_pair, masks_for


def test_loss_is_cross_entropy_on_masked_tokens_only():
    torch.manual_seed(0)
    model, spec, section, family = build_pair("beit", "beit_debug", 3, 16, 4)
    images = torch.randn(4, 3, 16, 16)
    masks = masks_for(model, spec, section, family, 16, 4)
    with torch.no_grad():
        out = model(images, masks)
        logits = model.logits(images, masks)  # [B, L, K] at every patch
    tokens = model.tokenizer.tokenize(images).flatten(1)
    m = masks.flatten(1)
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits[m], tokens[m]))
    assert out["pred"].shape == (int(m.sum()), 16)
    expected = (logits[m].argmax(-1) == tokens[m]).float().mean()
    torch.testing.assert_close(out["metrics"]["token_accuracy"], expected)


def test_the_tokenizer_is_frozen_outside_the_optimizer_and_the_state_dict():
    model, *_ = build_pair("beit", "vit_debug", 3, 16, 4)
    tok = model.tokenizer
    params = {id(p) for p in model.parameters()}
    assert not any(id(p) in params for p in tok.parameters())
    assert set(model.state_dict()) == {f"encoder.{k}" for k in model.encoder.state_dict()} | {
        "mask_token", "lm_head.weight", "lm_head.bias"}
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    model.train()
    model(torch.randn(2, 3, 16, 16), torch.from_numpy(np.ones((2, 4, 4), bool)))["loss"].backward()
    assert not tok.training and all(torch.equal(v, tok.state_dict()[k]) for k, v in before.items())


def test_predicted_token_map_keeps_the_tokenizers_tokens_where_visible():
    torch.manual_seed(0)
    model, spec, section, family = build_pair("beit", "beit_debug", 2, 16, 4)
    images = torch.randn(2, 2, 16, 16)
    masks = masks_for(model, spec, section, family, 16, 2)
    r = model.predict_tokens(images, masks)
    assert r["tokens"].shape == r["pred"].shape == (2, 4, 4)
    assert torch.equal(r["pred"][~masks], r["tokens"][~masks])
    assert 0 <= r["accuracy"] <= 1


def test_a_tokenizer_of_another_grid_or_channel_count_is_refused_naming_both():
    spec, family = OBJECTIVES["beit"], FAMILIES["beit"]
    encoder = create_encoder("beit_debug", 16, 4, 5)
    for tok, match in ((debug_tokenizer(create_encoder("vit_debug", 16, 2, 5)), r"\(8, 8\).*\(4, 4\)"),
                       (debug_tokenizer(create_encoder("vit_debug", 16, 4, 3)), "3-channel.*5-channel")):
        with pytest.raises(ValueError, match=match):
            spec.build(encoder, family, spec.Config(), tokenizer=tok)
    with pytest.raises(ValueError, match="needs a visual tokenizer"):
        spec.build(encoder, family, spec.Config())


def test_block_wise_masks_come_from_the_data_pipeline():
    spec = OBJECTIVES["beit"]
    draw = spec.mask_generator(spec.Config(), create_encoder("beit_debug", 32, 4, 3), BACKBONES["beit_debug"], 32)
    mask = draw(np.random.default_rng(0))
    assert mask.shape == (8, 8) and 21 <= mask.sum() <= 26  # 40 % of 64, within one 5-patch block


def test_a_beit_encoder_feeds_a_linear_probe_with_exactly_the_probe_head_missing():
    from pipeline.models.transfer import load_encoder
    from pipeline.weights import build_classifier

    model, spec, *_ = build_pair("beit", "beit_debug", 5, 16, 4)
    probe = build_classifier({"backbone": "beit_debug", "img_size": 16, "patch_size": 4, "in_chans": 5,
                              "num_classes": 3, "head": "probe"})
    fresh = load_encoder(probe, spec.encoder(model).state_dict(), BACKBONES["beit_debug"]).fresh
    assert fresh == {"head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias"}
    assert probe.eval()(torch.randn(2, 5, 16, 16)).shape == (2, 3)
