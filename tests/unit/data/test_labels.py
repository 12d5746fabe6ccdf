"""Issue 12, data side: label sets, the task a manifest trains as, bad labels refused naming the
row, group-aware multi-label splits and label fractions that keep every label."""
import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data import DataError
from pipeline.data.labels import check_labels, label_set, multi_hot, multilabel_fraction, resolve_task
from pipeline.data.manifest import Record, load_manifest
from pipeline.data.splits import assign_splits
from pipeline.stages.prepare import _build


def write_manifest(folder: Path, rows: list[tuple[str, str, str]], info: dict) -> Path:
    """rows (path, split, label) -> folder/manifest.csv (+ dataset.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "label", "group"])
        w.writerows((p, s, lab, p) for p, s, lab in rows)
    (folder / "dataset.json").write_text(json.dumps(info))
    return folder / "manifest.csv"


CARD = {"name": "toy", "task": "multilabel", "classes": ["a", "b", "c"]}


def test_label_sets_and_multi_hot():
    assert label_set(2) == (2,) and label_set((0, 2)) == (0, 2) and label_set(-1) == ()
    assert multi_hot((0, 2), 3).tolist() == [1, 0, 1] and multi_hot(-1, 3).tolist() == [0, 0, 0]


def test_auto_is_multilabel_when_the_card_says_so_or_a_row_holds_several_classes(tmp_path):
    single = write_manifest(tmp_path / "s", [("x.npy", "train", "0"), ("y.npy", "test", "1")],
                            {**CARD, "task": "multiclass"})
    assert resolve_task("auto", {**CARD, "task": "multiclass"}, single) == "multiclass"
    assert resolve_task("auto", CARD, single) == "multilabel"
    assert resolve_task("multilabel", {**CARD, "task": "multiclass"}, single) == "multilabel"
    several = write_manifest(tmp_path / "m", [("x.npy", "train", "0"), ("y.npy", "val", "0|2")],
                             {**CARD, "task": "multiclass"})
    assert check_labels(several, {**CARD, "task": "multiclass"}, "auto") == "multilabel"


def test_a_multilabel_manifest_with_task_multiclass_fails_naming_the_row(tmp_path):
    path = write_manifest(tmp_path, [("x.npy", "train", "0"), ("y.npy", "val", "0|2")], CARD)
    with pytest.raises(DataError, match=r"manifest\.csv:3 \(y\.npy\): label '0\|2' holds 2 classes, but "
                                        r"finetune\.task=multiclass"):
        check_labels(path, CARD, "multiclass")


def test_a_class_not_in_the_card_fails_naming_the_row(tmp_path):
    path = write_manifest(tmp_path, [("x.npy", "train", "0"), ("y.npy", "test", "1|3")], CARD)
    with pytest.raises(DataError, match=r"manifest\.csv:3 \(y\.npy\): label '1\|3' names class 3, but the data "
                                        r"card of 'toy' has 3 classes"):
        check_labels(path, CARD)


def test_a_multilabel_task_needs_two_classes(tmp_path):
    path = write_manifest(tmp_path, [("x.npy", "train", "0")], {**CARD, "classes": ["a"]})
    with pytest.raises(DataError, match=r"dataset\.json: a multi-label task needs at least 2 classes"):
        check_labels(path, {**CARD, "classes": ["a"]})


def test_an_empty_label_set_needs_a_card_that_allows_it(tmp_path):
    rows = [("x.npy", "train", "0|1"), ("y.npy", "train", ""), ("z.npy", "unlabelled", "")]
    path = write_manifest(tmp_path, rows, CARD)
    with pytest.raises(DataError, match=r"manifest\.csv:3 \(y\.npy\): empty label in the train split: the data "
                                        r"card of 'toy' does not allow an empty label set"):
        check_labels(path, CARD)
    # ChestX-ray14's card: "No Finding" is an explicit, empty set
    assert check_labels(path, {**CARD, "empty_label": "no finding"}) == "multilabel"
    with pytest.raises(DataError, match="a multi-class row needs one class"):
        check_labels(write_manifest(tmp_path / "mc", rows[1:], CARD), {**CARD, "task": "multiclass"})


def _npy_csv(tmp_path: Path, labels: list[str]) -> Path:
    rows = []
    for i, label in enumerate(labels):
        np.save(tmp_path / f"{i}.npy", np.full((2, 8, 8), i, np.float32))
        rows.append({"path": f"{i}.npy", "label": label, "group": f"g{i}"})
    with open(tmp_path / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    return tmp_path / "table.csv"


def test_prepare_refuses_a_multilabel_table_for_task_multiclass_and_a_class_outside_the_card(tmp_path):
    table = _npy_csv(tmp_path, ["a", "b", "a|b", "b"] * 6)
    overrides = ["data.dataset=csv", f"data.options={{manifest: {table}, classes: [a, b]}}",
                 f"data.root={tmp_path / 'prepared'}", "run.quiet=true"]
    with pytest.raises(DataError, match=r"manifest\.csv:\d+ \(.*2\.npy\): label '0\|1' holds 2 classes, but "
                                        r"finetune\.task=multiclass"):
        _build(load_config(None, [*overrides, "finetune.task=multiclass"]), tmp_path / "prepared" / "csv")
    info = _build(load_config(None, overrides), tmp_path / "prepared" / "csv")  # auto: multi-label
    assert info["task"] == "multilabel"
    # reused prepared data is checked again: finetune.task is no prepare setting
    with pytest.raises(DataError, match="finetune.task=multiclass"):
        _build(load_config(None, [*overrides, "finetune.task=multiclass"]), tmp_path / "prepared" / "csv")
    table.write_text(table.read_text().replace("1.npy,b,", "1.npy,5,"))
    with pytest.raises(ValueError, match=r"table\.csv:3: label '5' names class 5, but there are 2 classes"):
        _build(load_config(None, [*overrides, f"data.root={tmp_path / 'fresh'}"]), tmp_path / "fresh" / "csv")


def _multilabel_rows(n: int, seed: int = 0) -> list[tuple]:
    """n label sets over 6 labels: two common, two medium, two rare (7 and 4 rows)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        labs = {k for k, p in enumerate([0.6, 0.4, 0.15, 0.1]) if rng.random() < p}
        rows.append(tuple(sorted(labs)))
    for i, k in [(3, 4), (17, 4), (40, 4), (66, 4), (90, 4), (120, 4), (150, 4), (9, 5), (55, 5), (99, 5), (140, 5)]:
        rows[i] = tuple(sorted({*rows[i], k}))
    return rows


def test_label_fractions_keep_every_label_follow_the_mix_and_are_reproducible():
    labels = _multilabel_rows(200)
    records = [Record(Path(f"{i}.npy"), "train", lab, f"g{i}") for i, lab in enumerate(labels)]
    for fraction in (0.05, 0.1, 0.3):
        kept = multilabel_fraction(records, fraction, seed=0, num_classes=6)
        assert kept == multilabel_fraction(records, fraction, seed=0, num_classes=6)
        have = Counter(c for r in kept for c in r.label)
        assert set(have) == set(range(6)), f"fraction {fraction} lost labels: {have}"
        assert abs(len(kept) - fraction * 200) <= 6  # the draw plus at most one row per missing label
        if fraction >= 0.1:  # the common labels keep their share
            whole = Counter(c for lab in labels for c in lab)
            for c in (0, 1):
                assert have[c] / len(kept) == pytest.approx(whole[c] / 200, abs=0.08)
    assert multilabel_fraction(records, 1.0, 0, 6) == records


def test_multilabel_splits_keep_groups_whole_and_every_label_in_every_split():
    labels = _multilabel_rows(200, seed=1)
    groups = [f"patient{i // 3}" for i in range(200)]  # 3 images per patient
    for seed in range(5):
        split_of = assign_splits(groups, labels, (0.6, 0.2, 0.2), seed)
        assert set(split_of) == set(groups)  # one split per patient: no patient straddles splits
        per_split = {s: Counter(c for g, lab in zip(groups, labels) if split_of[g] == s for c in lab)
                     for s in ("train", "val", "test")}
        for s, have in per_split.items():
            assert set(have) == set(range(6)), f"seed {seed}: {s} lacks labels ({have})"
        images = Counter(split_of[g] for g in groups)
        assert images["train"] == pytest.approx(120, abs=15)


def test_landsat_multilabel_labels_are_every_class_over_the_share(tmp_path):
    from datasets_loader import landsat_module

    mod = landsat_module()
    tile = np.array([[1] * 6 + [5] * 8 + [6] * 2] * 16)  # 37.5 %, 50 %, 12.5 % of 256 px
    assert mod.tile_labels(tile, "multilabel", 0.1) == (1, 5, 6)
    assert mod.tile_labels(tile, "multilabel", 0.2) == (1, 5)
    assert mod.tile_labels(tile, "multiclass", 0.1) == (5,)
    with pytest.raises(ValueError, match="data.options.task='multi'"):
        mod.build(tmp_path, task="multi")
    info = mod.build(tmp_path, pool_stride=16, task="multilabel")
    assert info["task"] == "multilabel" and "water" in info["classes"]
    records = load_manifest(tmp_path / "manifest.csv")
    labelled = [r for r in records if r.split != "unlabelled"]
    sizes = Counter(len(label_set(r.label)) for r in labelled)
    assert sizes[1] and sizes[2] and sizes[3] and not sizes[0]  # real sets of 1..4 classes, none empty
    split_of = {}
    for r in labelled:
        assert split_of.setdefault(r.group, r.split) == r.split
    per_split = {s: {c for r in labelled if r.split == s for c in label_set(r.label)} for s in ("train", "val", "test")}
    assert all(v == set(range(len(info["classes"]))) for v in per_split.values())
    import rasterio

    with rasterio.open(mod.source_files()[1]) as src:
        strata = src.read(1)
    code_of = {name: code for code, name in mod.CLASS_NAMES.items()}
    for r in labelled[:60]:
        _, y, x = r.path.stem.split("_")
        codes, counts = np.unique(strata[int(y):int(y) + 16, int(x):int(x) + 16], return_counts=True)
        over = {int(c) for c, n in zip(codes, counts) if n >= 0.1 * 256}
        assert {code_of[info["classes"][k]] for k in label_set(r.label)} == over & {code_of[c] for c in info["classes"]}
