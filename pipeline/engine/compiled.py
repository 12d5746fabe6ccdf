"""`run.compile` for a module with no compiled step of its own: its forward under torch.compile.

MAE offers `compile_step()` (its masks are drawn eagerly, its maths compiled). Every other training
module (SimMIM, BEiT, the classifiers) takes masks and images as inputs and draws nothing itself
but drop path, so its whole forward is compiled, the way timm's train.py `--torchcompile` does.
"""
from __future__ import annotations

import warnings

import torch


class CompiledForward:
    """Replaces `module.forward` (an instance attribute: the class, its state dict and checkpoints
    are unchanged). Compiled lazily, at the first training call; calls without gradients (plots,
    validation, prediction) run the eager forward, so they do not compile a second graph. If
    compilation or the compiled call fails (inductor needs a C++ compiler, not every graph
    compiles), it warns once and every later call runs eager.

    Drop path's random draws come from inductor's generator under compile, not eager torch's
    (the maths is the same; the draws are not bit-identical to an eager run)."""

    def __init__(self, module: torch.nn.Module):
        self.name = type(module).__name__
        self.eager = module.forward
        self.compiled = torch.compile(self.eager)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None and torch.is_grad_enabled():
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any compiler failure: fall back, loudly
                warnings.warn(f"{self.name}: torch.compile failed ({type(err).__name__}: {str(err)[:200]}); "
                              f"running eager")
                self.compiled = None
        return self.eager(*args, **kwargs)


def compile_forward(module: torch.nn.Module) -> CompiledForward:
    """Install a CompiledForward on `module` (idempotent) -> it."""
    if not isinstance(module.forward, CompiledForward):
        module.forward = CompiledForward(module)
    return module.forward
