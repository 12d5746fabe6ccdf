"""Stage 2: masked-image-model pretraining of an encoder on the unlabelled pool.

The objective (`pretrain.objective.name`) and the backbone family are registered specs; this stage
asks them, and never tests which one it has.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from pipeline.config import Config, stage_dir
from pipeline.data.manifest import load_dataset_info, load_manifest, select
from pipeline.data.stats import load_stats
from pipeline.engine.fit import EpochEnd, Task, fit
from pipeline.engine.state import SeededAugmentation, full_state_dict
from pipeline.models.backbones import FAMILIES, backbone_spec, create_encoder
from pipeline.models.objectives import OBJECTIVES, ObjectiveSpec
from pipeline.models.transfer import load_encoder
from pipeline.plots import reconstruction_grid
from pipeline.stages.common import cached_read_fn, geometry_meta, make_dataset
from pipeline.stages.tokenizer import token_predictions, tokenizer_for_pretraining
from pipeline.tracking.artifacts import fetch
from pipeline.tracking.base import Tracker
from pipeline.weights import load_weights, save_weights


def build_mim_model(cfg: Config, in_chans: int, init_state: dict | None = None,
                    tokenizer: torch.nn.Module | None = None) -> tuple[torch.nn.Module, ObjectiveSpec]:
    """The objective's training module around a fresh encoder of `model.backbone` (or one holding
    `init_state`, for continued pretraining: then the objective keeps those weights). `tokenizer`:
    the frozen visual tokenizer of an objective that predicts tokens (BEiT)."""
    m, objective = cfg.model, OBJECTIVES[cfg.pretrain.objective.name]
    family = FAMILIES[backbone_spec(m.backbone).encoder_family]
    objective.check_backbone(family, m.backbone)
    encoder = create_encoder(m.backbone, m.img_size, m.patch_size, in_chans, m.window_size)
    if init_state is not None:  # nothing may be left fresh in an encoder (it has no head)
        for note in load_encoder(encoder, init_state, family).notes:
            print(f"pretrain: init: {note}", flush=True)
    extra = {"tokenizer": tokenizer} if objective.targets == "tokens" else {}
    return objective.build(encoder, family, cfg.pretrain.objective, fresh=init_state is None, **extra), objective


def mask_fn(cfg: Config, model: torch.nn.Module, objective: ObjectiveSpec):
    """The data pipeline's mask generator for this objective (None: the module masks by itself)."""
    if objective.mask_generator is None:
        return None
    family = FAMILIES[backbone_spec(cfg.model.backbone).encoder_family]
    return objective.mask_generator(cfg.pretrain.objective, objective.encoder(model), family, cfg.model.img_size)


def _objective_loss(model, batch) -> dict:
    """batch: (images [B, C, H, W], labels, masks [B, h, w] when the data pipeline draws them)."""
    out = model(batch[0], batch[2] if len(batch) > 2 else None)
    return {"loss": out["loss"], **out["metrics"]}


def shown_tiles(cfg: Config, records, pool, stats: dict, classes: list[str]) -> tuple[torch.Tensor, list[str] | None]:
    """The 8 tiles every reconstruction figure shows -> (images [n, C, H, W] normalised and
    resized as evaluation does, their class names or None): one class after another when the
    data has labels (the pool usually has none), else the pool's first."""
    labelled = [r for r in select(records, "train") if isinstance(r.label, int) and r.label >= 0]
    if labelled:
        by_class: dict[int, list] = {}
        for r in labelled:
            by_class.setdefault(r.label, []).append(r)
        picked = []
        while len(picked) < 8 and any(by_class.values()):
            for k in sorted(by_class):
                if by_class[k] and len(picked) < 8:
                    picked.append(by_class[k].pop(0))
        names = [classes[r.label] if r.label < len(classes) else str(r.label) for r in picked]
    else:
        picked, names = pool[:8], None
    data = make_dataset(cfg, picked, stats, train=False)
    return torch.stack([data[i][0] for i in range(len(picked))]), names


def _reconstructions(cfg: Config, objective: ObjectiveSpec, images: torch.Tensor, masks, out: Path,
                     tracker: Tracker, channels: list[str], labels: list[str] | None):
    """Epoch-end hook: a reconstruction grid of the same tiles and masks every recon_every_epochs."""
    p = cfg.pretrain

    def plot(end: EpochEnd) -> dict:
        if end.epoch % p.recon_every_epochs and end.epoch != p.epochs:
            return {}
        model = end.accelerator.unwrap_model(end.model)
        device = end.accelerator.device
        # Every rank runs the forward (under FSDP it is collective); rank 0 plots. The plot draws
        # its own masks (the same every epoch), leaving training's RNG streams untouched.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.run.seed)
            r = model.reconstruct(images.to(device), None if masks is None else masks.to(device))
        if end.accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            rgb = (2, 1, 0) if images.shape[1] >= 3 else None  # bands 3-2-1 ~ true colour for Landsat
            patch = objective.encoder(model).patch_embed.patch_size[0]
            path = reconstruction_grid(images.numpy(), r["masked"].cpu().numpy(), r["recon"].cpu().numpy(),
                                       out / f"recon_epoch{end.epoch:03d}.png", rgb=rgb, mask=r["mask"].cpu().numpy(),
                                       patch_size=patch, channels=channels, labels=labels,
                                       title=f"{objective.name}, epoch {end.epoch}: input / masked / reconstruction "
                                             f"(loss of these {len(images)} tiles: {r['loss']:.3f})")
            tracker.log_artifact(path, "reconstructions")
        return {}

    return plot


def pretrain(cfg: Config, prepared: Path, accelerator: Accelerator, tracker: Tracker, name: str = "pretrain",
             tokenizer_dir: Path | None = None) -> Path:
    """-> folder with the encoder (model.safetensors + meta.json), also logged as artefact `encoder`.
    tokenizer_dir: the visual tokenizer `mimflow run` trained (else pretrain.objective.tokenizer)."""
    p = cfg.pretrain
    stats, info = load_stats(prepared / "stats.json"), load_dataset_info(prepared)
    records = load_manifest(prepared / "manifest.csv")
    pool = select(records, "unlabelled") or select(records, "train")
    init = fetch(p.init, "encoder", cfg.tracking) if p.init else None
    tokenizer = None
    if OBJECTIVES[p.objective.name].targets == "tokens":  # frozen; checkpoints hold its reference and hash
        tokenizer = tokenizer_for_pretraining(cfg, tokenizer_dir, stats)
        stats = tokenizer.meta["stats"]  # normalise exactly as the tokenizer saw its tiles
    model, objective = build_mim_model(cfg, len(stats["channels"]), load_weights(init)[0] if init else None,
                                       tokenizer.module if tokenizer else None)
    masks = mask_fn(cfg, model, objective)
    read_fn = cached_read_fn(cfg, pool, accelerator)  # epochs after the first decode nothing
    dataset = SeededAugmentation(make_dataset(cfg, pool, stats, train=True, read_fn=read_fn), cfg.run.seed, masks)
    shown, labels = shown_tiles(cfg, records, pool, stats, info.get("classes") or [])  # the same in every grid
    rng = np.random.default_rng(cfg.run.seed)
    shown_masks = torch.from_numpy(np.stack([masks(rng) for _ in shown])) if masks else None
    out = stage_dir(cfg, name)
    tracker.log_params({"pretrain.init_resolved": str(init), "pool_size": len(pool),
                        "pretrain.tokenizer_resolved": tokenizer.reference.reference if tokenizer else None})
    tracker.log_dataset(prepared / "manifest.csv", cfg.data.name, info["dataset_hash"], "training", pool[0].split)
    figures = (token_predictions(cfg, shown, shown_masks, out, tracker) if tokenizer else
               _reconstructions(cfg, objective, shown, shown_masks, out, tracker, stats["channels"], labels))
    task = Task(name=name, prefix="pretrain", model=model, dataset=dataset, loss=_objective_loss,
                epochs=p.epochs, batch_size_per_device=p.batch_size_per_device, optimizer=p.optimizer,
                log_every_steps=p.log_every_steps, sections=("run", "data", "model", "pretrain"),
                on_epoch_end=figures, states={"tokenizer": tokenizer.reference} if tokenizer else {})
    fitted = fit(cfg, task, accelerator, tracker)

    unwrapped = accelerator.unwrap_model(fitted.model)
    encoder_state = full_state_dict(fitted.model, accelerator, submodule=objective.encoder(unwrapped))  # collective
    if accelerator.is_main_process:
        meta = {**geometry_meta(cfg, stats), "kind": "encoder", "objective": objective.name,
                "family": backbone_spec(cfg.model.backbone).encoder_family,
                "dataset_hash": info.get("dataset_hash"), "config": cfg.to_dict(),
                "pretrain_run_id": tracker.run_id, "final_loss": fitted.loss, "init": str(init) if init else None,
                "tokenizer": {**tokenizer.reference.state_dict(), "run_id": tokenizer.meta.get("tokenizer_run_id")}
                if tokenizer else None}
        save_weights(encoder_state, out / "encoder", meta)
        tracker.log_artifacts(out / "encoder", "encoder")
        tracker.log_metrics({"pretrain/final_loss": fitted.loss}, step=fitted.state.step)
    accelerator.free_memory()
    return out / "encoder"
