"""Foreign checkpoints into a classifier, as timm's checkpoint filters take them: official MAE
(pretrained, with its decoder; fine-tuned, with fc_norm and a 1000-class head), DeiT (two heads and
a distillation token), timm, DDP-saved and compiled layouts; BEiT into a ViT is refused, shortly.
Each is a small local file in its release format, loaded the way `finetune.init=FILE` loads it."""
import pytest
import timm
import torch

from pipeline.models.backbones import BACKBONES, create_backbone, create_encoder
from pipeline.models.transfer import load_encoder
from pipeline.weights import load_weights

SMALL = dict(embed_dim=32, depth=2, num_heads=2, img_size=16, patch_size=4, in_chans=5)


def encoder_state():
    torch.manual_seed(0)
    return create_encoder("vit_debug", 16, 4, 5).state_dict()


def official_mae_pretrain(enc):
    """facebookresearch/mae's mae_pretrain_vit_*.pth: {"model": encoder + decoder + mask token}."""
    decoder = {"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32),
               "decoder_pos_embed": torch.zeros(1, 17, 16), "decoder_blocks.0.norm1.weight": torch.ones(16),
               "decoder_norm.weight": torch.ones(16), "decoder_pred.weight": torch.zeros(80, 16)}
    return {"model": {**enc, **decoder}}


def official_mae_finetuned(enc):
    """mae_finetuned_vit_*.pth: average pooling (fc_norm, no norm) and a 1000-class head."""
    model = {k: v for k, v in enc.items() if not k.startswith("norm.")}
    model.update({"fc_norm.weight": enc["norm.weight"], "fc_norm.bias": enc["norm.bias"],
                  "head.weight": torch.zeros(1000, 32), "head.bias": torch.zeros(1000)})
    return {"model": model}


def timm_imagenet(enc):
    return {**enc, "head.weight": torch.zeros(1000, 32), "head.bias": torch.zeros(1000)}


LAYOUTS = {
    "official MAE pretrain": (official_mae_pretrain, "dropped the pretraining decoder and mask token"),
    "official MAE fine-tuned": (official_mae_finetuned, "used the checkpoint's fc_norm as norm"),
    "timm ImageNet": (timm_imagenet, "dropped the checkpoint's head (head: 1000 classes)"),
    "DDP-saved": (lambda e: {"state_dict": {f"module.{k}": v for k, v in timm_imagenet(e).items()}},
                  "stripped the wrapper prefix 'module.'"),
    "torch.compile": (lambda e: {f"_orig_mod.{k}": v for k, v in e.items()}, "stripped the wrapper prefix '_orig_mod.'"),
    "DDP around compile": (lambda e: {"model": {f"module._orig_mod.{k}": v for k, v in e.items()}},
                           "stripped the wrapper prefix '_orig_mod.'"),
    "mimflow MAE module": (lambda e: {**{f"backbone.vit.{k}": v for k, v in e.items()},
                                      "backbone.mask_token": torch.zeros(1, 1, 32),
                                      "decoder_embed.weight": torch.zeros(16, 32)},
                           "took the encoder under 'backbone.vit.'"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_released_layouts_load_with_exactly_the_head_left_to_train(layout, tmp_path):
    make, note = LAYOUTS[layout]
    enc = encoder_state()
    path = tmp_path / "weights.pth"
    torch.save(make(enc), path)
    state, meta = load_weights(path)  # weights_only torch.load, unwrapped
    clf = create_backbone("vit_debug", 16, 4, 5, num_classes=3)
    transfer = load_encoder(clf, state, BACKBONES["vit_debug"])
    assert transfer.fresh == {"head.weight", "head.bias"}
    assert any(note in n for n in transfer.notes), transfer.notes
    for k, v in enc.items():
        torch.testing.assert_close(clf.state_dict()[k], v)


def test_official_deit_loads_into_deit_with_its_token_and_into_vit_without():
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=1000, **SMALL).state_dict()
    clf = create_backbone("deit_debug", 16, 4, 5, num_classes=3)
    t = load_encoder(clf, {"model": deit}["model"], BACKBONES["deit_debug"])
    assert t.fresh == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert "dropped the checkpoint's head (head, head_dist: 1000 classes); this task trains its own" in t.notes
    torch.testing.assert_close(clf.dist_token, deit["dist_token"])
    vit = create_backbone("vit_debug", 16, 4, 5, num_classes=3)
    t = load_encoder(vit, deit, BACKBONES["vit_debug"])
    assert "dropped DeiT's distillation token (this classifier has none)" in t.notes
    torch.testing.assert_close(vit.pos_embed[:, 1:], deit["pos_embed"][:, 2:])  # the grid rows


def test_beit_into_a_vit_is_refused_with_a_short_message_naming_what_differs():
    torch.manual_seed(0)
    beit = timm.create_model("beit_base_patch16_224", num_classes=1000, **SMALL).state_dict()
    clf = create_backbone("vit_debug", 16, 4, 5, num_classes=3)
    with pytest.raises(ValueError) as err:
        load_encoder(clf, beit, BACKBONES["vit_debug"])
    msg = str(err.value)
    assert "blocks.*.gamma_1 (x2)" in msg and "relative_position_bias_table" in msg and "pos_embed" in msg
    assert len(msg) < 700  # patterns, not every key


def test_a_safetensors_file_is_weights_too(tmp_path):
    from safetensors.torch import save_file

    enc = encoder_state()
    save_file(timm_imagenet(enc), tmp_path / "model.safetensors")
    state, _ = load_weights(tmp_path / "model.safetensors")
    clf = create_backbone("vit_debug", 16, 4, 5, num_classes=3)
    assert load_encoder(clf, state, BACKBONES["vit_debug"]).fresh == {"head.weight", "head.bias"}
