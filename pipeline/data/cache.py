"""Decoded-image cache: memory-mapped .npy shards of the raw decoded arrays, so that every epoch
after the first reads no source file and decodes nothing.

What is cached is what the reader returns (float32 [C, H, W], NaN at nodata), *before*
normalisation and augmentation, so one cache serves any channel statistics or transform.

Layout of one cache, `<cache_root>/<key>/`:
    index.json          version, key, count, shape [C, H, W], shards, the source paths in order
    shard_00000.npy     float32 [n, C, H, W] (plain .npy, opened with mmap_mode="r")
    shard_00001.npy     ...
`key` is a sha256 over: CACHE_VERSION, the reader (its name, options and a hash of its source
code, so a reader fix invalidates old caches), and per record the absolute path plus size and
mtime (`fingerprint="stat"`, no file is read) or a hash of the file's bytes (`"content"`).

Writes are atomic: shards and index go to a sibling `.tmp-*` folder that is renamed to `<key>/`
only once complete and fsynced, so a killed build never leaves a cache that opens. The next
build removes temp folders whose process is gone.

All images must share one shape (tiles are same-size); otherwise ShapeMismatchError names the
first file that differs, and a marker makes later builds over the same files fail at once.

Memmaps are opened lazily in each process (DataLoader workers included) and never pickled.

    cache = TileCache.build(records, "<data.root>/.cache")   # decodes once; later calls open it
    cache[i]                                                  # float32 [C, H, W], a copy
    read = cached_reader(records, "<data.root>/.cache", reader_options=...)
    read(record)                                              # what read_record(record, **options) gives

Records may point at one image of a multi-image file (`Record.index`: a DICOM frame, a NIfTI
slice, an .npz image); the cache keys and stores each (path, index) separately.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.data.manifest import Record
from pipeline.data.readers import read_image
from pipeline.fsutil import fsync_path

CACHE_VERSION = 1
INDEX = "index.json"
MAX_SHARD_BYTES = 512 * 2**20  # shard size when none is given: a few thousand tiles, or a few X-rays
_TMP_PREFIX = ".tmp-"
_MISMATCH_SUFFIX = ".mismatch.json"


class CacheError(ValueError):
    """A cache could not be built or opened; the message says which and why."""


class ShapeMismatchError(CacheError):
    """Images of different shapes: the cache needs same-size images (read such records uncached)."""


def _abspath(p: str | Path) -> str:
    return os.path.abspath(os.fspath(p))


def _item(r: Record | str | Path) -> tuple[str, int | None]:
    """A record (or a bare path) -> (absolute path, image index within the file or None)."""
    if isinstance(r, Record):
        return _abspath(r.path), getattr(r, "index", None)
    return _abspath(r), None


def _read(read_fn: Callable, path: str, index: int | None, options: dict) -> np.ndarray:
    return read_fn(path, **options) if index is None else read_fn(path, index=index, **options)


def _reader_id(read_fn: Callable, reader_options: dict) -> dict:
    """What identifies the decoding: function name, options, and a hash of its source code."""
    fn = read_fn.func if isinstance(read_fn, functools.partial) else read_fn
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    h = hashlib.sha256()
    try:
        source = Path(inspect.getsourcefile(fn))
        # The readers package dispatches to its submodules: any of them can change the pixels.
        files = sorted(source.parent.glob("*.py")) if name.startswith("pipeline.data.readers") else [source]
        for f in files:
            h.update(f.read_bytes())
    except (TypeError, OSError):  # builtins, C functions: no source to hash
        h.update(b"no-source")
    options = dict(reader_options)
    if isinstance(read_fn, functools.partial):
        options = {**read_fn.keywords, **options}
    return {"reader": name, "code": h.hexdigest()[:16],
            "options": json.loads(json.dumps(options, sort_keys=True, default=str))}


def cache_key(records: Sequence[Record | str | Path], read_fn: Callable = read_image,
              reader_options: dict | None = None, fingerprint: str = "stat") -> str:
    """sha256 hex identifying (these images, as their files are now, in this order) x (this reader)."""
    return _key([_item(r) for r in records], read_fn, reader_options, fingerprint)


def _key(items: list[tuple[str, int | None]], read_fn: Callable, reader_options: dict | None,
         fingerprint: str) -> str:
    if fingerprint not in ("stat", "content"):
        raise ValueError(f"fingerprint={fingerprint!r}, expected 'stat' or 'content'")
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "fingerprint": fingerprint,
                                   **_reader_id(read_fn, reader_options or {})}, sort_keys=True).encode())
    digests: dict[str, str] = {}  # a multi-frame file is hashed once
    for p, index in items:
        try:
            if p not in digests and fingerprint == "stat":
                st = os.stat(p)
                digests[p] = f"{st.st_size}\0{st.st_mtime_ns}"
            elif p not in digests:
                with open(p, "rb") as f:
                    digests[p] = hashlib.file_digest(f, "sha256").hexdigest()
            h.update(f"{p}\0{index}\0{digests[p]}\n".encode())
        except FileNotFoundError:
            raise CacheError(f"{p}: no such file (cannot key the cache; open an existing cache "
                             f"by its folder with TileCache.open)") from None
    return h.hexdigest()


class TileCache:
    """Read-only view of one built cache: `len(cache)`, `cache[i]` -> float32 [C, H, W]."""

    def __init__(self, path: Path, index: dict):
        self.path = Path(path)
        self.index = index
        self.shape: tuple[int, int, int] = tuple(index["shape"])
        self.paths: list[str] = index["paths"]
        self.indexes: list[int | None] = index["indexes"]  # image within the file (frame, slice)
        self._shard_size = index["shards"][0]["count"]  # every shard but the last holds this many
        self._maps: dict[int, np.ndarray] = {}
        self._pid = os.getpid()
        self._position: dict[str, int] | None = None

    # ---- building and opening -------------------------------------------------------------
    @classmethod
    def build(cls, records: Sequence[Record | str | Path], cache_root: str | Path,
              read_fn: Callable[..., np.ndarray] = read_image, reader_options: dict | None = None,
              fingerprint: str = "stat", shard_size: int | None = None,
              max_shard_bytes: int = MAX_SHARD_BYTES, quiet: bool = False) -> "TileCache":
        """Open the cache of these records under `cache_root`, decoding them first if there is none.

        records: manifest Records or paths; `cache[i]` is
            `read_fn(records[i].path, index=records[i].index, **reader_options)` (no `index` when None).
        shard_size: images per shard (default: as many as fit in `max_shard_bytes`).
        """
        items = [_item(r) for r in records]
        if not items:
            raise CacheError("no images to cache")
        reader_options = dict(reader_options or {})
        cache_root = Path(cache_root)
        key = _key(items, read_fn, reader_options, fingerprint)
        final = cache_root / key
        if (final / INDEX).is_file():
            try:
                return cls.open(final)
            except CacheError as err:  # damaged on disk: rebuild rather than fail every run
                warnings.warn(f"rebuilding the tile cache: {err}", stacklevel=2)
                shutil.rmtree(final, ignore_errors=True)
        mismatch = cache_root / f"{key}{_MISMATCH_SUFFIX}"
        if mismatch.is_file():  # decoded before and found mixed shapes: fail without decoding again
            raise ShapeMismatchError(json.loads(mismatch.read_text())["message"])
        cache_root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(cache_root)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key[:16]}-{socket.gethostname()}-{os.getpid()}-",
                                    dir=cache_root))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a shared cache should not be
        try:
            index = _write_shards(tmp, items, read_fn, reader_options, shard_size, max_shard_bytes, quiet)
            index.update(key=key, fingerprint=fingerprint, **_reader_id(read_fn, reader_options))
            _write_synced(tmp / INDEX, json.dumps(index, indent=1).encode())
            fsync_path(tmp)
            _publish(tmp, final)
        except ShapeMismatchError as err:
            _write_synced(mismatch, json.dumps({"message": str(err)}).encode())
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
        return cls.open(final)

    @classmethod
    def open(cls, path: str | Path) -> "TileCache":
        """Open a built cache folder (`<cache_root>/<key>`); touches no source file."""
        path = Path(path)
        try:
            index = json.loads((path / INDEX).read_text())
        except FileNotFoundError:
            raise CacheError(f"{path}: no tile cache here (no {INDEX}; build it with TileCache.build)") from None
        except json.JSONDecodeError as err:
            raise CacheError(f"{path}/{INDEX}: corrupt: {err}") from None
        if index.get("version") != CACHE_VERSION:
            raise CacheError(f"{path}: cache version {index.get('version')} != {CACHE_VERSION}; rebuild it")
        cache = cls(path, index)
        expected = 0
        for s, shard in enumerate(index["shards"]):  # a header check per shard: no pixel is read
            try:
                arr = cache._shard(s)
            except (OSError, ValueError) as err:  # missing, or shorter than its header says
                raise CacheError(f"{path / shard['file']}: unreadable shard: {err}") from None
            if arr.shape != (shard["count"], *cache.shape) or arr.dtype != np.float32:
                raise CacheError(f"{path / shard['file']}: holds {arr.dtype} {arr.shape}, index says "
                                 f"float32 {(shard['count'], *cache.shape)}")
            expected += shard["count"]
        if expected != index["count"] or len(cache.paths) != expected or len(cache.indexes) != expected:
            raise CacheError(f"{path}: shards hold {expected} images, index lists {len(cache.paths)}")
        cache._maps = {}  # mapped again lazily, by whichever process reads first
        return cache

    # ---- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.index["count"]

    def __getitem__(self, i: int) -> np.ndarray:
        """-> float32 [C, H, W], a writable copy (the memmap itself is read-only)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a cache of {n} images")
        s, j = divmod(i % n, self._shard_size)
        return np.array(self._shard(s)[j])

    def position(self, path: str | Path, index: int | None = None) -> int | None:
        """Where the image (path, index within the file) is in the cache; None if not cached."""
        if self._position is None:
            items = list(enumerate(zip(self.paths, self.indexes)))
            self._position = {item: i for i, item in reversed(items)}
        return self._position.get((_abspath(path), index))

    def _shard(self, s: int) -> np.ndarray:
        if self._pid != os.getpid():  # forked into a DataLoader worker: map the files afresh
            self._maps, self._pid = {}, os.getpid()
        arr = self._maps.get(s)
        if arr is None:
            arr = self._maps[s] = np.load(self.path / self.index["shards"][s]["file"], mmap_mode="r")
        return arr

    def __getstate__(self) -> dict:  # spawn-started workers: send the folder, not mapped pages
        return {**self.__dict__, "_maps": {}}

    def __repr__(self) -> str:
        return f"TileCache({str(self.path)!r}, {len(self)} x {list(self.shape)})"


class CachedReader:
    """`reader(record)` or `reader(path, index=None)` -> raw float32 [C, H, W]: the cached array
    when the image is cached, else the reader's (with the options the cache was built with).

    Picklable (DataLoader workers); calls with extra reader options bypass the cache.
    """

    def __init__(self, cache: TileCache, read_fn: Callable[..., np.ndarray] = read_image,
                 reader_options: dict | None = None):
        self.cache, self.read_fn, self.reader_options = cache, read_fn, dict(reader_options or {})

    def __call__(self, item: Record | str | Path, index: int | None = None, **options) -> np.ndarray:
        if isinstance(item, Record):
            item, index = item.path, getattr(item, "index", None)
        i = None if options else self.cache.position(item, index)
        if i is None:
            return _read(self.read_fn, item, index, {**self.reader_options, **options})
        return self.cache[i]


def cached_reader(records: Sequence[Record | str | Path], cache_root: str | Path,
                  read_fn: Callable[..., np.ndarray] = read_image, reader_options: dict | None = None,
                  fallback: bool = True, quiet: bool = False, **build_options) -> Callable[..., np.ndarray]:
    """A CachedReader over `records` (cache built on first use): `read(record)` -> raw [C, H, W].

    With `fallback=True`, images of mixed shapes give a warning and a reader that reads every
    record uncached instead (same call signature).
    """
    try:
        cache = TileCache.build(records, cache_root, read_fn, reader_options, quiet=quiet, **build_options)
    except ShapeMismatchError as err:
        if not fallback:
            raise
        warnings.warn(f"tile cache not used, reading uncached: {err}", stacklevel=2)
        return _UncachedReader(read_fn, reader_options or {})
    return CachedReader(cache, read_fn, reader_options)


class _UncachedReader:
    """Same calls as CachedReader, always decoding (the fallback when no cache can be built)."""

    def __init__(self, read_fn: Callable[..., np.ndarray], reader_options: dict):
        self.read_fn, self.reader_options = read_fn, dict(reader_options)

    def __call__(self, item: Record | str | Path, index: int | None = None, **options) -> np.ndarray:
        if isinstance(item, Record):
            item, index = item.path, getattr(item, "index", None)
        return _read(self.read_fn, item, index, {**self.reader_options, **options})


# ---- writing helpers -------------------------------------------------------------------------
def _write_shards(tmp: Path, items: list[tuple[str, int | None]], read_fn: Callable, reader_options: dict,
                  shard_size: int | None, max_shard_bytes: int, quiet: bool) -> dict:
    """Decode every (path, index) into float32 shards under tmp -> the index (without key/reader fields)."""
    paths = [p for p, _ in items]
    first = np.asarray(_read(read_fn, *items[0], reader_options), dtype=np.float32)
    if first.ndim != 3:
        raise CacheError(f"{paths[0]}: reader returned shape {first.shape}, expected [C, H, W]")
    shape, n = first.shape, len(paths)
    per_shard = shard_size or max(1, max_shard_bytes // first.nbytes)
    need, free = n * first.nbytes, shutil.disk_usage(tmp).free
    if need > free:
        raise CacheError(f"tile cache needs {need / 2**30:.2f} GiB for {n} x {list(shape)} float32, "
                         f"{tmp.parent} has {free / 2**30:.2f} GiB free")
    shards = []
    with tqdm(total=n, desc="tile cache", disable=quiet, leave=False) as bar:
        for s, start in enumerate(range(0, n, per_shard)):
            count, name = min(per_shard, n - start), f"shard_{s:05d}.npy"
            mm = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=np.float32, shape=(count, *shape))
            for j in range(count):
                i = start + j
                img = first if i == 0 else _read(read_fn, *items[i], reader_options)
                if img.shape != shape:
                    where = paths[i] if items[i][1] is None else f"{paths[i]} (image {items[i][1]})"
                    raise ShapeMismatchError(
                        f"{where}: decoded shape {tuple(img.shape)} differs from {tuple(shape)} of "
                        f"the first image ({paths[0]}); the tile cache needs same-size images, "
                        f"read these records uncached")
                mm[j] = img
                bar.update()
            mm.flush()
            del mm
            fsync_path(tmp / name)
            shards.append({"file": name, "start": start, "count": count})
    return {"version": CACHE_VERSION, "count": n, "shape": list(shape), "dtype": "float32",
            "shards": shards, "paths": paths, "indexes": [index for _, index in items]}


def _publish(tmp: Path, final: Path) -> None:
    """Atomically rename the finished temp folder to its key; a concurrent twin may have won."""
    for _ in range(2):
        try:
            os.rename(tmp, final)
            fsync_path(final.parent)
            return
        except OSError:
            if (final / INDEX).is_file():
                return  # another process built the same key first: keep theirs
            if final.is_dir():  # a folder without index is no cache of ours: replace it
                shutil.rmtree(final, ignore_errors=True)
                continue
            raise
    raise CacheError(f"could not move the built cache to {final}")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())



def _remove_stale_temps(cache_root: Path) -> None:
    """Delete .tmp-* folders left by killed builds on this host (their process no longer runs)."""
    host = socket.gethostname()
    for tmp in cache_root.glob(f"{_TMP_PREFIX}*"):
        parts = tmp.name[len(_TMP_PREFIX):].split("-")
        # .tmp-<key16>-<host>-<pid>-<random>; the host may itself contain dashes
        if len(parts) < 4 or "-".join(parts[1:-2]) != host or not parts[-2].isdigit():
            continue
        try:
            os.kill(int(parts[-2]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's
