"""Stage: train a visual tokenizer on the unlabelled pool (the targets BEiT predicts), and load a
trained one for BEiT pretraining.

`mimflow tokenizer` (also run by `mimflow run` for BEiT without pretrain.objective.tokenizer):
    [teacher_pretrain: an MAE encoder, when tokenizer.kind=vqkd and tokenizer.teacher=auto]
    -> tokenizer: VQ-KD on the teacher's patch features, or VQ-VAE on pixels
    -> <output_dir>/<name>/tokenizer/tokenizer/ (model.safetensors + meta.json), logged as artefact
       `tokenizer` and registered as models:/<tokenizer.model_name>@<register.alias>.

Per epoch it logs, measured on a fixed set of pool tiles: codebook perplexity, share of codes
used, dead codes and reconstruction loss (`codebook/*`), and every tokenizer.figure_every_epochs
a figure of the tiles' token maps. A codebook that collapses (fewer than tokenizer.min_code_usage
of its codes in use after training) is warned about in the console and tagged on the run.

A frozen model a stage uses (the teacher here, the tokenizer in BEiT pretraining) is checkpointed
as its reference and the sha256 of its weights (`FrozenReference`), never its weights: a
resumed run must load the very same weights.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from pipeline.config import Config, OptimizerConfig, config_from_dict, stage_dir
from pipeline.data.manifest import load_dataset_info, load_manifest, select
from pipeline.data.stats import load_stats
from pipeline.engine.checkpoint import CheckpointError
from pipeline.engine.fit import EpochEnd, Task, fit
from pipeline.engine.state import SeededAugmentation, full_state_dict
from pipeline.models.backbones import FAMILIES, create_encoder
from pipeline.models.tokenizer import TeacherFeatures, VisualTokenizer, build_tokenizer, codebook_usage
from pipeline.plots import token_map_grid
from pipeline.stages.common import cached_read_fn, geometry_meta, make_dataset
from pipeline.tracking.artifacts import fetch
from pipeline.tracking.base import Tracker
from pipeline.weights import WEIGHTS, UnsafeCheckpointError, load_weights, save_weights

ARTIFACT = "tokenizer"


class TokenizerError(ValueError):
    """A tokenizer or teacher that cannot be loaded, or does not fit the run; the message names it."""


@dataclass
class FrozenReference:
    """Checkpoint component of a frozen model a stage uses: its reference and weights hash."""
    what: str  # "tokenizer", "teacher"
    reference: str
    sha256: str

    def state_dict(self) -> dict:
        return {"reference": self.reference, "sha256": self.sha256}

    def load_state_dict(self, state: dict) -> None:
        if state["sha256"] != self.sha256:
            raise CheckpointError(
                f"the checkpoint was trained with the {self.what} {state['reference']} (sha256 "
                f"{state['sha256'][:12]}), this run loads {self.reference} (sha256 {self.sha256[:12]}): "
                "give the same one, or start over with checkpoint.resume=never")


@dataclass
class Loaded:
    """A frozen model loaded from a weights folder: the module, its meta.json, its checkpoint entry."""
    module: nn.Module
    meta: dict
    reference: FrozenReference


def weights_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    with open(Path(directory) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _said(err: Exception, limit: int = 300) -> str:
    """An exception on one line (torch's load_state_dict spreads its keys over many)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def fetch_named(ref: str, artifact: str, key: str, what: str, cfg: Config) -> Path:
    """fetch() with a failure named by the config key and reference (TokenizerError)."""
    try:
        return fetch(ref, artifact, cfg.tracking)
    except Exception as err:  # FileNotFoundError, MlflowException (unknown run, model, alias), ...
        raise TokenizerError(f"{key}={ref!r}: cannot load the {what}: {_said(err)}") from None


def _weights(directory: Path, kind: str, key: str, ref: str) -> tuple[dict, dict]:
    try:
        state, meta = load_weights(directory)
    except (FileNotFoundError, UnsafeCheckpointError, ValueError, OSError) as err:
        raise TokenizerError(f"{key}={ref!r}: cannot load it: {err}") from None
    if meta.get("kind") != kind:
        article = "an" if kind[0] in "aeiou" else "a"
        raise TokenizerError(f"{key}={ref!r}: a {meta.get('kind', 'foreign')!r} weights folder, not {article} {kind}")
    return state, meta


# -- the teacher (vqkd) ----------------------------------------------------------------------------

def teacher_source(cfg: Config) -> str:
    """"none" (vqvae), "train" (teacher=auto: an MAE teacher_pretrain stage first) or a reference."""
    t = cfg.tokenizer
    if t.kind == "vqvae":
        return "none"
    return "train" if t.teacher == "auto" else t.teacher


def teacher_config(cfg: Config) -> Config:
    """The config the auto teacher is pretrained with: MAE (its default section and optimizer) on
    tokenizer.teacher_backbone, same data and geometry, tokenizer.teacher_epochs epochs."""
    tree = cfg.to_dict()
    tree["model"]["backbone"] = cfg.tokenizer.teacher_backbone
    tree["pretrain"].update(objective={"name": "mae"}, init=None, optimizer=OptimizerConfig().model_dump(mode="json"),
                            epochs=cfg.tokenizer.teacher_epochs or cfg.pretrain.epochs)
    return config_from_dict(tree, "the tokenizer teacher's config")


def load_teacher(directory: Path, ref: str, cfg: Config, stats: dict) -> Loaded:
    """An encoder weights folder -> its frozen patch features on the tokenizer's grid. Raises
    TokenizerError naming tokenizer.teacher when it cannot be loaded or does not fit."""
    key = "tokenizer.teacher"
    state, meta = _weights(directory, "encoder", key, ref)
    if meta.get("channels") != stats["channels"]:
        raise TokenizerError(f"{key}={ref!r}: the teacher was pretrained on channels {meta.get('channels')}, "
                             f"the data has {stats['channels']}")
    if meta.get("img_size") != cfg.model.img_size:
        raise TokenizerError(f"{key}={ref!r}: the teacher takes {meta.get('img_size')} px images, "
                             f"model.img_size is {cfg.model.img_size}")
    try:
        family = FAMILIES[meta["family"]]
        encoder = create_encoder(meta["backbone"], meta["img_size"], meta["patch_size"], meta["in_chans"],
                                 meta.get("window_size"))
        encoder.load_state_dict(family.adapt_encoder(state, encoder))  # strict: exactly this encoder
        grid = (cfg.model.img_size // cfg.model.patch_size,) * 2
        teacher = TeacherFeatures(encoder, family.masked_features, grid)
    except (KeyError, ValueError, RuntimeError) as err:
        raise TokenizerError(f"{key}={ref!r}: cannot build the teacher encoder: {_said(err)}") from None
    return Loaded(teacher, meta, FrozenReference("teacher", ref, weights_sha256(directory)))


# -- the tokenizer -----------------------------------------------------------------------------------

def architecture(cfg: Config, in_chans: int, teacher: Loaded | None) -> dict:
    """What rebuilds the tokenizer (recorded in its meta.json)."""
    t = cfg.tokenizer
    target = teacher.module.width if teacher else cfg.model.patch_size ** 2 * in_chans
    return dict(kind=t.kind, encoder_backbone=t.encoder, codebook_size=t.codebook_size, code_dim=t.code_dim,
                target_dim=target, decoder_dim=t.decoder_dim, decoder_depth=t.decoder_depth,
                decoder_heads=t.decoder_heads, decay=t.decay, kmeans_init=t.kmeans_init,
                dead_code_threshold=t.dead_code_threshold, commitment_weight=t.commitment_weight,
                center_targets=t.center_targets)


def load_tokenizer(directory: Path, ref: str, cfg: Config, stats: dict) -> Loaded:
    """A tokenizer weights folder -> the frozen tokenizer (eval mode). Raises TokenizerError naming
    every mismatch of image size, patch size and channels with this run, or a folder that cannot load."""
    key = "pretrain.objective.tokenizer"
    state, meta = _weights(directory, "tokenizer", key, ref)
    wrong = [f"{k} {meta.get(k)} (model.{k} is {mine})"
             for k, mine in (("img_size", cfg.model.img_size), ("patch_size", cfg.model.patch_size))
             if meta.get(k) != mine]
    if meta.get("channels") != stats["channels"]:
        wrong.append(f"channels {meta.get('channels')} (the data has {stats['channels']})")
    if wrong:
        raise TokenizerError(f"{key}={ref!r} does not fit this run: its {'; '.join(wrong)}")
    try:
        arch = meta["architecture"]
        encoder = create_encoder(arch["encoder_backbone"], meta["img_size"], meta["patch_size"], meta["in_chans"])
        tokenizer = build_tokenizer(encoder, **arch)
        tokenizer.load_state_dict(state)  # strict
    except (KeyError, ValueError, RuntimeError) as err:
        raise TokenizerError(f"{key}={ref!r}: cannot rebuild the tokenizer: {_said(err)}") from None
    return Loaded(tokenizer.eval().requires_grad_(False), meta,
                  FrozenReference("tokenizer", ref, weights_sha256(directory)))


def tokenizer_for_pretraining(cfg: Config, given: Path | None, stats: dict) -> Loaded:
    """BEiT's tokenizer: the folder `mimflow run` trained (`given`), else pretrain.objective.tokenizer."""
    ref = cfg.pretrain.objective.tokenizer
    if given is None and not ref:
        raise TokenizerError("pretrain.objective.tokenizer: BEiT predicts the tokens of a visual tokenizer; give "
                             "one (PATH | run id | runs:/ | models:/, e.g. from `mimflow tokenizer`), or let "
                             "`mimflow run` train it first")
    directory = given if given is not None else fetch_named(ref, ARTIFACT, "pretrain.objective.tokenizer",
                                                             "tokenizer", cfg)
    return load_tokenizer(directory, str(ref or given), cfg, stats)


class CodebookReport:
    """Epoch-end hook: codebook statistics of the tokenizer on fixed pool tiles, and token-map figures."""

    def __init__(self, cfg: Config, images: torch.Tensor, out: Path, tracker: Tracker):
        self.cfg, self.images, self.out, self.tracker = cfg, images, out, tracker
        self.rgb = (2, 1, 0) if images.shape[1] >= 3 else None  # bands 3-2-1 ~ true colour for Landsat

    @torch.no_grad()
    def measure(self, model: VisualTokenizer, device) -> tuple[dict, torch.Tensor]:
        """-> ({codebook/perplexity, codebook/usage, codebook/dead_codes, codebook/recon_loss}, codes [N, h, w])."""
        was_training = model.training
        model.eval()  # no codebook updates while measuring
        codes, recon = [], 0.0
        for chunk in self.images.split(self.cfg.tokenizer.batch_size_per_device):
            out = model(chunk.to(device))
            codes.append(out["codes"].cpu())
            recon += out["metrics"]["recon_loss"].item() * len(chunk)
        model.train(was_training)
        codes = torch.cat(codes)
        usage = codebook_usage(codes, model.codebook_size)
        return {"codebook/perplexity": usage["perplexity"].item(), "codebook/usage": usage["codes_used"].item(),
                "codebook/dead_codes": model.dead_codes(), "codebook/recon_loss": recon / len(codes)}, codes

    def __call__(self, end: EpochEnd) -> dict:
        t = self.cfg.tokenizer
        model = end.accelerator.unwrap_model(end.model)
        metrics, codes = self.measure(model, end.accelerator.device)  # every rank alike (FSDP: collective)
        if end.accelerator.is_main_process and (end.epoch % t.figure_every_epochs == 0 or end.epoch == t.epochs):
            self.figure(codes, metrics, f"epoch {end.epoch}", f"token_maps_epoch{end.epoch:03d}.png")
        return metrics

    def figure(self, codes: torch.Tensor, metrics: dict, when: str, name: str) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        K = self.cfg.tokenizer.codebook_size
        title = (f"{self.cfg.tokenizer.kind} tokenizer, {when}: {round(metrics['codebook/usage'] * K)}/{K} codes used, "
                 f"perplexity {metrics['codebook/perplexity']:.1f}")
        path = token_map_grid(self.images.numpy(), {"visual tokens": codes.numpy()}, K, self.out / name,
                              title=title, rgb=self.rgb)
        self.tracker.log_artifact(path, "token_maps")
        return path


def _tokenizer_loss(model, batch) -> dict:
    out = model(batch[0])
    return {"loss": out["loss"], **out["metrics"]}


def _report_collapse(cfg: Config, metrics: dict, tracker: Tracker) -> bool:
    """Warn (console + MLflow tag) when too few codes are in use -> whether the codebook collapsed."""
    t = cfg.tokenizer
    usage, K = metrics["codebook/usage"], t.codebook_size
    collapsed = usage < t.min_code_usage
    tracker.set_tags({"mimflow.codebook_collapse": str(collapsed).lower(), "mimflow.codebook_usage": f"{usage:.4f}"})
    if collapsed:
        print(f"tokenizer: warning: codebook collapse: only {round(usage * K)} of {K} codes ({usage:.1%}) are used "
              f"on the report tiles, below tokenizer.min_code_usage={t.min_code_usage:.0%}; BEiT's targets will carry "
              "little information (try a smaller tokenizer.codebook_size, a lower tokenizer.decay or a larger "
              "tokenizer.dead_code_threshold)", file=sys.stderr, flush=True)
    return collapsed


def _register(cfg: Config, tracker: Tracker, meta: dict) -> str | None:
    """models:/<name>@<alias> of the logged tokenizer folder (rank 0; None without MLflow or on failure)."""
    if tracker.run_id is None:
        return None
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.folders import register_folder

    name = cfg.tokenizer.model_name or f"{cfg.register.model_name}-tokenizer"
    tags = {"tokenizer_run_id": tracker.run_id, "kind": meta["tokenizer_kind"],
            "codebook_size": cfg.tokenizer.codebook_size, "channels": ",".join(meta["channels"]),
            "teacher": (meta.get("teacher") or {}).get("reference", "none"), "dataset_hash": meta.get("dataset_hash")}
    try:
        version = register_folder(MlflowClient(cfg.tracking.uri), tracker.run_id, ARTIFACT, name, cfg.register.alias, tags)
    except Exception as err:  # the run id still references it; registration is a convenience
        print(f"tokenizer: not registered ({str(err).splitlines()[0]}); reference it by run id {tracker.run_id}",
              file=sys.stderr, flush=True)
        return None
    tracker.set_tags({"registered_model": f"{name}/{version}"})
    return f"models:/{name}@{cfg.register.alias}"


def train_tokenizer(cfg: Config, prepared: Path, teacher_dir: Path | None, accelerator: Accelerator,
                    tracker: Tracker, teacher_ref: str | None = None, name: str = "tokenizer") -> Path:
    """-> folder with the tokenizer (model.safetensors + meta.json), also logged as artefact `tokenizer`.
    teacher_dir: the teacher encoder's folder (vqkd); teacher_ref: how the user named it;
    name: the stage's folder under the run (checkpoints, tokenizer/), e.g. the sweep's."""
    t = cfg.tokenizer
    stats, info = load_stats(prepared / "stats.json"), load_dataset_info(prepared)
    records = load_manifest(prepared / "manifest.csv")
    pool = select(records, "unlabelled") or select(records, "train")
    teacher = None
    if t.kind == "vqkd":
        if teacher_dir is None:
            raise TokenizerError("tokenizer.kind=vqkd needs a teacher encoder (tokenizer.teacher)")
        teacher = load_teacher(teacher_dir, teacher_ref or str(teacher_dir), cfg, stats)
        stats = teacher.meta.get("stats", stats)  # normalise exactly as the teacher was trained
    in_chans = len(stats["channels"])
    arch = architecture(cfg, in_chans, teacher)
    encoder = create_encoder(t.encoder, cfg.model.img_size, cfg.model.patch_size, in_chans)
    model = build_tokenizer(encoder, teacher=teacher.module if teacher else None, **arch)
    read_fn = cached_read_fn(cfg, pool, accelerator)  # epochs after the first decode nothing
    dataset = SeededAugmentation(make_dataset(cfg, pool, stats, train=True, read_fn=read_fn), cfg.run.seed)
    shown = make_dataset(cfg, pool[:t.report_images], stats, train=False, read_fn=read_fn)
    out = stage_dir(cfg, name)
    report = CodebookReport(cfg, torch.stack([shown[i][0] for i in range(len(shown))]), out, tracker)
    tracker.log_params({"tokenizer.teacher_resolved": str(teacher_dir), "pool_size": len(pool),
                        "report_images": len(shown)})
    task = Task(name=name, prefix="tokenizer", model=model, dataset=dataset, loss=_tokenizer_loss,
                epochs=t.epochs, batch_size_per_device=t.batch_size_per_device, optimizer=t.optimizer,
                log_every_steps=t.log_every_steps, sections=("run", "data", "model", "tokenizer"),
                on_epoch_end=report, states={"teacher": teacher.reference} if teacher else {})
    fitted = fit(cfg, task, accelerator, tracker)

    unwrapped = accelerator.unwrap_model(fitted.model)
    final, _ = report.measure(unwrapped, accelerator.device)
    state = full_state_dict(fitted.model, accelerator)  # collective
    if accelerator.is_main_process:
        collapsed = _report_collapse(cfg, final, tracker)
        meta = {**geometry_meta(cfg, stats), "backbone": t.encoder, "kind": "tokenizer", "tokenizer_kind": t.kind,
                "architecture": arch, "codebook": {**{k.split("/")[1]: v for k, v in final.items()},
                                                   "collapsed": collapsed},
                "teacher": ({**teacher.reference.state_dict(), "backbone": teacher.meta.get("backbone"),
                             "pretrain_run_id": teacher.meta.get("pretrain_run_id")} if teacher else None),
                "dataset_hash": info.get("dataset_hash"), "config": cfg.to_dict(), "tokenizer_run_id": tracker.run_id,
                "final_loss": fitted.loss}
        save_weights(state, out / ARTIFACT, meta)
        tracker.log_artifacts(out / ARTIFACT, ARTIFACT)
        uri = _register(cfg, tracker, meta)
        print(f"tokenizer: {round(final['codebook/usage'] * t.codebook_size)}/{t.codebook_size} codes used, "
              f"perplexity {final['codebook/perplexity']:.1f}, {final['codebook/dead_codes']} dead; "
              f"{out / ARTIFACT}" + (f" ({uri})" if uri else ""), flush=True)
    accelerator.free_memory()
    return out / ARTIFACT


# -- BEiT's figures --------------------------------------------------------------------------------------

def token_predictions(cfg: Config, images: torch.Tensor, masks: torch.Tensor, out: Path, tracker: Tracker):
    """Epoch-end hook of BEiT pretraining: the tiles, their visual tokens, and the tokens BEiT
    predicts at the (hatched) masked patches, every pretrain.recon_every_epochs."""
    p = cfg.pretrain
    rgb = (2, 1, 0) if images.shape[1] >= 3 else None

    def plot(end: EpochEnd) -> dict:
        if end.epoch % p.recon_every_epochs and end.epoch != p.epochs:
            return {}
        model = end.accelerator.unwrap_model(end.model)
        device = end.accelerator.device
        was_training = model.training
        model.eval()
        r = model.predict_tokens(images.to(device), masks.to(device))  # every rank: collective under FSDP
        model.train(was_training)
        if end.accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            K = model.tokenizer.codebook_size
            path = token_map_grid(images.numpy(), {"visual tokens": r["tokens"].cpu().numpy(),
                                                   "predicted": r["pred"].cpu().numpy()}, K,
                                  out / f"tokens_epoch{end.epoch:03d}.png", rgb=rgb,
                                  masks=np.asarray(r["mask"].cpu()),
                                  title=f"BEiT, epoch {end.epoch}: tokens predicted at the hatched (masked) patches "
                                        f"(token accuracy of these tiles {r['accuracy']:.2f})")
            tracker.log_artifact(path, "token_predictions")
        return {}

    return plot
