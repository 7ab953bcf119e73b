"""Test-only fault points: let the reliability tests stop a driver or a worker at an exact step.

Unset in production; every call is one environment lookup. The driver forwards the variables to
its Ray workers.

    BULK_EXPLAIN_TEST_CRASH_AT      POINT or POINT:SHARD  (POINT: listing, planned, ray_started
                                    (driver, Ray up, signals still deferred), before_stage,
                                    after_stage, after_marker, after_publish (every kind's worker,
                                    in `workers/commit.py`; SHARD is the unit id);
                                    the audit has audit_written, before its summary.json)
    BULK_EXPLAIN_TEST_CRASH_ACTION  exit (default: os._exit, no cleanup), kill (SIGKILL itself),
                                    pause (sleep, so that the test can kill whatever it wants), or
                                    wait (go on once the test deletes the flag file), or
                                    hold (go on once the test creates FLAG.go; the flag stays,
                                    so a retry of the same step does not stop again)
    BULK_EXPLAIN_TEST_CRASH_FLAG    optional file: created with "PID SHARD" when the point fires;
                                    if it already exists the point does not fire again (once only)
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

CRASH_AT = "BULK_EXPLAIN_TEST_CRASH_AT"
CRASH_ACTION = "BULK_EXPLAIN_TEST_CRASH_ACTION"
CRASH_FLAG = "BULK_EXPLAIN_TEST_CRASH_FLAG"
ENV_PREFIX = "BULK_EXPLAIN_TEST_"


def fault_point(point: str, shard: Optional[int] = None) -> None:
    spec = os.environ.get(CRASH_AT)
    if not spec:
        return
    name, _, want = spec.partition(":")
    if name != point or (want and (shard is None or int(want) != shard)):
        return
    flag = os.environ.get(CRASH_FLAG)
    if flag:
        try:
            fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()} {-1 if shard is None else shard}\n".encode())
        os.close(fd)
    action = os.environ.get(CRASH_ACTION, "exit")
    if action == "pause":
        time.sleep(600)
        return
    if action == "wait":
        deadline = time.monotonic() + 120
        while flag and os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    if action == "hold":
        deadline = time.monotonic() + 300
        while flag and not os.path.exists(flag + ".go") and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(86)
