"""Encoder -> classifier for every family: exactly the head (and declared additions) left fresh;
position embeddings and relative-position tables follow the geometry, or a clear refusal."""
import pytest
import torch

from pipeline.models.backbones import BACKBONES, create_backbone, create_encoder, head_keys
from pipeline.models.transfer import load_encoder

HEADS = {"vit_debug": {"head.weight", "head.bias"},
         "deit_debug": {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"},
         "swin_debug": {"head.fc.weight", "head.fc.bias"},
         "beit_debug": {"head.weight", "head.bias"},
         "resnet_debug": {"fc.weight", "fc.bias"}}


@pytest.mark.parametrize("backbone", sorted(HEADS))
def test_head_names_come_from_the_family(backbone):
    clf = create_backbone(backbone, 16, 4, 5, num_classes=4)
    assert head_keys(clf, BACKBONES[backbone]) == HEADS[backbone]


@pytest.mark.parametrize("backbone", sorted(HEADS))
def test_encoder_fills_everything_but_the_head(backbone):
    encoder_state = create_encoder(backbone, 16, 4, 5).state_dict()
    clf = create_backbone(backbone, 16, 4, 5, num_classes=4)
    fresh = load_encoder(clf, encoder_state, BACKBONES[backbone]).fresh
    additions = {"dist_token"} if backbone == "deit_debug" else set()
    assert fresh == HEADS[backbone] | additions
    for k, v in encoder_state.items():
        if k != "pos_embed":
            torch.testing.assert_close(clf.state_dict()[k], v)
    assert clf.eval()(torch.randn(2, 5, 16, 16)).shape == (2, 4)


def test_distilled_deit_gets_a_position_row_for_its_token():
    enc = create_encoder("deit_debug", 16, 4, 3).state_dict()  # a plain ViT: [1, 1 + 16, D]
    clf = create_backbone("deit_debug", 32, 4, 3, num_classes=2)  # distilled, 8 x 8 grid: [1, 2 + 64, D]
    load_encoder(clf, enc, BACKBONES["deit_debug"])
    assert clf.pos_embed.shape == (1, 2 + 64, 32)
    torch.testing.assert_close(clf.pos_embed[:, 1], enc["pos_embed"][:, 0])  # the class token's row


def test_position_embedding_is_resized_for_a_larger_grid():
    enc = create_backbone("vit_debug", 16, 4, 3).state_dict()  # 4 x 4 grid
    clf = create_backbone("vit_debug", 32, 4, 3, num_classes=2)  # 8 x 8 grid
    load_encoder(clf, enc, BACKBONES["vit_debug"])
    assert clf.pos_embed.shape == (1, 1 + 64, 32)


def test_swin_relative_position_tables_follow_a_new_window_size():
    enc = create_encoder("swin_debug", 32, 4, 3, window_size=4).state_dict()  # tables [(2*4-1)^2, heads]
    clf = create_backbone("swin_debug", 32, 4, 3, num_classes=2, window_size=2)
    load_encoder(clf, enc, BACKBONES["swin_debug"])
    table = clf.state_dict()["layers.0.blocks.0.attn.relative_position_bias_table"]
    assert table.shape == (9, 2) and enc["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (49, 2)


def test_swin_tables_that_cannot_be_resized_are_refused_naming_the_sizes():
    enc = create_encoder("swin_debug", 32, 4, 3).state_dict()
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    enc[key] = torch.zeros(10, 2)  # no square window has 10 relative positions
    clf = create_backbone("swin_debug", 32, 4, 3, num_classes=2)
    with pytest.raises(ValueError, match=r"relative-position tables .*\(10, 2\).*windows"):
        load_encoder(clf, enc, BACKBONES["swin_debug"])


@pytest.mark.parametrize("backbone", ["vit_debug", "swin_debug"])
def test_channel_mismatch_is_refused_not_reshaped(backbone):
    enc = create_encoder(backbone, 16, 4, 3).state_dict()
    clf = create_backbone(backbone, 16, 4, 13, num_classes=2)
    with pytest.raises(ValueError, match="channel count or patch size differ"):
        load_encoder(clf, enc, BACKBONES[backbone])


def test_foreign_or_partial_weights_are_refused():
    enc = create_backbone("vit_debug", 16, 4, 3).state_dict()
    del enc["blocks.0.attn.qkv.weight"]
    clf = create_backbone("vit_debug", 16, 4, 3, num_classes=2)
    with pytest.raises(ValueError, match=r"it lacks blocks\.\*\.attn\.qkv\.weight"):
        load_encoder(clf, enc, BACKBONES["vit_debug"])


def test_an_encoder_of_another_family_is_refused():
    enc = create_encoder("vit_debug", 16, 4, 3).state_dict()
    clf = create_backbone("swin_debug", 16, 4, 3, num_classes=2)
    with pytest.raises(ValueError, match="does not fit the swin model"):
        load_encoder(clf, enc, BACKBONES["swin_debug"])


def test_timm_local_weight_file_loads_without_network(tmp_path):
    from safetensors.torch import save_file

    src = create_backbone("vit_debug", 16, 4, 3, num_classes=7)
    save_file(src.state_dict(), tmp_path / "weights.safetensors")
    model = BACKBONES["vit_debug"].build(BACKBONES["vit_debug"].variants["vit_debug"], img_size=16, patch_size=4,
                                         in_chans=3, num_classes=7, pretrained_file=str(tmp_path / "weights.safetensors"))
    torch.testing.assert_close(model.pos_embed, src.pos_embed)


def test_beit_relative_position_tables_follow_a_new_image_size():
    enc = create_encoder("beit_debug", 16, 4, 5).state_dict()  # 4 x 4 grid: tables [(2*4-1)^2 + 3, heads]
    clf = create_backbone("beit_debug", 32, 4, 5, num_classes=3)  # 8 x 8 grid
    fresh = load_encoder(clf, enc, BACKBONES["beit_debug"]).fresh
    assert fresh == {"head.weight", "head.bias"}
    key = "blocks.0.attn.relative_position_bias_table"
    assert enc[key].shape == (7 * 7 + 3, 2) and clf.state_dict()[key].shape == (15 * 15 + 3, 2)
    # the 3 class-token entries are carried over as they are
    torch.testing.assert_close(clf.state_dict()[key][-3:], enc[key][-3:])
    assert clf.eval()(torch.randn(2, 5, 32, 32)).shape == (2, 3)


def test_beit_tables_that_cannot_be_resized_are_refused_naming_the_sizes():
    enc = create_encoder("beit_debug", 16, 4, 3).state_dict()
    enc["blocks.0.attn.relative_position_bias_table"] = torch.zeros(7 * 7 + 3, 4)  # 4 heads, the model has 2
    clf = create_backbone("beit_debug", 32, 4, 3, num_classes=2)
    with pytest.raises(ValueError, match=r"relative position bias tables .*8 x 8 patch grid.*\(228, 2\)"):
        load_encoder(clf, enc, BACKBONES["beit_debug"])


def test_beit_encoder_of_another_channel_count_is_refused():
    enc = create_encoder("beit_debug", 16, 4, 3).state_dict()
    clf = create_backbone("beit_debug", 16, 4, 13, num_classes=2)
    with pytest.raises(ValueError, match="channel count or patch size differ"):
        load_encoder(clf, enc, BACKBONES["beit_debug"])
