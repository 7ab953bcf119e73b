"""What every job kind's driver shares around its own stages, so the kinds cannot drift apart:
signals (SIGINT/SIGTERM, including while Ray starts), credential redaction for `job.json`, reading
small JSON files (markers, job.json) that tells "missing" from "failed", and the environment and
S3 endpoint the Ray workers get.

    with sigterm_raises():               # the whole job: SIGTERM -> JobInterrupted (exit 143)
        ...
        with ray_startup():              # ray.init/connect: signals deferred, then honoured
            started = connect(address)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
from typing import Dict, Optional

from bulk_explain.workers.faults import ENV_PREFIX as FAULT_ENV_PREFIX

EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143

# The endpoint variables a user may have set, in the order they win (ours, then boto3's own).
S3_ENDPOINT_VARIABLES = ("BULK_EXPLAIN_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class JobInterrupted(SystemExit):
    """SIGTERM while a job runs: raised in the main thread so that workers are stopped and Ray shut
    down on the way out; the process exits 143 (128 + SIGTERM) unless the caller catches it."""

    def __init__(self):
        super().__init__(EXIT_SIGTERM)


# One class for the whole project (the CLI maps it to exit 5); defined on the workers/ side, which
# raises it from the storage seam too.
from bulk_explain.workers.environment import EnvironmentProblem  # noqa: E402


# ---------------------------------------------------------------------------- signals

_sigterm_owned = False  # True while a job owns the SIGTERM handler
_sigterm_received = False


def _raise_interrupted(signum, frame):
    global _sigterm_received
    _sigterm_received = True
    raise JobInterrupted()


def sigterm_received() -> bool:
    """True once SIGTERM arrived during the current job (Ray's `wait()` may turn the exception our
    handler raised into a plain SystemExit(1): this flag says what it was)."""
    return _sigterm_received


@contextlib.contextmanager
def sigterm_raises():
    """Owns SIGTERM for the duration of a job: it raises `JobInterrupted` in the main thread.

    Left alone when called from another thread or when the caller installed its own handler.
    """
    global _sigterm_owned, _sigterm_received
    _sigterm_received = False
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield  # not ours to change: another thread, or the caller has its own handler
        return
    signal.signal(signal.SIGTERM, _raise_interrupted)
    _sigterm_owned = True
    try:
        yield
    finally:
        _sigterm_owned = False
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def reclaim_sigterm() -> None:
    """ray.init/connect install their own SIGTERM handler (sys.exit(15)); put ours back."""
    if _sigterm_owned and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)


def as_job_interrupt(exc: BaseException) -> BaseException:
    """The exception to re-raise for an interrupted job: `JobInterrupted` when SIGTERM caused it
    (even if Ray re-wrapped it), else `exc` itself."""
    if isinstance(exc, JobInterrupted) or not _sigterm_received:
        return exc
    return JobInterrupted()


@contextlib.contextmanager
def ray_startup():
    """Defers SIGINT and SIGTERM while Ray starts or connects, then honours them.

    Why: ray.init starts GCS, raylet and agents, replaces the SIGTERM handler with one that calls
    sys.exit(15), and the driver's CoreWorker installs Abseil's failure-signal handler, which takes
    SIGTERM at the C level and aborts. A signal in that window used to exit 15, abort the driver or
    leave DashboardAgent/RuntimeEnvAgent running. Here both signals are only recorded until the
    block ends; Ray cannot install handlers for them meanwhile (the calls are swallowed, as Ray's
    own `DeferSigint` does for SIGINT). On exit our handlers are back and a recorded signal is
    raised (KeyboardInterrupt / JobInterrupted) after start-up finished, so the caller's cleanup
    stops the Ray it just started. Outside the main thread it does nothing (Python runs handlers
    only there).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    deferred = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in deferred}
    original_signal = signal.signal

    def record(signum, frame):
        pending.append(signum)

    def guarded_signal(signum, handler):
        if signum in deferred:
            return record  # Ray's handlers for these never get installed
        return original_signal(signum, handler)

    # The driver's CoreWorker would install Abseil's failure-signal handler, which also takes
    # SIGTERM at the C level (it dumps a stack and aborts the driver) until our handler is back:
    # the driver owns its SIGTERM, so its CoreWorker gets none (workers keep theirs).
    from ray._private import ray_constants

    switch = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"  # read when the driver's CoreWorker is created
    no_failure_handler = getattr(ray_constants, switch, None)
    if no_failure_handler is not None:
        setattr(ray_constants, switch, True)
    for s in deferred:
        if previous[s] is not signal.SIG_IGN:
            original_signal(s, record)
    signal.signal = guarded_signal
    try:
        yield
    finally:
        signal.signal = original_signal
        if no_failure_handler is not None:
            setattr(ray_constants, switch, no_failure_handler)
        for s in deferred:
            if previous[s] is not signal.SIG_IGN:
                original_signal(s, previous[s] if previous[s] is not None else signal.SIG_DFL)
        reclaim_sigterm()
    if pending:
        # Honour the first signal as if it arrived now, through the handlers just restored.
        signum = pending[0]
        handler = signal.getsignal(signum)
        if callable(handler):
            handler(signum, None)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt()
        else:
            os.kill(os.getpid(), signum)  # SIG_DFL: die as the signal says


def restore_default_signals() -> None:
    """Gives SIGINT its Python handler (KeyboardInterrupt) and unblocks SIGINT/SIGTERM.

    Python installs its Ctrl-C handler only if SIGINT was at its default when the process started:
    a driver started from a script with `&` inherits SIGINT ignored and would run to the end.
    A signal mask blocking them is inherited over exec too. Main thread only.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


# ---------------------------------------------------------------------------- redaction

# `scheme://user:password@host`, where the password may hold unencoded "/" or "@": the userinfo
# ends at the first "@" after which the host part (up to the next "/") holds no further "@".
_USER_PASSWORD = re.compile(r"(?<=://)[^\s/@:]*:\S*?@(?=[^\s/@]*(?:/|\s|$))")
# `scheme://token@host` (no password part): up to the first "/" only, so `s3://b/me@home.jpg` stays.
_USER_ONLY = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` with URL userinfo (`user:password@`, `token@`) replaced by `***@`.

    Args:
        text: any string (a URI, a config value, a log line).

    Returns:
        The string without credentials; unchanged when it holds none.
    """
    return _USER_ONLY.sub("***@", _USER_PASSWORD.sub("***@", text))


def redacted(value):
    """Strips URL userinfo anywhere in a JSON-like value (job.json never holds secrets)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v) for v in value]
    return value


# ---------------------------------------------------------------------------- small JSON files


def read_json(storage, uri: str) -> Optional[dict]:
    """Reads a small JSON file (commit marker, job.json) through the storage seam.

    Only a missing file is "nothing there": the backends raise FileNotFoundError for exactly that
    (S3: NoSuchKey / 404). Anything else must stop the job; treating an AccessDenied marker as
    "not committed" would silently recompute (and overwrite) committed work.

    Args:
        storage: the backend `uri` belongs to.
        uri: the file.

    Returns:
        The parsed value, or None when the file does not exist.

    Raises:
        EnvironmentProblem: the file exists but cannot be read (permissions, network, S3 error).
        ValueError: the file is not JSON.
    """
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EnvironmentProblem(f"cannot read {redact(uri)}: {_one_line(exc)}") from None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{redact(uri)} is not valid JSON ({_one_line(exc)}); delete it or use a new output") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------- worker environment


def s3_endpoint(explicit: Optional[str]) -> Optional[str]:
    """The S3 endpoint the driver uses: the configured one, else the first endpoint variable set.

    Workers get it in their settings (constructor arguments), not in Ray's runtime_env, which Ray
    writes to its logs; the URL may hold userinfo.
    """
    if explicit:
        return explicit
    for name in S3_ENDPOINT_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


@contextlib.contextmanager
def s3_storage_configured(explicit: Optional[str]):
    """While a job runs in this process, `storage_for("s3://...")` uses the job's endpoint
    (`s3_endpoint(explicit)`): passed to the backend's constructor, never written to os.environ,
    and the previous setting is back afterwards."""
    from bulk_explain.workers.storage import configure_storage

    previous = configure_storage("s3", endpoint_url=s3_endpoint(explicit))
    try:
        yield
    finally:
        configure_storage("s3", **previous)


def worker_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment variables for the Ray workers' runtime_env: quiet TensorFlow and the test-only
    fault-injection variables (so each job kind's crash paths can be tested). Never credentials or
    endpoints: Ray logs runtime_env."""
    env = {"TF_CPP_MIN_LOG_LEVEL": "2"}
    env.update(extra or {})
    env.update({k: v for k, v in os.environ.items() if k.startswith(FAULT_ENV_PREFIX)})
    return env
