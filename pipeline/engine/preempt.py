"""SIGTERM (cluster preemption) -> checkpoint at the next step boundary, then exit 0.

The handler only records the request; the training loop polls `requested()` after each optimizer
step, agrees with the other ranks (one of them may be signalled first), writes a checkpoint and
raises `Preempted`, which the CLI turns into exit status 0. A watchdog ends the process if that
takes longer than the grace period, so the cluster's SIGKILL never lands mid-write.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

from pipeline import faults


class Preempted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint; resume continues from it."""

    mlflow_status = "KILLED"  # how tracked_run ends the MLflow runs it unwinds through

    def __init__(self, stage: str, step: int, checkpoint):
        super().__init__(f"{stage}: stopped on SIGTERM at step {step}; checkpoint {checkpoint}")
        self.stage, self.step, self.checkpoint = stage, step, checkpoint

    @property
    def flush_timeout_s(self) -> float:
        """What is left of the grace period for delivering logs, less a margin to exit."""
        return max(0.0, remaining() - 2.0)


_state = {"since": None, "grace": 25.0, "cancel": threading.Event()}
WATCHDOG_EXIT = 143  # what a process killed by SIGTERM reports


def _handler(signum, frame) -> None:
    if _state["since"] is not None:
        return
    _state["since"] = time.monotonic()
    print(f"mimflow: SIGTERM received: checkpointing at the next step, exiting within "
          f"{_state['grace']:.0f} s", file=sys.stderr, flush=True)
    _state["cancel"] = threading.Event()
    threading.Thread(target=_watch, args=(_state["grace"], _state["cancel"]), daemon=True).start()


def _watch(grace: float, cancel: threading.Event) -> None:
    if cancel.wait(grace):
        return
    print(f"mimflow: grace period of {grace:.0f} s after SIGTERM exceeded; exiting without a new "
          "checkpoint (the previous one is kept)", file=sys.stderr, flush=True)
    os._exit(WATCHDOG_EXIT)


def install(grace_s: float) -> None:
    """Route SIGTERM to the stop flag (main thread only; a no-op elsewhere, e.g. in tests' threads)."""
    _state["grace"] = grace_s
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)


def requested() -> bool:
    return _state["since"] is not None


def remaining() -> float:
    """Seconds of the grace period left (the full period when no SIGTERM came)."""
    if _state["since"] is None:
        return _state["grace"]
    return max(0.0, _state["grace"] - (time.monotonic() - _state["since"]))


def request_for_tests() -> None:
    """What SIGTERM does, without a signal (unit tests of the loop)."""
    _handler(signal.SIGTERM, None)


def reset() -> None:
    """Forget a stop request and call off its watchdog (tests)."""
    _state["since"] = None
    _state["cancel"].set()


def inject_test_fault(stage: str, step: int) -> None:
    """Test-only fault injection after optimizer steps (pipeline/faults.py)."""
    faults.inject(stage, step)
