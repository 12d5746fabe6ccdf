"""`mimflow sweep`: every arm of the grid (sweep.*) trained and scored on the same nested label
subsets, repeated group-aware splits and seeds; one MLflow parent run with a child per trial;
report.md, results.csv and label_efficiency.png at the end (pipeline/sweep/report.py).

    prepare (once) -> pretrain each `pretrain:<objective>` encoder (once per encoder shape)
    -> decode every labelled image once (one cache) and its channel statistics (classical rows)
    -> per repetition: split folders with each fraction's labels -> trials (sequential or Ray)
    -> statistics and report

Everything a sweep writes is under <run.output_dir>/<run.name>/sweep/. Every trial (and the
prepare and pretraining jobs) keeps a record there: a finished one is never run again while its
fingerprint (the settings and data that decide its result) is unchanged; one that was
interrupted continues in its MLflow run from its last checkpoint. So a killed sweep, started
again with the same command, only runs what is left, and a grid extended by a seed or a fraction
only runs the new trials.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.config import Config, changed_keys, config_from_dict, resume_safe_keys, stage_dir
from pipeline.data.manifest import Record, load_dataset_info, load_manifest, select, write_manifest
from pipeline.data.readers import read_image
from pipeline.distributed import make_accelerator
from pipeline.engine.loaders import make_loader
from pipeline.engine.loop import predict
from pipeline.engine.preempt import Preempted
from pipeline.fsutil import atomic_write_text, sha256_file
from pipeline.metrics import classification_metrics
from pipeline.models.backbones import check_geometry, create_encoder
from pipeline.models.objectives import OBJECTIVES
from pipeline.stages.common import block_names, make_dataset
from pipeline.stages.finetune import _init_encoder, finetune
from pipeline.stages.prepare import prepare, verify_prepared
from pipeline.stages.pretrain import pretrain
from pipeline.stages.run import log_config, run_lock, tokenizer_chain
from pipeline.sweep import classical, grid
from pipeline.sweep.executors import Job, Progress, make_executor
from pipeline.sweep.report import SweepResults, write_report
from pipeline.tracking.artifacts import fetch
from pipeline.tracking.runs import tracked_run
from pipeline.weights import build_classifier, load_classifier, read_meta, verify_weights

SWEEP = "sweep"  # <run.output_dir>/<run.name>/sweep
RECORD = "record.json"  # a job's or trial's status, MLflow run, fingerprint and result
PROTOCOL = 3  # how a trial trains and scores, beyond its config (and the defaults): a change reruns the trials


class SweepError(ValueError):
    """The grid cannot run as given; the message names the sweep key and the value."""


class SweepRefused(RuntimeError):
    """The grid is larger than sweep.max_trials and was not confirmed."""


# -- records ---------------------------------------------------------------------------------------

def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _write(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=1, default=str))


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def finished(folder: Path, fingerprint: str, reuse: bool = True) -> dict | None:
    """The recorded result of a job that finished with this fingerprint, else None (always None
    when not `reuse`: checkpoint.resume=never)."""
    rec = _read(folder / RECORD) if reuse else None
    return rec["result"] if rec and rec.get("status") == "finished" and rec.get("fingerprint") == fingerprint else None


def in_child_run(cfg: Config, folder: Path, name: str, fingerprint: str, tags: dict, fn: Callable) -> object:
    """fn(tracker) -> JSON-able result, in an MLflow child run of the sweep (tag mlflow.parentRunId,
    so that a Ray worker's run is a child too); an interrupted job with the same fingerprint
    reopens its run. The record says running, then finished with the result."""
    rec = _read(folder / RECORD)
    reopen = rec["run_id"] if rec and rec.get("status") == "running" and rec.get("fingerprint") == fingerprint else None
    with tracked_run(cfg.tracking, True, name, tags, run_id=reopen) as t:
        base, start = {"run_id": t.run_id, "fingerprint": fingerprint, "name": name}, time.monotonic()
        _write(folder / RECORD, {**base, "status": "running"})
        result = fn(t)
        # seconds: of the attempt that finished (a resumed job's earlier attempts are not counted)
        _write(folder / RECORD, {**base, "status": "finished", "result": result,
                                 "seconds": round(time.monotonic() - start, 2)})
    return result


def _job(cfg: Config, folder: Path, name: str, fingerprint: str, tags: dict, fn: Callable,
         verify: Callable[[object], object] | None = None) -> object:
    """A driver-side job (prepare, pretraining): its recorded result when it finished and still
    verifies, else run in a child run."""
    done = finished(folder, fingerprint, cfg.checkpoint.resume != "never")
    if done is not None:
        try:
            if verify is not None:
                verify(done)
            print(f"sweep: {name}: done before (record {folder / RECORD}); not redone", flush=True)
            return done
        except (OSError, ValueError) as err:
            print(f"sweep: {name}: its recorded result failed verification ({err}); redoing it", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    return in_child_run(cfg, folder, name, fingerprint, tags, fn)


# -- the one decoded-image cache and the classical features -------------------------------------------

def labelled_records(prepared: Path) -> list[Record]:
    return [r for r in load_manifest(prepared / "manifest.csv") if r.split in grid.LABELLED]


@functools.lru_cache(maxsize=4)
def shared_reader(manifest: str, root: str, options: str):
    """One cache of every labelled image of the prepared data (built on first use, opened after):
    every trial of the sweep, in this process or a Ray worker, reads its images from it."""
    from pipeline.data.cache import cached_reader

    return cached_reader(labelled_records(Path(manifest).parent), root, reader_options=json.loads(options), quiet=True)


def _reader(spec: dict):
    c = spec.get("cache")
    return shared_reader(c["manifest"], c["root"], c["options"]) if c else None


def _item_key(r: Record) -> str:
    return f"{os.path.abspath(r.path)}|{r.index}|{r.channels}"


def build_features(records: list[Record], read_fn, reader_options: dict, path: Path) -> Path:
    """Channel statistics of every labelled image (classical.channel_statistics) -> features.npz."""
    if not path.exists():
        rows = [classical.channel_statistics(read_fn(r) if read_fn else read_image(r.path, index=r.index,
                                             channels=r.channels, **reader_options)) for r in records]
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, x=np.stack(rows), keys=np.array([_item_key(r) for r in records]))
        os.replace(tmp, path)
    return path


@functools.lru_cache(maxsize=2)
def _features(path: str) -> tuple[np.ndarray, dict[str, int]]:
    with np.load(path) as z:
        return z["x"], {k: i for i, k in enumerate(z["keys"].tolist())}


# -- one trial (the executors' function; also a Ray task) ------------------------------------------------

def run_trial(spec: dict) -> dict:
    """Train and score one trial -> {"status": "finished", "metrics", "predicted", ...} or
    {"status": "failed", "error"}. A trial that finished with the same fingerprint is not rerun."""
    folder = Path(spec["folder"])
    done = finished(folder, spec["fingerprint"], spec["reuse"])
    if done is not None:
        return done
    torch.set_num_threads(spec["threads"])  # the same in every executor: the same numbers
    cfg = config_from_dict(spec["config"], f"trial {spec['id']}")
    trial = grid.Trial.from_dict(spec["trial"])
    tags = {"mlflow.parentRunId": spec["parent_run_id"], "mimflow.stage": "sweep_trial",
            "mimflow.arm": trial.arm.key, "mimflow.trial": spec["id"]}
    start = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    body = _network_trial if trial.arm.kind == "network" else _classical_trial

    def fn(tracker) -> dict:
        tracker.log_params({"sweep.arm": trial.arm.key, "sweep.fraction": trial.fraction, "sweep.repetition":
                            trial.repetition, "sweep.seed": trial.seed, "sweep.init": str(spec.get("encoder")),
                            "sweep.steps": spec.get("steps")})
        result = body(cfg, spec, trial, tracker)
        tracker.log_metrics({f"test/{k}": v for k, v in result["metrics"].items()})
        return {**result, "status": "finished", "run_id": tracker.run_id, "seconds": time.monotonic() - start}

    try:
        return in_child_run(cfg, folder, spec["id"], spec["fingerprint"], tags, fn)
    except (KeyboardInterrupt, Preempted):
        raise
    except Exception as err:  # recorded and reported; the rest of the grid goes on
        error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        rec = _read(folder / RECORD) or {}
        _write(folder / RECORD, {**rec, "status": "failed", "error": error, "fingerprint": spec["fingerprint"]})
        print(f"sweep: trial {spec['id']} failed: {error}", flush=True)
        return {"status": "failed", "error": error}


def _scored(logits: torch.Tensor, labels: torch.Tensor, spec: dict) -> dict:
    expected = spec["test_labels"]
    if labels.tolist() != expected:
        raise RuntimeError(f"trial {spec['id']}: test labels came back in another order than the split's")
    m = classification_metrics(logits, labels, spec["num_classes"])
    return {"metrics": {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")},
            "predicted": logits.argmax(1).tolist()}


def _network_trial(cfg: Config, spec: dict, trial: grid.Trial, tracker) -> dict:
    acc = make_accelerator(cfg.run, block_names(cfg))  # seeds every generator with the trial's seed
    split, read_fn = Path(spec["split"]), _reader(spec)
    encoder = Path(spec["encoder"]) if spec.get("encoder") else None
    clf = finetune(cfg, split, encoder, acc, tracker, name=spec["stage"], read_fn=read_fn,
                   epoch_images=spec["epoch_images"])
    model, meta = load_classifier(clf)
    test = select(load_manifest(split / "manifest.csv"), "test")
    ds = make_dataset(cfg, test, meta["stats"], train=False, img_size=meta["img_size"], read_fn=read_fn)
    loader = acc.prepare(make_loader(ds, cfg.evaluate.batch_size, cfg, train=False))
    logits, labels = predict(acc.prepare(model), loader, acc)
    shutil.rmtree(stage_dir(cfg, spec["stage"]) / "checkpoints", ignore_errors=True)  # the trial is over
    return _scored(logits, labels, spec)


def _classical_trial(cfg: Config, spec: dict, trial: grid.Trial, tracker) -> dict:
    x, row = _features(spec["features"])
    records = load_manifest(Path(spec["split"]) / "manifest.csv")
    train, test = select(records, "train"), select(records, "test")
    pick = lambda recs: x[[row[_item_key(r)] for r in recs]]  # noqa: E731
    probs = classical.fit_predict(trial.arm.estimator, trial.seed, pick(train), np.array([r.label for r in train]),
                                  pick(test), spec["num_classes"])
    logits = torch.from_numpy(np.log(np.clip(probs, 1e-12, 1.0))).float()
    return _scored(logits, torch.tensor([r.label for r in test]), spec)


# -- planning -----------------------------------------------------------------------------------------

def _absolute(cfg: Config) -> Config:
    """Paths made absolute: Ray workers need not start where the driver did."""
    tree = cfg.to_dict()
    tree["run"]["output_dir"] = os.path.abspath(tree["run"]["output_dir"])
    tree["data"]["root"] = os.path.abspath(tree["data"]["root"])
    t = tree["tracking"]
    if t["uri"].startswith("sqlite:///") and not t["uri"].startswith("sqlite:////"):
        t["uri"] = "sqlite:///" + os.path.abspath(t["uri"][len("sqlite:///"):])
    for key in ("artifact_location", "backlog_dir"):
        if t[key] and "://" not in t[key]:
            t[key] = os.path.abspath(t[key])
    return config_from_dict(tree, "the sweep's config")


def _fingerprint(cfg: Config, sections: tuple[str, ...], extra: dict) -> str:
    """What decides a job's result: the keys of `sections` that differ from their defaults and are
    not resume-safe (paths, logging), and `extra` (the trial, its split's rows, its encoder's
    sha256). Only changed keys count, so a config key added in a later version (at a default that
    keeps the old behaviour) reruns no finished trial; behaviour changes bump PROTOCOL."""
    safe = resume_safe_keys()
    keys = {k: v for k, v in changed_keys(cfg).items()
            if k.split(".")[0] in sections and not any(k == s or k.startswith(s + ".") for s in safe)}
    return _hash({"config": keys, **extra})


def _geometry_cfg(cfg: Config, backbone: str, patch: int, window: int | None, **finetune) -> dict:
    tree = cfg.to_dict()
    tree["model"].update(backbone=backbone, patch_size=patch, window_size=window)
    tree["finetune"].update(finetune)
    return tree


def trial_config(cfg: Config, trial: grid.Trial, encoder: Path | None, epochs: int) -> Config:
    """The recipe with the trial's seed, backbone, geometry, mode and budget; its labels are the
    split folder's (label_fraction 1), no distillation teacher (one trained on all labels would
    leak them), quiet."""
    from pipeline.config import MODE_OPTIMIZER

    arm, s = trial.arm, cfg.sweep
    extra = dict(init=str(encoder) if encoder else "scratch", mode=arm.mode, epochs=epochs, label_fraction=1.0,
                 batch_size_per_device=s.batch_size, compare_scratch=False,
                 distillation={**cfg.finetune.distillation.model_dump(mode="json"), "teacher": "none"})
    if arm.mode != cfg.finetune.mode:  # the mode's own optimizer (probe: LARS), not the recipe's
        extra["optimizer"] = dict(MODE_OPTIMIZER[arm.mode])
    tree = _geometry_cfg(cfg, arm.backbone or cfg.model.backbone, arm.patch_size or cfg.model.patch_size,
                         arm.window_size, **extra)
    tree["run"].update(seed=trial.seed, quiet=True)
    tree["pretrain"]["init"] = None
    return config_from_dict(tree, f"trial {trial.id}")


def _steps_per_epoch(cfg: Config, images: int) -> int:
    """Optimizer steps of an epoch of `images` samples, as engine.fit counts them."""
    batches = len(make_loader(range(images), cfg.sweep.batch_size, cfg, train=True))
    return math.ceil(batches / cfg.run.gradient_accumulation_steps)


def _split_folders(root: Path, prepared: Path, reps: list[grid.Repetition], fractions: list[float], seed: int,
                   scale_val: bool) -> tuple[dict, dict]:
    """Per (repetition, fraction) a prepared-data folder whose manifest holds that fraction's train
    (and validation) labels and the repetition's test items -> (folders, label counts per fraction)."""
    info = load_dataset_info(prepared)
    classes = info["classes"]
    folders, counts = {}, {f: {"train": [], "val": [], "per_class": {c: [] for c in classes}, "raised": []}
                           for f in fractions}
    for rep in reps:
        train = grid.nested_subsets(rep.train, fractions, seed * 1000 + rep.index)
        val = grid.nested_subsets(rep.val, fractions, seed * 1000 + rep.index + 500) if scale_val else None
        for f in fractions:
            sub = train[f]
            val_recs = val[f].records if val else rep.val
            folder = root / "splits" / f"rep{rep.index}" / f"frac{f:g}"
            rows = [(os.path.abspath(r.path), part, r.label, r.group, "" if r.index is None else r.index, r.sha256,
                     r.channels or "") for part, recs in (("train", sub.records), ("val", val_recs), ("test", rep.test))
                    for r in recs]
            write_manifest(folder, rows, ("index", "sha256", "channels"))
            for name in ("dataset.json", "stats.json"):
                shutil.copyfile(prepared / name, folder / name)
            folders[(rep.index, f)] = folder
            c = counts[f]
            c["train"].append(len(sub.records))
            c["val"].append(len(val_recs))
            for k, name in enumerate(classes):
                c["per_class"][name].append(sub.per_class.get(k, 0))
            c["raised"] += [(rep.index, classes[k], "train") for k in sub.raised]
            if val:
                c["raised"] += [(rep.index, classes[k], "validation") for k in val[f].raised]
    return folders, counts


def _encoder_shape(backbone: str, img: int, patch: int, window: int | None, chans: int) -> str:
    """Which pretrained encoders are interchangeable: the same state-dict names and shapes (a
    distilled DeiT and the ViT of its size share one)."""
    with torch.device("meta"):
        enc = create_encoder(backbone, img, patch, chans, window)
    return _hash(sorted((k, tuple(v.shape)) for k, v in enc.state_dict().items()))[:12]


def pretrain_encoders(cfg: Config, acc, arms: list[grid.Arm], prepared: Path, root: Path, chans: int) -> dict:
    """Every `pretrain:<objective>` encoder the arms need, pretrained once per (objective, encoder
    shape) in a child run -> {arm key: encoder folder}."""
    out, done = {}, {}
    for arm in arms:
        if arm.init is None or arm.init.kind != "pretrain":
            continue
        shape = _encoder_shape(arm.backbone, cfg.model.img_size, arm.patch_size, arm.window_size, chans)
        key = (arm.init.value, shape)
        if key not in done:
            recipe = cfg.pretrain.objective.model_dump(mode="json")
            obj = {**(recipe if recipe["name"] == arm.init.value else {}), **cfg.sweep.objectives.get(arm.init.value, {}),
                   "name": arm.init.value}
            tree = _geometry_cfg(cfg, arm.backbone, arm.patch_size, arm.window_size, init="pretrained")
            tree["pretrain"]["objective"] = obj
            pcfg = config_from_dict(tree, f"sweep.inits.{arm.init.name} x sweep.heads.{arm.head}")
            name = f"{SWEEP}/pretrain/{arm.init.value}-{arm.backbone}-{shape[:6]}"
            extra = {"prepared": load_dataset_info(prepared).get("dataset_hash")}
            tokenizer = None
            if OBJECTIVES[obj["name"]].targets == "tokens" and not pcfg.pretrain.objective.tokenizer:
                tokenizer = sweep_tokenizer(pcfg, acc, prepared)
                extra["tokenizer"] = _encoder_id(tokenizer)  # only here: other encoders keep their fingerprints
            fp = _fingerprint(pcfg, ("run", "data", "model", "pretrain"), extra)

            def fn(t, pcfg=pcfg, name=name, tokenizer=tokenizer):
                print(f"sweep: pretraining {pcfg.pretrain.objective.name} on {pcfg.model.backbone}, "
                      f"{pcfg.pretrain.epochs} epochs (MLflow run {t.run_id}, folder {name})", flush=True)
                log_config(pcfg, t)
                return str(pretrain(pcfg, prepared, acc, t, name=name, tokenizer_dir=tokenizer))

            done[key] = Path(_job(pcfg, stage_dir(cfg, name), name, fp, {"mimflow.stage": "pretrain"}, fn,
                                  verify=lambda p: verify_weights(Path(p))))
        out[arm.key] = done[key]
    return out


def sweep_tokenizer(pcfg: Config, acc, prepared: Path) -> Path:
    """The visual tokenizer a token-predicting objective (BEiT) needs: the chain `mimflow run` runs
    (tokenizer.teacher=auto: an MAE teacher, then the tokenizer), each stage a job of the sweep with
    its own child run and record. Keyed on what the tokenizer depends on, not on the backbone BEiT
    pretrains, so BEiT on a ViT and on a BEiT encoder of one geometry share one tokenizer."""
    tree = pcfg.to_dict()
    tree["model"].update(backbone=pcfg.tokenizer.encoder, window_size=None)
    tree["pretrain"]["objective"] = {"name": "mae"}  # the teacher's objective; the tokenizer reads none
    kcfg = config_from_dict(tree, "the sweep's tokenizer config")
    prefix = f"{SWEEP}/pretrain/tokenizer-p{kcfg.model.patch_size}-"
    dataset_hash = load_dataset_info(prepared).get("dataset_hash")

    def stage(c: Config, name: str, fn: Callable):
        def body(t):
            print(f"sweep: {name.removeprefix(prefix)} for BEiT's visual tokens (MLflow run {t.run_id}, "
                  f"folder {name})", flush=True)
            log_config(c, t)
            return fn(acc, t)
        fp = _fingerprint(c, ("run", "data", "model", "pretrain", "tokenizer"), {"prepared": dataset_hash, "stage": name})
        return _job(c, stage_dir(c, name), name, fp, {"mimflow.stage": name.removeprefix(prefix)}, body,
                    verify=lambda p: verify_weights(Path(p)))

    return tokenizer_chain(kcfg, prepared, stage, prefix)


def reference_encoders(cfg: Config, arms: list[grid.Arm], stats: dict, classes: list[str]) -> dict:
    """Every reference init fetched (path, run id, runs:/ or models:/ URI, weights file) and
    loaded once into each head it is crossed with -> {arm key: local path}.
    SweepError naming sweep.inits.<name> and the reference when it cannot be fetched or loaded."""
    out, fetched = {}, {}
    for arm in arms:
        if arm.init is None or arm.init.kind != "reference":
            continue
        init = arm.init
        try:
            if init.name not in fetched:
                fetched[init.name] = fetch(init.value, "encoder", cfg.tracking)
            meta = {"backbone": arm.backbone, "img_size": cfg.model.img_size, "patch_size": arm.patch_size,
                    "window_size": arm.window_size, "in_chans": len(stats["channels"]), "num_classes": len(classes),
                    "head": "probe" if arm.mode == "probe" else "linear"}
            _init_encoder(build_classifier(meta), arm.backbone, fetched[init.name], stats)
        except Exception as err:
            raise SweepError(f"sweep.inits.{init.name}: cannot load {init.value!r} into head {arm.head!r} "
                             f"({arm.backbone}): {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        out[arm.key] = fetched[init.name]
    return out


def _encoder_id(path: Path | None) -> str | None:
    if path is None:
        return None
    return sha256_file(path) if path.is_file() else read_meta(path).get("weights_sha256")


def _split_id(folder: Path) -> str:
    """The split folder's rows (not where the files lie): what a trial's labels are."""
    return _hash([(r.split, r.label, r.group, r.index, r.sha256 or r.path.name)
                  for r in load_manifest(folder / "manifest.csv")])


# -- the sweep ----------------------------------------------------------------------------------------------

def check_grid(cfg: Config) -> tuple[list[grid.Arm], list[tuple[str, str]], int]:
    """Arms, skipped pairs and the number of trials; SweepError naming the head whose backbone
    cannot be built with its geometry. Nothing is read or run."""
    arms, skipped = grid.arms(cfg.sweep, cfg.model.patch_size, cfg.model.window_size)
    for arm in arms:
        if arm.kind == "network":
            try:
                check_geometry(arm.backbone, cfg.model.img_size, arm.patch_size, 1, arm.window_size)
            except ValueError as err:
                where = f"sweep.heads.{arm.head}" if arm.head else "sweep.cnn_baseline"
                raise SweepError(f"{where}: {err}") from None
    s = cfg.sweep
    return arms, skipped, len(arms) * s.repetitions * len(s.fractions) * len(s.seeds)


def run_sweep(cfg: Config, confirm: Callable[[int, int], bool]) -> dict:
    """The whole sweep -> {"report": path of report.md, "results": ..., "plot": ..., "seconds": ...}.
    confirm(n_trials, max_trials) is asked when the grid exceeds sweep.max_trials; False raises SweepRefused."""
    start = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SweepError("mimflow sweep runs one process per trial; for parallel trials use sweep.executor=ray "
                         "instead of torchrun / accelerate launch")
    if not cfg.model.resolved:  # every arm is built and compared at one geometry, checked before any work
        raise SweepError(f"mimflow sweep needs model.img_size and model.patch_size in the recipe (now "
                         f"{cfg.model.img_size} and {cfg.model.patch_size}); `mimflow prepare` prints the sizes "
                         "the data suggests")
    arms, skipped, n = check_grid(cfg)
    if n > cfg.sweep.max_trials and not confirm(n, cfg.sweep.max_trials):
        raise SweepRefused(f"the grid has {n} trials, more than sweep.max_trials={cfg.sweep.max_trials}; "
                           "pass --yes (or raise sweep.max_trials) to run it")
    cfg = _absolute(cfg)
    acc = make_accelerator(cfg.run, block_names(cfg))
    with run_lock(cfg, acc):
        return _sweep(cfg, acc, arms, skipped, start)


def _sweep(cfg: Config, acc, arms: list[grid.Arm], skipped: list, start: float) -> dict:
    root, s = stage_dir(cfg, SWEEP), cfg.sweep
    root.mkdir(parents=True, exist_ok=True)
    rec = _read(root / RECORD) if cfg.checkpoint.resume != "never" else None
    with tracked_run(cfg.tracking, True, cfg.run.name, {"mimflow.stage": "sweep"},
                     run_id=rec["run_id"] if rec else None) as parent:
        _write(root / RECORD, {"run_id": parent.run_id, "status": "running"})
        if rec is None:
            log_config(cfg, parent)
        prepared = Path(_job(cfg, root / "prepare", "prepare", _hash(cfg.data.prepare_settings()),
                             {"mimflow.stage": "prepare"}, lambda t: str(prepare(cfg, acc, t)),
                             verify=lambda p: verify_prepared(Path(p))))
        info = load_dataset_info(prepared)
        if info.get("task", "multiclass") != "multiclass":
            raise SweepError(f"mimflow sweep scores single-label classification; {cfg.data.dataset} is {info['task']}")
        records, stats = load_manifest(prepared / "manifest.csv"), json.loads((prepared / "stats.json").read_text())
        try:
            reps = grid.repetition_splits(records, s.repetitions, s.test_fraction, s.val_fraction, s.split_seed,
                                          len(info["classes"]))
        except ValueError as err:
            raise SweepError(f"{prepared}: {err}") from None
        folders, counts = _split_folders(root, prepared, reps, s.fractions, s.split_seed, s.scale_val)
        labelled = labelled_records(prepared)
        cache = None
        if cfg.data.cache:  # every labelled image decoded once, for the whole sweep
            cache = {"manifest": str(prepared / "manifest.csv"), "root": str(Path(cfg.data.root) / ".cache"),
                     "options": json.dumps(cfg.data.reader_options.as_dict(), sort_keys=True)}
        read_fn = _reader({"cache": cache})
        features = build_features(labelled, read_fn, cfg.data.reader_options.as_dict(),
                                  root / f"features-{(info.get('dataset_hash') or 'none')[:12]}.npz")
        encoders = {**reference_encoders(cfg, arms, stats, info["classes"]),
                    **pretrain_encoders(cfg, acc, arms, prepared, root, len(stats["channels"]))}
        jobs, results = _plan(cfg, arms, reps, folders, encoders, cache, features, parent.run_id, len(info["classes"]))
        pending = [j for j in jobs if j.key not in results]
        print(f"sweep: {len(jobs)} trials ({len(jobs) - len(pending)} finished before), "
              f"{s.executor} executor", flush=True)
        executor = make_executor(s)
        progress = Progress(len(jobs), len(jobs) - len(pending), getattr(executor, "parallel", 1))
        executor.run(pending, run_trial, lambda job, r: results.__setitem__(job.key, r), progress)
        res = _results(cfg, arms, skipped, reps, counts, jobs, results, info, records, encoders, time.time() - start)
        paths = write_report(res, root / "report")
        for p in paths.values():
            parent.log_artifact(p, "report")
        failed = sum(r.get("status") == "failed" for r in results.values())
        parent.log_metrics({"sweep/trials_finished": sum(r.get("status") == "finished" for r in results.values()),
                            "sweep/trials_failed": failed})
        _write(root / RECORD, {"run_id": parent.run_id, "status": "finished"})
    return {"report": paths["report.md"], "results": paths["results.csv"], "plot": paths["label_efficiency.png"],
            "seconds": time.time() - start, "failed": failed, "parent_run_id": parent.run_id}


def _plan(cfg: Config, arms, reps, folders, encoders, cache, features, parent_id, num_classes):
    """-> (a Job per trial of the grid, {trial id: result} of those that finished before)."""
    s, jobs, results = cfg.sweep, [], {}
    test_labels = {rep.index: [r.label for r in rep.test] for rep in reps}
    for trial in grid.trials(arms, s.repetitions, s.fractions, s.seeds):
        arm, split = trial.arm, folders[(trial.repetition, trial.fraction)]
        encoder = encoders.get(arm.key)
        spec = {"id": trial.id, "trial": trial.to_dict(), "split": str(split), "encoder": str(encoder) if encoder else None,
                "cache": cache, "features": str(features), "parent_run_id": parent_id, "threads": s.cpus_per_trial,
                "num_classes": num_classes, "test_labels": test_labels[trial.repetition],
                "reuse": cfg.checkpoint.resume != "never"}
        if arm.kind == "network":
            # an epoch is one validation interval, whatever the label count: the same steps for every trial
            epoch_images = s.eval_every_steps * s.batch_size * cfg.run.gradient_accumulation_steps
            spe = _steps_per_epoch(cfg, epoch_images)
            epochs = math.ceil(s.steps / spe)
            tcfg = trial_config(cfg, trial, encoder, epochs)
            spec.update(epoch_images=epoch_images, steps=epochs * spe)
        else:
            tree = cfg.to_dict()
            tree["run"]["seed"] = trial.seed
            tcfg = config_from_dict(tree, f"trial {trial.id}")
        sections = ("run", "data", "model", "finetune") if arm.kind == "network" else ("data",)
        fp = _fingerprint(tcfg, sections, {"trial": trial.to_dict(), "encoder": _encoder_id(encoder),
                                           "split": _split_id(split), "epoch_images": spec.get("epoch_images"),
                                           "protocol": PROTOCOL})
        stage = f"{SWEEP}/trials/{arm.key}/rep{trial.repetition}-frac{trial.fraction:g}-seed{trial.seed}-{fp[:8]}"
        spec.update(config=tcfg.to_dict(), fingerprint=fp, stage=stage, folder=str(stage_dir(cfg, stage)))
        jobs.append(Job(trial.id, arm.key, spec))
        done = finished(Path(spec["folder"]), fp, spec["reuse"])
        if done is not None:
            results[trial.id] = done
    return jobs, results


def _results(cfg, arms, skipped, reps, counts, jobs, results, info, records, encoders, seconds) -> SweepResults:
    s = cfg.sweep
    rows, sizes = [], {}
    for job in jobs:
        t, r = job.spec["trial"], results.get(job.key, {"status": "not run"})
        split = job.spec["split"]
        if split not in sizes:
            recs = load_manifest(Path(split) / "manifest.csv")
            sizes[split] = {p: len(select(recs, p)) for p in ("train", "val", "test")}
        n = sizes[split]
        arm = grid.Arm.from_dict(t["arm"])
        rows.append({"trial": job.key, "arm": arm.key, "arm_label": arm.label,
                     "init": arm.init.value if arm.init and arm.init.kind != "scratch" else ("scratch" if arm.kind == "network" else ""),
                     "backbone": arm.backbone or "", "mode": arm.mode if arm.kind == "network" else "",
                     "fraction": t["fraction"], "repetition": t["repetition"], "seed": t["seed"],
                     "train_labels": n["train"], "val_labels": n["val"] if arm.kind == "network" else 0,
                     "test_items": n["test"], "steps": job.spec.get("steps", ""), "status": r.get("status"),
                     **r.get("metrics", {}), "seconds": round(r.get("seconds", 0.0), 2),
                     "mlflow_run_id": r.get("run_id", ""), "error": r.get("error", ""),
                     "predicted": r.get("predicted")})
    test_sizes = [len(rep.test) for rep in reps]
    shown_sizes = f"{min(test_sizes)}" if min(test_sizes) == max(test_sizes) else f"{min(test_sizes)}-{max(test_sizes)}"
    pool = sum(r.split == "unlabelled" for r in records)
    compute = sum(r.get("seconds", 0.0) for r in results.values())
    facts = [f"Data: `{cfg.data.dataset}`, {len(info['classes'])} classes ({', '.join(info['classes'])}), "
             f"{sum(1 for r in records if r.split in grid.LABELLED)} labelled images, {pool} unlabelled "
             "(the pretraining pool)",
             f"Splits: {s.repetitions} repetition(s) of a group-aware, class-stratified split; test "
             f"{shown_sizes} images per repetition, drawn only from the {reps[0].eligible_groups} "
             "labelled groups no pretraining image comes from; validation from the rest"
             + (", cut to the same fraction as the training labels" if s.scale_val else ""),
             f"Seeds: {s.seeds}; fractions: {[f'{f:g}' for f in s.fractions]}",
             f"Budget of every network trial: {s.steps} optimizer steps or the next multiple of the validation "
             f"interval ({s.eval_every_steps} steps), batch {s.batch_size}, the same augmentations "
             f"(`{cfg.data.augment}`); the best validation epoch is kept; no distillation teacher",
             f"Compute: {compute / 60:.1f} min of trials in all, this command {seconds / 60:.1f} min "
             f"({s.executor} executor, {s.cpus_per_trial} CPU(s) per trial)"]
    users: dict[str, list[str]] = {}
    tokenizers: dict[str, list[str]] = {}
    for key, path in encoders.items():
        users.setdefault(str(path), []).append(f"`{key}`")
    for path, keys in users.items():
        meta = read_meta(path) if Path(path).is_dir() else {}
        took = (_read(Path(path).parent / RECORD) or {}).get("seconds")
        epochs = (meta.get("config") or {}).get("pretrain", {}).get("epochs")
        facts.append(f"Encoder of {', '.join(keys)}: {path}" + (
            f" ({meta.get('objective')} on {meta.get('backbone')}, {epochs} epochs over the {pool} pool images"
            + (f" in {took / 60:.1f} min" if took else "") + f", MLflow run {meta.get('pretrain_run_id')})"
            if meta.get("objective") else
            " (given by reference: what it was pretrained on is not known here; its pretraining may have seen test images)"))
        ref = (meta.get("tokenizer") or {}).get("reference")
        if ref and Path(ref).is_dir():  # BEiT's targets
            tokenizers.setdefault(ref, []).extend(keys)
    for ref, keys in tokenizers.items():  # what the visual tokens were, once per tokenizer
        t = read_meta(ref)
        book, teacher, size = t.get("codebook") or {}, t.get("teacher") or {}, t["architecture"]["codebook_size"]
        facts.append(f"Visual tokens of {', '.join(keys)}: tokenizer {ref} ({t.get('tokenizer_kind')}, "
                     f"{round(book.get('usage', 0) * size)} of {size} codes used, perplexity {book.get('perplexity', 0):.1f}"
                     + (f"; teacher {teacher.get('backbone')} at {teacher.get('reference')}" if teacher else "")
                     + f", MLflow run {t.get('tokenizer_run_id')})")
    return SweepResults(cfg.run.name, arms, s.fractions, s.seeds, info["classes"],
                        [np.array([r.label for r in rep.test]) for rep in reps], rows, counts, s.metric, s.bootstrap,
                        s.confidence, s.power, s.split_seed, facts, skipped)
