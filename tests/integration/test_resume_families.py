"""SIGKILL mid-epoch, then the same command again: bit for bit the uninterrupted run, for every
objective x backbone family beyond MAE x ViT (tested in test_resume.py), for every head, and for
BEiT's tokenizer stage (its codebook buffers included)."""
import signal

import pytest
from safetensors.torch import load_file

from conftest import TINY, tiny_overrides
from resume_helpers import checkpoint_index, ok, run_cli

pytestmark = pytest.mark.slow
EVERY_2 = "checkpoint.every_steps=2"  # tiny config: 5 steps per epoch, 2 epochs -> steps 1..10
TOKENIZER_TINY = ["tokenizer.encoder=vit_debug", "tokenizer.codebook_size=16", "tokenizer.code_dim=8",
                  "tokenizer.decoder_dim=16", "tokenizer.decoder_heads=2", "tokenizer.epochs=2",
                  "tokenizer.batch_size_per_device=64", "tokenizer.report_images=64", "tokenizer.log_every_steps=1"]

CASES = {
    "simmim-swin": ("pretrain", ["model.backbone=swin_debug", "model.patch_size=2", "pretrain.objective=simmim"]),
    "simmim-vit": ("pretrain", ["pretrain.objective=simmim"]),
    "swin-head": ("finetune", ["model.backbone=swin_debug", "model.patch_size=2"]),
    "deit-distilled": ("finetune", ["model.backbone=deit_debug"]),  # + the teacher below
    "probe": ("finetune", ["finetune.mode=probe"]),
    "tokenizer-vqkd": ("tokenizer", ["tokenizer.kind=vqkd", *TOKENIZER_TINY]),  # + the MAE teacher below
    "beit": ("pretrain", ["model.backbone=beit_debug", "pretrain.objective=beit"]),  # + the tokenizer below
}


@pytest.fixture(scope="module")
def teacher(prepared_landsat, tmp_path_factory):
    """A small ResNet teacher, trained once, for the distilled DeiT case."""
    tmp = tmp_path_factory.mktemp("teacher")
    ok(run_cli(["finetune", str(TINY), "--prepared", str(prepared_landsat), "--init", "scratch",
                *tiny_overrides(tmp), "model.backbone=resnet_debug", "finetune.epochs=1"], cwd=tmp))
    return tmp / "runs" / "landsat_tiny" / "finetune" / "classifier"


@pytest.fixture(scope="module")
def frozen(prepared_landsat, teacher, tmp_path_factory):
    """What each case loads frozen: the ResNet teacher, an MAE encoder (the VQ-KD teacher) and a
    VQ-VAE tokenizer (for BEiT), each trained once."""
    tmp = tmp_path_factory.mktemp("frozen")
    ok(run_cli(["pretrain", str(TINY), "--prepared", str(prepared_landsat), *tiny_overrides(tmp),
                "pretrain.epochs=1"], cwd=tmp))
    ok(run_cli(["tokenizer", str(TINY), "--prepared", str(prepared_landsat), *tiny_overrides(tmp),
                *TOKENIZER_TINY, "tokenizer.kind=vqvae", "tokenizer.epochs=1"], cwd=tmp))
    run = tmp / "runs" / "landsat_tiny"
    return {"deit-distilled": [f"finetune.distillation.teacher={teacher}"],
            "tokenizer-vqkd": [f"tokenizer.teacher={run / 'pretrain' / 'encoder'}"],
            "beit": [f"pretrain.objective.tokenizer={run / 'tokenizer' / 'tokenizer'}"]}


def args_for(case, prepared, tmp, frozen):
    stage, overrides = CASES[case]
    extra = frozen.get(case, [])
    init = ["--init", "scratch"] if stage == "finetune" else []
    return stage, [stage, str(TINY), "--prepared", str(prepared), *init, *tiny_overrides(tmp), EVERY_2,
                   f"tracking.backlog_dir={tmp / 'backlog'}", *overrides, *extra]


def weights(tmp, stage):
    folder = {"pretrain": "encoder", "tokenizer": "tokenizer"}.get(stage, "classifier")
    return load_file(tmp / "runs" / "landsat_tiny" / stage / folder / "model.safetensors")


@pytest.mark.parametrize("case", sorted(CASES))
def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(case, prepared_landsat, frozen, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref.mkdir(), cut.mkdir()
    stage, args = args_for(case, prepared_landsat, ref, frozen)
    ok(run_cli(args, cwd=ref))
    stage, args = args_for(case, prepared_landsat, cut, frozen)
    killed = run_cli(args, cwd=cut, fault=f"{stage}:kill:7")  # SIGKILL right after step 7
    assert killed.returncode == -signal.SIGKILL
    assert [c["step"] for c in checkpoint_index(cut, stage)["checkpoints"]] == [5, 6]
    resumed = ok(run_cli(args, cwd=cut))
    assert "(epoch 2, step 6, 1 batches into the epoch)" in resumed.stdout
    a, b = weights(ref, stage), weights(cut, stage)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k  # bit for bit
