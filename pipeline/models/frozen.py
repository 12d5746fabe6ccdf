"""Frozen modules a training module uses but does not own (BEiT's visual tokenizer, VQ-KD's teacher).

They are kept out of the owner's module tree, so they are not in its parameters() (hence not in
any optimizer), not in its state_dict() (checkpoints hold a reference and hash instead), not
wrapped or synchronised by DDP/FSDP, and they stay in eval mode whatever train() does to the
owner. They follow the owner's device and dtype moves (`.to()`, `.cuda()`, `.half()`).
"""
from __future__ import annotations

from torch import nn


class HoldsFrozen(nn.Module):
    """A module that holds frozen helpers by name: `self.hold("tokenizer", module)`, then
    `self.frozen("tokenizer")`."""

    def hold(self, name: str, module: nn.Module) -> nn.Module:
        module.eval().requires_grad_(False)
        # written to __dict__ directly: nn.Module.__setattr__ would register it as a submodule
        self.__dict__.setdefault("_frozen_modules", {})[name] = module
        return module

    def frozen(self, name: str) -> nn.Module:
        held = self.__dict__.get("_frozen_modules", {})
        if name not in held:
            raise KeyError(f"{type(self).__name__} holds no frozen {name!r} (it holds {sorted(held)})")
        return held[name]

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for module in self.__dict__.get("_frozen_modules", {}).values():
            module._apply(fn, recurse)
        return self
