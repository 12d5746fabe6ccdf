"""Test-only fault injection, read from the environment so that a subprocess under test can be
made to die at a known point: MIMFLOW_TEST_FAULT="pretrain:kill:7" SIGKILLs the process right after
optimizer step 7 of the pretrain stage; "pretrain:term:6" sends SIGTERM instead;
"pretrain:sleep:0.05" sleeps that long after every step (to make a tiny run last);
"register:kill:1" dies right after the model version is created. Unset, it does nothing.
"""
from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "MIMFLOW_TEST_FAULT"


def inject(where: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        place, action, arg = item.split(":")
        if place != where:
            continue
        if action == "sleep":
            time.sleep(float(arg))
        elif action in ("kill", "term") and step == int(arg):
            if os.environ.get("MIMFLOW_TEST_FAULT_RANK", "0") != os.environ.get("RANK", "0"):
                continue
            os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGTERM)
            if action == "kill":
                time.sleep(60)  # SIGKILL is asynchronous: never run past the fault
