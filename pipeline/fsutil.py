"""Durable file-system writes: the one place files are written atomically.

A write goes to a temporary sibling, is fsynced and renamed over the target, so a kill mid-write
never leaves a broken file; readers see the old or the new content, nothing in between.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

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
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
