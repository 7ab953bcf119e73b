"""One run per output: the lease `DST/_lease.json`.

A driver takes the lease before it reads the previous plan and keeps it until it has written
`summary.json`; a second driver on the same DST sees it and stops with `OutputBusy` (the CLI exits
4), or waits for it (`LeaseOptions.wait_seconds`). The holder renews the lease from a heartbeat
thread; a holder that died (SIGKILL, lost node) stops renewing, and once the lease is older than its
duration on the **store's clock** (S3 `Last-Modified` against the response's `Date`; locally the
file's mtime against a freshly created file's mtime), the next driver takes it over and the
driver's repair step cleans up what the dead run left.

Every step is a conditional write through the storage seam (`workers/storage.py`): create only if
absent (local link(2), S3 `If-None-Match: *`), renew / take over only if unchanged (S3
`If-Match: <etag>`; locally a version check under an flock of DST), release only if still ours. Two
drivers racing for a free or expired lease therefore cannot both win. On an S3-compatible store
without conditional writes (it answers 501) the seam falls back to check-then-write: two drivers
starting within one round trip of each other can then both get the lease.

`break_lease` takes a live lease over at once. It is for a holder you know is dead (a crashed
machine whose lease has a long duration): if the holder is in fact alive, both runs write DST
and the old one only learns at its next heartbeat (it then exits 4, "lease lost").

Environment: ``BULK_EXPLAIN_LEASE_SECONDS`` lease duration (default 120; heartbeat every quarter of
it).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Callable, Optional

from bulk_explain.workers.environment import env_number
from bulk_explain.workers.storage import Storage, storage_for

LEASE_NAME = "_lease.json"
DURATION_ENV = "BULK_EXPLAIN_LEASE_SECONDS"
DEFAULT_DURATION = 120.0
MIN_DURATION = 1.0
POLL_SECONDS = 1.0
# What Ray puts into a submitted job's environment: the JobConfig JSON whose metadata holds the
# submission id (`ray job submit --submission-id ...`), and the driver's job id.
_RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class OutputBusy(Exception):
    """The output is held by another run's live lease (the CLI exits 4).

    Attributes:
        output: the output root.
        holder: the lease's content (holder id, host, pid, Ray ids, times), {} if unreadable.
        expires_in: seconds until the lease expires on the store's clock, if known.
    """

    exit_code = 4

    def __init__(self, output: str, holder: dict, expires_in: Optional[float] = None,
                 message: Optional[str] = None):
        self.output, self.holder, self.expires_in = output, holder, expires_in
        super().__init__(message or (
            f"output is busy: {output} is held by {describe_holder(holder)}"
            + (f", lease expires in {max(0.0, expires_in):.0f} s" if expires_in is not None else "")
            + "; retry later, wait with --wait-for-lease SECONDS, or pass --break-lease if that run is dead"))


class LeaseLost(OutputBusy):
    """Another run took this run's lease over (--break-lease, or our heartbeats stopped past the
    expiry): both may have written the output; re-run once the other one has finished."""


def describe_holder(holder: dict) -> str:
    """One line naming a lease holder: id, host, pid, Ray submission, start time."""
    if not holder:
        return "an unreadable lease"
    parts = [f"run {holder.get('holder', '?')[:12]}", f"on {holder.get('host', '?')}",
             f"pid {holder.get('pid', '?')}"]
    if holder.get("ray_submission_id"):
        parts.append(f"Ray submission {holder['ray_submission_id']}")
    elif holder.get("ray_job_id"):
        parts.append(f"Ray job {holder['ray_job_id']}")
    if holder.get("job"):
        parts.append(f"{holder['job']} job")
    if holder.get("started"):
        parts.append(f"since {holder['started']}")
    return f"{parts[0]} ({', '.join(parts[1:])})"


@dataclasses.dataclass(frozen=True)
class LeaseOptions:
    """How a run treats a lease held by someone else.

    Attributes:
        wait_seconds: how long to wait for a live lease to be released or to expire before giving
            up with OutputBusy (0: give up at once).
        break_lease: take a live lease over at once (dangerous: see the module docstring).
        duration_seconds: this run's lease duration; None reads BULK_EXPLAIN_LEASE_SECONDS
            (default 120). A dead holder's lease is taken over this long after its last heartbeat.
    """

    wait_seconds: float = 0.0
    break_lease: bool = False
    duration_seconds: Optional[float] = None

    def duration(self) -> float:
        """The duration in effect. Raises ValueError (a one-line config error) if it is invalid."""
        value = self.duration_seconds
        if value is None:
            return env_number(DURATION_ENV, DEFAULT_DURATION, MIN_DURATION, unit="seconds")
        if not value >= MIN_DURATION:
            raise ValueError(f"lease duration must be at least {MIN_DURATION:g} s, received {value!r}")
        return float(value)


def _ray_ids() -> dict:
    ids = {}
    try:
        metadata = json.loads(os.environ.get(_RAY_JOB_CONFIG_ENV, "") or "{}").get("metadata") or {}
        if metadata.get("job_submission_id"):
            ids["ray_submission_id"] = str(metadata["job_submission_id"])
    except (ValueError, AttributeError):
        pass
    if os.environ.get("RAY_JOB_ID"):
        ids["ray_job_id"] = os.environ["RAY_JOB_ID"]
    return ids


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stderr(message: str) -> None:
    print(f"bulk-explain: {message}", file=sys.stderr, flush=True)


class OutputLease:
    """The lease on one output root; a context manager (`with OutputLease(dst, options):`).

    Args:
        output: the output root (local folder or s3:// prefix), already normalized.
        options: LeaseOptions (None: defaults).
        job: what holds it ("explain", "filters"), written into the lease.
        storage: the storage backend (None: `storage_for(output)`).
        log: where progress lines go (default: stderr).

    Raises (from acquire / enter):
        OutputBusy: the lease is held by a live run and did not come free within wait_seconds.
        ValueError: an invalid lease duration.
    """

    def __init__(self, output: str, options: Optional[LeaseOptions] = None, job: str = "explain",
                 storage: Optional[Storage] = None, log: Callable[[str], None] = _stderr):
        self.output = output
        self.options = options or LeaseOptions()
        self.duration = self.options.duration()
        self.storage = storage or storage_for(output)
        self.uri = self.storage.join(output, LEASE_NAME)
        self.job, self.log = job, log
        self.holder_id = uuid.uuid4().hex
        self.version: Optional[str] = None
        self.took_over: Optional[dict] = None
        self.lost: Optional[dict] = None
        self._started = time.time()
        self._beats = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # version: heartbeat thread vs release
        self._thread: Optional[threading.Thread] = None

    # -- content -----------------------------------------------------------------------------------

    def _body(self) -> bytes:
        now = time.time()
        body = {
            "holder": self.holder_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **_ray_ids(),
            "job": self.job,
            "output": self.output,
            "started": _iso(self._started),
            "heartbeat": _iso(now),
            "heartbeats": self._beats,
            "duration_seconds": self.duration,
            # The holder's own estimate, for people reading the file. Takers decide by the store's
            # clock: the object's last-modified time + duration_seconds.
            "expiry": _iso(now + self.duration),
            "expiry_rule": "store last-modified time + duration_seconds, on the store's clock",
        }
        if self.took_over:
            body["took_over_from"] = self.took_over.get("holder")
        return json.dumps(body, indent=1).encode()

    # -- acquire / renew / release -------------------------------------------------------------------

    def acquire(self) -> "OutputLease":
        """Takes the lease: creates it, waits for it, or takes over an expired (or, with
        break_lease, a live) one. Starts the heartbeat."""
        deadline = time.monotonic() + max(0.0, self.options.wait_seconds)
        broke = False
        while True:
            version = self.storage.create_versioned(self.uri, self._body())
            if version is not None:
                return self._hold(version)
            current = self.storage.read_versioned(self.uri)
            if current is None:
                continue  # released between our create and our read: try again
            try:
                holder = json.loads(current.data)
                if not isinstance(holder, dict):
                    raise ValueError
            except ValueError:
                holder = {}
            if holder.get("holder") == self.holder_id:
                return self._hold(current.version)  # our create answered "exists" after a lost reply
            try:
                their_duration = float(holder.get("duration_seconds", self.duration))
            except (TypeError, ValueError):
                their_duration = self.duration
            age = current.store_now - current.modified
            expired = age > their_duration
            if expired or (self.options.break_lease and not broke):
                broke = broke or not expired
                self.took_over = holder
                version = self.storage.replace_versioned(self.uri, self._body(), current.version)
                if version is not None:
                    why = (f"no heartbeat for {age:.0f} s, past its {their_duration:g} s lease" if expired
                           else "--break-lease")
                    self.log(f"took over the lease of {describe_holder(holder)} ({why}); "
                             "its uncommitted shards are redone")
                    return self._hold(version)
                self.took_over = None
                continue  # another taker won: look again
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OutputBusy(self.output, holder, their_duration - age)
            self.log(f"waiting for the lease on {self.output}: held by {describe_holder(holder)}")
            time.sleep(min(POLL_SECONDS, remaining, max(0.1, their_duration - age)))

    def _hold(self, version: str) -> "OutputLease":
        self.version = version
        if not self.storage.conditional_writes_atomic(self.uri):
            self.log(f"warning: the store of {self.output} lacks conditional writes; "
                     "the lease cannot exclude a second run started at the same moment")
        self._thread = threading.Thread(target=self._heartbeat, name="output-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        interval = max(0.2, self.duration / 4)
        while not self._stop.wait(interval):
            with self._lock:
                if self.version is None:
                    return
                self._beats += 1
                try:
                    version = self.storage.replace_versioned(self.uri, self._body(), self.version)
                except Exception as exc:  # noqa: BLE001 - a store hiccup: the next beat retries
                    self.log(f"warning: lease heartbeat on {self.output} failed ({exc}); retrying")
                    continue
                if version is not None:
                    self.version = version
                    continue
                try:
                    current = self.storage.read_versioned(self.uri)
                    self.lost = json.loads(current.data) if current else {}
                except Exception:  # noqa: BLE001 - naming the new holder is best effort
                    self.lost = {}
                self.version = None
            self.log(f"error: the lease on {self.output} was taken over by "
                     f"{describe_holder(self.lost) if self.lost else 'nobody (it was deleted)'}; "
                     "this run and that one may both be writing it")
            return

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            version, self.version = self.version, None
        if version is not None:
            try:
                self.storage.delete_versioned(self.uri, version)
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                self.log(f"warning: could not release the lease on {self.output} ({exc}); "
                         f"it expires {self.duration:g} s after the last heartbeat")

    def __enter__(self) -> "OutputLease":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.release()
        if self.lost is not None and exc_type is None:
            raise LeaseLost(self.output, self.lost, message=(
                f"lease lost: {self.output} was taken over by {describe_holder(self.lost)} while "
                "this run held it; re-run once that run has finished to make the output consistent"))
        return False


def hold_output_lease(output: str, options: Optional[LeaseOptions] = None, job: str = "explain",
                      log: Callable[[str], None] = _stderr) -> OutputLease:
    """The lease of `output` as a context manager: `with hold_output_lease(dst, options): ...`.

    Returns:
        An OutputLease, acquired on enter and released on exit (also on exceptions, Ctrl-C and
        SIGTERM, which the drivers turn into exceptions).
    """
    return OutputLease(output, options, job=job, log=log)
