"""Loading frozen models for BEiT: a tokenizer or teacher that does not fit the run, or cannot be
loaded, is refused naming the key, the reference and each mismatch; a resumed run must load the
very tokenizer its checkpoint was trained with."""
import pytest
import torch

from pipeline.config import load_config
from pipeline.engine.checkpoint import CheckpointError
from pipeline.models.backbones import create_encoder
from pipeline.models.tokenizer import debug_tokenizer
from pipeline.stages.tokenizer import (FrozenReference, TokenizerError, fetch_named, load_teacher, load_tokenizer,
                                       tokenizer_for_pretraining, weights_sha256)
from pipeline.weights import save_weights

CHANNELS = ["b1", "b2", "b3"]
STATS = {"channels": CHANNELS, "mean": [0.0] * 3, "std": [1.0] * 3}


def beit_config(*overrides):
    return load_config(None, ["model.backbone=beit_debug", "model.img_size=16", "model.patch_size=4",
                              "pretrain.objective=beit", *overrides])


def saved_tokenizer(tmp_path, patch=4, channels=CHANNELS):
    tok = debug_tokenizer(create_encoder("vit_debug", 16, patch, len(channels)))
    arch = dict(kind="vqvae", encoder_backbone="vit_debug", codebook_size=16, code_dim=8,
                target_dim=patch * patch * len(channels), decoder_dim=16, decoder_depth=1, decoder_heads=2,
                decay=0.99, kmeans_init=False, dead_code_threshold=1.0, commitment_weight=1.0)
    meta = {"kind": "tokenizer", "img_size": 16, "patch_size": patch, "in_chans": len(channels), "channels": channels,
            "stats": {**STATS, "channels": channels}, "architecture": arch}
    return save_weights(tok.state_dict(), tmp_path / "tok", meta), tok


def test_a_fitting_tokenizer_loads_frozen_with_its_hash(tmp_path):
    folder, tok = saved_tokenizer(tmp_path)
    loaded = load_tokenizer(folder, "my-tokenizer", beit_config(), STATS)
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded.module.tokenize(images), tok.eval().tokenize(images))
    assert not loaded.module.training and not any(p.requires_grad for p in loaded.module.parameters())
    assert loaded.reference.state_dict() == {"reference": "my-tokenizer", "sha256": weights_sha256(folder)}


def test_a_tokenizer_of_other_geometry_and_channels_is_refused_naming_each_mismatch(tmp_path):
    folder, _ = saved_tokenizer(tmp_path, patch=2, channels=["red", "green", "blue"])
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(folder, "tok-ref", beit_config(), STATS)
    message = str(err.value)
    assert message.startswith("pretrain.objective.tokenizer='tok-ref' does not fit this run")
    assert "patch_size 2 (model.patch_size is 4)" in message
    assert "channels ['red', 'green', 'blue'] (the data has ['b1', 'b2', 'b3'])" in message
    assert "img_size" not in message  # what fits is not reported


def test_beit_without_a_tokenizer_says_where_to_get_one():
    with pytest.raises(TokenizerError, match="pretrain.objective.tokenizer: BEiT predicts the tokens of a visual "
                                             "tokenizer.*mimflow tokenizer"):
        tokenizer_for_pretraining(beit_config(), None, STATS)


@pytest.mark.parametrize("ref,match", [
    ("/no/such/encoder", r"tokenizer\.teacher='/no/such/encoder': cannot load the teacher encoder: .*neither an "
                         "existing path"),
    ("0123456789abcdef0123456789abcdef", r"tokenizer\.teacher='0123456789abcdef0123456789abcdef': cannot load the "
                                         "teacher encoder"),
])
def test_a_teacher_that_cannot_be_fetched_names_the_reference(ref, match, tmp_path):
    cfg = beit_config(f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(TokenizerError, match=match):
        fetch_named(ref, "encoder", "tokenizer.teacher", "teacher encoder", cfg)


def test_a_teacher_folder_that_is_no_encoder_or_does_not_fit_is_refused(tmp_path):
    folder, _ = saved_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match=r"tokenizer\.teacher='t': a 'tokenizer' weights folder, not an encoder"):
        load_teacher(folder, "t", beit_config(), STATS)
    encoder = create_encoder("vit_debug", 16, 4, 3)
    meta = {"kind": "encoder", "family": "vit", "backbone": "vit_debug", "img_size": 16, "patch_size": 4,
            "in_chans": 3, "channels": CHANNELS, "stats": STATS}
    enc = save_weights(encoder.state_dict(), tmp_path / "enc", meta)
    assert load_teacher(enc, "e", beit_config(), STATS).module.width == 32
    with pytest.raises(TokenizerError, match=r"pretrained on channels \['b1', 'b2', 'b3'\], the data has \['x'\]"):
        load_teacher(enc, "e", beit_config(), {**STATS, "channels": ["x"]})
    broken = save_weights({k: v for k, v in encoder.state_dict().items() if "blocks.1" not in k}, tmp_path / "b", meta)
    with pytest.raises(TokenizerError, match=r"'b': cannot build the teacher encoder: RuntimeError.*Missing key"):
        load_teacher(broken, "b", beit_config(), STATS)


def test_resuming_with_another_tokenizer_is_refused():
    ours = FrozenReference("tokenizer", "runs:/new/tokenizer", "b" * 64)
    ours.load_state_dict({"reference": "elsewhere/tokenizer", "sha256": "b" * 64})  # same weights: fine
    with pytest.raises(CheckpointError, match="trained with the tokenizer old/tokenizer .*this run loads "
                                              "runs:/new/tokenizer"):
        ours.load_state_dict({"reference": "old/tokenizer", "sha256": "a" * 64})
