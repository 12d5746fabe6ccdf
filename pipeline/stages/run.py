"""All stages in one MLflow parent run, one nested child run per stage (and per arm: the
pretrained classifier, the from-scratch baseline, a distillation teacher).

A killed `mimflow run`, started again with the same config, continues where it stopped: it
reopens the same parent run, skips the stages that finished (their results are recorded), and
reopens the interrupted stage's child run, which resumes from its newest checkpoint.
"""
from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from pipeline.config import Config, save_config, stage_dir
from pipeline.data.manifest import load_manifest, select
from pipeline.distributed import make_accelerator
from pipeline.fsutil import atomic_write_text
from pipeline.models.backbones import backbone_spec
from pipeline.models.objectives import OBJECTIVES
from pipeline.stages.common import block_names
from pipeline.stages.evaluate import evaluate
from pipeline.stages.finetune import finetune, teacher_config
from pipeline.stages.prepare import prepare
from pipeline.stages.pretrain import pretrain
from pipeline.stages.register import register
from pipeline.stages.tokenizer import fetch_named, teacher_config as tokenizer_teacher_config, teacher_source as \
    tokenizer_teacher_source, train_tokenizer
from pipeline.tracking.artifacts import fetch
from pipeline.tracking.runs import tracked_run


def log_config(cfg: Config, tracker) -> None:
    if tracker.run_id is None:  # ranks other than 0 log nothing (and write no file for it)
        return
    tracker.log_params(cfg.flat())
    with tempfile.TemporaryDirectory() as tmp:
        save_config(cfg, Path(tmp) / "config.yaml")
        tracker.log_artifact(Path(tmp) / "config.yaml")


RECORD = "run.json"  # in <output_dir>/<name>/ (the parent run) and in every stage's folder


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


class StageRuns:
    """Which MLflow run each stage continues, from records that rank 0 writes as stages start
    and finish. Every rank reads them before any is written, so all ranks decide alike.

    pipeline=True (`mimflow run`): a parent whose record says "running" is reopened; within it,
    finished stages are skipped (their recorded result is reused) and a running one is reopened.
    pipeline=False (one stage alone): a stage left "running" by a killed command is reopened.
    checkpoint.resume=never: always new runs.
    """

    def __init__(self, cfg: Config, acc, pipeline: bool):
        self.cfg, self.acc, self.pipeline = cfg, acc, pipeline
        self.resume = cfg.checkpoint.resume != "never"
        self.parent_path = Path(cfg.run.output_dir) / cfg.run.name / RECORD
        rec = _read(self.parent_path) if pipeline and self.resume else None
        self.reopen_parent = rec["run_id"] if rec and rec.get("status") == "running" else None
        self.parent_id: str | None = None
        acc.wait_for_everyone()

    def _write(self, path: Path, record: dict) -> None:
        if self.acc.is_main_process:
            atomic_write_text(path, json.dumps(record, indent=2, default=str))

    @contextmanager
    def parent(self, tags: dict) -> Iterator:
        with tracked_run(self.cfg.tracking, self.acc.is_main_process, self.cfg.run.name, tags,
                         run_id=self.reopen_parent) as t:
            self.parent_id = t.run_id
            self._write(self.parent_path, {"run_id": t.run_id, "status": "running"})
            yield t
            self._write(self.parent_path, {"run_id": t.run_id, "status": "finished"})

    def stage(self, name: str, tags: dict, fn: Callable, collective: bool = True):
        """fn(tracker) -> a JSON-able result, run in the stage's (new or reopened) MLflow run."""
        path = stage_dir(self.cfg, name) / RECORD
        rec = _read(path) if self.resume else None
        ours = rec is not None and (rec.get("parent_run_id") == self.reopen_parent if self.pipeline
                                    else rec.get("parent_run_id") is None)
        if ours and self.pipeline and self.reopen_parent and rec.get("status") == "finished":
            if self.acc.is_main_process:
                print(f"{name}: finished before the restart (MLflow run {rec['run_id']}); not redone", flush=True)
            return rec["result"]
        run_id = rec["run_id"] if ours and rec.get("status") == "running" else None
        if collective:
            self.acc.wait_for_everyone()  # all ranks have read the record before it changes
        with tracked_run(self.cfg.tracking, self.acc.is_main_process, name, tags, run_id=run_id) as t:
            record = {"run_id": t.run_id, "parent_run_id": self.parent_id, "status": "running"}
            self._write(path, record)
            result = fn(t)
            self._write(path, {**record, "status": "finished", "result": result})
        return result


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


def teacher_source(cfg: Config) -> str:
    """"none", "train", or a reference to a trained classifier (path, run id, URI)."""
    teacher = cfg.finetune.distillation.teacher
    if teacher == "auto":
        return "train" if backbone_spec(cfg.model.backbone).family == "deit" else "none"
    return teacher


def tokenizer_chain(cfg: Config, prepared: Path, stage: Callable) -> Path:
    """BEiT's visual tokenizer: the `tokenizer` stage, after the MAE `teacher_pretrain` stage whose
    encoder it distils when tokenizer.teacher=auto (kind vqkd). stage(config, name, fn(acc, tracker))
    runs one stage in its MLflow run (`mimflow run`'s StageRuns, or the CLI's single stages)."""
    source, teacher = tokenizer_teacher_source(cfg), None
    if source == "train":
        tcfg = tokenizer_teacher_config(cfg)
        teacher = Path(stage(tcfg, "teacher_pretrain",
                             lambda acc, t: str(pretrain(tcfg, prepared, acc, t, name="teacher_pretrain"))))
    elif source != "none":
        teacher = fetch_named(source, "encoder", "tokenizer.teacher", "teacher encoder", cfg)
    ref = source if source not in ("train", "none") else None
    return Path(stage(cfg, "tokenizer", lambda acc, t: str(train_tokenizer(cfg, prepared, teacher, acc, t, ref))))


def run_tokenizer(cfg: Config, runs: StageRuns, acc, prepared: Path) -> Path | None:
    """In `mimflow run`: the tokenizer an objective that predicts visual tokens needs, trained here
    when pretrain.objective.tokenizer names none (None: the objective needs none, or one is named)."""
    if OBJECTIVES[cfg.pretrain.objective.name].targets != "tokens" or cfg.pretrain.objective.tokenizer:
        return None

    def stage(c: Config, name: str, fn: Callable):
        def body(t):
            log_config(c, t)
            return fn(acc, t)
        return runs.stage(name, {"mimflow.stage": name}, body)

    return tokenizer_chain(cfg, prepared, stage)


@dataclass(frozen=True)
class Arm:
    """One classifier the pipeline trains and evaluates: its stages' names and run tags."""
    key: str  # pretrained | scratch | teacher
    finetune: str
    evaluate: str


TEACHER = Arm("teacher", "teacher", "evaluate_teacher")


def arms(cfg: Config) -> list[Arm]:
    """The classifiers `mimflow run` trains: finetune.init's, then the from-scratch baseline."""
    main = Arm("scratch" if cfg.finetune.init == "scratch" else "pretrained", "finetune", "evaluate")
    if cfg.finetune.compare_scratch and main.key != "scratch":
        return [main, Arm("scratch", "finetune_scratch", "evaluate_scratch")]
    return [main]


def train_and_evaluate(cfg: Config, runs: StageRuns, acc, prepared: Path, arm: Arm, encoder: Path | None,
                       teacher: Path | None) -> tuple[Path, dict]:
    """The arm's finetune stage, then its evaluate stage -> (classifier folder, test metrics)."""
    tags = {"mimflow.arm": arm.key}

    def _finetune(t):
        log_config(cfg, t)
        return str(finetune(cfg, prepared, encoder, acc, t, name=arm.finetune, teacher_dir=teacher))

    classifier = Path(runs.stage(arm.finetune, {"mimflow.stage": "finetune", **tags}, _finetune))
    metrics = runs.stage(arm.evaluate, {"mimflow.stage": "evaluate", **tags},
                         lambda t: evaluate(cfg, prepared, classifier, acc, t, name=arm.evaluate))
    return classifier, metrics


def run_pipeline(cfg: Config) -> dict:
    """prepare -> (teacher_pretrain -> tokenizer) -> pretrain -> (teacher) -> finetune (-> scratch
    baseline) -> evaluate -> register."""
    start = time.time()
    if cfg.checkpoint.resume not in ("auto", "never"):
        raise ValueError(f"checkpoint.resume={cfg.checkpoint.resume!r}: a checkpoint path is for one stage "
                         "(mimflow pretrain / finetune); mimflow run resumes with auto")
    acc = make_accelerator(cfg.run, block_names(cfg))
    summary: dict = {}
    runs = StageRuns(cfg, acc, pipeline=True)
    with runs.parent({"mimflow.stage": "run"}) as parent:
        log_config(cfg, parent)
        prepared = Path(runs.stage("prepare", {"mimflow.stage": "prepare"}, lambda t: str(prepare(cfg, acc, t))))
        encoder = None
        if cfg.finetune.init == "pretrained":
            tokenizer = run_tokenizer(cfg, runs, acc, prepared)

            def _pretrain(t):
                log_config(cfg, t)
                return str(pretrain(cfg, prepared, acc, t, tokenizer_dir=tokenizer))
            encoder = Path(runs.stage("pretrain", {"mimflow.stage": "pretrain"}, _pretrain))
        if not select(load_manifest(prepared / "manifest.csv"), "train"):
            # An unlabelled-only data set: pretraining is the job; its encoder is the product.
            summary.update(encoder=str(encoder), parent_run_id=parent.run_id, seconds=time.time() - start)
            return summary
        teacher = None
        source = teacher_source(cfg)
        if source == "train":
            teacher, summary["teacher"] = train_and_evaluate(teacher_config(cfg), runs, acc, prepared,
                                                             TEACHER, None, None)
        elif source != "none":
            teacher = fetch(source, "classifier", cfg.tracking)
        classifiers = {}
        for arm in arms(cfg):
            init = resolve_init(cfg, encoder) if arm.key == "pretrained" else None
            classifiers[arm.key], summary[arm.key] = train_and_evaluate(cfg, runs, acc, prepared, arm, init, teacher)
        chosen = arms(cfg)[0].key
        if acc.is_main_process:
            summary["model_uri"] = runs.stage("register", {"mimflow.stage": "register"},
                                              lambda t: register(cfg, prepared, classifiers[chosen], t),
                                              collective=False)
            parent.log_metrics(summary[chosen])
            summary["parent_run_id"] = parent.run_id
        summary["registered_arm"] = chosen
    summary["seconds"] = time.time() - start
    return summary
