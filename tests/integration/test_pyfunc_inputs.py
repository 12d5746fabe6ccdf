"""The registered pyfunc model answers a wrong input (channels, shape, dtype) with a clear error:
first through MLflow's signature enforcement, and by its own checks for callers that bypass it."""
import mlflow
import numpy as np
import pytest
import torch

from pipeline.data.stats import load_stats
from pipeline.models.backbones import create_backbone
from pipeline.stages.register import _signature
from pipeline.tracking.registry import PACKAGE_DIR, PYFUNC_CODE
from pipeline.weights import save_weights


@pytest.fixture(scope="module")
def model(prepared_landsat, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pyfunc")
    stats = load_stats(prepared_landsat / "stats.json")
    meta = {"backbone": "vit_debug", "img_size": 16, "patch_size": 4, "in_chans": 5, "channels": stats["channels"],
            "stats": stats, "classes": ["a", "b", "c"], "num_classes": 3, "kind": "classifier"}
    torch.manual_seed(0)
    folder = save_weights(create_backbone("vit_debug", 16, 4, 5, num_classes=3).state_dict(), tmp / "clf", meta)
    mlflow.pyfunc.save_model(str(tmp / "model"), python_model=str(PYFUNC_CODE), artifacts={"classifier": str(folder)},
                             code_paths=[str(PACKAGE_DIR)], signature=_signature(meta))
    return mlflow.pyfunc.load_model(str(tmp / "model"))


def test_right_input_gives_probabilities(model):
    probs = model.predict(np.random.default_rng(0).normal(size=(2, 5, 16, 16)).astype(np.float32))
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_right_input_gives_probabilities_named_by_class(model):
    probs = model.predict(np.random.default_rng(0).normal(size=(2, 5, 16, 16)))  # float64 is fine too
    assert list(probs.columns) == ["a", "b", "c"]


@pytest.mark.parametrize("x, says", [
    (np.zeros((2, 3, 16, 16), np.float32), r"expected images of shape \[N, 5, H, W\] \(channels \['B1_blue'"),
    (np.zeros((5, 16), np.float32), r"expected images of shape \[N, 5, H, W\].*got \(5, 16\)"),
    (np.full((2, 5, 16, 16), "a"), "expected a numeric image array, got dtype <U1"),
    (np.zeros((2, 5, 16, 16), bool), "expected a numeric image array, got dtype bool"),
], ids=["channels", "rank", "strings", "bool"])
def test_wrong_inputs_are_refused_saying_what_was_expected(model, x, says):
    """The model's own checks run first (no input schema for MLflow to enforce, which would echo
    the whole input back): every message short, none an echo of the input."""
    with pytest.raises(Exception, match=says) as err:
        model.predict(x)
    assert len(str(err.value)) < 600


@pytest.mark.parametrize("x, says", [
    (np.zeros((2, 3, 16, 16), np.float32), r"expected images of shape \[N, 5, H, W\] \(channels \['B1_blue'"),
    (np.zeros((16, 16), np.float32), r"expected images of shape \[N, 5, H, W\].*got \(16, 16\)"),
    (np.zeros((2, 5, 16, 16), np.complex64), "expected a numeric image array, got dtype complex64"),
    (np.full((2, 5, 16, 16), "a"), "expected a numeric image array, got dtype <U1"),
    (np.zeros((2, 5, 16, 16), bool), "expected a numeric image array, got dtype bool"),
], ids=["channels", "rank", "complex", "strings", "bool"])
def test_the_model_checks_inputs_itself_too(model, x, says):
    inner = model.unwrap_python_model()  # e.g. a caller that skips MLflow's schema enforcement
    with pytest.raises(ValueError, match=says):
        inner.predict(None, x)
    ok = inner.predict(None, np.zeros((1, 5, 16, 16), np.uint16))  # raw integer tiles are fine here
    assert ok.shape == (1, 3)
