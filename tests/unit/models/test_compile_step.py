"""run.compile for the modules with no compiled step of their own (SimMIM, BEiT, the classifiers):
their forward under torch.compile, eager without gradients, and eager with a warning when the
compiler fails. (Real compilation takes ~65 s even for a debug model on this CPU: it is measured
by scripts/bench_pretrain.py --set run.compile=true, not here.)"""
import pytest
import torch

from pipeline.config import load_config
from pipeline.models.compiled import CompiledForward
from pipeline.engine.fit import compile_step
from pipeline.models.backbones import create_backbone
from registry_pairs import build_pair, masks_for

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _modules():
    """(name, module, inputs) of each kind of training module that compiles its whole forward."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 16)
    out = [("classifier", create_backbone("vit_debug", 16, 4, 3, num_classes=4), (images,))]
    for objective in ("simmim", "beit"):
        model, spec, section, family = build_pair(objective, "vit_debug", 3, 16, 4)
        out.append((objective, model, (images, masks_for(model, spec, section, family, 16, 2))))
    return out


def _loss(out) -> torch.Tensor:
    return out["loss"] if isinstance(out, dict) else out.square().mean()


@pytest.mark.parametrize("name", ["classifier", "simmim", "beit"])
def test_the_switch_compiles_the_forward_only_when_asked(name, monkeypatch):
    _, module, inputs = next(m for m in _modules() if m[0] == name)
    keys = list(module.state_dict())
    assert not compile_step(module, load_config(None).run)  # off by default
    assert "forward" not in module.__dict__
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(fn) or fn)  # the real one: ~65 s
    assert compile_step(module, load_config(None, ["run.compile=true"]).run)
    assert isinstance(module.forward, CompiledForward) and len(compiled) == 1
    compile_step(module, load_config(None, ["run.compile=true"]).run)  # a second prepare: no second wrapper
    assert len(compiled) == 1 and module.forward.eager.__func__ is type(module).forward  # the eager forward
    assert list(module.state_dict()) == keys  # checkpoints unchanged
    assert torch.isfinite(_loss(module(*inputs)))


@pytest.mark.parametrize("name", ["classifier", "simmim", "beit"])
def test_a_compile_failure_warns_once_and_runs_eager_with_the_same_result(name):
    _, module, inputs = next(m for m in _modules() if m[0] == name)
    module.eval()  # no drop-path draws: the eager and fallback results must be equal
    with torch.no_grad():
        eager = _loss(module(*inputs))
    wrapper = CompiledForward(module)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("InductorError: no C++ compiler")

    wrapper.compiled = broken  # what torch.compile's function does when inductor fails
    module.forward = wrapper
    with torch.no_grad():
        assert torch.equal(_loss(module(*inputs)), eager) and not calls  # no gradients: eager, not compiled
    with pytest.warns(UserWarning, match=f"{type(module).__name__}: torch.compile failed.*running eager"):
        loss = _loss(module(*inputs))
    assert torch.allclose(loss, eager) and wrapper.compiled is None and calls == [1]
    loss.backward()  # the eager graph trains
    _loss(module(*inputs))
    assert calls == [1]  # it does not try again
