"""BEiT's fast step (the encoder's last block at each image's masked patches only, padded to the
largest count) does the same maths as the reference step (every patch through the last block,
then x[bool_masked_pos]): the same loss, predictions and gradients, masks of unequal counts
included; a family or block it does not know takes the reference path."""
import copy

import pytest
import torch

from pipeline.models import fast
from pipeline.models.backbones import FAMILIES, create_encoder
from pipeline.models.objectives.beit import BEiT
from registry_pairs import adamw_loss_curve, build_pair, masks_for, real_tiles


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _loss_and_grads(model, images, masks, fast_form: bool):
    kept = model._features_at
    if not fast_form:
        model._features_at = None
    try:
        model.zero_grad(set_to_none=True)
        out = model(images, masks)
        out["loss"].backward()
    finally:
        model._features_at = kept
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backbone", ["vit_debug", "deit_debug"])
@pytest.mark.parametrize("in_chans,img,patch", [(3, 16, 4), (5, 32, 4), (1, 32, 8)])
@pytest.mark.parametrize("masks_from", ["blockwise", "uneven"])
def test_fast_and_reference_steps_give_the_same_loss_pred_and_gradients(backbone, in_chans, img, patch, masks_from,
                                                                       monkeypatch):
    calls, block_rows = [], fast.block_rows
    monkeypatch.setattr(fast, "block_rows", lambda *a: calls.append(1) or block_rows(*a))
    torch.manual_seed(0)
    model, spec, section, family = build_pair("beit", backbone, in_chans, img, patch)
    assert model._features_at is not None  # what the pretrain stage builds for a ViT
    model = model.double().train()
    images = torch.randn(4, in_chans, img, img, dtype=torch.float64)
    masks = masks_for(model, spec, section, family, img, 4)
    if masks_from == "uneven":  # 1, 2, 3 and all patches masked: padding rows in every image but one
        masks = torch.zeros_like(masks)
        for b, n in enumerate((1, 2, 3, masks[0].numel())):
            masks[b].view(-1)[torch.randperm(masks[b].numel())[:n]] = True
    ref, ref_grads = _loss_and_grads(model, images, masks, fast_form=False)
    assert not calls
    out, grads = _loss_and_grads(model, images, masks, fast_form=True)
    assert calls  # the fast form ran
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["pred"], ref["pred"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["metrics"]["token_accuracy"], ref["metrics"]["token_accuracy"])
    assert set(grads) == set(ref_grads)  # every parameter the reference trains, and only those
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_a_block_it_does_not_know_or_checkpointing_takes_the_reference_path(monkeypatch):
    model, spec, section, family = build_pair("beit", "vit_debug", 3, 16, 4)
    used = []
    monkeypatch.setattr(fast, "block_rows", lambda *a: used.append(1) or pytest.fail("fast path taken"))
    images, masks = torch.randn(2, 3, 16, 16), masks_for(model, spec, section, family, 16, 2)
    model.encoder.set_grad_checkpointing(True)
    model(images, masks)["loss"].backward()
    model.encoder.set_grad_checkpointing(False)
    model.encoder.blocks[-1].ls1 = torch.nn.Linear(32, 32)  # layer scale: a block it does not know
    model(images, masks)["loss"].backward()
    assert not used
    beit_family, *_ = build_pair("beit", "beit_debug", 3, 16, 4)
    assert beit_family._features_at is None  # BEiT's own blocks (relative position bias): the reference


def test_fast_off_builds_the_reference():
    model, *_ = build_pair("beit", "vit_debug", 3, 16, 4)
    ref = BEiT(create_encoder("vit_debug", 16, 4, 3), FAMILIES["vit"], model.tokenizer, fast=False)
    assert ref._features_at is None
    assert torch.isfinite(ref(torch.randn(2, 3, 16, 16), torch.ones(2, 4, 4, dtype=torch.bool))["loss"])


def test_200_steps_on_real_tiles_follow_the_reference_loss_curve(prepared_landsat):
    """The issue's check for the optimised step: AdamW over 200 steps on real Landsat tiles, fast
    form vs reference, the same blockwise masks at each step; float reordering could compound."""
    tiles, _ = real_tiles(prepared_landsat, 256)  # [256, 5, 16, 16]
    torch.manual_seed(0)
    fast_model, spec, section, family = build_pair("beit", "vit_debug", tiles.shape[1], 16, 4)
    reference = copy.deepcopy(fast_model)
    reference._features_at = None
    assert fast_model._features_at is not None

    def loss_of(model, images, step):  # the step's blockwise masks, the same in both runs
        return model(images, masks_for(model, spec, section, family, 16, len(images), seed=step))["loss"]

    curves = {name: adamw_loss_curve(model, tiles, loss_of)
              for name, model in (("reference", reference), ("fast", fast_model))}
    ref, got = curves["reference"], curves["fast"]
    assert ref[-20:].mean() < 0.9 * ref[:20].mean(), ref  # it learns the tokens: the comparison means something
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max(), (got - ref).abs().max()
