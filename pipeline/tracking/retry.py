"""Which tracking errors are an outage worth retrying, which are this machine's own problem (fail
fast, naming the path), and the retry loop with backoff."""
from __future__ import annotations

import sys
import time
from typing import Callable

from mlflow.exceptions import MlflowException

from pipeline.fsutil import is_local_fs_error, os_error_line

# SQLite's own words for a store this machine cannot use (not a busy one: "database is locked" is transient)
LOCAL_SQLITE = ("unable to open database file", "readonly database", "database or disk is full",
                "disk i/o error", "file is not a database", "database disk image is malformed")


class LocalStoreError(RuntimeError):
    """The local tracking store or artefact folder cannot be written (permissions, disk space, a
    damaged SQLite file): not an outage, so never retried; the message names the path."""


def log(msg: str) -> None:
    print(f"mimflow: {msg}", file=sys.stderr, flush=True)


def _messages(err: BaseException) -> str:
    text = []
    while err is not None:
        text.append(str(err))
        err = err.__cause__ or err.__context__
    return " | ".join(text).lower()


def local_error(err: BaseException, uri: str | None = None, where: str | None = None) -> LocalStoreError | None:
    """This machine's own problem, as a one-line LocalStoreError; None for anything else.
    where: the path to name when the OSError names none (a failed write() of a copy)."""
    seen, e = set(), err
    while e is not None and id(e) not in seen:  # MLflow wraps the OSError of its artefact store
        seen.add(id(e))
        if is_local_fs_error(e):
            if e.filename is None and where:
                e = OSError(e.errno, e.strerror, where)
            return LocalStoreError(f"cannot write MLflow data at {os_error_line(e)}")
        e = e.__cause__ or e.__context__
    text = _messages(err)
    phrase = next((p for p in LOCAL_SQLITE if p in text), None)
    if phrase is not None:
        return LocalStoreError(f"MLflow store {uri or '(sqlite)'}: {phrase}")
    return None


def store_error_line(err: BaseException, uri: str) -> str | None:
    """One line for an error of the tracking store (for the CLI), or None when it is none."""
    local = local_error(err, uri)
    if local is not None:
        return str(local)
    if type(err).__module__.startswith(("sqlalchemy", "sqlite3")):
        return f"MLflow store {uri}: {str(err).splitlines()[0][:300]}"
    return None


def is_transient(err: BaseException) -> bool:
    """Worth retrying: the server is down, slow or overloaded, or a local store is busy. A local
    disk, permission or damaged-store problem is not (see local_error)."""
    if local_error(err) is not None:
        return False
    if isinstance(err, MlflowException):
        code = getattr(err, "get_http_status_code", lambda: 500)()
        text = str(err).lower()
        return code >= 500 or code == 429 or "locked" in text or "connect" in text
    if "database is locked" in _messages(err):
        return True
    return not isinstance(err, (FileNotFoundError, ValueError, TypeError, KeyError))


def retrying(fn: Callable, what: str, timeout_s: float, max_backoff_s: float = 30.0, uri: str | None = None):
    """fn() until it succeeds, retrying transient errors with backoff for up to timeout_s; a local
    store problem raises LocalStoreError at once (naming `uri`, the store)."""
    deadline, backoff, warned = time.monotonic() + timeout_s, 0.5, False
    while True:
        try:
            return fn()
        except Exception as err:
            local = local_error(err, uri)
            if local is not None:
                raise local from err
            if not is_transient(err) or time.monotonic() + backoff > deadline:
                raise
            if not warned:
                log(f"{what} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); retrying")
                warned = True
            time.sleep(backoff)
            backoff = min(2 * backoff, max_backoff_s)
