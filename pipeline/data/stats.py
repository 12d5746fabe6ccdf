"""Per-channel statistics from the data itself (never ImageNet's), and the normaliser that uses them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from pipeline.data.manifest import Record, read_record
from pipeline.data.readers import read_image

STATS_VERSION = 1


def compute_channel_stats(paths: Iterable[Path | Record], channel_names: list[str] | None = None,
                          sample_per_channel: int = 200_000, percentiles=(1.0, 99.0),
                          seed: int = 0, quiet: bool = False, reader_options: dict | None = None) -> dict:
    """One streaming pass: exact mean/std (float64 sums) and percentiles from a sample.

    NaN pixels (nodata) are excluded. Each file contributes an equal share of at most
    `sample_per_channel` values per channel, so memory stays bounded for any pool size.
    """
    paths = list(paths)
    rng = np.random.default_rng(seed)
    per_file = max(1, sample_per_channel // max(1, len(paths)))
    n = s1 = s2 = None
    samples: list[list[np.ndarray]] = []
    for path in tqdm(paths, desc="channel stats", disable=quiet, leave=False):
        img = (read_record(path, **(reader_options or {})) if isinstance(path, Record)
               else read_image(path, **(reader_options or {})))  # [C, H, W]
        flat = img.reshape(img.shape[0], -1).astype(np.float64)
        if n is None:
            n, s1, s2 = (np.zeros(img.shape[0]) for _ in range(3))
            samples = [[] for _ in range(img.shape[0])]
        elif flat.shape[0] != n.shape[0]:
            raise ValueError(f"{getattr(path, 'path', path)}: {flat.shape[0]} channels, earlier images had {n.shape[0]}")
        ok = np.isfinite(flat)
        n += ok.sum(1)
        s1 += np.where(ok, flat, 0).sum(1)
        s2 += np.where(ok, flat * flat, 0).sum(1)
        for c in range(flat.shape[0]):
            vals = flat[c][ok[c]]
            samples[c].append(vals if vals.size <= per_file else rng.choice(vals, per_file, replace=False))
    if n is None:
        raise ValueError("no images to compute channel statistics from")
    if (n == 0).any():
        raise ValueError(f"channels {np.flatnonzero(n == 0).tolist()} have no valid pixel")
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
        "p_low": [float(np.percentile(np.concatenate(c), percentiles[0])) for c in samples],
        "p_high": [float(np.percentile(np.concatenate(c), percentiles[1])) for c in samples],
        "pixels": n.astype(int).tolist(),
    }


def save_stats(stats: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(stats, indent=2))


def load_stats(path: str | Path) -> dict:
    stats = json.loads(Path(path).read_text())
    if stats.get("version") != STATS_VERSION:
        raise ValueError(f"{path}: stats version {stats.get('version')} != {STATS_VERSION}")
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
