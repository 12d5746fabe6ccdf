import pytest
import torch

from pipeline.models.backbones import create_backbone, head_keys
from pipeline.models.objectives import OBJECTIVES
from pipeline.models.transfer import load_encoder


@pytest.mark.parametrize("backbone", ["vit_debug", "deit_debug"])
def test_pretrained_encoder_fills_everything_but_the_head(backbone):
    mae = OBJECTIVES["mae"](create_backbone(backbone, 16, 4, 5), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    encoder_state = mae.encoder.state_dict()
    clf = create_backbone(backbone, 16, 4, 5, num_classes=4)
    assert head_keys(clf) == {"head.weight", "head.bias"}
    load_encoder(clf, encoder_state)
    for k, v in encoder_state.items():
        torch.testing.assert_close(clf.state_dict()[k], v)
    assert clf(torch.randn(2, 5, 16, 16)).shape == (2, 4)


def test_position_embedding_is_resized_for_a_larger_grid():
    enc = create_backbone("vit_debug", 16, 4, 3).state_dict()  # 4 x 4 grid
    clf = create_backbone("vit_debug", 32, 4, 3, num_classes=2)  # 8 x 8 grid
    load_encoder(clf, enc)
    assert clf.pos_embed.shape == (1, 1 + 64, 32)


def test_channel_mismatch_is_refused_not_reshaped():
    enc = create_backbone("vit_debug", 16, 4, 3).state_dict()
    clf = create_backbone("vit_debug", 16, 4, 13, num_classes=2)
    with pytest.raises(ValueError, match="channel count or patch size differ"):
        load_encoder(clf, enc)


def test_foreign_or_partial_weights_are_refused():
    enc = create_backbone("vit_debug", 16, 4, 3).state_dict()
    del enc["blocks.0.attn.qkv.weight"]
    clf = create_backbone("vit_debug", 16, 4, 3, num_classes=2)
    with pytest.raises(ValueError, match=r"missing .*blocks\.0\.attn\.qkv\.weight"):
        load_encoder(clf, enc)


def test_timm_local_weight_file_loads_without_network(tmp_path):
    from safetensors.torch import save_file

    src = create_backbone("vit_debug", 16, 4, 3, num_classes=7)
    save_file(src.state_dict(), tmp_path / "weights.safetensors")
    model = create_backbone("vit_debug", 16, 4, 3, num_classes=7,
                            pretrained_file=str(tmp_path / "weights.safetensors"))
    torch.testing.assert_close(model.pos_embed, src.pos_embed)
