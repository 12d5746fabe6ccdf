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

from pipeline.config import Config, config_from_dict, flatten, save_config, stage_dir
from pipeline.data.manifest import load_manifest, select
from pipeline.distributed import make_accelerator
from pipeline.engine.checkpoint import CheckpointDir
from pipeline.engine.state import config_differences
from pipeline.fsutil import atomic_write_text, folder_lock
from pipeline.models.backbones import backbone_spec
from pipeline.models.objectives import OBJECTIVES
from pipeline.stages.common import block_names, resolve_geometry
from pipeline.stages.evaluate import evaluate
from pipeline.stages.finetune import finetune, teacher_config
from pipeline.stages.prepare import prepare, verify_prepared
from pipeline.stages.pretrain import pretrain
from pipeline.stages.register import register
from pipeline.stages.tokenizer import fetch_named, teacher_config as tokenizer_teacher_config, teacher_source as \
    tokenizer_teacher_source, train_tokenizer
from pipeline.tracking.artifacts import fetch
from pipeline.tracking.runs import tracked_run
from pipeline.weights import read_meta, verify_weights


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

    def __init__(self, cfg: Config, acc, pipeline: bool, timings: dict | None = None):
        self.cfg, self.acc, self.pipeline = cfg, acc, pipeline
        self.timings = timings if timings is not None else {}  # stage -> wall seconds, this command
        self.start = time.time()
        self.final: dict | None = None
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
            self._write(self.parent_path, {"run_id": t.run_id, "status": "finished", **(self.final or {})})

    def run_id_of(self, name: str) -> str | None:
        """The MLflow run id a stage of this run recorded."""
        return (_read(stage_dir(self.cfg, name) / RECORD) or {}).get("run_id")

    def finish(self, asked: dict, summary: dict) -> None:
        """What the parent's record keeps when it finishes: the config as asked (to know a repeat)
        and the summary (to report it without redoing anything)."""
        self.final = {"requested_config": asked, "summary": summary}

    def stage(self, name: str, tags: dict, fn: Callable, collective: bool = True,
              verify: Callable[[object], None] | None = None):
        """fn(tracker) -> a JSON-able result, run in the stage's (new or reopened) MLflow run.
        verify(result) raises when a finished stage's recorded result is no longer what it wrote
        (e.g. a weights file changed on disk): the stage is then redone, from its last checkpoint."""
        path = stage_dir(self.cfg, name) / RECORD
        rec = _read(path) if self.resume else None
        ours = rec is not None and (rec.get("parent_run_id") == self.reopen_parent if self.pipeline
                                    else rec.get("parent_run_id") is None)
        run_id = rec["run_id"] if ours and rec.get("status") == "running" else None
        if ours and self.pipeline and self.reopen_parent and rec.get("status") == "finished":
            try:
                if verify is not None:
                    verify(rec["result"])
                if self.acc.is_main_process:
                    print(f"{name}: finished before the restart (MLflow run {rec['run_id']}); not redone", flush=True)
                return rec["result"]
            except (OSError, ValueError) as err:  # missing or changed: never skip over broken results
                run_id = rec["run_id"]
                if self.acc.is_main_process:
                    print(f"{name}: its recorded result failed verification ({err}); redoing it from its "
                          "last checkpoint", flush=True)
                    CheckpointDir(stage_dir(self.cfg, name) / "checkpoints").reopen()
        if collective:
            self.acc.wait_for_everyone()  # all ranks have read the record before it changes
        began = time.time()
        with tracked_run(self.cfg.tracking, self.acc.is_main_process, name, tags, run_id=run_id) as t:
            record = {"run_id": t.run_id, "parent_run_id": self.parent_id, "status": "running"}
            self._write(path, record)
            result = fn(t)
            self._write(path, {**record, "status": "finished", "result": result})
        self.timings[name] = time.time() - began
        if self.acc.is_main_process and not self.cfg.run.quiet:
            print(f"{name}: {self.timings[name] / 60:.1f} min (this command so far {(time.time() - self.start) / 60:.1f} "
                  "min)", flush=True)
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


def tokenizer_chain(cfg: Config, prepared: Path, stage: Callable, prefix: str = "") -> Path:
    """BEiT's visual tokenizer: the `tokenizer` stage, after the MAE `teacher_pretrain` stage whose
    encoder it distils when tokenizer.teacher=auto (kind vqkd). stage(config, name, fn(acc, tracker))
    runs one stage in its MLflow run (`mimflow run`'s StageRuns, the CLI's single stages, a sweep's
    jobs); prefix goes before both stage names (the sweep's folder)."""
    source, teacher = tokenizer_teacher_source(cfg), None
    if source == "train":
        tcfg, name = tokenizer_teacher_config(cfg), prefix + "teacher_pretrain"
        teacher = Path(stage(tcfg, name, lambda acc, t: str(pretrain(tcfg, prepared, acc, t, name=name))))
    elif source != "none":
        teacher = fetch_named(source, "encoder", "tokenizer.teacher", "teacher encoder", cfg)
    ref, name = (source if source not in ("train", "none") else None), prefix + "tokenizer"
    return Path(stage(cfg, name, lambda acc, t: str(train_tokenizer(cfg, prepared, teacher, acc, t, ref, name=name))))


def run_tokenizer(cfg: Config, runs: StageRuns, acc, prepared: Path) -> Path | None:
    """In `mimflow run`: the tokenizer an objective that predicts visual tokens needs, trained here
    when pretrain.objective.tokenizer names none (None: the objective needs none, or one is named)."""
    if OBJECTIVES[cfg.pretrain.objective.name].targets != "tokens" or cfg.pretrain.objective.tokenizer:
        return None

    def stage(c: Config, name: str, fn: Callable):
        def body(t):
            log_config(c, t)
            return fn(acc, t)
        # a finished stage's weights are checked against their recorded hash before reuse
        return runs.stage(name, {"mimflow.stage": name}, body, verify=verify_weights)

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

    classifier = Path(runs.stage(arm.finetune, {"mimflow.stage": "finetune", **tags}, _finetune,
                                 verify=verify_weights))
    metrics = runs.stage(arm.evaluate, {"mimflow.stage": "evaluate", **tags},
                         lambda t: evaluate(cfg, prepared, classifier, acc, t, name=arm.evaluate))
    return classifier, metrics


@contextmanager
def run_lock(cfg: Config, acc) -> Iterator[None]:
    """Rank 0 holds the run folder's lock for the whole command: a second writer of the same run
    is refused at once (see fsutil.folder_lock)."""
    if not acc.is_main_process:
        yield
        return
    with folder_lock(Path(cfg.run.output_dir) / cfg.run.name, f"run {cfg.run.name!r}"):
        yield


def claim_run(cfg: Config, say: bool) -> tuple[Config, dict | None]:
    """Which run this command is: the same name when it is new, was killed, or finished with the
    same config (-> its recorded summary: nothing to do); a suffixed name (`name-2`, ...) when a
    run of that name finished with another config, said with the keys and both values.
    checkpoint.resume=never always reuses the name and does the run again."""
    if cfg.checkpoint.resume == "never":
        return cfg, None
    asked, base = cfg.to_dict(), cfg.run.name
    first = None
    for k in range(1, 1000):
        name = base if k == 1 else f"{base}-{k}"
        rec = _read(Path(cfg.run.output_dir) / name / RECORD)
        candidate = {**asked, "run": {**asked["run"], "name": name}}
        if rec is None or rec.get("status") != "finished":
            break  # new, or killed: continue it (a changed config is refused at its checkpoints)
        diff = config_differences(rec.get("requested_config", {}), candidate)
        if not diff:
            return (cfg if k == 1 else _renamed(cfg, name)), rec.get("summary")
        first = first or (name, rec, diff)
    if first is None:
        return cfg, None
    old, rec, diff = first
    if say:
        saved, now = flatten(rec.get("requested_config", {})), flatten(asked)
        changes = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:8])
        print(f"run {old!r} finished with another config ({changes}); this is run {name!r} "
              "(checkpoint.resume=never would redo the old one instead)", flush=True)
    return _renamed(cfg, name), None


def _renamed(cfg: Config, name: str) -> Config:
    tree = cfg.to_dict()
    tree["run"]["name"] = name
    return config_from_dict(tree, "the renamed run's config")


def choose_arm(cfg: Config, classifiers: dict[str, Path], say: bool) -> str:
    """The arm `mimflow run` registers (register.arm), said with the reason."""
    keys = [a.key for a in arms(cfg)]
    if cfg.register.arm != "best_val" or len(keys) == 1:
        chosen = cfg.register.arm if cfg.register.arm in keys else keys[0]
        return chosen
    metas = {k: read_meta(classifiers[k]) for k in keys}
    # the score fine-tuning selected its best epoch by: multi-label mAP, else balanced accuracy
    metric = "map" if any(m.get("task") == "multilabel" for m in metas.values()) else "balanced_accuracy"
    score = {k: metas[k].get(f"val_{metric}", float("-inf")) for k in keys}
    chosen = max(keys, key=lambda k: score[k])  # ties: the first arm, finetune.init's
    if say:
        other = [k for k in keys if k != chosen]
        print(f"register: the {chosen} classifier (validation {metric.replace('_', ' ')} {score[chosen]:.3f} vs "
              + ", ".join(f"{score[k]:.3f} for {k}" for k in other)
              + "); one split and one seed cannot tell small differences apart: `mimflow sweep` measures "
              "them with intervals", flush=True)
    return chosen


def run_pipeline(cfg: Config) -> dict:
    """prepare -> (teacher_pretrain -> tokenizer) -> pretrain -> (teacher) -> finetune (-> scratch
    baseline) -> evaluate -> register."""
    start = time.time()
    if cfg.checkpoint.resume not in ("auto", "never"):
        raise ValueError(f"checkpoint.resume={cfg.checkpoint.resume!r}: a checkpoint path is for one stage "
                         "(mimflow pretrain / finetune); mimflow run resumes with auto")
    acc = make_accelerator(cfg.run, block_names(cfg))
    asked = cfg.to_dict()
    cfg, done = claim_run(cfg, acc.is_main_process)
    if done is not None:
        if acc.is_main_process:
            print(f"run {cfg.run.name!r} finished before with this config (MLflow run {done.get('parent_run_id')}); "
                  "nothing to do (checkpoint.resume=never does it again)", flush=True)
        return {**done, "already_done": True}
    summary: dict = {"stage_seconds": {}}
    with run_lock(cfg, acc):
        return _run_stages(cfg, acc, summary, start, asked)


def _run_stages(cfg: Config, acc, summary: dict, start: float, asked: dict) -> dict:
    runs = StageRuns(cfg, acc, pipeline=True, timings=summary["stage_seconds"])
    with runs.parent({"mimflow.stage": "run"}) as parent:
        log_config(cfg, parent)
        prepared = Path(runs.stage("prepare", {"mimflow.stage": "prepare"}, lambda t: str(prepare(cfg, acc, t)),
                                   verify=lambda result: verify_prepared(Path(result))))
        cfg = runs.cfg = resolve_geometry(cfg, prepared, say=acc.is_main_process)
        encoder = None
        if cfg.finetune.init == "pretrained":
            tokenizer = run_tokenizer(cfg, runs, acc, prepared)

            def _pretrain(t):
                log_config(cfg, t)
                return str(pretrain(cfg, prepared, acc, t, tokenizer_dir=tokenizer))
            encoder = Path(runs.stage("pretrain", {"mimflow.stage": "pretrain"}, _pretrain, verify=verify_weights))
        if not select(load_manifest(prepared / "manifest.csv"), "train"):
            # An unlabelled-only data set: pretraining is the job; its encoder is the product.
            summary.update(encoder=str(encoder), parent_run_id=parent.run_id, seconds=time.time() - start)
            runs.finish(asked, summary)
            return summary
        teacher = None
        source = teacher_source(cfg)
        if source == "train":
            teacher, summary["teacher"] = train_and_evaluate(teacher_config(cfg), runs, acc, prepared,
                                                             TEACHER, None, None)
        elif source != "none":
            teacher = fetch(source, "classifier", cfg.tracking)
        classifiers, todo = {}, arms(cfg)
        for i, arm in enumerate(todo):
            init = resolve_init(cfg, encoder) if arm.key == "pretrained" else None
            classifiers[arm.key], summary[arm.key] = train_and_evaluate(cfg, runs, acc, prepared, arm, init, teacher)
            took = runs.timings.get(arm.finetune, 0) + runs.timings.get(arm.evaluate, 0)
            if i + 1 < len(todo) and took and acc.is_main_process and not cfg.run.quiet:
                print(f"about {took * (len(todo) - i - 1) / 60:.1f} min left ({len(todo) - i - 1} more classifier(s) "
                      "like this one, then register)", flush=True)
        chosen = choose_arm(cfg, classifiers, acc.is_main_process)
        if acc.is_main_process:
            scored_by = runs.run_id_of(next(a.evaluate for a in arms(cfg) if a.key == chosen))
            summary["model_uri"] = runs.stage("register", {"mimflow.stage": "register"},
                                              lambda t: register(cfg, prepared, classifiers[chosen], t,
                                                                 metrics=summary[chosen], evaluate_run_id=scored_by),
                                              collective=False)
            parent.log_metrics(summary[chosen])
            parent.set_tags({"mimflow.registered_arm": chosen})
            summary["parent_run_id"] = parent.run_id
        summary["registered_arm"] = chosen
        summary["seconds"] = time.time() - start
        summary["run_name"] = cfg.run.name
        runs.finish(asked, summary)
    return summary
