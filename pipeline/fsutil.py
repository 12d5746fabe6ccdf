"""Durable file-system writes: the one place files are written atomically, hashed and locked.

A write goes to a temporary sibling, is fsynced and renamed over the target, so a kill mid-write
never leaves a broken file; readers see the old or the new content, nothing in between. A folder
lock keeps a second writer out of a run's folder.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder's entry list: makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """write(tmp_path) then fsync + rename onto `path` (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would; mkstemp's 0600 hides results on shared disks
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # writers that replace the file (safetensors) reset the mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is None:  # a failed write() names no file: name the one being written
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock; the message names its host and PID."""


_HELD: dict[str, list] = {}  # lock path -> [fd, depth]: a process may re-enter its own lock


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "folder") -> Iterator[None]:
    """Hold an exclusive lock on `folder` (a `.mimflow.lock` file inside it) while the block runs.

    The lock is an OS file lock (flock): it dies with its process, so a crashed holder never
    blocks the next run, which takes it over and says from whom. A second live process is refused
    at once with FolderLockedError naming the holder's host, PID, start time and command.
    Re-entrant within one process. (flock is local to a host, and on NFS only as good as the
    server's lock support.)
    """
    path = Path(folder) / ".mimflow.lock"
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise FolderLockedError(
            f"{what} {folder} is being written by PID {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"(since {holder.get('since', '?')}: {holder.get('command', '?')}); wait for it to end, or use "
            "another run.name") from None
    previous = _holder(fd)
    if previous:  # left by a process that died holding it (a clean exit empties the file)
        print(f"mimflow: took over the lock of {what} {folder} from PID {previous.get('pid')} on "
              f"{previous.get('host')}, which is gone", file=sys.stderr, flush=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)[:300]}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
    except OSError as err:  # e.g. a full disk: name the file
        os.close(fd)
        raise OSError(err.errno, err.strerror, str(path)) from None
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        os.ftruncate(fd, 0)  # a clean release; the file stays (unlinking it would race a waiting locker)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


LOCAL_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
                errno.EDQUOT: "disk quota exceeded", errno.ENOENT: "no such file or folder",
                errno.ENOTDIR: "not a folder", errno.EISDIR: "is a folder"}


# what no retry can fix: the disk is full or read-only, or we may not write there
FATAL_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT}


def is_local_fs_error(err: BaseException) -> bool:
    """A problem of this machine's disk or permissions (not of a network peer)."""
    return isinstance(err, OSError) and not isinstance(err, ConnectionError) and err.errno in FATAL_ERRNOS


def os_error_line(err: OSError) -> str:
    """One line naming the path and what is wrong with it."""
    what = LOCAL_ERRNOS.get(err.errno, err.strerror or type(err).__name__)
    path = err.filename or "?"
    if err.filename2:
        path = f"{path} -> {err.filename2}"
    return f"{path}: {what}"
