"""`mimflow` command line: thin parsing, then one stage function (or all of them)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.config import Config, ConfigError, load_config

USAGE_ARGS = "[CONFIG.yaml] [key.sub=value ...]"


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    config = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None and item.endswith((".yaml", ".yml")):
            config = item
        else:
            raise ConfigError(f"unexpected argument {item!r}: expected a .yaml file or key=value")
    return config, overrides


def _prepared(cfg: Config, given: str | None) -> Path:
    path = Path(given) if given else Path(cfg.data.root) / cfg.data.dataset
    if not (path / "manifest.csv").is_file():
        raise FileNotFoundError(f"{path}: no prepared dataset (run `mimflow prepare` first, or pass --prepared)")
    return path


def _stage(cfg: Config, stage: str, fn):
    """Run one stage alone in its own MLflow run (the same run again when a killed command is
    restarted: it resumes from the stage's newest checkpoint)."""
    from pipeline.distributed import make_accelerator
    from pipeline.stages.common import block_names
    from pipeline.stages.run import run_lock

    acc = make_accelerator(cfg.run, block_names(cfg))
    with run_lock(cfg, acc):
        return _stage_locked(cfg, stage, fn, acc)


def _stage_locked(cfg: Config, stage: str, fn, acc):
    from pipeline.stages.run import StageRuns, log_config

    def body(tracker):
        log_config(cfg, tracker)
        result = fn(acc, tracker)
        if acc.is_main_process:
            print(f"{stage}: run {tracker.run_id} -> {result}")
        return result

    return StageRuns(cfg, acc, pipeline=False).stage(stage, {"mimflow.stage": stage}, body)


def print_summary(cfg: Config, summary: dict) -> None:
    print("\n" + "=" * 72)
    print(f"mimflow run '{cfg.run.name}' finished in {summary['seconds'] / 60:.1f} min")
    label = {"pretrained": f"init={cfg.finetune.init}", "scratch": "init=scratch",
             "teacher": f"teacher {cfg.finetune.distillation.teacher_backbone}"}
    rows = [k for k in ("pretrained", "scratch", "teacher") if k in summary]
    metrics = [k for k in summary[rows[0]] if "/auroc_" not in k]
    print(f"test metrics of {cfg.model.backbone} ({cfg.finetune.mode}) at label_fraction={cfg.finetune.label_fraction}:")
    print(f"  {'':26s}" + "".join(f"{m.split('/')[-1]:>19s}" for m in metrics))
    for r in rows:
        print(f"  {label[r]:26s}" + "".join(f"{summary[r][m]:19.4f}" for m in metrics))
    print(f"registered model: {summary.get('model_uri')} ({label[summary['registered_arm']]})")
    print(f"parent MLflow run: {summary.get('parent_run_id')}")
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:"):
        print(f"see the runs:  mlflow ui --backend-store-uri {uri} --port 5000   (then open http://127.0.0.1:5000)")
    else:
        print(f"see the runs:  open {uri}")
    print("=" * 72)


@dataclass(frozen=True)
class Command:
    """One `mimflow` command: its help line, its own options, and what it runs."""
    help: str
    run: Callable[[Config, argparse.Namespace], int]
    options: tuple[tuple[tuple[str, ...], dict], ...] = ()
    prepared: bool = True  # reads a prepared data set (--prepared)


def _run(cfg: Config, a) -> int:
    from pipeline.stages.run import run_pipeline

    summary = run_pipeline(cfg)
    if "model_uri" in summary:
        print_summary(cfg, summary)
    elif "encoder" in summary:
        print(f"no labelled split: pretrained encoder only, in {summary['encoder']} "
              f"(MLflow run {summary['parent_run_id']}, {summary['seconds'] / 60:.1f} min)")
    return 0


def _prepare(cfg: Config, a) -> int:
    from pipeline.stages.prepare import prepare

    _stage(cfg, "prepare", lambda acc, t: prepare(cfg, acc, t))
    return 0


def _pretrain(cfg: Config, a) -> int:
    from pipeline.stages.pretrain import pretrain

    prepared = _prepared(cfg, a.prepared)
    _stage(cfg, "pretrain", lambda acc, t: pretrain(cfg, prepared, acc, t))
    return 0


def _finetune(cfg: Config, a) -> int:
    from pipeline.stages.finetune import finetune, teacher_config
    from pipeline.stages.run import resolve_init, teacher_source
    from pipeline.tracking.artifacts import fetch

    if cfg.finetune.init == "pretrained":
        print("mimflow: finetune alone needs --init scratch|PATH|run id|URI", file=sys.stderr)
        return 2
    prepared, source, teacher = _prepared(cfg, a.prepared), teacher_source(cfg), None
    if source == "train":  # the teacher first, in a run of its own
        tcfg = teacher_config(cfg)
        teacher = Path(_stage(tcfg, "teacher", lambda acc, t: str(finetune(tcfg, prepared, None, acc, t,
                                                                            name="teacher"))))
    elif source != "none":
        teacher = fetch(source, "classifier", cfg.tracking)
    _stage(cfg, "finetune", lambda acc, t: finetune(cfg, prepared, resolve_init(cfg, None), acc, t,
                                                     teacher_dir=teacher))
    return 0


def _evaluate(cfg: Config, a) -> int:
    from pipeline.stages.evaluate import evaluate
    from pipeline.tracking.artifacts import fetch

    prepared, clf = _prepared(cfg, a.prepared), fetch(a.classifier, "classifier", cfg.tracking)
    print(json.dumps(_stage(cfg, "evaluate", lambda acc, t: evaluate(cfg, prepared, clf, acc, t)), indent=2))
    return 0


def _register(cfg: Config, a) -> int:
    from pipeline.stages.register import register
    from pipeline.tracking.artifacts import fetch

    prepared, clf = _prepared(cfg, a.prepared), fetch(a.classifier, "classifier", cfg.tracking)
    _stage(cfg, "register", lambda acc, t: register(cfg, prepared, clf, t))
    return 0


def _sweep(cfg: Config, a) -> int:
    from pipeline.stages.sweep import SweepError, SweepRefused, run_sweep

    def confirm(n: int, limit: int) -> bool:
        if a.yes or not sys.stdin.isatty():
            return a.yes
        answer = input(f"mimflow: the grid has {n} trials, more than sweep.max_trials={limit}; run them all? [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    try:
        out = run_sweep(cfg, confirm)
    except (SweepError, SweepRefused) as err:
        print(f"mimflow: {err}", file=sys.stderr)
        return 2 if isinstance(err, SweepRefused) else 1
    print(out["report"].read_text())
    print(f"mimflow sweep '{cfg.run.name}' finished in {out['seconds'] / 60:.1f} min (MLflow parent run "
          f"{out['parent_run_id']}); results.csv and label_efficiency.png beside the report")
    if out["failed"]:
        print(f"mimflow: {out['failed']} trial(s) failed (listed in the report); run the same command to retry them")
    print(f"report: {out['report']}", flush=True)
    return 1 if out["failed"] else 0


CLASSIFIER = (("--classifier",), dict(required=True, help="classifier folder, run id or URI"))
COMMANDS: dict[str, Command] = {
    "run": Command("all stages in one parent MLflow run (no config: the bundled demo)", _run, prepared=False),
    "prepare": Command("build the dataset manifest and channel statistics", _prepare, prepared=False),
    "pretrain": Command("masked-image-model pretraining on the unlabelled pool", _pretrain),
    "finetune": Command("fine-tune a classifier (or a linear probe) on the labelled tiles", _finetune, (
        (("--init",), dict(help="scratch | PATH | MLflow run id | runs:/ or models:/ URI")),
        (("--label-fraction",), dict(type=float, help="stratified fraction of training labels")),
        (("--probe",), dict(action="store_true", help="linear probe of the frozen encoder (finetune.mode=probe)")))),
    "evaluate": Command("score a classifier on the held-out split", _evaluate, (CLASSIFIER,)),
    "register": Command("register a classifier in the MLflow model registry", _register, (CLASSIFIER,)),
    "sweep": Command("does pretraining pay? inits x heads x label fractions x splits x seeds, with intervals",
                     _sweep, ((("--yes",), dict(action="store_true", help="run a grid over sweep.max_trials")),),
                     prepared=False),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mimflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, usage=f"mimflow {name} {USAGE_ARGS} [options]")
        p.add_argument("args", nargs="*", help="a YAML recipe and/or dotted overrides")
        if command.prepared:
            p.add_argument("--prepared", help="prepared dataset folder (default: data.root/data.dataset)")
        for flags, kwargs in command.options:
            p.add_argument(*flags, **kwargs)
    # key=value overrides may also come after --options (argparse alone would refuse them there)
    a, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    a.args += extra
    try:
        config_path, overrides = _split_args(a.args)
        overrides += [f"finetune.init={a.init}"] if getattr(a, "init", None) else []
        overrides += [f"finetune.label_fraction={a.label_fraction}"] if getattr(a, "label_fraction", None) else []
        overrides += ["finetune.mode=probe"] if getattr(a, "probe", False) else []
        cfg = load_config(config_path, overrides)
    except ConfigError as err:
        print(f"mimflow: {err}", file=sys.stderr)
        return 2
    from pipeline.data import DataError
    from pipeline.engine.checkpoint import CheckpointError
    from pipeline.engine.loop import NonFiniteLossError
    from pipeline.engine.preempt import Preempted
    from pipeline.fsutil import FolderLockedError, os_error_line
    from pipeline.stages.register import RegisterRefused
    from pipeline.tracking.retry import LocalStoreError, store_error_line
    from pipeline.weights import UnsafeCheckpointError, WeightsIntegrityError

    try:
        return COMMANDS[a.command].run(cfg, a)
    except Preempted as stop:  # SIGTERM: checkpointed; the same command resumes from it
        print(f"mimflow: {stop}; run the same command again to resume", file=sys.stderr, flush=True)
        return 0
    except (NonFiniteLossError, CheckpointError, UnsafeCheckpointError, DataError, FolderLockedError,
            WeightsIntegrityError, LocalStoreError, RegisterRefused) as err:
        print(f"mimflow: {err}", file=sys.stderr, flush=True)
        return 1
    except OSError as err:  # disk full, read-only or missing folders: the path, not a traceback
        print(f"mimflow: {os_error_line(err)}", file=sys.stderr, flush=True)
        return 1
    except Exception as err:
        line = store_error_line(err, cfg.tracking.uri)
        if line is None:
            raise
        print(f"mimflow: {line}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
