"""A sweep's outputs: results.csv (one row per trial), report.md (the table with intervals, the
verdicts, the minimum detectable effects, the labels behind each fraction) and
label_efficiency.png (the metric against the number of labels, one line per arm).

    tables = analyse(results)             # statistics.py over every fraction
    write_report(results, tables, folder) -> {"report.md": path, "results.csv": ..., "label_efficiency.png": ...}
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.fsutil import atomic_write_text
from pipeline.sweep import statistics as st
from pipeline.sweep.grid import Arm

CSV_FIELDS = ("trial", "arm", "arm_label", "init", "backbone", "mode", "fraction", "repetition", "seed",
              "train_labels", "val_labels", "test_items", "steps", "status", "accuracy", "balanced_accuracy",
              "macro_f1", "macro_auroc", "seconds", "mlflow_run_id", "error")


@dataclass
class SweepResults:
    """What a sweep produced, in plain data.

    rows: one dict per trial with the CSV_FIELDS, plus `predicted` (class per test item, in the
        repetition's test order) when the trial finished.
    test_labels: per repetition, the test labels [n_r].
    labels: per fraction, {"train": [count per repetition], "val": [...], "per_class": {class:
        [count per repetition]}, "raised": [(repetition, class, asked)]} for classes raised to one label.
    facts: lines about the data and settings, printed at the top of the report.
    """
    name: str
    arms: list[Arm]
    fractions: list[float]
    seeds: list[int]
    classes: list[str]
    test_labels: list[np.ndarray]
    rows: list[dict]
    labels: dict[float, dict]
    metric: str
    n_boot: int
    confidence: float
    power: float
    seed: int = 0
    facts: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class FractionTable:
    fraction: float
    cells: list[st.Cell]  # per arm
    differences: list[tuple[str, st.Difference]]  # (verdict sentence, difference)


def _correct(res: SweepResults, fraction: float) -> list[np.ndarray]:
    """Per repetition [A, S, n_r]: 1 right, 0 wrong, NaN where the trial has not finished."""
    arm_i = {a.key: i for i, a in enumerate(res.arms)}
    seed_i = {s: i for i, s in enumerate(res.seeds)}
    out = [np.full((len(res.arms), len(res.seeds), len(y)), np.nan) for y in res.test_labels]
    for row in res.rows:
        if row["fraction"] != fraction or row["status"] != "finished" or row["arm"] not in arm_i:
            continue
        y = res.test_labels[row["repetition"]]
        out[row["repetition"]][arm_i[row["arm"]], seed_i[row["seed"]]] = np.asarray(row["predicted"]) == y
    return out


def comparisons(arms: list[Arm], classical_means: dict[str, float]) -> list[tuple[int, int]]:
    """Pairs (a, b) to test, a - b: every pretrained arm against the same backbone from scratch;
    every network arm but the CNN baseline against the CNN baseline; every network arm against the
    stronger classical row (highest mean over all fractions)."""
    idx = {a.key: i for i, a in enumerate(arms)}
    pairs = []
    for i, a in enumerate(arms):
        if a.kind == "network" and a.pretrained:
            twin = next((j for j, b in enumerate(arms) if b.kind == "network" and not b.pretrained
                         and b.backbone == a.backbone and b.mode == "full"), None)
            if twin is not None:
                pairs.append((i, twin))
    cnn = next((i for i, a in enumerate(arms) if a.kind == "network" and a.baseline), None)
    if cnn is not None:
        pairs += [(i, cnn) for i, a in enumerate(arms) if a.kind == "network" and i != cnn]
    if classical_means:
        best = max(classical_means, key=lambda k: (np.nan_to_num(classical_means[k], nan=-1), k))
        pairs += [(i, idx[best]) for i, a in enumerate(arms) if a.kind == "network"]
    return list(dict.fromkeys(pairs))


def analyse(res: SweepResults) -> list[FractionTable]:
    """Cells and paired differences of every fraction (statistics.py); the same bootstrap draws
    for every arm of a fraction."""
    correct = {f: _correct(res, f) for f in res.fractions}
    k = len(res.classes)
    per_fraction = {f: st.cells(res.test_labels, correct[f], k, res.metric, res.n_boot, res.seed, res.confidence)[0]
                    for f in res.fractions}
    classical = {a.key: np.nanmean([per_fraction[f][i].mean for f in res.fractions])
                 for i, a in enumerate(res.arms) if a.kind == "classical"
                 if any(per_fraction[f][i].trials for f in res.fractions)}
    pairs = comparisons(res.arms, classical)
    tables = []
    for f in res.fractions:
        diffs = []
        for a, b in pairs:
            d = st.paired_difference(res.test_labels, correct[f], a, b, k, res.metric, res.n_boot, res.seed,
                                     res.confidence, res.power)
            diffs.append((st.verdict(res.arms[a].label, res.arms[b].label, d, res.power), d))
        tables.append(FractionTable(f, per_fraction[f], diffs))
    return tables


def write_csv(res: SweepResults, path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in sorted(res.rows, key=lambda r: (r["arm"], r["fraction"], r["repetition"], r["seed"])):
            w.writerow(row)
    return path


def _pct(x: float) -> str:
    return "-" if np.isnan(x) else f"{100 * x:.1f}"


def _mean_count(values: list[int]) -> str:
    mean = float(np.mean(values))
    shown = f"{mean:.0f}" if mean.is_integer() else f"{mean:.1f}"
    return shown if len(set(values)) <= 1 else f"{shown} ({min(values)}-{max(values)})"


def _labels_section(res: SweepResults) -> list[str]:
    lines = ["## Labels behind each fraction",
             "",
             "Nested: within a repetition, every smaller subset lies inside the larger one; stratified by "
             "class, at least one label per class. Counts are per repetition (mean, and range when they differ).",
             "",
             "| fraction | train labels | validation labels | " + " | ".join(f"train `{c}`" for c in res.classes) + " |",
             "|---|---|---|" + "---|" * len(res.classes)]
    for f in res.fractions:
        lab = res.labels[f]
        lines.append(f"| {f:g} | {_mean_count(lab['train'])} | {_mean_count(lab['val'])} | "
                     + " | ".join(_mean_count(lab["per_class"][c]) for c in res.classes) + " |")
    raised = [(f, r, c, asked) for f in res.fractions for r, c, asked in res.labels[f]["raised"]]
    lines.append("")
    if raised:
        lines.append("Raised to one label (the fraction would have left the class without any): "
                     + "; ".join(f"fraction {f:g}, repetition {r}: `{c}` ({part})" for f, r, c, part in raised) + ".")
    else:
        lines.append("No class needed raising to one label.")
    return lines


def _table_section(res: SweepResults, tables: list[FractionTable]) -> list[str]:
    metric = res.metric.replace("_", " ")
    lines = [f"## {metric.capitalize()} (%), mean over repetitions x seeds [{res.confidence:.0%} interval]",
             "",
             "| arm | " + " | ".join(f"{t.fraction:g}" for t in tables) + " |",
             "|---|" + "---|" * len(tables)]
    for i, arm in enumerate(res.arms):
        cells = [t.cells[i] for t in tables]
        shown = [f"{_pct(c.mean)} [{_pct(c.low)}, {_pct(c.high)}] (n={c.trials})" if c.trials else "not run"
                 for c in cells]
        lines.append(f"| {arm.label}{' *(baseline)*' if arm.baseline else ''} | " + " | ".join(shown) + " |")
    return lines


def _verdict_section(res: SweepResults, tables: list[FractionTable]) -> list[str]:
    lines = ["## Verdicts per label fraction",
             "",
             f"Paired differences (row arm minus column arm) on the same splits, seeds and test items, in points, "
             f"with {res.confidence:.0%} intervals; MDE: the minimum detectable effect at {res.power:.0%} power "
             f"(2.80 x the difference's bootstrap standard error at 95% / 80%). The intervals are per comparison, "
             "not corrected for the number of comparisons: about one in twenty excludes zero by chance alone."]
    for t in tables:
        lab = res.labels[t.fraction]
        found = [v for v, d in t.differences if d.pairs and (d.low > 0 or d.high < 0)]
        mdes = [d.mde for _, d in t.differences if d.pairs]
        lines += ["", f"### {t.fraction:g} of the labels ({_mean_count(lab['train'])} train + "
                      f"{_mean_count(lab['val'])} validation labels)", ""]
        if not mdes:
            lines.append("No paired trials yet.")
            continue
        lines.append(f"{len(found)} of {len(mdes)} comparisons show a difference; the minimum detectable effect "
                     f"ranges {_pct(min(mdes))}-{_pct(max(mdes))} points (median {_pct(float(np.median(mdes)))}).")
        lines += [""] + [f"- {v}" for v in found] + ([""] if found else [])
        lines += ["| comparison | difference [interval] | MDE | pairs |", "|---|---|---|---|"]
        for v, d in t.differences:
            a, b = res.arms[d.a].label, res.arms[d.b].label
            lines.append(f"| {a} vs {b} | {_pct(d.mean)} [{_pct(d.low)}, {_pct(d.high)}] | {_pct(d.mde)} | {d.pairs} |")
    return lines


def report_markdown(res: SweepResults, tables: list[FractionTable], plot_name: str) -> str:
    done = sum(r["status"] == "finished" for r in res.rows)
    failed = [r for r in res.rows if r["status"] == "failed"]
    lines = [f"# Sweep `{res.name}`: does domain pretraining pay on this data?", ""]
    lines += [f"- {fact}" for fact in res.facts]
    lines += [f"- Trials: {done} finished of {len(res.rows)}" + (f"; {len(failed)} failed (see below)" if failed else "")]
    lines += ["", *_table_section(res, tables), "", f"![label efficiency]({plot_name})", "",
              *_verdict_section(res, tables), "", *_labels_section(res), ""]
    lines += ["## Method", "",
              f"- Interval of a cell: hierarchical percentile bootstrap ({res.n_boot} replicates): repetitions drawn "
              "with replacement, then within each its seeds, and its test items within class (stratified), "
              "recomputing the metric (Efron & Tibshirani 1993; Davison & Hinkley 1997, sec. 3.8).",
              "- Paired difference: both arms scored on every replicate's same repetitions, seeds and items.",
              f"- Minimum detectable effect: (z_(1-alpha/2) + z_power) x SE of the paired difference, alpha = "
              f"{1 - res.confidence:.2f}, power = {res.power:.2f} (Bloom 1995).",
              f"- {res.metric.replace('_', ' ').capitalize()} averages all {len(res.classes)} classes of the data card "
              "(pipeline/metrics.py)."]
    if res.skipped:
        lines += ["", "## Not in the grid", ""] + [f"- `{k}`: {why}" for k, why in res.skipped]
    if failed:
        lines += ["", "## Failed trials (run the same command again to retry them)", ""]
        lines += [f"- `{r['trial']}`: {r.get('error', '')}" for r in failed]
    return "\n".join(lines) + "\n"


def panels(arms: list[Arm]) -> list[tuple[str, list[int]]]:
    """The figure's panels -> [(title, indices into arms)]: one per head (its arms from scratch and
    pretrained), each with every baseline too, so no panel holds more lines than one head's inits
    plus the baselines; a single panel when there is one head."""
    heads: dict[str, list[int]] = {}
    for i, arm in enumerate(arms):
        if not arm.baseline:
            heads.setdefault(arm.head or arm.key, []).append(i)
    base = [i for i, arm in enumerate(arms) if arm.baseline]
    if len(heads) <= 1:
        return [("", list(range(len(arms))))]
    return [(f"head `{name}`", idx + base) for name, idx in heads.items()]


def plot_label_efficiency(res: SweepResults, tables: list[FractionTable], path: Path) -> Path:
    """The metric (%) against the labels used (train + validation, mean over repetitions, log
    scale): one line per arm, its interval as a band, baselines dashed; one panel per head
    (`panels`), sharing the y axis, an initialisation in the same colour in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([np.mean(res.labels[t.fraction]["train"]) + np.mean(res.labels[t.fraction]["val"]) for t in tables])
    groups = panels(res.arms)
    cols = min(2, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(8 if cols == 1 else 12, 5 if rows == 1 else 4.2 * rows),
                             sharey=True, squeeze=False)
    # colour by what differs within a panel: the initialisation (or the baseline itself)
    keys = list(dict.fromkeys(_colour_key(a) for a in res.arms))
    colours = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")
    for ax, (title, idx) in zip(axes.flat, groups):
        for i in idx:
            arm = res.arms[i]
            y = np.array([t.cells[i].mean for t in tables]) * 100
            if np.isnan(y).all():
                continue
            lo = np.array([t.cells[i].low for t in tables]) * 100
            hi = np.array([t.cells[i].high for t in tables]) * 100
            colour = colours(keys.index(_colour_key(arm)) % colours.N)
            ax.plot(x, y, "--" if arm.baseline else "-", marker="o", color=colour, label=arm.label, linewidth=1.5)
            ax.fill_between(x, lo, hi, color=colour, alpha=0.12)
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:.0f}\n({t.fraction:g})" for v, t in zip(x, tables)])
        ax.minorticks_off()
        ax.set_xlabel("labelled images used: train + validation (fraction)")
        ax.set_ylabel(f"test {res.metric.replace('_', ' ')} (%)")
        if title:
            ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(f"{res.name}: mean over repetitions x seeds, {res.confidence:.0%} bootstrap bands")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _colour_key(arm: Arm) -> str:
    return arm.key if arm.baseline else (arm.init.name if arm.pretrained else "scratch")


def write_report(res: SweepResults, folder: Path) -> dict[str, Path]:
    """-> paths of report.md, results.csv and label_efficiency.png written under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = analyse(res)
    plot = plot_label_efficiency(res, tables, folder / "label_efficiency.png")
    atomic_write_text(folder / "report.md", report_markdown(res, tables, plot.name))
    return {"report.md": folder / "report.md", "results.csv": write_csv(res, folder / "results.csv"),
            "label_efficiency.png": plot}
