"""The visual tokenizer: VQ-KD on a teacher's features and VQ-VAE on pixels, at debug sizes."""
import pytest
import torch

from pipeline.models.backbones import FAMILIES, create_encoder
from pipeline.models.tokenizer import TeacherFeatures, VisualTokenizer, codebook_usage, patchify


def tokenizer(kind: str, in_chans: int = 5, img: int = 16, patch: int = 4, codebook: int = 32, teacher_backbone="vit_debug"):
    encoder = create_encoder("vit_debug", img, patch, in_chans)
    teacher = None
    target = patch * patch * in_chans
    if kind == "vqkd":
        family = FAMILIES[FAMILIES[teacher_backbone.split("_")[0]].encoder_family]
        teacher = TeacherFeatures(create_encoder(teacher_backbone, img, 2 if teacher_backbone.startswith("swin") else patch,
                                                 in_chans), family.masked_features, encoder.patch_embed.grid_size)
        target = teacher.width
    return VisualTokenizer(encoder, kind, codebook, code_dim=8, target_dim=target, decoder_dim=16, decoder_depth=1,
                           decoder_heads=2, teacher=teacher)


@pytest.mark.parametrize("kind", ["vqkd", "vqvae"])
def test_a_few_training_steps_use_many_codes_and_lower_the_loss(kind):
    torch.manual_seed(0)
    tok = tokenizer(kind)
    images = torch.randn(16, 5, 16, 16)
    opt = torch.optim.AdamW(tok.parameters(), lr=2e-3)
    history = []
    for _ in range(15):
        out = tok(images)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: float(v) for k, v in out["metrics"].items()} | {"loss": out["loss"].item()})
    first, last = history[0], history[-1]
    assert set(first) == {"loss", "recon_loss", "commit_loss", "perplexity", "codes_used"}
    assert last["perplexity"] > 1 and 0 < last["codes_used"] <= 1  # more than one code in use
    assert last["recon_loss"] < first["recon_loss"]
    tok.eval()
    codes = tok.tokenize(images)
    assert codes.shape == (16, 4, 4) and codes.dtype == torch.int64 and 0 <= codes.min() and codes.max() < 32
    assert torch.equal(codes, tok.tokenize(images))  # eval mode leaves the codebook alone
    assert codebook_usage(codes, 32)["perplexity"] > 1 and 0 <= tok.dead_codes() <= 32


def test_the_teacher_is_frozen_not_trained_and_not_saved():
    tok = tokenizer("vqkd")
    teacher = tok.frozen("teacher")
    names = {n for n, _ in tok.named_parameters()}
    assert not any(n.startswith("teacher") for n in names) and not any(k.startswith("teacher") for k in tok.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters())
    tok.train()
    assert not teacher.training  # train() does not reach it
    tok.to(torch.float64)
    assert next(teacher.parameters()).dtype == torch.float64  # but moves follow the owner


def test_a_swin_teacher_is_resampled_to_the_token_grid():
    tok = tokenizer("vqkd", teacher_backbone="swin_debug")  # its last stage is 4 x 4 at 16 px, patch 2, 2 stages
    feats = tok.targets(torch.randn(2, 5, 16, 16))
    assert feats.shape == (2, 16, tok.frozen("teacher").width)


def test_codebook_usage_measures_perplexity_and_share():
    usage = codebook_usage(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 8)
    assert usage["perplexity"].item() == pytest.approx(4.0) and usage["codes_used"].item() == 0.5
    assert codebook_usage(torch.zeros(10, dtype=torch.long), 8)["perplexity"].item() == pytest.approx(1.0)


def test_patchify_is_row_major_patches():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = patchify(images, 2)
    assert p.shape == (2, 4, 12)
    torch.testing.assert_close(p[0, 1].reshape(2, 2, 3).permute(2, 0, 1), images[0, :, 0:2, 2:4])


def test_mismatches_are_refused_naming_them():
    with pytest.raises(ValueError, match="expects 5 channels.*\\(2, 3, 16, 16\\)"):
        tokenizer("vqvae").encode(torch.randn(2, 3, 16, 16))
    without_teacher = VisualTokenizer(create_encoder("vit_debug", 16, 4, 3), "vqkd", 8, 8, 32).eval()
    assert without_teacher.tokenize(torch.randn(1, 3, 16, 16)).shape == (1, 4, 4)  # a loaded one tokenizes
    with pytest.raises(ValueError, match="holds no teacher"):
        without_teacher.train()(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="P\\*P\\*C = 48"):
        VisualTokenizer(create_encoder("vit_debug", 16, 4, 3), "vqvae", 8, 8, 32)


def test_vqkd_targets_are_the_teachers_features_centred_on_the_batch_mean():
    tok = tokenizer("vqkd")
    images = torch.randn(4, 5, 16, 16)
    raw = tok.frozen("teacher")(images)
    torch.testing.assert_close(tok.targets(images), raw - raw.flatten(0, 1).mean(0))
    tok.center_targets = False
    torch.testing.assert_close(tok.targets(images), raw)
