"""The sweep's grid: arms, nested stratified label subsets, repeated group-aware splits."""
from collections import Counter
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data.manifest import Record
from pipeline.sweep import grid


def records(sizes: dict[int, int], split: str = "train", per_group: int = 1, prefix: str = "") -> list[Record]:
    out = []
    for label, n in sizes.items():
        out += [Record(Path(f"{prefix}{label}_{i}.npy"), split, label, f"{prefix}g{label}_{i // per_group}")
                for i in range(n)]
    return out


def test_subsets_are_nested_stratified_and_never_leave_a_class_out():
    recs = records({0: 200, 1: 40, 2: 3})
    subsets = grid.nested_subsets(recs, [0.05, 0.1, 0.25, 1.0], seed=3)
    fractions = sorted(subsets)
    for small, large in zip(fractions, fractions[1:]):
        assert set(subsets[small].records) <= set(subsets[large].records)
    for f, sub in subsets.items():
        counts = Counter(r.label for r in sub.records)
        assert counts == {c: max(1, round(f * n)) for c, n in {0: 200, 1: 40, 2: 3}.items()}
        assert sub.per_class == dict(counts)
    # 5% and 10% of 3 images round to none: raised to one, and said
    assert subsets[0.05].raised == {2: 0} and subsets[0.1].raised == {2: 0} and subsets[0.25].raised == {}
    assert subsets[1.0].records == recs


def test_subsets_depend_on_the_seed_only():
    recs = records({0: 50, 1: 50})
    assert grid.nested_subsets(recs, [0.2], 1)[0.2].records == grid.nested_subsets(recs, [0.2], 1)[0.2].records
    assert grid.nested_subsets(recs, [0.2], 1)[0.2].records != grid.nested_subsets(recs, [0.2], 2)[0.2].records


def _dataset():
    """Labelled images in groups of 4 (blocks), and an unlabelled pool covering the first half of them."""
    labelled = records({0: 160, 1: 80, 2: 40}, per_group=4)
    for i, r in enumerate(labelled):
        labelled[i] = Record(r.path, ("train", "val", "test")[i % 3], r.label, r.group)
    pool_groups = sorted({r.group for r in labelled})[::2]
    pool = [Record(Path(f"u_{g}.npy"), "unlabelled", -1, g) for g in pool_groups]
    return labelled + pool, set(pool_groups)


def test_repetitions_redraw_group_aware_splits_whose_test_pretraining_never_saw():
    recs, pool_groups = _dataset()
    reps = grid.repetition_splits(recs, 3, test_fraction=0.2, val_fraction=0.2, seed=0, num_classes=3)
    tests = []
    for rep in reps:
        groups = {part: {r.group for r in getattr(rep, part)} for part in ("train", "val", "test")}
        assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
        assert not (groups["val"] & groups["test"])
        assert not groups["test"] & pool_groups  # no test pixel reached pretraining
        assert len(rep.train) + len(rep.val) + len(rep.test) == 280
        assert len(rep.test) == pytest.approx(0.2 * 280, abs=12) and len(rep.val) == pytest.approx(0.2 * 280, abs=12)
        assert {r.label for r in rep.test} == {0, 1, 2}
        tests.append(frozenset(groups["test"]))
    assert len(set(tests)) == 3  # never one fixed test set


def test_a_test_share_the_unseen_groups_cannot_give_is_refused_with_the_numbers():
    recs, _ = _dataset()
    with pytest.raises(ValueError, match=r"test_fraction=0.6 asks for ~168 test images, but only 140"):
        grid.repetition_splits(recs, 1, test_fraction=0.6, val_fraction=0.2, seed=0, num_classes=3)


def test_arms_cross_inits_and_heads_and_always_add_the_baselines():
    cfg = load_config(None, ["sweep.inits={scratch: scratch, mae: 'pretrain:mae', simmim: 'pretrain:simmim'}",
                             "sweep.heads={vit: {backbone: vit_debug}, swin: {backbone: swin_debug, window_size: 2},"
                             " probe: {backbone: vit_debug, mode: probe}}"])
    arms, skipped = grid.arms(cfg.sweep, patch_size=2, window_size=None)
    keys = [a.key for a in arms]
    assert keys == ["scratch-vit", "mae-vit", "simmim-vit", "scratch-swin", "simmim-swin", "mae-probe",
                    "simmim-probe", "resnet18", "logistic_regression", "random_forest"]
    assert dict(skipped).keys() == {"mae-swin", "scratch-probe"}
    assert "cannot pretrain backbone 'swin_debug'" in dict(skipped)["mae-swin"]
    by = {a.key: a for a in arms}
    assert by["simmim-swin"].window_size == 2 and by["mae-vit"].window_size is None
    assert by["mae-vit"].label == "ViT (vit_debug) + MAE" and by["scratch-swin"].label == "Swin (swin_debug) from scratch"
    assert [a.key for a in arms if a.baseline] == ["resnet18", "logistic_regression", "random_forest"]
    assert all(grid.Arm.from_dict(a.to_dict()) == a for a in arms)


def test_the_cnn_baseline_is_not_doubled_when_it_is_also_a_head():
    cfg = load_config(None, ["sweep.inits={scratch: scratch}", "sweep.heads={cnn: {backbone: resnet18}}"])
    arms, _ = grid.arms(cfg.sweep, 2, None)
    assert [a.key for a in arms] == ["scratch-cnn", "logistic_regression", "random_forest"]


def test_trials_cover_the_grid_in_whole_cells():
    cfg = load_config(None, ["sweep.inits={scratch: scratch}", "sweep.heads={vit: {backbone: vit_debug}}",
                             "sweep.fractions=[0.1, 1.0]", "sweep.repetitions=2", "sweep.seeds=[0, 1, 2]"])
    arms, _ = grid.arms(cfg.sweep, 2, None)
    trials = grid.trials(arms, 2, cfg.sweep.fractions, cfg.sweep.seeds)
    assert len(trials) == len(arms) * 2 * 2 * 3 == len({t.id for t in trials})
    assert [t.arm.key for t in trials[:len(arms)]] == [a.key for a in arms]  # the first cell is whole
    assert trials[0].id == "scratch-vit/rep0-frac0.1-seed0"
