"""One typed config tree for every stage, loaded from YAML plus dotted overrides.

Unknown keys and wrong types fail at load time with a message naming the key:
    >>> load_config("configs/recipes/landsat_mae.yaml", ["pretrain.epochs=5"])

Objectives bring their own section (`pretrain.objective`, tagged by `name`; each is defined in its
file under pipeline/models/objectives/), and the backbone, its geometry and the objective x
backbone pair are checked here, at load, naming the keys.
"""
from __future__ import annotations

import copy
import difflib
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_serializer, model_validator

from pipeline.configbase import RESUME_SAFE, Section as _Section, resume_safe, resume_safe_factory
from pipeline.models.backbones import BACKBONES, backbone_spec, check_geometry, create_encoder
from pipeline.models.objectives import OBJECTIVES
from pipeline.sweep.config import SweepConfig


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class RunConfig(_Section):
    """The run: its name, seed, device, precision and how it reports."""
    # None: derived from the data and the method, e.g. landsat_landcover_mae (outputs go to <output_dir>/<name>)
    name: str | None = None
    seed: int = 0  # every random draw (init, shuffles, masks, augmentations, splits) follows from it
    output_dir: str = resume_safe("mimflow_runs")  # stage outputs go to <output_dir>/<name>/<stage>
    device: Literal["auto", "cpu", "cuda"] = resume_safe("auto")  # auto: CUDA when there is one
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # bf16 on GPUs; CPUs here run bf16 matmuls 2x slower
    gradient_accumulation_steps: int = Field(1, ge=1)  # micro-batches per optimizer step
    num_workers: int = resume_safe(0, ge=0)  # data-loader processes per rank (0: in the training process)
    quiet: bool = resume_safe(False)  # no progress bars (CI logs)
    fsdp: bool = False  # shard weights/grads/optimizer state (FSDP2) instead of DDP: for ViT-L/H
    # recompute block activations in backward: less memory, same numbers
    activation_checkpointing: bool = resume_safe(False)
    # a non-finite loss skips its optimizer step; this many in a row stop the run
    max_consecutive_nonfinite: int = resume_safe(5, ge=1)
    # torch.compile the training step (MAE: everything but the mask draw; SimMIM, BEiT and the
    # classifiers: the module's forward): 0-5 % faster at ViT-S on a 2-core CPU after ~110 s of
    # compiling; a compile error falls back to eager with a warning
    compile: bool = False
    # torch threads on CPU (None: torch's default, one per core); on a CPU shared with other
    # work fewer threads can be much faster (scripts/bench_pretrain.py)
    cpu_threads: int | None = Field(None, ge=1)


class TrackingConfig(_Section):
    """Where runs, metrics, artefacts and models go: an MLflow store or server."""
    uri: str = "sqlite:///mlflow.db"  # embedded default; http://host:port for a server
    artifact_location: str | None = "mlartifacts"  # only used when the experiment is created
    experiment: str = "mimflow"  # the MLflow experiment every run of this recipe goes to
    # Logging runs in the background and survives a server outage: failed calls are retried with
    # backoff (capped at retry_max_backoff_s) and delivered in order once the server is back.
    retry_max_backoff_s: float = Field(30.0, gt=0)
    # at the end of a stage, wait this long for the backlog; then spill it to backlog_dir
    # (replayed by the next mimflow command that uses this tracking URI)
    flush_timeout_s: float = Field(600.0, ge=0)
    backlog_dir: str = ".mimflow/tracking_backlog"  # undelivered tracking calls wait here (only when there are any)


class CheckpointConfig(_Section):
    """Checkpoints under <output_dir>/<name>/<stage>/checkpoints, for exact resume."""
    every_steps: int = Field(500, ge=0)  # optimizer steps between checkpoints (0: epoch ends only)
    keep_last: int = Field(2, ge=1)  # checkpoints kept per stage (older ones are deleted)
    resume: str = "auto"  # auto: the newest valid unfinished checkpoint | never | PATH of a checkpoint
    # SIGTERM (preemption): checkpoint at the next step, then exit 0 within this many seconds.
    # torchrun and SLURM send SIGKILL 30 s after SIGTERM by default: stay below that.
    sigterm_grace_s: float = Field(25.0, gt=0)


class _ReaderSection(_Section):
    """One reader's options: only the keys written in the recipe are passed on (and dumped)."""

    @model_serializer(mode="wrap")
    def _only_set(self, handler):
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


Window = Union[str, tuple[float, float]]  # a preset name, "header", or (center, width)


class PngOptions(_ReaderSection):
    alpha: Literal["drop", "keep", "nodata"] = "drop"
    orientation: Literal["exif", "stored"] = "exif"  # exif: upright as the camera said (PIL's exif_transpose)


class TiffOptions(_ReaderSection):
    bands: list[Union[int, str]] | None = None  # 1-based indexes or band descriptions
    max_pixels: int = Field(2**30, ge=1)


class DicomOptions(_ReaderSection):
    window: Union[Window, list[Window], None] = None  # names checked by prepare before any read
    force: bool = False


class NiftiOptions(_ReaderSection):
    axis: Literal[0, 1, 2] = 2
    min_nonzero_fraction: float = Field(0.01, ge=0, le=1)
    canonical: bool = True


class NpyOptions(_ReaderSection):
    pass


class NpzOptions(_ReaderSection):
    split: Literal["train", "val", "test"] | None = None


class ReaderOptions(_ReaderSection):
    """data.reader_options: options keyed by reader, each file takes its own reader's.

    A read-only mapping {reader: {option: value}} of the readers set, so that
    `read_image(path, **cfg.data.reader_options)` passes exactly what the recipe says.
    """
    png: PngOptions | None = None  # {alpha: drop | keep | nodata, orientation: exif | stored}
    jpeg: PngOptions | None = None  # as png
    tiff: TiffOptions | None = None  # {bands: [1-based indexes or descriptions], max_pixels}
    dicom: DicomOptions | None = None  # {window: lung | [center, width] | header, force}
    nifti: NiftiOptions | None = None  # {axis: 0 | 1 | 2, min_nonzero_fraction, canonical}
    npy: NpyOptions | None = None  # no options
    npz: NpzOptions | None = None  # {split: train | val | test}

    @model_validator(mode="before")
    @classmethod
    def _keyed_by_reader(cls, value: Any) -> Any:
        """The flat form of old recipes ({axis: 2}) gets a message saying where the key goes."""
        if isinstance(value, dict):
            for key in value:
                owners = [n for n, f in cls.model_fields.items()
                          if key not in cls.model_fields and key in f.annotation.__args__[0].model_fields]
                if owners:
                    raise ValueError(f"{key!r} is an option of the {' / '.join(owners)} reader: options are "
                                     f"keyed by reader, e.g. reader_options: {{{owners[0]}: {{{key}: ...}}}}")
        return value

    def keys(self) -> list[str]:
        return [k for k in type(self).model_fields if k in self.model_fields_set and getattr(self, k) is not None]

    def __getitem__(self, name: str) -> dict[str, Any]:
        return getattr(self, name).model_dump(mode="json")

    def __len__(self) -> int:
        return len(self.keys())

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {k: self[k] for k in self.keys()}


GENERIC_SOURCES = {"folder": "root", "imagefolder": "root", "csv": "manifest"}  # source -> its path option
REPO_ROOT = Path(__file__).resolve().parents[1]


class DataConfig(_Section):
    """The imagery: where it comes from, how it is read, checked, split, normalised and augmented."""
    dataset: str = "landsat_landcover"  # folder | imagefolder | csv, or a data card: datasets/<dataset>/prepare.py
    # the data set's name in run, model and folder names; None: the data card's name, or the name
    # of the folder (table) a generic source reads
    name: str | None = None
    # passed to the builder as keyword arguments
    options: dict[str, Any] = Field(default_factory=lambda: {"tile_size": 16, "block_size": 64, "pool_stride": 4})
    root: str = resume_safe(".mimflow/data")  # prepared data goes to <root>/<data.name>
    # keyed by reader: {dicom: {window: lung}, nifti: {axis: 2}, png: {alpha: nodata}, tiff: {bands: [4, 3, 2]}}
    reader_options: ReaderOptions = Field(default_factory=ReaderOptions)
    # auto: the data card's channels, else the largest count present (grey is replicated, and
    # prepare says so); N: convert every image to N (grey -> N, RGB -> grey by luminance);
    # a list of names: that many channels, named
    channels: Union[Literal["auto"], Annotated[int, Field(ge=1)], Annotated[list[str], Field(min_length=1)]] = "auto"
    strict: bool = False  # a bad file fails prepare instead of being quarantined
    # prepare fails when quarantine would remove more than this share of any class's images
    # (all of a class always fails)
    max_quarantined_share: float = Field(0.2, ge=0, le=1)
    # a class may be missing from a split (e.g. it has fewer groups than there are splits)
    allow_missing_classes: bool = False
    cache: bool = True  # decode the pretraining pool once into memory-mapped shards under <root>/.cache
    augment: Literal["satellite", "medical", "none"] = "satellite"  # training transform preset
    augment_options: dict[str, Any] = Field(default_factory=dict)  # e.g. {scale: [0.5, 1.0]}
    stats_sample_per_channel: int = Field(200_000, ge=1000)  # reservoir for percentiles
    clip_percentiles: tuple[float, float] = (1.0, 99.0)  # each channel is clipped to these percentiles, then standardised

    @field_validator("channels", mode="before")
    @classmethod
    def _channels(cls, v):
        count = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        names = isinstance(v, list) and v and all(isinstance(n, str) for n in v) and len(set(v)) == len(v)
        if v != "auto" and not count and not names:
            raise ValueError("expected auto, a channel count >= 1, or a list of unique channel names")
        return v

    def prepare_settings(self) -> dict[str, Any]:
        """Every setting that changes what prepare writes: prepared data is reused only when
        these are equal (training-time settings are left out)."""
        return self.model_dump(mode="json", exclude={"root", "cache", "augment", "augment_options"})


class ModelConfig(_Section):
    """The backbone and its input geometry."""
    backbone: str = "vit_demo"  # a variant of a registered family: vit_*, deit_* (distilled), swin_*, resnet*
    # None: from the data once prepared (the median image size, capped at 224 px; said in the console)
    img_size: int | None = Field(None, ge=4)
    # None: the smallest of 2, 4, 8, 16, 32 that divides img_size into at most 16 x 16 patches
    patch_size: int | None = Field(None, ge=1)
    window_size: int | None = Field(None, ge=1)  # Swin only; None: the variant's default

    @field_validator("patch_size")
    @classmethod
    def _divides(cls, v: int | None, info) -> int | None:
        img = info.data.get("img_size")
        if img is not None and v is not None and img % v:
            raise ValueError(f"patch_size={v} does not divide img_size={img}")
        return v

    @property
    def resolved(self) -> bool:
        return self.img_size is not None and self.patch_size is not None


class OptimizerConfig(_Section):
    """timm's optimizer factory (AdamW by default) with its parameter groups: no weight decay on
    norms, biases and tokens; optional layer-wise lr decay (BEiT/MAE fine-tuning)."""
    name: Literal["adamw", "sgd", "momentum", "lars", "lamb"] = "adamw"  # timm's optimizer name
    base_lr: float = Field(1.5e-3, gt=0)  # lr = base_lr * global_batch / 256 (MAE's linear rule)
    weight_decay: float = Field(0.05, ge=0)  # decoupled (AdamW) weight decay, not on norms, biases and tokens
    betas: tuple[float, float] = (0.9, 0.95)  # adam-family optimizers
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd / momentum / lars
    layer_decay: float | None = Field(None, gt=0, le=1)  # lr x layer_decay^(depth - layer); None: off
    warmup_epochs: float = Field(2, ge=0)  # linear warmup, then cosine to 0
    clip_grad_norm: float | None = Field(None, gt=0)  # max global L2 norm of the gradients


def _objective_union():
    configs = tuple(spec.Config for spec in OBJECTIVES.values())
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator="name")]


ObjectiveSection = _objective_union()


class PretrainConfig(_Section):
    """Masked-image-model pretraining on the unlabelled pool."""
    # {name: mae | simmim | ..., <that objective's own keys>}; a plain name is accepted too
    objective: ObjectiveSection = Field(default_factory=OBJECTIVES["mae"].Config)
    # continued pretraining: start from these encoder weights (folder, .pt/.pth, run id, runs:/ or models:/ URI)
    init: str | None = None
    epochs: int = Field(40, ge=1)  # passes over the pool
    batch_size_per_device: int = Field(128, ge=1)  # images per step and process (global = x processes x accumulation)
    # base_lr: 10x MAE's 1.5e-4 because the demo run is short
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    recon_every_epochs: int = resume_safe(5, ge=1)  # a reconstruction figure every N epochs (and at the end)
    log_every_steps: int = resume_safe(10, ge=1)  # loss and lr to MLflow every N optimizer steps

    @field_validator("objective", mode="before")
    @classmethod
    def _tag(cls, v):
        if isinstance(v, str):
            v = {"name": v}
        if isinstance(v, dict) and "name" not in v:
            v = {**v, "name": "mae"}
        if isinstance(v, dict) and v["name"] not in OBJECTIVES:
            raise ValueError(f"unknown objective {v['name']!r}; known: {sorted(OBJECTIVES)}")
        return v


class DistillationConfig(_Section):
    """Hard distillation into a distilled DeiT's second head (Touvron et al. 2021)."""
    # auto: train a teacher when model.backbone is a distilled DeiT, else none |
    # none | train (a `teacher` stage on the same labels) | PATH / run id / runs:/ / models:/ of a classifier
    teacher: str = "auto"
    teacher_backbone: str = "resnet18"  # when trained here: torchvision resnet18 | resnet50 | resnet_debug


class MultilabelConfig(_Section):
    """Multi-label fine-tuning: one sigmoid output per label."""
    # bce: binary cross-entropy per label | asymmetric: ASL (Ridnik et al. 2021, timm's
    # AsymmetricLossMultiLabel), which down-weights the many easy negatives of rare findings
    loss: Literal["bce", "asymmetric"] = "bce"
    # weight each label's positive term by negatives / positives among the training rows (capped
    # at max_pos_weight), so a rare label's few positives weigh as much as its negatives
    pos_weight: bool = True
    max_pos_weight: float = Field(100.0, ge=1)  # the cap on a label's positive weight
    gamma_neg: float = Field(4.0, ge=0)  # asymmetric: focusing on negatives (ASL's default 4)
    gamma_pos: float = Field(0.0, ge=0)  # asymmetric: focusing on positives (ASL's default 0)
    clip: float = Field(0.05, ge=0, lt=1)  # asymmetric: probability margin shifted off negatives


# The optimizer each fine-tuning mode starts from; keys given in the recipe override single values.
# full: MAE's fine-tuning recipe (AdamW, layer decay 0.75); probe: MAE's linear probe (LARS, lr 0.1, no decay).
MODE_OPTIMIZER = {
    "full": dict(name="adamw", base_lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), layer_decay=0.75,
                 warmup_epochs=2),
    "probe": dict(name="lars", base_lr=0.1, weight_decay=0.0, layer_decay=None, warmup_epochs=2),
}


class FinetuneConfig(_Section):
    """Fine-tuning (or a linear probe) on a fraction of the labelled training split."""
    init: str = "pretrained"  # pretrained | scratch | PATH | run id | runs:/... | models:/...
    # auto: multilabel when the data card says so or any labelled row holds several classes |
    # multiclass (softmax, one class per image) | multilabel (a sigmoid per label)
    task: Literal["auto", "multiclass", "multilabel"] = "auto"
    mode: Literal["full", "probe"] = "full"  # probe: frozen encoder, BatchNorm + linear head (MAE protocol)
    epochs: int = Field(50, ge=1)  # passes over the labelled subset; the best epoch by validation is kept
    batch_size_per_device: int = Field(64, ge=1)  # images per step and process
    # starts from the mode's settings (MODE_OPTIMIZER); keys given here override single values
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(**MODE_OPTIMIZER["full"]))
    drop_path: float = Field(0.1, ge=0, lt=1)  # stochastic depth rate of the transformer blocks
    # of the cross-entropy targets; multi-label: each target moves towards 0.5
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    label_fraction: float = Field(0.1, gt=0, le=1)  # the label-scarce setting
    compare_scratch: bool = resume_safe(True)  # in `run`: also fine-tune from scratch as the baseline
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)  # a distilled DeiT's teacher
    multilabel: MultilabelConfig = Field(default_factory=MultilabelConfig)  # used when the task is multi-label
    log_every_steps: int = resume_safe(10, ge=1)  # loss and lr to MLflow every N optimizer steps

    @model_validator(mode="before")
    @classmethod
    def _mode_optimizer(cls, data):
        if isinstance(data, dict):
            given = data.get("optimizer") or {}
            if isinstance(given, dict):
                data = {**data, "optimizer": {**MODE_OPTIMIZER[data.get("mode", "full")], **given}}
        return data


# BEiT v2's tokenizer optimizer (its betas and weight decay), the start of tokenizer.optimizer
TOKENIZER_OPTIMIZER = dict(name="adamw", base_lr=1e-3, weight_decay=1e-4, betas=(0.9, 0.99), warmup_epochs=1)


class TokenizerConfig(_Section):
    """The visual tokenizer BEiT predicts the tokens of (`mimflow tokenizer`; `mimflow run` trains it
    first when pretrain.objective is beit without a tokenizer). Same image and patch size as model."""
    # vqkd: reconstruct a teacher encoder's features (BEiT v2's VQ-KD); vqvae: reconstruct the pixels
    kind: Literal["vqkd", "vqvae"] = "vqkd"
    # vqkd's teacher: auto = an MAE encoder pretrained first on the same pool (a `teacher_pretrain`
    # stage) | PATH / run id / runs:/ / models:/ of an encoder
    teacher: str = "auto"
    teacher_backbone: str = "vit_demo"  # teacher=auto: the MAE encoder's backbone
    teacher_epochs: int | None = Field(None, ge=1)  # teacher=auto: its pretraining epochs (None: pretrain.epochs)
    encoder: str = "vit_demo"  # the tokenizer's own encoder: a ViT variant (vit_*)
    codebook_size: int = Field(256, ge=2)  # K visual tokens (BEiT v2: 8192 for ImageNet)
    code_dim: int = Field(32, ge=2)  # width of a code vector (BEiT v2: 32)
    decoder_dim: int = Field(128, ge=8)  # width of the decoder that reconstructs the targets
    decoder_depth: int = Field(1, ge=1)  # BEiT v2: 3
    decoder_heads: int = Field(4, ge=1)  # attention heads of the decoder
    decay: float = Field(0.99, gt=0, lt=1)  # codebook EMA decay (BEiT v2: 0.99)
    kmeans_init: bool = True  # initialise the codebook by k-means on the first batch
    # replace codes whose EMA assignment count per step falls below this (0: never)
    dead_code_threshold: float = Field(1.0, ge=0)
    commitment_weight: float = Field(1.0, ge=0)  # BEiT v2: beta = 1
    # vqkd: subtract the batch's mean teacher feature before the cosine loss, so that a direction
    # all patches share does not let a few codes reconstruct everything (pipeline/models/tokenizer.py)
    center_targets: bool = True
    # fewer codes in use than this share of the codebook after training: "codebook collapse",
    # warned in the console and tagged on the MLflow run (mimflow.codebook_collapse)
    min_code_usage: float = Field(0.1, ge=0, le=1)
    epochs: int = Field(20, ge=1)  # passes over the unlabelled pool
    batch_size_per_device: int = Field(128, ge=1)  # images per step and process
    # starts from BEiT v2's settings (TOKENIZER_OPTIMIZER); keys given here override single values
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(**TOKENIZER_OPTIMIZER))
    report_images: int = resume_safe(1024, ge=1)  # the fixed pool tiles codebook statistics are measured on
    figure_every_epochs: int = resume_safe(5, ge=1)  # token-map figure every N epochs (and the last)
    log_every_steps: int = resume_safe(10, ge=1)  # loss and codebook metrics to MLflow every N steps
    # registered as models:/<model_name>@<register.alias>; None: <register.model_name>-tokenizer
    model_name: str | None = resume_safe(None)

    @model_validator(mode="before")
    @classmethod
    def _tokenizer_optimizer(cls, data):
        # tokenizer.optimizer.base_lr=... alone must not reset BEiT v2's betas and decay to AdamW's
        if isinstance(data, dict) and isinstance(data.get("optimizer"), dict):
            data = {**data, "optimizer": {**TOKENIZER_OPTIMIZER, **data["optimizer"]}}
        return data


class EvaluateConfig(_Section):
    """Scoring a classifier on a held-out split."""
    split: str = "test"  # the split scored: test (held-out groups) or val
    batch_size: int = Field(256, ge=1)  # images per prediction batch


class RegisterConfig(_Section):
    """The MLflow model registry entry of the classifier."""
    # None: derived from the data and the backbone family, e.g. landsat-landcover-vit
    model_name: str | None = None
    alias: str = "candidate"  # the alias moved to the new version (promote with another alias in MLflow)
    # which classifier of `mimflow run` is registered: the one with the better validation balanced
    # accuracy (best_val), or always the pretrained / the scratch arm
    arm: Literal["best_val", "pretrained", "scratch"] = "best_val"
    # a version whose classes, channels or input geometry differ from the model's latest is refused
    allow_schema_change: bool = False
    # a classifier that never saw a class in training is refused (it cannot predict it) unless this is set
    allow_missing_classes: bool = False


# pydantic warns that the `register` section shadows BaseModel.register; the key is part of
# the recipe format, and nothing here calls BaseModel.register.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    tracking: TrackingConfig = resume_safe_factory(TrackingConfig)  # never changes what training computes
    checkpoint: CheckpointConfig = resume_safe_factory(CheckpointConfig)  # never changes what training computes
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    evaluate: EvaluateConfig = resume_safe_factory(EvaluateConfig)  # never changes what training computes
    register: RegisterConfig = resume_safe_factory(RegisterConfig)  # never changes what training computes
    sweep: SweepConfig = resume_safe_factory(SweepConfig)  # `mimflow sweep` only; a trial's own keys are set in its config

    @model_validator(mode="after")
    def _models_can_be_built(self):
        m = self.model
        try:
            spec = backbone_spec(m.backbone)
        except KeyError as err:
            raise ValueError(f"model.backbone: {err.args[0]}") from None
        self._check_data()
        self._name_from_the_data(spec.family)
        _check_tokenizer(self.tokenizer)
        pretraining = self.finetune.init == "pretrained" or self.pretrain.init
        if pretraining:  # needs no geometry: refused before the data is even prepared
            try:
                OBJECTIVES[self.pretrain.objective.name].check_backbone(spec, m.backbone)
            except ValueError as err:
                raise ValueError(f"pretrain.objective: {err}") from None
        if not m.resolved:  # from the data: checked again once prepare has set it (resolve_geometry)
            return self._check_teacher()
        try:
            check_geometry(m.backbone, m.img_size, m.patch_size, 1, m.window_size)
        except ValueError as err:
            raise ValueError(f"model: {err}") from None
        if pretraining:
            objective = OBJECTIVES[self.pretrain.objective.name]
            try:
                import torch

                with torch.device("meta"):
                    encoder = create_encoder(m.backbone, m.img_size, m.patch_size, 1, m.window_size)
                objective.check(self.pretrain.objective, encoder, backbone_spec(m.backbone), m.img_size)
            except ValueError as err:
                raise ValueError(f"pretrain.objective: {err}") from None
        return self._check_teacher()

    def _check_teacher(self):
        teacher = self.finetune.distillation.teacher_backbone
        if teacher not in BACKBONES:
            raise ValueError(f"finetune.distillation.teacher_backbone: unknown backbone {teacher!r}; "
                             f"known: {sorted(BACKBONES)}")
        return self

    def _check_data(self) -> None:
        """What config can check of the data before any work: the source exists, its path too."""
        d = self.data
        if d.dataset in GENERIC_SOURCES:
            key = GENERIC_SOURCES[d.dataset]
            given = d.options.get(key)
            if not given:
                raise ValueError(f"data.options.{key}: data.dataset={d.dataset} reads the images from there; give it")
            if not Path(given).exists():
                raise ValueError(f"data.options.{key}: {given} does not exist")
            return
        cards = sorted(p.parent.name for p in (REPO_ROOT / "datasets").glob("*/prepare.py"))
        if d.dataset not in cards:
            close = difflib.get_close_matches(d.dataset, [*GENERIC_SOURCES, *cards], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"data.dataset: unknown data set {d.dataset!r}{hint} (generic sources: "
                             f"{sorted(GENERIC_SOURCES)}; data cards in datasets/: {cards})")

    def _name_from_the_data(self, family: str) -> None:
        """Fill data.name, run.name and register.model_name from the data when not given."""
        d = self.data
        if d.name is None:
            path = d.options.get(GENERIC_SOURCES.get(d.dataset, ""), "")
            stem = Path(path).resolve().stem if path else d.dataset
            if d.dataset == "csv" and stem in ("manifest", "labels", "data", "index", "train"):
                stem = Path(path).resolve().parent.name  # a generic table name says little
            d.name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or d.dataset
        if self.run.name is None:
            method = self.pretrain.objective.name if self.finetune.init == "pretrained" else "scratch"
            self.run.name = f"{d.name}_{method}"
        if self.register.model_name is None:
            self.register.model_name = f"{d.name.replace('_', '-')}-{family}".lower()

    @model_validator(mode="before")
    @classmethod
    def _objective_finetune_defaults(cls, data):
        """Fine-tuning starts from the pretraining objective's recipe values (BEiT: layer decay
        0.65), under the keys the recipe gives itself."""
        if not isinstance(data, dict) or not isinstance(data.get("finetune", {}), dict):
            return data
        objective = (data.get("pretrain") or {}).get("objective", "mae")
        name = objective.get("name", "mae") if isinstance(objective, dict) else objective
        defaults = getattr(OBJECTIVES.get(name), "finetune_optimizer", None)
        finetune = data.get("finetune", {})
        given = finetune.get("optimizer") or {}
        if not defaults or finetune.get("mode", "full") != "full" or not isinstance(given, dict):
            return data
        return {**data, "finetune": {**finetune, "optimizer": {**defaults, **given}}}

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values (for MLflow params and for comparing configs)."""
        return flatten(self.to_dict())


def _check_tokenizer(t: TokenizerConfig) -> None:
    """The tokenizer's encoder must be a ViT; an auto teacher a backbone with patch features."""
    for key, name in (("encoder", t.encoder), ("teacher_backbone", t.teacher_backbone)):
        if name not in BACKBONES:
            raise ValueError(f"tokenizer.{key}: unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    if backbone_spec(t.encoder).family != "vit":
        raise ValueError(f"tokenizer.encoder: {t.encoder!r} is not a ViT variant (vit_*)")
    if backbone_spec(t.teacher_backbone).masked_features is None:
        raise ValueError(f"tokenizer.teacher_backbone: {t.teacher_backbone!r} has no patch features to distil")


def stage_dir(cfg: Config, stage: str) -> Path:
    """Where a stage of this run writes: <run.output_dir>/<run.name>/<stage>."""
    return Path(cfg.run.output_dir) / cfg.run.name / stage


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {dotted key: leaf value}; an empty dict is a leaf. The one flattener."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def changed_keys(section: _Section, prefix: str = "", base: _Section | None = None) -> dict[str, Any]:
    """Dotted keys whose value differs from its default -> their JSON values. The default of a key
    in a nested section is that of the section its parent holds by default (tokenizer.optimizer
    has other defaults than pretrain.optimizer), or of its class when the parent holds another
    variant (pretrain.objective=simmim); a tagged section's name always counts. A key added to the
    tree later, at a default that keeps the old behaviour, does not appear, so results keyed on
    this (sweep trials) survive new config keys; a changed default, like any change of behaviour,
    needs its own version bump there."""
    out: dict[str, Any] = {}
    dumped = section.model_dump(mode="json")
    for name, field in type(section).model_fields.items():
        value, key = getattr(section, name), prefix + name
        default = getattr(base, name) if base is not None else field.get_default(call_default_factory=True)
        if isinstance(value, _Section):
            sub = changed_keys(value, key + ".", default if type(default) is type(value) else None)
            if "name" in type(value).model_fields:  # which variant of a tagged section
                sub.setdefault(key + ".name", dumped[name]["name"])
            out.update(sub)
        elif value != default:
            out[key] = dumped[name]
    return out


def resume_safe_keys(model: type[_Section] = None, prefix: str = "") -> set[str]:
    """Dotted keys marked resume_safe in the tree (they, and every key under them, may change when
    a run resumes)."""
    model = model or Config
    keys = set()
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get(RESUME_SAFE):
            keys.add(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, _Section):
            keys |= resume_safe_keys(ann, f"{prefix}{name}.")
    return keys


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    keys = dotted.split(".")
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if isinstance(child, str):  # a tagged section given by name (pretrain.objective=simmim), then its keys
            child = node[k] = {"name": child}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict:
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override {item!r} has an empty key")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), str) and "name" not in v:
            out[k] = {"name": out[k]}  # a tagged section given by name in the recipe, keys from overrides
        if k == "objective" and isinstance(v, dict) and isinstance(out.get(k), dict) and "name" in v \
                and out[k].get("name", "mae") != v["name"]:
            out[k] = v  # another objective: the recipe's keys were the other one's
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):  # data.options merges too
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def config_from_dict(tree: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = [str(p) for p in e["loc"]]
            note = ""
            if loc[:2] == ["pretrain", "objective"] and len(loc) > 3 and loc[2] in OBJECTIVES:
                note = f" for objective {loc.pop(2)!r}"  # the union's tag is no key of the recipe
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
            hint = _did_you_mean(loc, note) if e["type"] == "extra_forbidden" else ""
            if not loc:  # a check across sections: its message names the keys
                lines.append(f"  {msg}")
                continue
            lines.append(f"  {'.'.join(loc)}: {msg}{note}{hint} (got {e.get('input')!r})")
        raise ConfigError(f"invalid {source}:\n" + "\n".join(lines)) from None


def _did_you_mean(loc: list[str], note: str) -> str:
    """'; did you mean X?' for an unknown key, from the keys of the section it was found in."""
    from pipeline.configdoc import section_class

    cls = Config
    for part in loc[:-1]:
        field = cls.model_fields.get(part)
        if field is None:
            return ""
        if part == "objective" and note:  # the objective named in the union's tag
            cls = OBJECTIVES[note.split("'")[1]].Config
            continue
        cls = section_class(field.annotation)
        if cls is None:
            return ""
    close = difflib.get_close_matches(loc[-1], list(cls.model_fields), n=1)
    return f"; did you mean {'.'.join([*loc[:-1], close[0]])}?" if close else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + dotted overrides -> validated Config."""
    tree: dict = {}
    source = "overrides" if overrides else "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}:{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
        if loaded is None:  # an empty file would silently run every default (the full demo)
            raise ConfigError(f"{path}: the recipe is empty; give at least one section, or no recipe for the demo")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        tree, source = loaded, str(path)
    tree = _merge(tree, parse_overrides(overrides))
    return config_from_dict(tree, source)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
