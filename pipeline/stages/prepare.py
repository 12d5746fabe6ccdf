"""Stage 1: build the dataset (manifest + tiles) and its per-channel statistics."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from accelerate import Accelerator

from pipeline.config import Config
from pipeline.data.manifest import dataset_hash, load_manifest, select
from pipeline.data.stats import compute_channel_stats, save_stats
from pipeline.tracking.base import Tracker

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_builder(name: str):
    """datasets/<name>/prepare.py:build (datasets/ is no package: it would shadow HF datasets)."""
    path = REPO_ROOT / "datasets" / name / "prepare.py"
    if not path.is_file():
        known = sorted(p.parent.name for p in (REPO_ROOT / "datasets").glob("*/prepare.py"))
        raise FileNotFoundError(f"data.dataset={name!r}: no {path} (known: {known})")
    spec = importlib.util.spec_from_file_location(f"mimflow_datasets_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build


def _build(cfg: Config, out: Path) -> dict:
    info_path = out / "dataset.json"
    if info_path.is_file() and (out / "stats.json").is_file():
        info = json.loads(info_path.read_text())
        if info.get("build_options") == cfg.data.options:
            return info  # already prepared with these options
    info = load_builder(cfg.data.dataset)(out_dir=out, **cfg.data.options)
    records = load_manifest(out / "manifest.csv")
    pool = select(records, "unlabelled") or select(records, "train")
    stats = compute_channel_stats([r.path for r in pool], info.get("channels"),
                                  cfg.data.stats_sample_per_channel, cfg.data.clip_percentiles,
                                  seed=cfg.run.seed, quiet=cfg.run.quiet)
    save_stats(stats, out / "stats.json")
    info.update(build_options=cfg.data.options, dataset_hash=dataset_hash(out / "manifest.csv"),
                counts={s: len(select(records, s)) for s in ("unlabelled", "train", "val", "test")})
    info_path.write_text(json.dumps(info, indent=2))
    return info


def prepare(cfg: Config, accelerator: Accelerator, tracker: Tracker) -> Path:
    """-> folder with manifest.csv, dataset.json and stats.json (built once, on rank 0)."""
    out = Path(cfg.data.root) / cfg.data.dataset
    if accelerator.is_main_process:
        info = _build(cfg, out)
        tracker.log_params({"dataset": cfg.data.dataset, "dataset_hash": info["dataset_hash"],
                            **{f"data.{k}": v for k, v in cfg.data.options.items()},
                            **{f"count.{k}": v for k, v in info["counts"].items()}})
        tracker.set_tags({"dataset_hash": info["dataset_hash"]})
        for name in ("manifest.csv", "dataset.json", "stats.json"):
            tracker.log_artifact(out / name, "prepared")
    accelerator.wait_for_everyone()
    return out
