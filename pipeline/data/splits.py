"""Train/val/test splits drawn per group (file, patient, volume, scene block) and stratified by class.

    assign_splits(groups, labels, fractions, seed) -> {group: split}
    split_counts(records, classes)                 -> per class and split: images and groups
    missing_from_splits(counts)                    -> [(class, split, its group count)]

A group never straddles splits (no patient in train and test). Within that constraint the class
mix of every split follows the whole set's: scikit-learn's StratifiedGroupKFold cuts the groups
into K folds of balanced class mix, with K chosen so that whole folds make up the fractions
(0.6/0.2/0.2 -> 5 folds: 3, 1, 1; 0.7/0.15/0.15 -> 20 folds: 14, 3, 3), and folds go to test and
val first where they bring a class that split still lacks. A class with fewer groups than there
are splits cannot be in every split: `missing_from_splits` names it for prepare to refuse.

Multi-label rows (tuples of classes) are stratified on every label at once: the groups, each
with the set of labels its rows hold (and "no label" for a group with an empty set), are cut into
the K folds by iterative stratification (Sechidis et al. 2011, iterative-stratification's
MultilabelStratifiedKFold), which places the rarest labels first. Each group counts once per
label, whatever its image count.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

SPLIT_NAMES = ("train", "val", "test")
MAX_FOLDS = 20


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"split_fractions={list(fractions)}: three non-negative numbers (train, val, "
                         f"test) summing to 1")
    return tuple(float(f) for f in fractions)


def assign_splits(groups: Sequence[str], labels: Sequence, fractions: Sequence[float],
                  seed: int) -> dict[str, str]:
    """Rows' groups and labels -> {group: "train" | "val" | "test"}.

    labels: per row a class index, a tuple of them (multi-label: any tuple makes the whole set
        multi-label, stratified on every label by iterative stratification of the groups), or
        None / -1 / () for a row without one.
    fractions: (train, val, test) shares of the groups' images, summing to 1.
    ValueError for fractions that are not three non-negative numbers summing to 1.
    """
    fractions = check_fractions(fractions)
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
    names = sorted(set(groups))
    wanted = [s for s, f in zip(SPLIT_NAMES, fractions) if f > 0]
    if any(isinstance(lab, tuple) for lab in labels):
        return _assign_multilabel(groups, labels, fractions, seed, names, wanted)
    strata = _strata(labels)
    if max(Counter(strata.tolist()).values()) < 2:  # no class with two rows: nothing to stratify
        strata = np.zeros(len(strata), int)
    # StratifiedGroupKFold needs K <= groups, and K <= the rows of the largest class
    limit = min(MAX_FOLDS, len(names), max(Counter(strata.tolist()).values()))
    if limit < 2 or len(wanted) == 1:
        return {g: wanted[0] for g in names}
    k, per_split = _folds(fractions, limit)
    fold_of_row = np.empty(len(groups), int)
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits":
        warnings.simplefilter("ignore", UserWarning)  # prepare's own check names the class
        from sklearn.model_selection import StratifiedGroupKFold

        folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        for f, (_, rows) in enumerate(folds.split(np.zeros(len(groups)), strata, groups)):
            fold_of_row[rows] = f
    classes_of_fold = [set() for _ in range(k)]
    for f, y in zip(fold_of_row, strata):
        classes_of_fold[f].add(y)
    split_of_fold = _folds_to_splits(classes_of_fold, per_split, seed)
    return {g: split_of_fold[f] for g, f in zip(groups, fold_of_row)}


def _assign_multilabel(groups: Sequence[str], labels: Sequence, fractions: tuple[float, float, float],
                       seed: int, names: list[str], wanted: list[str]) -> dict[str, str]:
    """assign_splits for multi-label rows: folds of groups by iterative stratification."""
    limit = min(MAX_FOLDS, len(names))
    if limit < 2 or len(wanted) == 1:
        return {g: wanted[0] for g in names}
    k, per_split = _folds(fractions, limit)
    classes = sorted({c for lab in labels for c in _as_set(lab)})
    column = {c: i for i, c in enumerate(classes)}
    row_of = {g: i for i, g in enumerate(names)}
    y = np.zeros((len(names), len(classes) + 1), bool)  # [groups, labels + "no label"]
    for g, lab in zip(groups, labels):
        members = _as_set(lab)
        y[row_of[g], [column[c] for c in members] if members else [len(classes)]] = True
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    fold_of_group = np.empty(len(names), int)
    folds = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, rows) in enumerate(folds.split(np.zeros(len(names)), y)):
        fold_of_group[rows] = f
    classes_of_fold = [set() for _ in range(k)]
    for i, f in enumerate(fold_of_group):
        classes_of_fold[f] |= {classes[j] for j in np.flatnonzero(y[i, :-1])}
    split_of_fold = _folds_to_splits(classes_of_fold, per_split, seed)
    return {g: split_of_fold[fold_of_group[row_of[g]]] for g in names}


def _as_set(label) -> tuple:
    if isinstance(label, tuple):
        return label
    return () if label is None or label == "" or int(label) < 0 else (int(label),)


def _strata(labels: Sequence) -> np.ndarray:
    """Per row one class to stratify on: the class itself, a multi-label row's rarest class, -1 for none."""
    flat = Counter(c for lab in labels for c in (lab if isinstance(lab, tuple) else [lab]))
    out = []
    for lab in labels:
        if isinstance(lab, tuple):
            out.append(min(lab, key=lambda c: (flat[c], c)) if lab else -1)
        else:
            out.append(-1 if lab is None or lab == "" else int(lab))
    return np.asarray(out)


def _folds(fractions: tuple[float, float, float], limit: int) -> tuple[int, dict[str, int]]:
    """-> (K <= limit folds, folds per split) whose shares come closest to `fractions`; every
    split with a non-zero fraction gets a fold while K allows."""
    wanted = [s for s, f in zip(SPLIT_NAMES, fractions) if f > 0]
    best = None
    for k in range(max(2, len(wanted)), limit + 1):
        counts = _round_to(fractions, k)
        error = sum(abs(c / k - f) for c, f in zip(counts, fractions))
        if best is None or error < best[0] - 1e-9:
            best = (error, k, counts)
    if best is None:  # fewer groups than splits: train first, then test, then val
        first = [s for s in ("train", "test", "val") if s in wanted][:limit]
        return limit, {s: int(s in first) for s in SPLIT_NAMES}
    return best[1], dict(zip(SPLIT_NAMES, best[2]))


def _round_to(fractions: tuple[float, float, float], k: int) -> list[int]:
    """Largest-remainder rounding of fractions * k, at least 1 for every non-zero fraction."""
    raw = [f * k for f in fractions]
    counts = [max(1 if f > 0 else 0, math.floor(r)) for f, r in zip(fractions, raw)]
    while sum(counts) < k:
        i = max(range(3), key=lambda j: (raw[j] - counts[j], fractions[j]))
        counts[i] += 1
    while sum(counts) > k:
        i = max((j for j in range(3) if counts[j] > 1), key=lambda j: counts[j] - raw[j])
        counts[i] -= 1
    return counts


def _folds_to_splits(classes_of_fold: list[set], per_split: dict[str, int], seed: int) -> list[str]:
    """Folds -> splits: test and val (the small ones) take, one fold at a time, the fold that
    brings the most classes they lack, weighted by rarity, without taking from train the last
    fold of a class; train keeps the rest."""
    k = len(classes_of_fold)
    folds_with = Counter(c for fold in classes_of_fold for c in fold)
    order = list(np.random.default_rng(seed).permutation(k))
    out: list[str | None] = [None] * k
    for split in ("test", "val"):
        have: set = set()
        for _ in range(per_split[split]):
            free = [f for f in order if out[f] is None]
            left = Counter(c for f in free for c in classes_of_fold[f])

            def score(f):
                gain = sum(1 / folds_with[c] for c in classes_of_fold[f] - have)
                loss = sum(1 / folds_with[c] for c in classes_of_fold[f] if left[c] == 1)
                return gain - loss

            pick = max(free, key=score)  # max keeps the first of equals: the seeded order
            out[pick] = split
            have |= classes_of_fold[pick]
    return [s or "train" for s in out]


def split_counts(records, classes: Sequence[str]) -> dict[str, dict[str, dict[str, int]]]:
    """Labelled records -> {class name: {split: {"images": n, "groups": n}}} for every class and
    split in SPLIT_NAMES (zeros included)."""
    images: dict = defaultdict(Counter)
    groups: dict = defaultdict(lambda: defaultdict(set))
    for r in records:
        if r.split not in SPLIT_NAMES:
            continue
        for c in r.label if isinstance(r.label, tuple) else (r.label,):
            if 0 <= c < len(classes):
                images[c][r.split] += 1
                groups[c][r.split].add(r.group)
    return {name: {s: {"images": images[c][s], "groups": len(groups[c][s])} for s in SPLIT_NAMES}
            for c, name in enumerate(classes)}


def missing_from_splits(counts: dict[str, dict[str, dict[str, int]]]) -> list[tuple[str, str, int]]:
    """[(class, split it is missing from, its groups over all splits)] for the splits that hold
    any labelled image."""
    used = {s for per_split in counts.values() for s, n in per_split.items() if n["images"]}
    return [(name, s, sum(n["groups"] for n in per_split.values()))
            for name, per_split in counts.items() for s in SPLIT_NAMES
            if s in used and not per_split[s]["images"]]
