"""How sure is a sweep's table? Intervals, paired differences and the minimum detectable effect.

The unit of evidence is one trial: an arm trained at one label fraction on one repetition of the
split with one seed, scored on that repetition's test items. For one fraction the inputs are, per
repetition r, the test labels y_r [n_r] and an array correct_r [A, S, n_r] (arm, seed, item):
1.0 for a right prediction, 0.0 for a wrong one, NaN for a trial that has not run.

Point estimate of a cell: the mean over repetitions and seeds of the trial's metric.

Interval: a hierarchical (multi-stage) percentile bootstrap (Efron & Tibshirani 1993, ch. 13;
Davison & Hinkley 1997, sec. 3.8): every replicate draws the repetitions with replacement, then
within each drawn repetition its seeds with replacement and its test items with replacement
*within class* (a stratified bootstrap: every class keeps its test count, so balanced accuracy is
always defined). All arms share each replicate's draws, so the difference of two arms is a paired
difference on the same splits, seeds and items, and its interval is the percentile interval of
the replicate differences.

Minimum detectable effect (Bloom 1995, "Minimum detectable effects", Evaluation Review 19(5)):
MDE = (z_{1 - alpha/2} + z_{power}) x SE, with SE the bootstrap standard error of the paired
difference: the smallest true difference a two-sided test at level alpha would find with the
given power at this test size and this spread over splits and seeds (2.80 x SE at 95% / 80%).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

METRICS = ("balanced_accuracy", "accuracy")


def _check(labels: list[np.ndarray], correct: list[np.ndarray]) -> None:
    if len(labels) != len(correct) or not labels:
        raise ValueError(f"{len(labels)} label arrays for {len(correct)} correctness arrays (one per repetition)")
    for r, (y, c) in enumerate(zip(labels, correct)):
        if c.ndim != 3 or c.shape[2] != len(y):
            raise ValueError(f"repetition {r}: correctness {c.shape} is not [arms, seeds, {len(y)} items]")
    if len({c.shape[:2] for c in correct}) != 1:
        raise ValueError(f"arms x seeds differ between repetitions: {[c.shape[:2] for c in correct]}")


def _scores(y: np.ndarray, c: np.ndarray, weights: np.ndarray, num_classes: int, metric: str) -> np.ndarray:
    """y [n], c [A, S, n], weights [B, n] (item counts of each replicate) -> metric [B, A, S].

    balanced_accuracy: mean over all `num_classes` classes of the weighted recall; a class with no
    test item counts as 0, as in pipeline.metrics (the same test set for every arm, so it moves
    no difference). accuracy: weighted share of right predictions."""
    A, S, n = c.shape
    flat = c.reshape(A * S, n)
    if metric == "accuracy":
        return (weights @ flat.T / n).reshape(-1, A, S)
    if metric != "balanced_accuracy":
        raise ValueError(f"metric {metric!r}: one of {METRICS}")
    total = np.zeros((weights.shape[0], A * S))
    for k in range(num_classes):
        idx = np.flatnonzero(y == k)
        if len(idx):
            total += weights[:, idx] @ flat[:, idx].T / len(idx)
    return (total / num_classes).reshape(-1, A, S)


def trial_scores(labels: list[np.ndarray], correct: list[np.ndarray], num_classes: int, metric: str) -> np.ndarray:
    """-> metric of every trial [R, A, S] (NaN where it has not run), without resampling."""
    _check(labels, correct)
    return np.stack([_scores(y, c, np.ones((1, len(y))), num_classes, metric)[0] for y, c in zip(labels, correct)])


def _stratified_weights(y: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[B, n] item counts: each class's items drawn with replacement, its count kept."""
    w = np.zeros((n_boot, len(y)))
    for k in np.unique(y):
        idx = np.flatnonzero(y == k)
        w[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_boot)
    return w


def bootstrap(labels: list[np.ndarray], correct: list[np.ndarray], num_classes: int, metric: str,
              n_boot: int, seed: int) -> np.ndarray:
    """-> [B, A] replicates of each arm's mean metric over repetitions and seeds.

    The draws depend only on (seed, B, the test sets, the number of seeds), never on the arms:
    calls with the same seed resample the same repetitions, seeds and items for any arms, which
    is what makes differences between calls paired. NaN trials are left out of a replicate's mean.
    """
    _check(labels, correct)
    rng = np.random.default_rng(seed)
    R, S = len(labels), correct[0].shape[1]
    reps = rng.integers(0, R, size=(n_boot, R))
    seeds = rng.integers(0, S, size=(n_boot, R, S))
    weights = [_stratified_weights(y, n_boot, rng) for y in labels]
    scores = np.stack([_scores(y, c, w, num_classes, metric) for y, c, w in zip(labels, correct, weights)],
                      axis=1)  # [B, R, A, S]
    b = np.arange(n_boot)[:, None, None]
    drawn = scores[b, reps[:, :, None], :, seeds]  # [B, R, S, A]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: an arm with no trial yet, NaN is the answer
        return np.nanmean(drawn, axis=(1, 2))


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron & Tibshirani 1993, eq. 13.5) -> (low, high); NaNs
    (no trial) give (nan, nan)."""
    x = replicates[~np.isnan(replicates)]
    if not len(x):
        return float("nan"), float("nan")
    lo, hi = np.quantile(x, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def minimum_detectable_effect(se: float, confidence: float = 0.95, power: float = 0.8) -> float:
    """(z_{1 - alpha/2} + z_{power}) x se, alpha = 1 - confidence (Bloom 1995): 2.8016 x se at 95% / 80%."""
    return float((norm.ppf(1 - (1 - confidence) / 2) + norm.ppf(power)) * se)


@dataclass
class Cell:
    """One arm at one fraction: mean metric, interval, trials behind it."""
    mean: float
    low: float
    high: float
    trials: int


@dataclass
class Difference:
    """Arm a minus arm b on the same splits, seeds and items."""
    a: int
    b: int
    mean: float
    low: float
    high: float
    se: float
    mde: float
    pairs: int  # (repetition, seed) units both arms have


def cells(labels: list[np.ndarray], correct: list[np.ndarray], num_classes: int, metric: str, n_boot: int,
          seed: int, confidence: float) -> tuple[list[Cell], np.ndarray]:
    """-> (a Cell per arm, the replicates [B, A] the differences are drawn from)."""
    per_trial = trial_scores(labels, correct, num_classes, metric)  # [R, A, S]
    replicates = bootstrap(labels, correct, num_classes, metric, n_boot, seed)
    out = []
    for a in range(per_trial.shape[1]):
        values = per_trial[:, a, :]
        lo, hi = percentile_interval(replicates[:, a], confidence)
        n = int((~np.isnan(values)).sum())
        out.append(Cell(float(np.nanmean(values)) if n else float("nan"), lo, hi, n))
    return out, replicates


def paired_difference(labels: list[np.ndarray], correct: list[np.ndarray], a: int, b: int, num_classes: int,
                      metric: str, n_boot: int, seed: int, confidence: float, power: float) -> Difference:
    """Arm a minus arm b over the (repetition, seed) units both have, with the percentile interval,
    bootstrap standard error and minimum detectable effect of the difference."""
    pair = []
    for c in correct:
        both = np.isnan(c[[a, b]]).any(axis=2).any(axis=0)  # [S]: a unit either lacks
        c2 = c[[a, b]].copy()
        c2[:, both, :] = np.nan
        pair.append(c2)
    per_trial = trial_scores(labels, pair, num_classes, metric)  # [R, 2, S]
    diffs = (per_trial[:, 0] - per_trial[:, 1]).ravel()
    diffs = diffs[~np.isnan(diffs)]
    if not len(diffs):
        nan = float("nan")
        return Difference(a, b, nan, nan, nan, nan, nan, 0)
    reps = bootstrap(labels, pair, num_classes, metric, n_boot, seed)
    d = reps[:, 0] - reps[:, 1]
    lo, hi = percentile_interval(d, confidence)
    se = float(np.nanstd(d, ddof=1))
    return Difference(a, b, float(diffs.mean()), lo, hi, se, minimum_detectable_effect(se, confidence, power),
                      len(diffs))


def verdict(name_a: str, name_b: str, d: Difference, power: float) -> str:
    """The difference in plain words (metric values as fractions in, points out)."""
    pts = lambda x: f"{100 * x:.1f}"  # noqa: E731
    if d.pairs == 0:
        return f"{name_a} vs {name_b}: no paired trials yet"
    if d.low > 0:
        return f"{name_a} beats {name_b} by {pts(d.mean)} points [{pts(d.low)}, {pts(d.high)}]"
    if d.high < 0:
        return f"{name_b} beats {name_a} by {pts(-d.mean)} points [{pts(-d.high)}, {pts(-d.low)}]"
    return (f"{name_a} vs {name_b}: no difference detectable at this test size ({'+' if d.mean >= 0 else ''}"
            f"{pts(d.mean)} points [{pts(d.low)}, {pts(d.high)}]; a true difference under {pts(d.mde)} points "
            f"would be missed more than {100 - round(100 * power)}% of the time)")
