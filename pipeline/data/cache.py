"""Decoded-image cache: memory-mapped .npy shards of the raw decoded arrays, so that every epoch
after the first reads no source file and decodes nothing.

What is cached is what the reader returns (float32 [C, H, W], NaN at nodata), *before*
normalisation and augmentation, so one cache serves any channel statistics or transform.

Layout of one cache, `<cache_root>/<key>/`:
    index.json          version, key, count, shards, and per image: source path, index within
                        the file, channel count asked for, shape [C, H, W] and offset in its shard
    shard_00000.npy     float32 [n_values], the images flattened one after another (plain .npy,
    shard_00001.npy     opened with mmap_mode="r"); an image never spans two shards
`key` is a sha256 over: CACHE_VERSION, the reader (its name, options and a hash of its source
code, so a reader fix invalidates old caches), and per record the absolute path, image index,
channel count, plus the file's content hash: the sha256 the manifest recorded for it when there
is one (a file changed in place, size and timestamp kept, gets a new key once prepare has seen
it), else size and mtime (`fingerprint="stat"`, no file is read) or a hash of its bytes
(`"content"`).

The cache does not trust its own bytes either: index.json carries a checksum of itself and of
every shard's values, verified when the cache is opened; a cache that fails is rebuilt, as is one
whose image list is not the one asked for.

Writes are atomic: shards and index go to a sibling `.tmp-*` folder that is renamed to `<key>/`
only once complete and fsynced, so a killed build never leaves a cache that opens. The next
build removes temp folders whose process is gone.

Images may differ in shape (X-rays of several sizes, slices of several volumes): each keeps
its own. With the default reader each file is decoded once per build (a volume's slices, a
multi-frame file's frames together).

Memmaps are opened lazily in each process (DataLoader workers included) and never pickled.

    cache = TileCache.build(records, "<data.root>/.cache")   # decodes once; later calls open it
    cache[i]                                                  # float32 [C, H, W], a copy
    read = cached_reader(records, "<data.root>/.cache", reader_options=...)
    read(record)                                              # what read_record(record, **options) gives

Records may point at one image of a multi-image file (`Record.index`: a DICOM frame, a NIfTI
slice, an .npz image) and carry the channel count to convert to (`Record.channels`); the cache
keys and stores each (path, index, channels) separately, as read_record returns it.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import inspect
import json
import math
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.data.manifest import Record, read_records
from pipeline.data.readers import read_image
from pipeline.fsutil import fsync_path

CACHE_VERSION = 3  # 2: per-image shapes in flat shards; 3: checksums of the index and every shard
INDEX = "index.json"
MAX_SHARD_BYTES = 512 * 2**20  # shard size when none is given: a few thousand tiles, or a few X-rays
_TMP_PREFIX = ".tmp-"
Item = tuple[str, "int | None", "int | None"]  # (absolute path, image index in the file, channels)


class CacheError(ValueError):
    """A cache could not be built or opened; the message says which and why."""


def _abspath(p: str | Path) -> str:
    return os.path.abspath(os.fspath(p))


def _item(r: Record | str | Path) -> Item:
    """A record (or a bare path) -> (absolute path, image index within the file, channels)."""
    if isinstance(r, Record):
        return _abspath(r.path), r.index, r.channels
    return _abspath(r), None, None


def _read(read_fn: Callable, path: str, index: int | None, channels: int | None, options: dict) -> np.ndarray:
    extra = {k: v for k, v in (("index", index), ("channels", channels)) if v is not None}
    return read_fn(path, **extra, **options)


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


def _recorded_digests(records: Sequence[Record | str | Path]) -> dict[str, str]:
    """absolute path -> the sha256 the manifest recorded for the file (records that carry one)."""
    return {_abspath(r.path): r.sha256 for r in records if isinstance(r, Record) and r.sha256}


def cache_key(records: Sequence[Record | str | Path], read_fn: Callable = read_image,
              reader_options: dict | None = None, fingerprint: str = "stat") -> str:
    """sha256 hex identifying (these images, as their files are now, in this order) x (this reader)."""
    return _key([_item(r) for r in records], read_fn, reader_options, fingerprint, _recorded_digests(records))


def _key(items: list[Item], read_fn: Callable, reader_options: dict | None,
         fingerprint: str, recorded: dict[str, str] | None = None) -> str:
    if fingerprint not in ("stat", "content"):
        raise ValueError(f"fingerprint={fingerprint!r}, expected 'stat' or 'content'")
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "fingerprint": fingerprint,
                                   **_reader_id(read_fn, reader_options or {})}, sort_keys=True).encode())
    digests: dict[str, str] = {f: f"sha256:{d}" for f, d in (recorded or {}).items()}  # a file once
    for p, index, channels in items:
        try:
            if p not in digests and fingerprint == "stat":
                st = os.stat(p)
                digests[p] = f"{st.st_size}\0{st.st_mtime_ns}"
            elif p not in digests:
                with open(p, "rb") as f:
                    digests[p] = hashlib.file_digest(f, "sha256").hexdigest()
            h.update(f"{p}\0{index}\0{channels}\0{digests[p]}\n".encode())
        except FileNotFoundError:
            raise CacheError(f"{p}: no such file (cannot key the cache; open an existing cache "
                             f"by its folder with TileCache.open)") from None
    return h.hexdigest()


class TileCache:
    """Read-only view of one built cache: `len(cache)`, `cache[i]` -> float32 [C, H, W]."""

    def __init__(self, path: Path, index: dict):
        self.path = Path(path)
        self.index = index
        self.paths: list[str] = index["paths"]
        self.indexes: list[int | None] = index["indexes"]  # image within the file (frame, slice)
        self.channels: list[int | None] = index["channels"]  # channel count asked for, None: as stored
        self.shapes: list[tuple[int, int, int]] = [tuple(s) for s in index["shapes"]]
        self.offsets: list[int] = index["offsets"]  # first value of each image in its shard
        self._starts = [shard["start"] for shard in index["shards"]]
        self._maps: dict[int, np.ndarray] = {}
        self._pid = os.getpid()
        self._position: dict[Item, int] | None = None

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """The shape every image shares, None when they differ."""
        return self.shapes[0] if len(set(self.shapes)) == 1 else None

    # ---- building and opening -------------------------------------------------------------
    @classmethod
    def build(cls, records: Sequence[Record | str | Path], cache_root: str | Path,
              read_fn: Callable[..., np.ndarray] = read_image, reader_options: dict | None = None,
              fingerprint: str = "stat", shard_size: int | None = None,
              max_shard_bytes: int = MAX_SHARD_BYTES, quiet: bool = False) -> "TileCache":
        """Open the cache of these records under `cache_root`, decoding them first if there is none.

        records: manifest Records or paths; `cache[i]` is `read_fn(records[i].path,
            index=records[i].index, channels=records[i].channels, **reader_options)` (without the
            keywords that are None); the default read_fn decodes each file once.
        shard_size: images per shard (default: as many as fit in `max_shard_bytes`).
        """
        items = [_item(r) for r in records]
        if not items:
            raise CacheError("no images to cache")
        reader_options = dict(reader_options or {})
        cache_root = Path(cache_root)
        key = _key(items, read_fn, reader_options, fingerprint, _recorded_digests(records))
        final = cache_root / key
        if (final / INDEX).is_file():
            try:
                cache = cls.open(final)
                if list(zip(cache.paths, cache.indexes, cache.channels)) != [tuple(i) for i in items]:
                    raise CacheError(f"{final}: its index lists other images (or another order) than asked for")
                return cache
            except CacheError as err:  # damaged on disk: rebuild rather than fail every run
                warnings.warn(f"rebuilding the tile cache: {err}", stacklevel=2)
                shutil.rmtree(final, ignore_errors=True)
        cache_root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(cache_root)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key[:16]}-{socket.gethostname()}-{os.getpid()}-",
                                    dir=cache_root))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a shared cache should not be
        try:
            images = _decoded(items, read_fn, reader_options)
            index = _write_shards(tmp, items, images, shard_size, max_shard_bytes, quiet)
            index.update(key=key, fingerprint=fingerprint, **_reader_id(read_fn, reader_options))
            index["checksum"] = _index_checksum(index)
            _write_synced(tmp / INDEX, json.dumps(index, indent=1).encode())
            fsync_path(tmp)
            _publish(tmp, final)
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
        if index.get("checksum") != _index_checksum(index):
            raise CacheError(f"{path}/{INDEX}: changed since it was written (checksum mismatch)")
        cache = cls(path, index)
        expected = 0
        for s, shard in enumerate(index["shards"]):  # every shard's values against their checksum
            try:
                arr = cache._shard(s)
            except (OSError, ValueError) as err:  # missing, or shorter than its header says
                raise CacheError(f"{path / shard['file']}: unreadable shard: {err}") from None
            if arr.shape != (shard["values"],) or arr.dtype != np.float32:
                raise CacheError(f"{path / shard['file']}: holds {arr.dtype} {arr.shape}, index says "
                                 f"float32 ({shard['values']},)")
            if hashlib.sha256(arr.data).hexdigest() != shard["sha256"]:
                raise CacheError(f"{path / shard['file']}: its values changed since it was written (sha256 mismatch)")
            expected += shard["count"]
        lists = (cache.paths, cache.indexes, cache.channels, cache.shapes, cache.offsets)
        if expected != index["count"] or any(len(x) != expected for x in lists):
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
        i %= n
        shape, start = self.shapes[i], self.offsets[i]
        flat = self._shard(bisect.bisect_right(self._starts, i) - 1)[start:start + math.prod(shape)]
        return np.array(flat).reshape(shape)

    def position(self, path: str | Path, index: int | None = None, channels: int | None = None) -> int | None:
        """Where the image (path, index within the file, channels) is in the cache; None if not cached."""
        if self._position is None:
            items = list(enumerate(zip(self.paths, self.indexes, self.channels)))
            self._position = {item: i for i, item in reversed(items)}
        return self._position.get((_abspath(path), index, channels))

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
        shape = list(self.shape) if self.shape else "mixed shapes"
        return f"TileCache({str(self.path)!r}, {len(self)} x {shape})"


class CachedReader:
    """`reader(record)` or `reader(path, index=None)` -> raw float32 [C, H, W]: the cached array
    when the image is cached, else the reader's (with the options the cache was built with).

    Picklable (DataLoader workers); calls with extra reader options bypass the cache.
    """

    def __init__(self, cache: TileCache, read_fn: Callable[..., np.ndarray] = read_image,
                 reader_options: dict | None = None):
        self.cache, self.read_fn, self.reader_options = cache, read_fn, dict(reader_options or {})

    def __call__(self, item: Record | str | Path, index: int | None = None, channels: int | None = None,
                 **options) -> np.ndarray:
        if isinstance(item, Record):
            item, index, channels = item.path, item.index, item.channels
        i = None if options else self.cache.position(item, index, channels)
        if i is None:
            return _read(self.read_fn, item, index, channels, {**self.reader_options, **options})
        return self.cache[i]


def cached_reader(records: Sequence[Record | str | Path], cache_root: str | Path,
                  read_fn: Callable[..., np.ndarray] = read_image, reader_options: dict | None = None,
                  quiet: bool = False, **build_options) -> CachedReader:
    """A CachedReader over `records` (cache built on first use): `read(record)` -> raw [C, H, W]."""
    cache = TileCache.build(records, cache_root, read_fn, reader_options, quiet=quiet, **build_options)
    return CachedReader(cache, read_fn, reader_options)


# ---- writing helpers -------------------------------------------------------------------------
def _decoded(items: list[Item], read_fn: Callable, reader_options: dict) -> Iterator[np.ndarray]:
    """The images of `items` in order; the default reader decodes each file once (read_records)."""
    if read_fn is not read_image:
        for path, index, channels in items:
            yield _read(read_fn, path, index, channels, reader_options)
        return
    records = [Record(Path(p), "unlabelled", -1, p, index, channels=c) for p, index, c in items]
    pending: dict[int, np.ndarray] = {}
    next_i = 0
    for i, _, img in read_records(records, **reader_options):
        if isinstance(img, Exception):
            raise img
        pending[i] = img
        while next_i in pending:  # files come grouped: hand images on in record order
            yield pending.pop(next_i)
            next_i += 1


def _write_shards(tmp: Path, items: list[Item], images: Iterator[np.ndarray], shard_size: int | None,
                  max_shard_bytes: int, quiet: bool) -> dict:
    """Write the decoded images into flat float32 shards under tmp -> the index (without key/reader
    fields). A shard closes at `shard_size` images or `max_shard_bytes`; one shard's images are
    held in memory until it is written."""
    shards, shapes, offsets, batch = [], [], [], []

    def flush():
        values = sum(a.size for a in batch)
        name = f"shard_{len(shards):05d}.npy"
        mm = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=np.float32, shape=(values,))
        at = 0
        for a in batch:
            mm[at:at + a.size] = a.ravel()
            at += a.size
        mm.flush()
        digest = hashlib.sha256(mm.data).hexdigest()  # of the values as written (not the .npy header)
        del mm
        fsync_path(tmp / name)
        shards.append({"file": name, "start": len(shapes) - len(batch), "count": len(batch), "values": values,
                       "sha256": digest})
        batch.clear()

    with tqdm(total=len(items), desc="tile cache", disable=True if quiet else None,
              leave=False) as bar:  # None: no bar off a terminal
        for i, img in enumerate(images):
            img = np.asarray(img, dtype=np.float32)
            if img.ndim != 3:
                raise CacheError(f"{items[i][0]}: reader returned shape {img.shape}, expected [C, H, W]")
            if not shards and not batch:
                _check_space(tmp, img.nbytes * len(items), len(items))
            if batch and (len(batch) == shard_size or (shard_size is None and
                                                       (sum(a.nbytes for a in batch) + img.nbytes > max_shard_bytes))):
                flush()
            offsets.append(sum(a.size for a in batch))
            shapes.append(list(img.shape))
            batch.append(img)
            bar.update()
    if batch:
        flush()
    return {"version": CACHE_VERSION, "count": len(items), "dtype": "float32", "shards": shards,
            "paths": [p for p, _, _ in items], "indexes": [i for _, i, _ in items],
            "channels": [c for _, _, c in items], "shapes": shapes, "offsets": offsets}


def _index_checksum(index: dict) -> str:
    body = {k: v for k, v in index.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_space(tmp: Path, need: int, n: int) -> None:
    free = shutil.disk_usage(tmp).free
    if need > free:
        raise CacheError(f"tile cache needs about {need / 2**30:.2f} GiB for {n} images (estimated "
                         f"from the first), {tmp.parent} has {free / 2**30:.2f} GiB free")


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
