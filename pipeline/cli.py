"""`mimflow` command line: thin parsing, then one stage function (or all of them)."""
from __future__ import annotations

import argparse
import json
import os
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
    path = Path(given) if given else Path(cfg.data.root) / cfg.data.name
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


def ui_command(uri: str) -> str:
    """A `mlflow ui` command that works as typed from here: the mlflow of this environment (by a
    path relative to the working folder where it can be), not whichever is on PATH."""
    exe = Path(sys.executable).parent / "mlflow"
    try:
        shown = str(exe.relative_to(Path.cwd()))
    except ValueError:
        shown = str(exe)
    return f"{shown} ui --backend-store-uri {uri} --port 5000"


def print_summary(cfg: Config, summary: dict) -> None:
    print("\n" + "=" * 72)
    name = summary.get("run_name", cfg.run.name)
    when = "finished before" if summary.get("already_done") else "finished"
    print(f"mimflow run '{name}' {when} in {summary['seconds'] / 60:.1f} min")
    times = summary.get("stage_seconds") or {}
    if times:
        print("  stages: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    label = {"pretrained": f"init={cfg.finetune.init}", "scratch": "init=scratch",
             "teacher": f"teacher {cfg.finetune.distillation.teacher_backbone}"}
    rows = [k for k in ("pretrained", "scratch", "teacher") if k in summary]
    from pipeline.stages.evaluate import SUMMARY_METRICS

    metrics = [k for k in summary[rows[0]] if k.split("/")[-1] in SUMMARY_METRICS]  # no per-class keys
    print(f"test metrics of {cfg.model.backbone} ({cfg.finetune.mode}) at label_fraction={cfg.finetune.label_fraction}:")
    print(f"  {'':26s}" + "".join(f"{m.split('/')[-1]:>19s}" for m in metrics))
    for r in rows:
        print(f"  {label[r]:26s}" + "".join(f"{summary[r][m]:19.4f}" for m in metrics))
    print(f"registered model: {summary.get('model_uri')} ({label[summary['registered_arm']]})")
    print(f"parent MLflow run: {summary.get('parent_run_id')}")
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:"):
        print(f"see the runs:  {ui_command(uri)}   (or: make ui; then open http://127.0.0.1:5000)")
    else:
        print(f"see the runs:  open {uri}")
    print("=" * 72)


def quiet_output(quiet: bool) -> None:
    """Logs a person can read: no progress-bar redraws off a terminal (tqdm's and MLflow's
    download bars), and with run.quiet no bars at all and no MLflow INFO lines."""
    import logging

    if quiet or not sys.stderr.isatty():
        os.environ["TQDM_DISABLE"] = "1"  # every tqdm bar, in this process and its workers
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    if quiet:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"  # the same for MLflow's subprocesses


@dataclass(frozen=True)
class Command:
    """One `mimflow` command: its help line, its own options, and what it runs."""
    help: str
    run: Callable[[Config, argparse.Namespace], int]
    options: tuple[tuple[tuple[str, ...], dict], ...] = ()
    prepared: bool = True  # reads a prepared data set (--prepared)
    reads_writes: str = ""


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
    from pipeline.stages.common import resolve_geometry
    from pipeline.stages.pretrain import pretrain

    prepared = _prepared(cfg, a.prepared)
    cfg = resolve_geometry(cfg, prepared)
    _stage(cfg, "pretrain", lambda acc, t: pretrain(cfg, prepared, acc, t))
    return 0


def _tokenizer(cfg: Config, a) -> int:
    from pipeline.stages.common import resolve_geometry
    from pipeline.stages.run import tokenizer_chain

    prepared = _prepared(cfg, a.prepared)
    tokenizer_chain(resolve_geometry(cfg, prepared), prepared, _stage)
    return 0


def _finetune(cfg: Config, a) -> int:
    from pipeline.stages.common import resolve_geometry
    from pipeline.stages.finetune import finetune, teacher_config
    from pipeline.stages.run import resolve_init, teacher_source
    from pipeline.tracking.artifacts import fetch

    if cfg.finetune.init == "pretrained":
        print("mimflow: finetune alone needs --init scratch|PATH|run id|URI", file=sys.stderr)
        return 2
    prepared, source, teacher = _prepared(cfg, a.prepared), teacher_source(cfg), None
    cfg = resolve_geometry(cfg, prepared)
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


def _config(cfg: Config, a) -> int:
    from pipeline.configdoc import describe

    print("# the resolved config: each key with its meaning, and its default where the recipe or an override\n"
          "# changed it (model.img_size / patch_size null: set from the data by prepare)")
    print("\n".join(describe(cfg)))
    return 0


CLASSIFIER = (("--classifier",), dict(required=True, help="classifier folder, run id, runs:/ or models:/ URI "
                                                           "(models:/name@alias works)"))
COMMANDS: dict[str, Command] = {
    "run": Command("all stages in one parent MLflow run (no recipe: the bundled demo)", _run, prepared=False,
                   reads_writes="Reads the recipe's data; writes the prepared data under data.root/data.name, every "
                                "stage's outputs under run.output_dir/run.name/, one MLflow parent run with a child "
                                "per stage, and a registered model version (models:/<register.model_name>@<alias>). "
                                "A finished run is reported, not redone."),
    "prepare": Command("build the dataset manifest and channel statistics", _prepare, prepared=False,
                       reads_writes="Reads every image data.dataset lists; writes data.root/data.name/ (manifest.csv, "
                                    "dataset.json, stats.json, quarantine.csv, skipped.csv) and an MLflow run."),
    "tokenizer": Command("train BEiT's visual tokenizer on the unlabelled pool (VQ-KD on a teacher's features, "
                         "or VQ-VAE on pixels)", _tokenizer,
                         reads_writes="Reads the prepared data (and, for kind=vqkd, a teacher encoder); writes "
                                      "run.output_dir/run.name/tokenizer/ (tokenizer/ = model.safetensors + meta.json) "
                                      "and an MLflow run with the tokenizer."),
    "pretrain": Command("masked-image-model pretraining on the unlabelled pool", _pretrain,
                        reads_writes="Reads the prepared data; writes run.output_dir/run.name/pretrain/ (checkpoints/, "
                                     "encoder/ = model.safetensors + meta.json) and an MLflow run with the encoder."),
    "finetune": Command("fine-tune a classifier (or a linear probe) on the labelled tiles", _finetune, (
        (("--init",), dict(help="scratch | PATH | MLflow run id | runs:/ or models:/ URI")),
        (("--label-fraction",), dict(type=float, help="stratified fraction of training labels")),
        (("--probe",), dict(action="store_true", help="linear probe of the frozen encoder (finetune.mode=probe)"))),
        reads_writes="Reads the prepared data and the encoder named by --init; writes run.output_dir/run.name/"
                     "finetune/ (checkpoints/, classifier/ = the best epoch's weights + meta.json) and an MLflow run."),
    "evaluate": Command("score a classifier on the held-out split", _evaluate, (CLASSIFIER,),
                        reads_writes="Reads the prepared data and the classifier; writes run.output_dir/run.name/"
                                     "evaluate/ (metrics.json, confusion_matrix.png) and an MLflow run; prints the metrics."),
    "register": Command("register a classifier in the MLflow model registry", _register, (CLASSIFIER,),
                        reads_writes="Reads the classifier (and one test image as the input example); writes a model "
                                     "version of register.model_name with lineage tags and alias register.alias."),
    "config": Command("print the resolved config: every key, its default and its meaning", _config, prepared=False,
                      reads_writes="Reads the recipe and overrides; writes nothing."),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mimflow", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Label-scarce domain adaptation of vision transformers: prepare imagery, pretrain by masked\n"
                    "image modelling, fine-tune on few labels, evaluate, register in MLflow. Every command takes an\n"
                    "optional YAML recipe and dotted overrides (key.sub=value); `mimflow config` lists every key.",
        epilog="examples:\n"
               "  mimflow run                                        the bundled demo (about 4 min on 2 cores)\n"
               "  mimflow run configs/recipes/landsat_simmim_swin.yaml finetune.label_fraction=0.05\n"
               "  mimflow config data.dataset=imagefolder data.options.root=/data/cxr\n"
               "  mimflow evaluate --classifier models:/landsat-landcover-vit@candidate\n"
               "run `mimflow COMMAND --help` for what a command reads and writes")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, usage=f"mimflow {name} {USAGE_ARGS} [options]",
                           description=f"{command.help[0].upper()}{command.help[1:]}. {command.reads_writes}")
        p.add_argument("args", nargs="*", help="a YAML recipe and/or dotted overrides")
        if command.prepared:
            p.add_argument("--prepared", help="prepared dataset folder (default: data.root/data.name)")
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
    from pipeline.stages.tokenizer import TokenizerError
    from pipeline.tracking.registry import SchemaChangeError
    from pipeline.tracking.retry import LocalStoreError, store_error_line
    from pipeline.weights import UnsafeCheckpointError, WeightsIntegrityError

    quiet_output(cfg.run.quiet)
    try:
        return COMMANDS[a.command].run(cfg, a)
    except Preempted as stop:  # SIGTERM: checkpointed; the same command resumes from it
        print(f"mimflow: {stop}; run the same command again to resume", file=sys.stderr, flush=True)
        return 0
    except (NonFiniteLossError, CheckpointError, UnsafeCheckpointError, DataError, FolderLockedError,
            WeightsIntegrityError, LocalStoreError, RegisterRefused, SchemaChangeError, ConfigError,
            TokenizerError) as err:
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
