"""Backbone families as registered specs: timm ViT, distilled DeiT, Swin, and a torchvision ResNet.

A family is one file in this folder that defines `SPEC = BackboneSpec(...)`; it is found by name,
so adding a family is adding a file. Every family has a debug-size variant for the tests. Pure:
no I/O, never a download.

    create_backbone("swin_debug", img_size=16, patch_size=2, in_chans=5, num_classes=4)
    create_encoder("deit_debug", 16, 2, 5)      # the ViT a distilled DeiT is pretrained as
    head_keys(model)                           # {"head.fc.weight", "head.fc.bias"} for a Swin
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from pipeline.registry import discover


@dataclass(frozen=True)
class Variant:
    """A named size: timm (or torchvision) architecture plus overrides that shrink or reshape it."""
    arch: str
    overrides: dict = field(default_factory=dict)
    encoder_arch: str | None = None  # what it is pretrained as, when that differs (distilled DeiT -> ViT)


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone family.

    build(variant, img_size, patch_size, in_chans, num_classes, window_size, drop_path_rate) -> model;
        num_classes=0 gives the encoder (no head).
    encoder_family: the family whose pretrained encoders this family's classifier loads.
    classifier: the head's module names (timm's `pretrained_cfg["classifier"]` where timm has one).
    additions(model): parameter names a classifier adds to its encoder besides the head
        (DeiT's distillation token); they are "missing" when an encoder is loaded, and checked.
    adapt_encoder(state, model): resize what depends on the geometry (position embeddings,
        relative-position tables); raises ValueError naming the sizes when it cannot.
    block_classes: transformer blocks, the unit of FSDP sharding and activation checkpointing.
    masked_features(model, images, mask, mask_token): the encoder with masked patch embeddings
        replaced by `mask_token` -> feature map [B, D, h, w] (for SimMIM); None: unsupported.
    output_stride(model): input pixels per feature-map cell of `masked_features`.
    masked_features_at(model, images, mask, mask_token, rows): the same features at patch rows
        [B, M] only -> [B, M, D], computed for those rows only where the family can (BEiT's loss
        reads the masked patches only); None from the call where it cannot for this model.
    """
    family: str
    variants: dict[str, Variant]
    debug: str
    build: Callable[..., nn.Module]
    encoder_family: str
    classifier: tuple[str, ...] | None = None
    additions: Callable[[nn.Module], set[str]] = lambda model: set()
    adapt_encoder: Callable[[dict, nn.Module], dict] = lambda state, model: dict(state)
    block_classes: tuple[type, ...] = ()
    masked_features: Callable | None = None
    masked_features_at: Callable | None = None
    output_stride: Callable[[nn.Module], int] | None = None
    uses_patch_size: bool = True
    uses_window_size: bool = False


FAMILIES: dict[str, BackboneSpec] = discover(__name__, __path__, BackboneSpec, "family")
BACKBONES: dict[str, BackboneSpec] = {name: spec for spec in FAMILIES.values() for name in spec.variants}
DEBUG_BACKBONES: list[str] = sorted(spec.debug for spec in FAMILIES.values())


def backbone_spec(name: str) -> BackboneSpec:
    """The family spec of a backbone variant name; KeyError naming the known ones."""
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[name]


def create_backbone(name: str, img_size: int, patch_size: int, in_chans: int, num_classes: int = 0,
                    window_size: int | None = None, drop_path_rate: float = 0.0) -> nn.Module:
    """The classifier of variant `name` (num_classes=K), or its encoder (num_classes=0: no head)."""
    spec = backbone_spec(name)
    return spec.build(spec.variants[name], img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                      num_classes=num_classes, window_size=window_size, drop_path_rate=drop_path_rate)


def create_encoder(name: str, img_size: int, patch_size: int, in_chans: int,
                   window_size: int | None = None, drop_path_rate: float = 0.0) -> nn.Module:
    """What variant `name` is pretrained as: the headless model of its encoder family
    (a distilled DeiT is pretrained as the plain ViT of the same size)."""
    spec = backbone_spec(name)
    variant = spec.variants[name]
    if variant.encoder_arch is not None:
        spec = FAMILIES[spec.encoder_family]
        variant = Variant(variant.encoder_arch, variant.overrides)
    return spec.build(variant, img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                      window_size=window_size, drop_path_rate=drop_path_rate)


def check_geometry(name: str, img_size: int, patch_size: int, in_chans: int,
                   window_size: int | None = None) -> None:
    """Build the variant on the meta device (no memory, no time): ValueError with timm's reason
    when this image/patch/window size cannot be built."""
    spec = backbone_spec(name)
    if window_size is not None and not spec.uses_window_size:
        raise ValueError(f"model.window_size={window_size}: backbone {name!r} ({spec.family}) has no windows")
    try:
        with torch.device("meta"):
            create_backbone(name, img_size, patch_size, in_chans, num_classes=2, window_size=window_size)
    except Exception as err:  # timm raises AssertionError, ValueError, RuntimeError alike
        raise ValueError(f"backbone {name!r} cannot be built with img_size={img_size}, patch_size={patch_size}"
                         + (f", window_size={window_size}" if window_size else "")
                         + f": {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def classifier_names(model: nn.Module, spec: BackboneSpec) -> tuple[str, ...]:
    """Module names of the classification head(s), from timm's pretrained_cfg where present."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or spec.classifier
    return (names,) if isinstance(names, str) else tuple(names)


def head_keys(model: nn.Module, spec: BackboneSpec) -> set[str]:
    """State-dict keys of the classification head(s): what fine-tuning adds to an encoder."""
    keys = set()
    for name in classifier_names(model, spec):
        keys |= {f"{name}.{k}" for k in model.get_submodule(name).state_dict()}
    return keys
