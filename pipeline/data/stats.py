"""Per-channel statistics from the data itself (never ImageNet's), and the normaliser that uses them."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from pipeline.data import DataError
from pipeline.data.manifest import Record, read_records
from pipeline.data.readers import read_units

# 2: mean/std are those of the clipped values the Normalizer standardises (1: of raw values)
# 3: physical values (GeoTIFF scales/offsets applied, as DICOM rescale and NIfTI scl were), and
#    `units` per channel
STATS_VERSION = 3
MIXED = "mixed: "


def compute_channel_stats(paths: Iterable[Path | Record], channel_names: list[str] | None = None,
                          sample_per_channel: int = 200_000, percentiles=(1.0, 99.0),
                          seed: int = 0, quiet: bool = False, reader_options: dict | None = None) -> dict:
    """Per-channel statistics of exactly what the Normalizer computes with, in two passes.

    Pass 1 draws a sample (each image an equal share of at most `sample_per_channel` values per
    channel) for the `percentiles` p_low/p_high. Pass 2 sums, exactly in float64, the values
    clipped to [p_low, p_high]: `mean`/`std` are those of the clipped values, so the normalised
    data has mean 0 and std 1 per channel however many outliers the raw data has.
    NaN pixels (nodata) are left out everywhere. Each file is decoded once per pass.
    ValueError for no images, channel counts that differ, or a channel without a valid pixel.
    """
    records = [p if isinstance(p, Record) else Record(Path(p), "unlabelled", -1, str(p)) for p in paths]
    if not records:
        raise ValueError("no images to compute channel statistics from")
    rng = np.random.default_rng(seed)
    per_image = max(1, sample_per_channel // len(records))
    samples: list[list[np.ndarray]] | None = None
    for flat, ok in _pixels(records, reader_options, quiet, "channel percentiles"):
        if samples is None:
            samples = [[] for _ in range(len(flat))]
        for c, values in enumerate(flat):
            vals = values[ok[c]]
            samples[c].append(vals if vals.size <= per_image else rng.choice(vals, per_image, replace=False))
    empty = [c for c, chunks in enumerate(samples) if not sum(len(v) for v in chunks)]
    if empty:
        raise ValueError(f"channels {empty} have no valid pixel")
    low = np.array([np.percentile(np.concatenate(c), percentiles[0]) for c in samples])
    high = np.array([np.percentile(np.concatenate(c), percentiles[1]) for c in samples])
    n = s1 = s2 = 0.0
    for flat, ok in _pixels(records, reader_options, quiet, "channel mean/std"):
        clipped = np.where(ok, np.clip(flat, low[:, None], high[:, None]), 0.0)  # [C, H*W]
        n, s1, s2 = n + ok.sum(1), s1 + clipped.sum(1), s2 + (clipped * clipped).sum(1)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0))
    names = channel_names or [f"band_{i}" for i in range(len(mean))]
    if len(names) != len(mean):
        raise ValueError(f"{len(names)} channel names for {len(mean)} channels")
    return {
        "version": STATS_VERSION,
        "channels": names,
        "mean": mean.tolist(),
        "std": np.maximum(std, 1e-6).tolist(),
        "percentiles": list(percentiles),
        "p_low": low.tolist(),
        "p_high": high.tolist(),
        "pixels": n.astype(int).tolist(),
    }


def channel_units(records: list[Record], reader_options: dict | None = None) -> list[str]:
    """Per channel, the unit of its values over `records` (readers.read_units: one header read per
    file): the unit every file declares for it, or "mixed: HU (12 files), not declared (3 files)"
    when files disagree. ReadError for a file whose header cannot be read."""
    counts: list[Counter] = []
    for rec in {r.path: r for r in reversed(records)}.values():  # the first record of each file
        units = read_units(rec.path, rec.index, rec.channels, **(reader_options or {}))
        counts += [Counter() for _ in range(len(units) - len(counts))]
        for c, unit in enumerate(units):
            counts[c][unit] += 1
    return [next(iter(c)) if len(c) == 1 else MIXED + ", ".join(f"{u} ({n} files)" for u, n in sorted(c.items(), key=lambda x: (-x[1], x[0])))
            for c in counts]


def _pixels(records: list[Record], reader_options: dict | None, quiet: bool, desc: str):
    """-> per image (float64 values [C, H*W], finite mask [C, H*W]); every image must share C."""
    channels = None
    for _, rec, img in tqdm(read_records(records, **(reader_options or {})), total=len(records), desc=desc,
                            disable=True if quiet else None, leave=False):  # None: off a terminal too
        if isinstance(img, Exception):
            raise img
        if channels is not None and img.shape[0] != channels:
            raise ValueError(f"{rec.path}: {img.shape[0]} channels, earlier images had {channels}")
        channels = img.shape[0]
        flat = img.reshape(channels, -1).astype(np.float64)
        yield flat, np.isfinite(flat)


def save_stats(stats: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(stats, indent=2))


def load_stats(path: str | Path) -> dict:
    stats = json.loads(Path(path).read_text())
    if stats.get("version") != STATS_VERSION:
        raise DataError(f"{path}: stats version {stats.get('version')}, this mimflow writes {STATS_VERSION}: "
                        "the data was prepared by an older version; run `mimflow prepare` (or `mimflow run`) again")
    return stats


class Normalizer:
    """Clip to the data's percentiles, then standardise; nodata (NaN) becomes 0 (the mean)."""

    def __init__(self, stats: dict):
        self.channels = list(stats["channels"])
        shape = (-1, 1, 1)
        self.mean = np.asarray(stats["mean"], np.float32).reshape(shape)
        self.std = np.asarray(stats["std"], np.float32).reshape(shape)
        self.low = np.asarray(stats["p_low"], np.float32).reshape(shape)
        self.high = np.asarray(stats["p_high"], np.float32).reshape(shape)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        """[C, H, W] or [N, C, H, W] raw -> same shape, float32 normalised."""
        c = img.shape[-3]
        if c != len(self.channels):
            raise ValueError(f"image has {c} channels, statistics are for {len(self.channels)} "
                             f"({', '.join(self.channels)})")
        out = (np.clip(img.astype(np.float32), self.low, self.high) - self.mean) / self.std
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
