"""`run.compile`'s pieces: a compiled call that falls back to eager, and a module's forward under
torch.compile.

MAE offers `compile_step()` (its masks are drawn eagerly, its maths compiled). Every other training
module (SimMIM, BEiT, the classifiers) takes masks and images as inputs and draws nothing itself
but drop path, so its whole forward is compiled (`CompiledForward`), the way timm's train.py
`--torchcompile` does. Both call through `call_compiled`.
"""
from __future__ import annotations

import warnings

import torch


def call_compiled(owner, attr: str, eager, name: str, *args, **kwargs):
    """`owner.<attr>(*args, **kwargs)`, the compiled function, when it is set and gradients are on;
    else `eager(...)` (calls without gradients, e.g. plots and validation, so they do not compile a
    second graph). If the compiled call fails (inductor needs a C++ compiler, not every graph
    compiles) it warns once, sets `owner.<attr>` to None (eager from then on) and runs eager."""
    compiled = getattr(owner, attr)
    if compiled is not None and torch.is_grad_enabled():
        try:
            return compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any compiler failure: fall back, loudly
            warnings.warn(f"{name}: torch.compile failed ({type(err).__name__}: {str(err)[:200]}); running eager")
            setattr(owner, attr, None)
    return eager(*args, **kwargs)


class CompiledForward:
    """Replaces `module.forward` (an instance attribute: the class, its state dict and checkpoints
    are unchanged). Compiled lazily, at the first training call; eager without gradients and after
    a compiler failure (`call_compiled`).

    Drop path's random draws come from inductor's generator under compile, not eager torch's
    (the maths is the same; the draws are not bit-identical to an eager run)."""

    def __init__(self, module: torch.nn.Module):
        self.name = type(module).__name__
        self.eager = module.forward
        self.compiled = torch.compile(self.eager)

    def __call__(self, *args, **kwargs):
        return call_compiled(self, "compiled", self.eager, self.name, *args, **kwargs)


def compile_forward(module: torch.nn.Module) -> CompiledForward:
    """Install a CompiledForward on `module` (idempotent) -> it."""
    if not isinstance(module.forward, CompiledForward):
        module.forward = CompiledForward(module)
    return module.forward
