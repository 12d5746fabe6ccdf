"""Which tracking errors are an outage worth retrying, and the retry loop with backoff."""
from __future__ import annotations

import sys
import time
from typing import Callable

from mlflow.exceptions import MlflowException


def log(msg: str) -> None:
    print(f"mimflow: {msg}", file=sys.stderr, flush=True)


def is_transient(err: Exception) -> bool:
    """Worth retrying: the server is down, slow, overloaded, or a local store is busy."""
    if isinstance(err, MlflowException):
        code = getattr(err, "get_http_status_code", lambda: 500)()
        return code >= 500 or code == 429 or "locked" in str(err).lower() or "connect" in str(err).lower()
    return not isinstance(err, (FileNotFoundError, ValueError, TypeError))


def retrying(fn: Callable, what: str, timeout_s: float, max_backoff_s: float = 30.0):
    """fn() until it succeeds, retrying transient errors with backoff for up to timeout_s."""
    deadline, backoff, warned = time.monotonic() + timeout_s, 0.5, False
    while True:
        try:
            return fn()
        except Exception as err:
            if not is_transient(err) or time.monotonic() + backoff > deadline:
                raise
            if not warned:
                log(f"{what} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); retrying")
                warned = True
            time.sleep(backoff)
            backoff = min(2 * backoff, max_backoff_s)
