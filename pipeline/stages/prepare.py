"""Stage 1: build the dataset manifest, quarantine unusable files, compute channel statistics.

Nothing is dropped quietly: every quarantined image is listed in quarantine.csv and printed;
prepare refuses (a DataError naming the class and the fix) when quarantine would take all of a
class or more than data.max_quarantined_share of it, when data.strict=true and any image is bad,
when a class is missing from a split (unless data.allow_missing_classes=true), and when a
labelled row names a class outside the data card, holds an empty label set the card does not
allow, or holds several classes while finetune.task=multiclass (data/labels.py; naming the row).
"""
from __future__ import annotations

import csv
import importlib.util
import inspect
import json
import shutil
from collections import Counter
from pathlib import Path

from accelerate import Accelerator

from pipeline.config import Config
from pipeline.data import DataError
from pipeline.data.folders import SKIPPED_FILE, read_skipped
from pipeline.data.labels import check_labels, label_set
from pipeline.data.manifest import changed_files, dataset_hash, load_manifest, select
from pipeline.data.readers import check_reader_options
from pipeline.data.sources import SOURCES
from pipeline.data.splits import SPLIT_NAMES, missing_from_splits, split_counts
from pipeline.data.stats import MIXED, STATS_VERSION, channel_units, compute_channel_stats, save_stats
from pipeline.data.validate import Validation, validate_records
from pipeline.tracking.base import Tracker

REPO_ROOT = Path(__file__).resolve().parents[2]
SHOWN = 5  # quarantined files printed (all are in quarantine.csv)


class BadDataError(DataError):
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


def settings(cfg: Config) -> dict:
    """Everything that changes what prepare writes; prepared data is reused only when equal."""
    return {**{f"data.{k}": v for k, v in cfg.data.prepare_settings().items()}, "run.seed": cfg.run.seed}


def _is_current(cfg: Config, out: Path) -> bool:
    """Prepared before with the same settings and statistics version, and no listed file changed."""
    info_path, stats_path = out / "dataset.json", out / "stats.json"
    if not (info_path.is_file() and stats_path.is_file()):
        return False
    before = json.loads(info_path.read_text()).get("prepare_settings") or {}
    now = settings(cfg)
    differ = sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
    if differ:
        if before:
            print(f"prepare: {', '.join(differ)} changed since {out} was prepared; rebuilding")
        return False
    if json.loads(stats_path.read_text()).get("version") != STATS_VERSION:
        return False
    changed = changed_files(load_manifest(out / "manifest.csv"))
    if changed:
        print(f"prepare: {len(changed)} file(s) changed since the manifest was written "
              f"(first: {changed[0]}); rebuilding")
    return not changed


def _builder_options(builder, cfg: Config) -> dict:
    """data.options, plus data.reader_options for builders that count the images in a file (so
    that counting and decoding use the same options)."""
    options = dict(cfg.data.options)
    if "reader_options" in inspect.signature(builder).parameters:
        if "reader_options" in options:
            raise DataError("data.options.reader_options: set data.reader_options instead (one place "
                            "for the builder and every reader)")
        options["reader_options"] = cfg.data.reader_options.as_dict()
    return options


def _write_filtered(out: Path, bad: list, channels: int | None) -> None:
    """manifest.all.csv keeps what the builder listed; manifest.csv drops quarantined rows and
    records the channel count every row is read with; quarantine.csv lists every bad image."""
    shutil.move(out / "manifest.csv", out / "manifest.all.csv")
    bad_keys = {(str(r.path), r.index) for r, _ in bad}
    with open(out / "manifest.all.csv", newline="") as src, open(out / "manifest.csv", "w", newline="") as dst:
        reader = csv.DictReader(src)
        fields = [f for f in reader.fieldnames if f != "channels"] + ["channels"]
        writer = csv.DictWriter(dst, fields)
        writer.writeheader()
        for row in reader:
            index = int(row["index"]) if row.get("index") else None
            if (str(out / row["path"]), index) not in bad_keys:  # Record.path is out / row path
                writer.writerow({**row, "channels": channels or ""})
    with open(out / "quarantine.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "index", "reason"])
        writer.writerows((str(r.path), "" if r.index is None else r.index, why) for r, why in bad)


def _wanted_channels(cfg: Config, card: list[str] | None) -> int | None:
    """data.channels -> the count to convert to; None: the largest count present."""
    wanted = cfg.data.channels
    if isinstance(wanted, list):
        return len(wanted)
    if isinstance(wanted, int):
        return wanted
    return len(card) if card else None


def _channel_names(cfg: Config, card: list[str] | None, count: int) -> list[str]:
    if isinstance(cfg.data.channels, list):
        return cfg.data.channels
    if card and len(card) == count:
        return card
    return [f"band_{i}" for i in range(count)]


def _listing(bad: list, out: Path) -> str:
    lines = [f"  quarantined {why}" for _, why in bad[:SHOWN]]
    if len(bad) > SHOWN:
        lines.append(f"  ... {len(bad) - SHOWN} more in {out / 'quarantine.csv'}")
    return "\n".join(lines)


def _refuse_strict(v: Validation, n: int, out: Path) -> None:
    files = len({r.path for r, _ in v.bad})
    total_files = len({r.path for r in v.good} | {r.path for r, _ in v.bad})
    raise BadDataError(f"data.strict=true and {len(v.bad)} of {n} images ({files} of {total_files} files) "
                       f"cannot be used; all are listed in {out / 'quarantine.csv'}\n" + _listing(v.bad, out))


def _class_names(rec, classes: list[str]):
    for c in rec.label if isinstance(rec.label, tuple) else (rec.label,):
        if 0 <= c < len(classes):
            yield classes[c]


def _refuse_lost_classes(listed: list, v: Validation, classes: list[str], share: float, out: Path) -> None:
    """DataError when quarantine takes all of a class, or more than `share` of it."""
    total = Counter(name for r in listed for name in _class_names(r, classes))
    lost, first = Counter(), {}
    for r, why in v.bad:
        for name in _class_names(r, classes):
            lost[name] += 1
            first.setdefault(name, why)
    for name in classes:
        if not lost[name] or lost[name] <= share * total[name] and lost[name] < total[name]:
            continue
        every = lost[name] == total[name]
        how = "all" if every else f"{lost[name] / total[name]:.0%} (over data.max_quarantined_share={share})"
        fix = ("set data.channels to a count these files convert to" if "no conversion" in first[name]
               else "repair or remove the files listed in quarantine.csv")
        raise DataError(f"class {name!r}: quarantine would remove {how} of its images ({lost[name]} of "
                        f"{total[name]}), first: {first[name]}. Fix: {fix}"
                        + ("" if every else ", or raise data.max_quarantined_share")
                        + f"; every entry is in {out / 'quarantine.csv'}")


def _check_splits(counts: dict, allowed: bool) -> list[str]:
    """DataError for a class missing from a split, unless allowed -> warning lines to print."""
    notes = []
    for name, split, groups in missing_from_splits(counts):
        text = (f"class {name!r} has no image in the {split} split: it has {groups} group(s) (files, "
                f"patients, volumes or blocks) for {len(SPLIT_NAMES)} splits")
        if not allowed:
            raise DataError(f"{text}. Add images of {name!r}, change data.options.split_fractions, or "
                            f"accept it with data.allow_missing_classes=true")
        notes.append(f"  WARNING {text} (accepted: data.allow_missing_classes=true)")
    return notes


def _duplicates(records: list, classes: list[str]) -> dict:
    """Byte-identical files (equal sha256) among the manifest's rows -> {"files": copies beyond
    the first of each set, "sets": sets of copies, "across_splits": sets whose rows lie in more
    than one split (splits given by the source), "conflicting_labels": sets whose labelled rows
    disagree, "first_across" / "first_conflict": an example of each, or ""}."""
    by_hash: dict[str, dict] = {}
    for r in records:
        if r.sha256:
            by_hash.setdefault(r.sha256, {})[r.path] = r
    sets = [rows for rows in by_hash.values() if len(rows) > 1]
    across = [s for s in sets if len({r.split for r in s.values()}) > 1]
    conflict = [s for s in sets if len({r.label for r in s.values() if r.split != "unlabelled"}) > 1]

    def example(rows: dict, show) -> str:
        return " == ".join(f"{p} ({show(r)})" for p, r in list(rows.items())[:2])

    def label(r) -> str:
        return ", ".join(_class_names(r, classes)) or str(r.label)

    return {"files": sum(len(s) - 1 for s in sets), "sets": len(sets), "across_splits": len(across),
            "conflicting_labels": len(conflict),
            "first_across": example(across[0], lambda r: r.split) if across else "",
            "first_conflict": example(conflict[0], label) if conflict else ""}


def _found_lines(info: dict, out: Path) -> list[str]:
    """Summary lines for copies among the files and for paths the source skipped."""
    d, lines = info["duplicates"], []
    if d["files"]:
        lines.append(f"  duplicates: {d['files']} file(s) are byte-identical copies of another ({d['sets']} set(s)); "
                     "the rows of each set share one group, so a copy never straddles train/val/test")
    if d["across_splits"]:
        lines.append(f"  WARNING {d['across_splits']} set(s) of copies lie in more than one split, as the source "
                     f"assigned them (first: {d['first_across']})")
    if d["conflicting_labels"]:
        lines.append(f"  WARNING {d['conflicting_labels']} set(s) of copies carry different labels "
                     f"(first: {d['first_conflict']})")
    skipped = read_skipped(out)
    if skipped:
        kinds = ", ".join(f"{n} {kind}" for kind, n in (info.get("skipped") or {}).items())
        lines.append(f"  skipped {len(skipped)} path(s) that are no images ({kinds}; all listed in {out / SKIPPED_FILE})")
        lines += [f"    skipped {path} ({why})" for path, why in skipped[:SHOWN]]
        if len(skipped) > SHOWN:
            lines.append(f"    ... {len(skipped) - SHOWN} more in {out / SKIPPED_FILE}")
    return lines


def _units_line(info: dict) -> str:
    units = info["units"]
    if len(set(units)) == 1:
        return f"  units: {units[0]} (every channel; stats.json has them)"
    return "  units: " + ", ".join(f"{name} {unit}" for name, unit in zip(info["channels"], units))


def _summary(v: Validation, counts: dict, info: dict, cfg: Config, out: Path, notes: list[str]) -> str:
    source = ("data.channels" if cfg.data.channels != "auto" else
              "auto: the data card's" if info.get("card_channels") else "auto: the largest count present")
    lines = [f"prepare: {len(v.good)} images used ({', '.join(f'{s} {n}' for s, n in info['counts'].items())}), "
             f"{len(v.bad)} quarantined" + (f" (all listed in {out / 'quarantine.csv'})" if v.bad else ""),
             f"  channels: {v.channels} {info['channels']} ({source}; stored: "
             + ", ".join(f"{n} image(s) with {c}" for c, n in sorted(v.stored.items())) + ")",
             _units_line(info)]
    lines += [f"  WARNING channel {name!r} holds values of several units ({unit[len(MIXED):]}): its statistics "
              "mix quantities; convert the files to one unit, or prepare them as separate data sets"
              for name, unit in zip(info["channels"], info["units"]) if unit.startswith(MIXED)]
    lines += [f"  converted {n} image(s): {what}" for what, n in v.conversions.items()]
    lines += [f"  {key} by the builder: {value}" for key, value in info.items() if key.startswith("dropped") and value]
    lines += _found_lines(info, out)
    if v.bad:
        lines.append(_listing(v.bad, out))
    if counts:
        width = max(12, *(len(c) for c in counts))
        lines.append(f"  {'class':<{width}}" + "".join(f"{s:>14}" for s in SPLIT_NAMES) + "   (images / groups)")
        for name, per in counts.items():
            cells = (f"{per[s]['images']} / {per[s]['groups']}" for s in SPLIT_NAMES)
            lines.append(f"  {name:<{width}}" + "".join(f"{c:>14}" for c in cells))
    return "\n".join(lines + notes)


def _build(cfg: Config, out: Path) -> dict:
    if _is_current(cfg, out):
        info = json.loads((out / "dataset.json").read_text())
        check_labels(out / "manifest.csv", info, cfg.finetune.task)  # finetune.task may have changed
        return info
    reader_options = cfg.data.reader_options.as_dict()
    check_reader_options(reader_options)  # a bad option value fails before any file is read
    builder = load_builder(cfg.data.dataset)
    info = builder(out_dir=out, **_builder_options(builder, cfg))
    card = info.get("channels")
    listed = load_manifest(out / "manifest.csv")
    v = validate_records(listed, _wanted_channels(cfg, card), reader_options, cfg.run.quiet)
    _write_filtered(out, v.bad, v.channels)
    if v.bad and cfg.data.strict:
        _refuse_strict(v, len(listed), out)
    classes = info.get("classes") or []
    _refuse_lost_classes(listed, v, classes, cfg.data.max_quarantined_share, out)
    if not v.good:
        raise DataError(f"no usable image among the {len(listed)} listed; see {out / 'quarantine.csv'}")
    # a class outside the card, an empty set the card does not allow, several classes for a
    # multi-class task: refused naming the row, before the statistics pass
    task = check_labels(out / "manifest.csv", info, cfg.finetune.task)
    records = load_manifest(out / "manifest.csv")
    counts = split_counts(records, classes)
    notes = _check_splits(counts, cfg.data.allow_missing_classes)
    pool = select(records, "unlabelled") or select(records, "train")
    names = _channel_names(cfg, card, v.channels)
    stats = compute_channel_stats(pool, names, cfg.data.stats_sample_per_channel, cfg.data.clip_percentiles,
                                  seed=cfg.run.seed, quiet=cfg.run.quiet, reader_options=reader_options)
    stats["units"] = channel_units(records, reader_options)
    save_stats(stats, out / "stats.json")
    info.update(channels=stats["channels"], units=stats["units"], card_channels=card, prepare_settings=settings(cfg),
                dataset_hash=dataset_hash(out / "manifest.csv"), quarantined=len(v.bad),
                conversions=dict(v.conversions), split_counts=counts, duplicates=_duplicates(listed, classes),
                image_size=v.size_summary(),
                counts={s: len(select(records, s)) for s in ("unlabelled", *SPLIT_NAMES)})
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    print(_summary(v, counts, info, cfg, out, notes))
    if task == "multilabel":
        print(_label_sets_line(records, cfg.finetune.task))
    return info


def _label_sets_line(records: list, requested: str) -> str:
    """'  task: multilabel (finetune.task=auto); labelled images by label-set size: 1: 173, 2: 304, ...'"""
    sizes = Counter(len(label_set(r.label)) for r in records if r.split in SPLIT_NAMES)
    return (f"  task: multilabel (finetune.task={requested}); labelled images by number of labels: "
            + ", ".join(f"{k}: {n}" for k, n in sorted(sizes.items())) + " (the table counts positives)")


def prepare(cfg: Config, accelerator: Accelerator, tracker: Tracker) -> Path:
    """-> folder with manifest.csv, dataset.json, stats.json, quarantine.csv (built once, on rank 0)."""
    out = Path(cfg.data.root) / cfg.data.name
    if accelerator.is_main_process:
        info = _build(cfg, out)
        tracker.log_params({"dataset": cfg.data.dataset, "dataset_hash": info["dataset_hash"],
                            **{f"data.{k}": v for k, v in cfg.data.options.items()},
                            **{f"count.{k}": v for k, v in info["counts"].items()}})
        tracker.log_metrics({"prepare/quarantined": info.get("quarantined", 0),
                             "prepare/duplicate_files": (info.get("duplicates") or {}).get("files", 0),
                             "prepare/skipped_paths": sum((info.get("skipped") or {}).values())})
        tracker.set_tags({"dataset_hash": info["dataset_hash"]})
        for name in ("manifest.csv", "dataset.json", "stats.json", "quarantine.csv", SKIPPED_FILE):
            if (out / name).is_file():
                tracker.log_artifact(out / name, "prepared")
    accelerator.wait_for_everyone()
    return out


def verify_prepared(out: Path) -> None:
    """A prepared folder is what prepare wrote: its manifest (and the files it pins) hash to the
    dataset_hash recorded in dataset.json. Raises ValueError naming the folder otherwise."""
    try:
        recorded = json.loads((out / "dataset.json").read_text())["dataset_hash"]
        actual = dataset_hash(out / "manifest.csv")
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{out}: prepared data unreadable ({err})") from None
    if actual != recorded:
        raise ValueError(f"{out}: manifest.csv or the files it lists changed since prepare (dataset hash)")
