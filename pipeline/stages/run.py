"""All stages in one MLflow parent run, one nested child run per stage."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from pipeline.config import Config, save_config
from pipeline.data.manifest import load_manifest, select
from pipeline.distributed import make_accelerator
from pipeline.stages.evaluate import evaluate
from pipeline.stages.finetune import finetune
from pipeline.stages.prepare import prepare
from pipeline.stages.pretrain import pretrain
from pipeline.stages.register import register
from pipeline.tracking.mlflow import fetch, tracked_run


def log_config(cfg: Config, tracker) -> None:
    tracker.log_params(cfg.flat())
    with tempfile.TemporaryDirectory() as tmp:
        save_config(cfg, Path(tmp) / "config.yaml")
        tracker.log_artifact(Path(tmp) / "config.yaml")


def resolve_init(cfg: Config, encoder: Path | None) -> Path | None:
    init = cfg.finetune.init
    if init == "scratch":
        return None
    if init == "pretrained":
        if encoder is None:
            raise ValueError("finetune.init=pretrained needs an encoder: run pretraining first, "
                             "or give a path / run id / models:/ URI")
        return encoder
    return fetch(init, "encoder", cfg.tracking)


def run_pipeline(cfg: Config) -> dict:
    """prepare -> pretrain -> finetune (-> scratch baseline) -> evaluate -> register."""
    start = time.time()
    acc = make_accelerator(cfg.run)
    main = acc.is_main_process
    summary: dict = {}
    with tracked_run(cfg.tracking, main, cfg.run.name, {"mimflow.stage": "run"}) as parent:
        log_config(cfg, parent)
        with tracked_run(cfg.tracking, main, "prepare", {"mimflow.stage": "prepare"}) as t:
            prepared = prepare(cfg, acc, t)
        encoder = None
        if cfg.finetune.init == "pretrained":
            with tracked_run(cfg.tracking, main, "pretrain", {"mimflow.stage": "pretrain"}) as t:
                log_config(cfg, t)
                encoder = pretrain(cfg, prepared, acc, t)
        if not select(load_manifest(prepared / "manifest.csv"), "train"):
            # An unlabelled-only data set: pretraining is the job; its encoder is the product.
            summary.update(encoder=str(encoder), parent_run_id=parent.run_id, seconds=time.time() - start)
            return summary
        variants = [("finetune", resolve_init(cfg, encoder))]
        if cfg.finetune.compare_scratch and cfg.finetune.init != "scratch":
            variants.append(("finetune_scratch", None))
        classifiers = {}
        for name, init in variants:
            with tracked_run(cfg.tracking, main, name, {"mimflow.stage": "finetune"}) as t:
                log_config(cfg, t)
                classifiers[name] = finetune(cfg, prepared, init, acc, t, name=name)
            eval_name = name.replace("finetune", "evaluate")
            with tracked_run(cfg.tracking, main, eval_name, {"mimflow.stage": "evaluate"}) as t:
                summary[name] = evaluate(cfg, prepared, classifiers[name], acc, t, name=eval_name)
        if main:
            with tracked_run(cfg.tracking, main, "register", {"mimflow.stage": "register"}) as t:
                summary["model_uri"] = register(cfg, prepared, classifiers["finetune"], t)
            parent.log_metrics({k: v for k, v in summary["finetune"].items()})
            summary["parent_run_id"] = parent.run_id
    summary["seconds"] = time.time() - start
    return summary
