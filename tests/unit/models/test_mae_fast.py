"""MAE's fast step (kept patches embedded only, last decoder block at the masked rows only) does
the same maths as the reference step (lightly's modules, every token decoded): the same loss and
gradients on one batch, and the same loss curve over 200 optimizer steps on real Landsat tiles."""
import copy

import pytest
import torch

from pipeline.models.backbones import create_encoder
from pipeline.models.objectives.mae import MAE
from registry_pairs import adamw_loss_curve, build_pair, real_tiles


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _loss_and_grads(model: MAE, images: torch.Tensor, fast: bool, seed: int = 1):
    model.fast = fast
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same masks for both forms
    out = model(images)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_the_fast_form_is_on_for_the_stock_modules_and_off_where_it_does_not_know_them():
    model, *_ = build_pair("mae", "vit_debug", 3, 16, 4)
    assert model.fast  # what the pretrain stage builds
    assert not MAE(create_encoder("vit_debug", 16, 4, 3), decoder_dim=16, decoder_depth=1, decoder_heads=2,
                   fast=False).fast
    vit = create_encoder("vit_debug", 16, 4, 3)
    vit.patch_embed.norm = torch.nn.LayerNorm(vit.embed_dim)  # a patch embedding it does not know
    assert not MAE(vit, decoder_dim=16, decoder_depth=1, decoder_heads=2).fast


@pytest.mark.parametrize("backbone", ["vit_debug", "deit_debug"])
@pytest.mark.parametrize("in_chans,img,patch,depth", [(3, 16, 4, 1), (5, 32, 4, 2), (1, 32, 8, 3)])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_fast_and_reference_steps_give_the_same_loss_pred_and_gradients(backbone, in_chans, img, patch, depth,
                                                                       norm_pix):
    torch.manual_seed(0)
    model = MAE(create_encoder(backbone, img, patch, in_chans), decoder_dim=16, decoder_depth=depth,
                decoder_heads=2, norm_pix_loss=norm_pix)
    assert model.fast
    images = torch.randn(3, in_chans, img, img)
    ref, ref_grads = _loss_and_grads(model, images, fast=False)
    out, grads = _loss_and_grads(model, images, fast=True)
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["pred"], ref["pred"], rtol=1e-4, atol=1e-5)
    assert torch.equal(out["mask"], ref["mask"])
    assert set(grads) == set(ref_grads)  # every parameter the reference trains, and only those
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_200_steps_on_real_tiles_follow_the_reference_loss_curve(prepared_landsat):
    tiles, _ = real_tiles(prepared_landsat, 256)  # [256, 5, 16, 16]
    torch.manual_seed(0)
    reference = MAE(create_encoder("vit_debug", 16, 4, tiles.shape[1]), decoder_dim=32, decoder_depth=2,
                    decoder_heads=2, fast=False)  # debug ViT: width 32, depth 2; patch 4 on 16 px tiles
    fast = copy.deepcopy(reference)
    fast.fast = True

    def loss_of(model, images, step):
        torch.manual_seed(step)  # the same masks at each step in both runs
        return model(images)["loss"]

    curves = {name: adamw_loss_curve(model, tiles, loss_of)
              for name, model in (("reference", reference), ("fast", fast))}
    ref, got = curves["reference"], curves["fast"]
    assert ref[-20:].mean() < 0.9 * ref[:20].mean(), ref  # it learns: the comparison means something
    # float reordering could compound over 200 AdamW steps; the curves must still coincide
    # (measured: 2e-7 apart at most)
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max(), (got - ref).abs().max()


def test_a_compile_failure_falls_back_to_the_eager_step_with_a_warning():
    torch.manual_seed(0)
    model, *_ = build_pair("mae", "vit_debug", 3, 16, 4)
    images = torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)
    eager = model(images)["loss"]

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    model.compiled_loss_at = broken  # what compile_step() installs, failing as inductor can
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="torch.compile failed.*running eager"):
        loss = model(images)["loss"]
    assert model.compiled_loss_at is None and torch.equal(loss, eager)


def test_run_compile_switch_compiles_the_step_only_when_asked():
    from pipeline.config import load_config
    from pipeline.engine.fit import compile_step

    model, *_ = build_pair("mae", "vit_debug", 3, 16, 4)
    assert not compile_step(model, load_config(None).run) and model.compiled_loss_at is None  # off by default
    assert compile_step(model, load_config(None, ["run.compile=true"]).run)
    assert model.compiled_loss_at is not None  # compiled lazily, at the first training step


def test_fast_form_keeps_activation_checkpointing_and_its_gradients():
    from pipeline.distributed import set_activation_checkpointing

    torch.manual_seed(0)
    model, *_ = build_pair("mae", "vit_debug", 3, 16, 4)
    images = torch.randn(2, 3, 16, 16)
    ref, ref_grads = _loss_and_grads(model, images, fast=False)
    assert set_activation_checkpointing(model, True)
    out, grads = _loss_and_grads(model, images, fast=True)
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
