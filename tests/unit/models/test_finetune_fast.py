"""The ViT classifier's training forward (last block at the class token only, pipeline.models.fast)
does the same maths as timm's forward: the same logits, loss and gradients on one batch (drop path
on: the same random draws), the same loss curve over AdamW steps, and timm's own path wherever the
fast one does not apply."""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from pipeline.config import OptimizerConfig
from pipeline.engine.optim import make_optimizer
from pipeline.models import fast
from pipeline.models.backbones import create_backbone
from pipeline.models.backbones.deit import ClassTokenDeiT
from pipeline.models.backbones.vit import ClassTokenViT
from pipeline.weights import add_probe_head
from registry_pairs import real_tiles


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _step(model, images, labels, reference: bool, seed: int = 1):
    """-> (logits, loss, gradients) of one training forward + backward; reference: timm's forward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same drop-path draws for both forms
    logits = VisionTransformer.forward(model, images) if reference else model(images)
    heads = logits if isinstance(logits, tuple) else (logits,)  # DeiT's distilled training: (class, distillation)
    loss = sum(F.cross_entropy(h, labels, label_smoothing=0.1) for h in heads)
    loss.backward()
    return logits, loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_vit_classifiers_take_the_class_token_forward_and_encoders_do_not():
    classifier = create_backbone("vit_debug", 16, 4, 3, num_classes=4)
    assert type(classifier) is ClassTokenViT and fast.can_run_class_token(classifier)
    assert type(create_backbone("vit_debug", 16, 4, 3)) is VisionTransformer  # an encoder: timm's as it is
    stock = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=4, embed_dim=32, depth=2,
                              num_heads=2, global_pool="token")
    assert classifier.state_dict().keys() == stock.state_dict().keys()
    deit = create_backbone("deit_debug", 16, 4, 3, num_classes=4)  # two rows: class and distillation tokens
    assert type(deit) is ClassTokenDeiT and deit.HEAD_ROWS == 2 and fast.can_run_class_token(deit)
    stock = VisionTransformerDistilled(img_size=16, patch_size=4, in_chans=3, num_classes=4, embed_dim=32, depth=2,
                                       num_heads=2)
    assert deit.state_dict().keys() == stock.state_dict().keys()


@pytest.mark.parametrize("in_chans,img,patch", [(3, 16, 4), (5, 32, 8), (1, 32, 4)])
@pytest.mark.parametrize("drop_path", [0.0, 0.3])
@pytest.mark.parametrize("probe", [False, True])
@pytest.mark.parametrize("backbone,distilled", [("vit_debug", False), ("deit_debug", False), ("deit_debug", True)])
def test_class_token_and_timm_forwards_give_the_same_logits_loss_and_gradients(in_chans, img, patch, drop_path,
                                                                               probe, backbone, distilled):
    # float64: the same maths shows as agreement to ~1e-14, whatever the order of float32 sums (the
    # probe's BatchNorm over 4 images makes some float32 gradients mostly cancellation noise)
    torch.manual_seed(0)
    model = create_backbone(backbone, img, patch, in_chans, num_classes=5, drop_path_rate=drop_path)
    if probe:
        add_probe_head(model, backbone)
    if distilled:
        model.set_distilled_training(True)  # DeiT trained against a teacher: both heads' logits
    model = model.double().train()
    images = torch.randn(4, in_chans, img, img, dtype=torch.float64)
    labels = torch.randint(0, 5, (4,))
    ref_logits, ref_loss, ref_grads = _step(model, images, labels, reference=True)
    logits, loss, grads = _step(model, images, labels, reference=False)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert set(grads) == set(ref_grads)  # every parameter the reference trains, and only those
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_eval_mode_checkpointing_and_unknown_blocks_run_timms_forward(monkeypatch):
    model = create_backbone("vit_debug", 16, 4, 3, num_classes=3)
    used = []
    monkeypatch.setattr(fast, "class_token_features", lambda *a: used.append(1) or pytest.fail("fast path taken"))
    images = torch.randn(2, 3, 16, 16)
    model.eval()(images)
    model.train().set_grad_checkpointing(True)
    model(images)
    model.set_grad_checkpointing(False)
    model.blocks[-1].ls1 = torch.nn.Linear(32, 32)  # a block it does not know (layer scale)
    model(images)
    assert not used


@pytest.mark.parametrize("backbone", ["vit_debug", "deit_debug"])
def test_200_steps_on_real_labelled_tiles_follow_timms_loss_curve(prepared_landsat, backbone):
    """The class-token form and timm's forward over 200 AdamW steps (layer decay, drop path, label
    smoothing) on the real labelled Landsat tiles, the same drop-path draws at each step."""
    tiles, labels = real_tiles(prepared_landsat, 256, split="train")  # [256, 5, 16, 16], [256]
    assert (labels >= 0).all()
    classes = int(labels.max()) + 1
    torch.manual_seed(0)
    model = create_backbone(backbone, 16, 4, tiles.shape[1], num_classes=classes, drop_path_rate=0.1)
    assert isinstance(model, (ClassTokenViT, ClassTokenDeiT))
    reference = copy.deepcopy(model)
    curves = []
    for m, ref in ((model, False), (reference, True)):
        optimizer = make_optimizer(m.train(), 1e-3, OptimizerConfig(base_lr=1e-3, layer_decay=0.75))
        losses = []
        for step in range(200):
            at = (step * 32) % 256
            _, loss, _ = _step(m, tiles[at:at + 32], labels[at:at + 32], reference=ref, seed=step)
            optimizer.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    assert curves[1][-20:].mean() < 0.9 * curves[1][:20].mean(), curves[1]  # it learns the classes
    assert (curves[0] - curves[1]).abs().max() < 1e-4 * curves[1].abs().max(), (curves[0] - curves[1]).abs().max()
