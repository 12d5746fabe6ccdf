"""`mimflow tokenizer` and BEiT pretraining on bad input, through the real CLI: one `mimflow:` line
naming the key and reference (no traceback), and a collapsed codebook warned about in the console
and tagged on the MLflow run."""
import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY, tiny_overrides
from helpers import mimflow, runs_by_name

pytestmark = pytest.mark.slow
TOKENIZER_TINY = ["tokenizer.encoder=vit_debug", "tokenizer.code_dim=8", "tokenizer.decoder_dim=16",
                  "tokenizer.decoder_heads=2", "tokenizer.epochs=1", "tokenizer.batch_size_per_device=64",
                  "tokenizer.report_images=64"]


def cli(tmp, prepared, *args, check=True):
    command, *rest = args
    return mimflow(command, str(TINY), "--prepared", str(prepared), *tiny_overrides(tmp), *rest, cwd=tmp,
                   check=check)


def one_line_error(proc) -> str:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("mimflow: ")][-1]


@pytest.fixture(scope="module")
def collapsed(prepared_landsat, tmp_path_factory):
    """A VQ-VAE tokenizer whose 512 codes cannot all be used by 64 report tiles x 16 patches,
    trained with min_code_usage=1.0: the collapse warning must fire."""
    tmp = tmp_path_factory.mktemp("collapse")
    proc = cli(tmp, prepared_landsat, "tokenizer", *TOKENIZER_TINY, "tokenizer.kind=vqvae",
               "tokenizer.codebook_size=512", "tokenizer.min_code_usage=1.0")
    return tmp, proc


def test_a_collapsed_codebook_is_warned_in_the_console_and_tagged(collapsed):
    tmp, proc = collapsed
    assert "tokenizer: warning: codebook collapse: only" in proc.stderr
    assert "below tokenizer.min_code_usage=100%" in proc.stderr
    run = runs_by_name(MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}"))["tokenizer"]
    assert run.data.tags["mimflow.codebook_collapse"] == "true"
    assert 0 < float(run.data.tags["mimflow.codebook_usage"]) < 1


def test_a_tokenizer_of_another_patch_size_is_refused_by_pretraining(collapsed, prepared_landsat, tmp_path):
    folder = collapsed[0] / "runs" / "landsat_tiny" / "tokenizer" / "tokenizer"
    proc = cli(tmp_path, prepared_landsat, "pretrain", "model.backbone=beit_debug", "model.patch_size=2",
               "pretrain.objective=beit", f"pretrain.objective.tokenizer={folder}", check=False)
    assert one_line_error(proc) == (f"mimflow: pretrain.objective.tokenizer='{folder}' does not fit this run: its "
                                    "patch_size 4 (model.patch_size is 2)")


def test_beit_pretraining_without_a_tokenizer_says_where_to_get_one(prepared_landsat, tmp_path):
    proc = cli(tmp_path, prepared_landsat, "pretrain", "model.backbone=beit_debug", "pretrain.objective=beit",
               check=False)
    assert one_line_error(proc).startswith("mimflow: pretrain.objective.tokenizer: BEiT predicts the tokens of a "
                                           "visual tokenizer")


def test_a_teacher_that_cannot_be_loaded_is_named(prepared_landsat, tmp_path):
    proc = cli(tmp_path, prepared_landsat, "tokenizer", *TOKENIZER_TINY, "tokenizer.teacher=/no/such/encoder",
               check=False)
    assert one_line_error(proc).startswith("mimflow: tokenizer.teacher='/no/such/encoder': cannot load the teacher "
                                           "encoder: FileNotFoundError")
