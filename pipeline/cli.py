"""`mimflow` command line: thin parsing, then one stage function (or all of them)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    from pipeline.stages.run import StageRuns, log_config

    acc = make_accelerator(cfg.run)

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
    rows = [k for k in ("finetune", "finetune_scratch") if k in summary]
    metrics = [k for k in summary["finetune"] if "/auroc_" not in k]
    label = {"finetune": f"init={cfg.finetune.init}", "finetune_scratch": "init=scratch"}
    print(f"test metrics at label_fraction={cfg.finetune.label_fraction}:")
    print(f"  {'':22s}" + "".join(f"{m.split('/')[-1]:>19s}" for m in metrics))
    for r in rows:
        print(f"  {label[r]:22s}" + "".join(f"{summary[r][m]:19.4f}" for m in metrics))
    print(f"registered model: {summary.get('model_uri')}")
    print(f"parent MLflow run: {summary.get('parent_run_id')}")
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:"):
        print(f"see the runs:  mlflow ui --backend-store-uri {uri} --port 5000   (then open http://127.0.0.1:5000)")
    else:
        print(f"see the runs:  open {uri}")
    print("=" * 72)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mimflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("run", "all stages in one parent MLflow run (no config: the bundled demo)"),
                        ("prepare", "build the dataset manifest and channel statistics"),
                        ("pretrain", "masked-image-model pretraining on the unlabelled pool"),
                        ("finetune", "fine-tune a classifier on the labelled tiles"),
                        ("evaluate", "score a classifier on the held-out split"),
                        ("register", "register a classifier in the MLflow model registry")]:
        p = sub.add_parser(name, help=help_, usage=f"mimflow {name} {USAGE_ARGS} [options]")
        p.add_argument("args", nargs="*", help="a YAML recipe and/or dotted overrides")
        if name != "run" and name != "prepare":
            p.add_argument("--prepared", help="prepared dataset folder (default: data.root/data.dataset)")
        if name == "finetune":
            p.add_argument("--init", help="scratch | PATH | MLflow run id | runs:/ or models:/ URI")
            p.add_argument("--label-fraction", type=float, help="stratified fraction of training labels")
        if name in ("evaluate", "register"):
            p.add_argument("--classifier", required=True, help="classifier folder, run id or URI")
    # key=value overrides may also come after --options (argparse alone would refuse them there)
    a, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    a.args += extra
    try:
        config_path, overrides = _split_args(a.args)
        if a.command == "finetune":
            overrides += [f"finetune.init={a.init}"] if a.init else []
            overrides += [f"finetune.label_fraction={a.label_fraction}"] if a.label_fraction else []
        cfg = load_config(config_path, overrides)
    except ConfigError as err:
        print(f"mimflow: {err}", file=sys.stderr)
        return 2
    from pipeline.data import DataError
    from pipeline.engine.checkpoint import CheckpointError, UnsafeCheckpointError
    from pipeline.engine.loop import NonFiniteLossError
    from pipeline.engine.preempt import Preempted

    try:
        return _dispatch(cfg, a)
    except Preempted as stop:  # SIGTERM: checkpointed; the same command resumes from it
        print(f"mimflow: {stop}; run the same command again to resume", file=sys.stderr, flush=True)
        return 0
    except (NonFiniteLossError, CheckpointError, UnsafeCheckpointError, DataError) as err:
        print(f"mimflow: {err}", file=sys.stderr, flush=True)
        return 1


def _dispatch(cfg: Config, a) -> int:
    from pipeline.tracking.mlflow import fetch

    if a.command == "run":
        from pipeline.stages.run import run_pipeline

        summary = run_pipeline(cfg)
        if "model_uri" in summary:
            print_summary(cfg, summary)
        elif "encoder" in summary:
            print(f"no labelled split: pretrained encoder only, in {summary['encoder']} "
                  f"(MLflow run {summary['parent_run_id']}, {summary['seconds'] / 60:.1f} min)")
        return 0
    if a.command == "prepare":
        from pipeline.stages.prepare import prepare

        _stage(cfg, "prepare", lambda acc, t: prepare(cfg, acc, t))
        return 0
    prepared = _prepared(cfg, a.prepared)
    if a.command == "pretrain":
        from pipeline.stages.pretrain import pretrain

        _stage(cfg, "pretrain", lambda acc, t: pretrain(cfg, prepared, acc, t))
    elif a.command == "finetune":
        from pipeline.stages.finetune import finetune
        from pipeline.stages.run import resolve_init

        if cfg.finetune.init == "pretrained":
            print("mimflow: finetune alone needs --init scratch|PATH|run id|URI", file=sys.stderr)
            return 2
        _stage(cfg, "finetune", lambda acc, t: finetune(cfg, prepared, resolve_init(cfg, None), acc, t))
    elif a.command == "evaluate":
        from pipeline.stages.evaluate import evaluate

        clf = fetch(a.classifier, "classifier", cfg.tracking)
        metrics = _stage(cfg, "evaluate", lambda acc, t: evaluate(cfg, prepared, clf, acc, t))
        print(json.dumps(metrics, indent=2))
    elif a.command == "register":
        from pipeline.stages.register import register

        clf = fetch(a.classifier, "classifier", cfg.tracking)
        _stage(cfg, "register", lambda acc, t: register(cfg, prepared, clf, t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
