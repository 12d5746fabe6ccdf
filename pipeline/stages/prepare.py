"""Stage 1: build the dataset manifest, quarantine unreadable files, compute channel statistics."""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

from accelerate import Accelerator

from pipeline.config import Config
from pipeline.data.manifest import changed_files, dataset_hash, load_manifest, select
from pipeline.data.sources import SOURCES
from pipeline.data.stats import compute_channel_stats, save_stats
from pipeline.data.validate import validate_records
from pipeline.tracking.base import Tracker

REPO_ROOT = Path(__file__).resolve().parents[2]


class BadDataError(ValueError):
    """strict mode: the data set holds files that cannot be used."""


def load_builder(name: str):
    """A generic source (folder / imagefolder / csv) or datasets/<name>/prepare.py:build
    (datasets/ is no package: it would shadow Hugging Face `datasets`)."""
    if name in SOURCES:
        return SOURCES[name]
    path = REPO_ROOT / "datasets" / name / "prepare.py"
    if not path.is_file():
        known = sorted(SOURCES) + sorted(p.parent.name for p in (REPO_ROOT / "datasets").glob("*/prepare.py"))
        raise FileNotFoundError(f"data.dataset={name!r}: no {path} (known: {known})")
    spec = importlib.util.spec_from_file_location(f"mimflow_datasets_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build


def _is_current(cfg: Config, out: Path) -> bool:
    """Prepared before with the same options, and no listed file changed since."""
    info_path = out / "dataset.json"
    if not (info_path.is_file() and (out / "stats.json").is_file()):
        return False
    info = json.loads(info_path.read_text())
    if info.get("build_options") != cfg.data.options or info.get("reader_options") != cfg.data.reader_options:
        return False
    changed = changed_files(load_manifest(out / "manifest.csv"))
    if changed:
        print(f"prepare: {len(changed)} file(s) changed since the manifest was written "
              f"(first: {changed[0]}); rebuilding")
    return not changed


def _write_filtered(out: Path, bad: list) -> None:
    """manifest.all.csv keeps what the builder listed; manifest.csv drops quarantined rows."""
    shutil.move(out / "manifest.csv", out / "manifest.all.csv")
    bad_keys = {(str(r.path), r.index) for r, _ in bad}
    with open(out / "manifest.all.csv", newline="") as src, open(out / "manifest.csv", "w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, reader.fieldnames)
        writer.writeheader()
        for row in reader:
            index = int(row["index"]) if row.get("index") else None
            if (str(out / row["path"]), index) not in bad_keys:  # Record.path is out / row path
                writer.writerow(row)
    with open(out / "quarantine.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "index", "reason"])
        writer.writerows((str(r.path), "" if r.index is None else r.index, why) for r, why in bad)


def _build(cfg: Config, out: Path) -> dict:
    if _is_current(cfg, out):
        return json.loads((out / "dataset.json").read_text())
    info = load_builder(cfg.data.dataset)(out_dir=out, **cfg.data.options)
    channels = info.get("channels")
    good, bad = validate_records(load_manifest(out / "manifest.csv"), len(channels) if channels else None,
                                 cfg.data.reader_options, cfg.run.quiet)
    if bad and cfg.data.strict:
        listing = "\n".join(f"  {why}" for _, why in bad[:50])
        raise BadDataError(f"data.strict=true and {len(bad)} file(s) cannot be used:\n{listing}")
    _write_filtered(out, bad)
    records = load_manifest(out / "manifest.csv")
    pool = select(records, "unlabelled") or select(records, "train")
    stats = compute_channel_stats(pool, channels, cfg.data.stats_sample_per_channel, cfg.data.clip_percentiles,
                                  seed=cfg.run.seed, quiet=cfg.run.quiet, reader_options=cfg.data.reader_options)
    save_stats(stats, out / "stats.json")
    info.update(channels=stats["channels"], build_options=cfg.data.options, reader_options=cfg.data.reader_options,
                dataset_hash=dataset_hash(out / "manifest.csv"), quarantined=len(bad),
                counts={s: len(select(records, s)) for s in ("unlabelled", "train", "val", "test")})
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    print(f"prepare: {len(good)} images ({info['counts']}), {len(bad)} quarantined"
          + "".join(f"\n  quarantined {why}" for _, why in bad[:20])
          + (f"\n  ... {len(bad) - 20} more in {out / 'quarantine.csv'}" if len(bad) > 20 else ""))
    return info


def prepare(cfg: Config, accelerator: Accelerator, tracker: Tracker) -> Path:
    """-> folder with manifest.csv, dataset.json, stats.json, quarantine.csv (built once, on rank 0)."""
    out = Path(cfg.data.root) / cfg.data.dataset
    if accelerator.is_main_process:
        info = _build(cfg, out)
        tracker.log_params({"dataset": cfg.data.dataset, "dataset_hash": info["dataset_hash"],
                            **{f"data.{k}": v for k, v in cfg.data.options.items()},
                            **{f"count.{k}": v for k, v in info["counts"].items()}})
        tracker.log_metrics({"prepare/quarantined": info.get("quarantined", 0)})
        tracker.set_tags({"dataset_hash": info["dataset_hash"]})
        for name in ("manifest.csv", "dataset.json", "stats.json", "quarantine.csv"):
            if (out / name).is_file():
                tracker.log_artifact(out / name, "prepared")
    accelerator.wait_for_everyone()
    return out
