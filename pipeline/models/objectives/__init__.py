"""Masked-image-modelling objectives as registered specs.

An objective is one file in this folder defining `SPEC = ObjectiveSpec(...)` and its own config
section (a pydantic class tagged by `name`, found under `pretrain.objective`); it is found by name,
so adding an objective is adding a file. Every objective module's forward(images [B, C, H, W],
mask [B, h, w] or None) returns {"loss": scalar, "pred": ..., "mask": [B, L] (1 = masked),
"metrics": {name: scalar} to log beside the loss}.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from torch import nn

from pipeline.configbase import ObjectiveConfig
from pipeline.registry import discover
from pipeline.models.backbones import BackboneSpec

MaskFn = Callable[[np.random.Generator], np.ndarray]  # rng -> bool [h, w] over the patch grid


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective.

    Config: its config section (subclass of ObjectiveConfig with `name: Literal[...]`).
    build(encoder, backbone, section, fresh) -> the training module around the encoder; fresh=False
        keeps the encoder's weights (continued pretraining) instead of the objective's own init.
    supports: the backbone families (encoder families) it can train.
    encoder(model): the encoder inside the trained module (what fine-tuning loads).
    mask_generator(section, encoder, backbone, img_size) -> MaskFn, when the data pipeline draws
        the masks (None: the module masks by itself).
    check(section, encoder, backbone, img_size): ValueError naming the values when this geometry
        cannot be trained (called at config load on a meta-device encoder).
    block_classes: the objective's own transformer blocks (e.g. MAE's decoder), for FSDP.
    debug: section values of the objective's tiny variant, used by the tests.
    targets: what it predicts. "pixels": the module's reconstruct(images, mask) serves the
        figures. "tokens": the visual tokens of a frozen tokenizer, which build() takes as
        `tokenizer=` (the pretrain stage loads it) and the module's predict_tokens(images, mask)
        serves the figures.
    finetune_optimizer: finetune.optimizer defaults for an encoder it pretrained (its paper's
        fine-tuning recipe); the recipe's own keys win.
    """
    name: str
    Config: type[ObjectiveConfig]
    build: Callable[..., nn.Module]
    supports: frozenset[str]
    encoder: Callable[[nn.Module], nn.Module] = lambda model: model.encoder
    mask_generator: Callable[..., MaskFn] | None = None
    check: Callable[..., None] = lambda section, encoder, backbone, img_size: None
    block_classes: tuple[type, ...] = ()
    debug: dict = field(default_factory=dict)
    targets: str = "pixels"
    finetune_optimizer: dict = field(default_factory=dict)

    def check_backbone(self, backbone: BackboneSpec, name: str) -> None:
        if backbone.encoder_family not in self.supports:
            raise ValueError(f"objective {self.name!r} cannot pretrain backbone {name!r} (family "
                             f"{backbone.encoder_family!r}); it supports {sorted(self.supports)}")


OBJECTIVES: dict[str, ObjectiveSpec] = discover(__name__, __path__, ObjectiveSpec, "name")
