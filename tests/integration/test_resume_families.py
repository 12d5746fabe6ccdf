"""SIGKILL mid-epoch, then the same command again: bit for bit the uninterrupted run, for every
objective x backbone family beyond MAE x ViT (tested in test_resume.py) and for every head."""
import signal

import pytest
from safetensors.torch import load_file

from conftest import TINY, tiny_overrides
from resume_helpers import checkpoint_index, ok, run_cli

pytestmark = pytest.mark.slow
EVERY_2 = "checkpoint.every_steps=2"  # tiny config: 5 steps per epoch, 2 epochs -> steps 1..10

CASES = {
    "simmim-swin": ("pretrain", ["model.backbone=swin_debug", "model.patch_size=2", "pretrain.objective=simmim"]),
    "simmim-vit": ("pretrain", ["pretrain.objective=simmim"]),
    "swin-head": ("finetune", ["model.backbone=swin_debug", "model.patch_size=2"]),
    "deit-distilled": ("finetune", ["model.backbone=deit_debug"]),  # + the teacher below
    "probe": ("finetune", ["finetune.mode=probe"]),
}


@pytest.fixture(scope="module")
def teacher(prepared_landsat, tmp_path_factory):
    """A small ResNet teacher, trained once, for the distilled DeiT case."""
    tmp = tmp_path_factory.mktemp("teacher")
    ok(run_cli(["finetune", str(TINY), "--prepared", str(prepared_landsat), "--init", "scratch",
                *tiny_overrides(tmp), "model.backbone=resnet_debug", "finetune.epochs=1"], cwd=tmp))
    return tmp / "runs" / "landsat_tiny" / "finetune" / "classifier"


def args_for(case, prepared, tmp, teacher_dir):
    stage, overrides = CASES[case]
    extra = [f"finetune.distillation.teacher={teacher_dir}"] if case == "deit-distilled" else []
    init = ["--init", "scratch"] if stage == "finetune" else []
    return stage, [stage, str(TINY), "--prepared", str(prepared), *init, *tiny_overrides(tmp), EVERY_2,
                   f"tracking.backlog_dir={tmp / 'backlog'}", *overrides, *extra]


def weights(tmp, stage):
    folder = "encoder" if stage == "pretrain" else "classifier"
    return load_file(tmp / "runs" / "landsat_tiny" / stage / folder / "model.safetensors")


@pytest.mark.parametrize("case", sorted(CASES))
def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(case, prepared_landsat, teacher, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref.mkdir(), cut.mkdir()
    stage, args = args_for(case, prepared_landsat, ref, teacher)
    ok(run_cli(args, cwd=ref))
    stage, args = args_for(case, prepared_landsat, cut, teacher)
    killed = run_cli(args, cwd=cut, fault=f"{stage}:kill:7")  # SIGKILL right after step 7
    assert killed.returncode == -signal.SIGKILL
    assert [c["step"] for c in checkpoint_index(cut, stage)["checkpoints"]] == [5, 6]
    resumed = ok(run_cli(args, cwd=cut))
    assert "(epoch 2, step 6, 1 batches into the epoch)" in resumed.stdout
    a, b = weights(ref, stage), weights(cut, stage)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k  # bit for bit
