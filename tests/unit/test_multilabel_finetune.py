"""Issue 12: the multi-label fine-tuning loss on every head (ViT, distilled DeiT with its
distillation loss, Swin, linear probe, ResNet), positive weighting and the asymmetric option."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import MultilabelConfig
from pipeline.data.manifest import Record
from pipeline.models.backbones import DEBUG_BACKBONES
from pipeline.stages.finetune import multilabel_loss, positive_weights
from pipeline.weights import build_classifier

K = 3


def meta(backbone: str, head: str = "linear") -> dict:
    return {"backbone": backbone, "img_size": 16, "patch_size": 4, "in_chans": 5, "num_classes": K, "head": head,
            "window_size": None}


def batch(n: int = 6):
    g = torch.Generator().manual_seed(0)
    targets = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.float)[:n]
    return torch.randn(n, 5, 16, 16, generator=g), targets


def test_positive_weights_are_negatives_over_positives_capped():
    labels = [(0,), (0, 1), (0,), -1, (0, 2)]  # label 0: 4 of 5, label 1: 1 of 5, label 2: 1 of 5
    records = [Record(Path(f"{i}.npy"), "train", lab, str(i)) for i, lab in enumerate(labels)]
    assert positive_weights(records, 4, cap=100).tolist() == [1 / 4, 4.0, 4.0, 1.0]  # label 3: none -> 1
    assert positive_weights(records, 4, cap=2).tolist() == [1 / 4, 2.0, 2.0, 1.0]


def test_bce_with_positive_weights_and_smoothing_is_the_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 0.0, 3.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    w = torch.tensor([1.0, 4.0, 0.5])
    loss = multilabel_loss(MultilabelConfig(), 0.1, w)(lambda x: logits, (None, targets))["loss"]
    y = targets * 0.9 + 0.05
    p = torch.sigmoid(logits)
    expected = -(w * y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_asymmetric_loss_without_focusing_or_clip_is_bce_and_with_them_quiets_easy_negatives():
    logits = torch.tensor([[3.0, -4.0, -3.0], [-2.0, 1.0, -5.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    plain = MultilabelConfig(loss="asymmetric", gamma_neg=0, gamma_pos=0, clip=0)
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    asl = multilabel_loss(plain, 0.0, None)(lambda x: logits, (None, targets))["loss"]
    assert asl.item() == pytest.approx(bce.item(), rel=1e-4)
    asl = multilabel_loss(MultilabelConfig(loss="asymmetric"), 0.0, None)  # gamma_neg 4, clip 0.05
    negatives = torch.zeros(1, 2)
    easy = asl(lambda x: torch.tensor([[-3.0, -4.0]]), (None, negatives))["loss"]  # p 0.047, 0.018 < clip
    hard = asl(lambda x: torch.tensor([[1.0, 2.0]]), (None, negatives))["loss"]  # p 0.73, 0.88
    assert easy.item() == 0.0 and hard.item() > 0.1  # easy negatives are discarded, hard ones still count


@pytest.mark.parametrize("backbone,head", [(b, "linear") for b in DEBUG_BACKBONES] + [("vit_debug", "probe")])
def test_every_head_trains_one_sigmoid_per_label(backbone, head):
    model = build_classifier(meta(backbone, head)).train()
    images, targets = batch()
    out = multilabel_loss(MultilabelConfig(), 0.0, torch.ones(K))(model, (images, targets))
    out["loss"].backward()
    assert model(images).shape == (6, K) and torch.isfinite(out["loss"])
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_distilled_deit_learns_the_teachers_predicted_label_sets():
    """Hard distillation for multi-label: the distillation head's target is the teacher's label set
    at the teacher's own thresholds (not its argmax)."""
    student = build_classifier(meta("deit_debug")).train()
    student.set_distilled_training(True)
    teacher_logits = torch.tensor([[2.0, -2.0, 0.1]]).repeat(6, 1)  # sigmoid 0.88, 0.12, 0.52

    def teacher(images):
        return teacher_logits

    thresholds = torch.tensor([0.5, 0.5, 0.6])  # -> the teacher predicts {label 0} for every image
    images, targets = batch()
    out = multilabel_loss(MultilabelConfig(), 0.0, None, teacher, thresholds)(student, (images, targets))
    cls_logits, dist_logits = student(images)
    teacher_sets = torch.tensor([[1.0, 0.0, 0.0]]).repeat(6, 1)
    assert out["loss_distill"].item() == pytest.approx(
        F.binary_cross_entropy_with_logits(dist_logits, teacher_sets).item(), rel=1e-4)
    assert out["loss_cls"].item() == pytest.approx(F.binary_cross_entropy_with_logits(cls_logits, targets).item(),
                                                   rel=1e-4)
    assert out["loss"].item() == pytest.approx(0.5 * (out["loss_cls"] + out["loss_distill"]).item(), rel=1e-5)
    agreement = ((dist_logits >= 0).float() == teacher_sets).float().mean()
    assert out["teacher_agreement"].item() == pytest.approx(agreement.item())
    student.eval()
    assert student(images).shape == (6, K)  # at inference the two heads are averaged: one logit per label


def test_unused_multilabel_keys_are_named_only_when_the_recipe_changed_them(capsys):
    """A multi-class run says finetune.multilabel is unused only for keys the recipe changed; a
    config rebuilt from its dict (every key 'set') says nothing (seen in the demo's console)."""
    from pipeline.config import config_from_dict, load_config
    from pipeline.stages.finetune import _objective

    plain = load_config(None)
    rebuilt = config_from_dict(plain.to_dict(), "round trip")
    _objective(rebuilt.finetune, "multiclass", [], ["a", "b"], None, None, None)
    assert "is not used" not in capsys.readouterr().out
    changed = load_config(None, ["finetune.multilabel.loss=asymmetric"])
    _objective(changed.finetune, "multiclass", [], ["a", "b"], None, None, None)
    assert "finetune: finetune.multilabel (loss) is not used: the task is multiclass" in capsys.readouterr().out
