"""The `sweep:` config section (see pipeline/sweep/__init__.py and the README's sweep section).

    sweep:
      fractions: [0.05, 0.1, 0.25, 1.0]     # of each repetition's training labels, nested
      repetitions: 3                        # redraws of the group-aware train/val/test split
      seeds: [0, 1, 2]                      # training seeds per (repetition, fraction)
      inits: {scratch: scratch, mae: "pretrain:mae", ours: "runs:/<id>/encoder"}
      heads: {vit: {backbone: vit_demo}, probe: {backbone: vit_demo, mode: probe}}
      steps: 200                            # optimizer steps of every network trial
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from pipeline.configbase import Section
from pipeline.models.backbones import BACKBONES, backbone_spec
from pipeline.models.objectives import OBJECTIVES

PRETRAIN_PREFIX = "pretrain:"  # an init "pretrain:<objective>" is pretrained by the sweep itself
CLASSICAL = ("logistic_regression", "random_forest")


class HeadSection(Section):
    """One classifier family to fine-tune: a backbone variant, full fine-tuning or a linear probe,
    and its own geometry when it differs from `model:` (None: model.patch_size / window_size)."""
    backbone: str
    mode: Literal["full", "probe"] = "full"
    patch_size: int | None = Field(None, ge=1)
    window_size: int | None = Field(None, ge=1)

    @field_validator("backbone")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in BACKBONES:
            raise ValueError(f"unknown backbone {v!r}; known: {sorted(BACKBONES)}")
        return v


class RaySection(Section):
    address: str | None = None  # None: start a local Ray instance; "auto" or "ray://host:10001": join a cluster
    gpus_per_trial: float = Field(0.0, ge=0)  # a fraction shares one GPU between trials


class SweepConfig(Section):
    # label fractions of each repetition's training split (nested: each inside the next larger)
    fractions: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.25, 1.0], min_length=1)
    repetitions: int = Field(3, ge=1)  # redraws of the group-aware train / val / test split
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)  # training seeds per cell
    split_seed: int = 0  # draws the repetitions' splits and label subsets (not the training seeds)
    # shares of all labelled images per repetition; test groups come only from groups that no
    # pretraining pool image belongs to (a pretrained encoder never saw a test pixel)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)  # share of the labelled images validated on
    # true: the validation labels are cut to the same fraction as the training labels (a user with
    # 5% of the labels has no full validation set); false: the whole validation split
    scale_val: bool = True
    # name -> scratch | pretrain:<objective> | an encoder: folder, run id, runs:/ or models:/ URI,
    # or a weights file (.pt/.pth/.bin/.safetensors)
    inits: dict[str, str] = Field(default_factory=lambda: {"scratch": "scratch", "mae": "pretrain:mae"},
                                  min_length=1)
    # objective -> its pretrain.objective keys for the `pretrain:<objective>` inits (default: the
    # recipe's pretrain.objective when it names that objective, else the objective's defaults)
    objectives: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # name -> {backbone, mode: full | probe, patch_size, window_size}: the classifiers trained per init
    heads: dict[str, HeadSection] = Field(default_factory=lambda: {"vit": HeadSection(backbone="vit_demo")},
                                          min_length=1)
    cnn_baseline: str = "resnet18"  # trained from scratch on the same labels and budget, always in the table
    steps: int = Field(200, ge=1)  # optimizer steps of every network trial (the same for every arm)
    eval_every_steps: int = Field(25, ge=1)  # validation (best-epoch selection) and checkpoint interval
    batch_size: int = Field(32, ge=1)  # images per optimizer step of a trial
    metric: Literal["balanced_accuracy", "accuracy"] = "balanced_accuracy"  # the one the report compares
    bootstrap: int = Field(2000, ge=100)  # bootstrap replicates per interval
    confidence: float = Field(0.95, gt=0.5, lt=1)  # of every interval
    power: float = Field(0.8, gt=0.5, lt=1)  # of the minimum detectable effect
    executor: Literal["sequential", "ray"] = "sequential"  # trials one after another, or as Ray tasks
    ray: RaySection = Field(default_factory=RaySection)
    cpus_per_trial: int = Field(1, ge=1)  # torch threads of a trial (and its Ray CPU share)
    max_trials: int = Field(200, ge=1)  # a larger grid asks for confirmation (or --yes)

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in v) or len(set(v)) != len(v):
            raise ValueError("fractions must be distinct numbers in (0, 1]")
        return sorted(v)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v

    @field_validator("inits")
    @classmethod
    def _inits(cls, v: dict[str, str]) -> dict[str, str]:
        for name, ref in v.items():
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"init name {name!r}: letters, digits, - and _ only (it names folders)")
            objective = ref[len(PRETRAIN_PREFIX):] if ref.startswith(PRETRAIN_PREFIX) else None
            if objective is not None and objective not in OBJECTIVES:
                raise ValueError(f"{name}: unknown objective {objective!r} in {ref!r}; known: {sorted(OBJECTIVES)}")
            if not ref.strip():
                raise ValueError(f"{name}: empty reference")
        return v

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, keys in v.items():
            if name not in OBJECTIVES:
                raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
            try:
                OBJECTIVES[name].Config(**{**keys, "name": name})
            except ValidationError as err:
                e = err.errors()[0]
                raise ValueError(f"{name}.{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})") from None
        return v

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: dict[str, HeadSection]) -> dict[str, HeadSection]:
        for name in v:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"head name {name!r}: letters, digits, - and _ only (it names folders)")
        return v

    @field_validator("cnn_baseline")
    @classmethod
    def _cnn(cls, v: str) -> str:
        if v not in BACKBONES or backbone_spec(v).family != "resnet":
            raise ValueError(f"{v!r} is not a ResNet variant; known: "
                             f"{sorted(n for n in BACKBONES if backbone_spec(n).family == 'resnet')}")
        return v
