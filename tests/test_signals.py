"""Signals reach both job kinds (issue 8 item 4, issue 9): Ctrl-C gives exit 130 even when the
driver was started with SIGINT ignored or blocked; SIGINT/SIGTERM while Ray starts are deferred,
then honoured (130/143, never exit 15 or SIGSEGV) and leave no Ray process in the driver's session.
SIGTERM while a job's units run is tested for every kind in test_job_kinds.py.

Every driver runs in its own session (start_new_session=True), so "no process left" means no process
of that session id remains (GCS, raylet, DashboardAgent, RuntimeEnvAgent, workers).
"""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from test_reliability import ENV, MODEL, kill_session, make_inputs, wait_flag, _session_pids

FAULTS = ("BULK_EXPLAIN_TEST_CRASH_AT", "BULK_EXPLAIN_TEST_CRASH_ACTION", "BULK_EXPLAIN_TEST_CRASH_FLAG")


def start(args, fault=None, flag=None, action="pause", preexec_fn=None, **env):
    full = dict(os.environ, **ENV, **env)
    for name in FAULTS:
        full.pop(name, None)
    if fault:
        full.update(BULK_EXPLAIN_TEST_CRASH_AT=fault, BULK_EXPLAIN_TEST_CRASH_ACTION=action,
                    BULK_EXPLAIN_TEST_CRASH_FLAG=flag)
    return subprocess.Popen([sys.executable, "-m", "bulk_explain", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full, start_new_session=True, preexec_fn=preexec_fn, cwd=REPO)


def finish(proc, timeout=180):
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        raise AssertionError("the driver did not stop after the signal")
    return proc.returncode, err


def session_left(proc, grace=60):
    """Processes still in the driver's session once Ray had `grace` seconds to go away."""
    deadline = time.monotonic() + grace
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _session_pids(proc.pid)
    names = []
    for pid in left:
        try:
            names.append(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")[:120].decode(errors="replace"))
        except OSError:
            pass
    kill_session(proc)  # never leave them running, whatever the assertion says
    return names


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _block_sigint():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


@pytest.mark.parametrize("inherited", [_ignore_sigint, _block_sigint], ids=["ignored", "blocked"])
def test_sigint_exits_130_when_the_parent_ignored_or_blocked_it(tmp_path, inherited):
    # As from a script with `cmd &` (SIGINT ignored) or a parent with SIGINT in its signal mask:
    # Python would not install its Ctrl-C handler, and the driver would sleep on at the fault point.
    make_inputs(str(tmp_path / "in"), 2)
    flag = str(tmp_path / "flag")
    args = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *MODEL]
    proc = start(args, "listing", flag, preexec_fn=inherited)
    wait_flag(flag, proc)
    os.kill(proc.pid, signal.SIGINT)
    rc, err = finish(proc, timeout=60)
    assert rc == 130, err[-3000:]
    assert "interrupted" in err
    assert session_left(proc) == []


def _ray_processes_started(sid):
    for pid in _session_pids(sid):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"gcs_server" in cmd or b"raylet" in cmd:
            return True
    return False


@pytest.mark.parametrize("signame,moment", [("SIGTERM", "fault"), ("SIGINT", "fault"), ("SIGTERM", "poll")])
def test_signal_during_ray_startup_is_honoured_and_leaves_no_ray_process(tmp_path, signame, moment):
    make_inputs(str(tmp_path / "in"), 2)
    out = str(tmp_path / "out")
    flag = str(tmp_path / "flag")
    args = ["run", "--input", str(tmp_path / "in"), "--output", out, *MODEL]
    sig = getattr(signal, signame)
    if moment == "fault":
        # Ray is up, its SIGTERM handler (sys.exit(15)) installed, ours not back yet: the driver
        # waits there until the test deletes the flag.
        proc = start(args, "ray_started", flag, action="wait")
        wait_flag(flag, proc)
        os.kill(proc.pid, sig)
        time.sleep(0.5)  # the signal is pending in the driver before start-up goes on
        os.remove(flag)
    else:
        # ray.init in progress: GCS or raylet exists, start-up not finished
        proc = start(args)
        deadline = time.monotonic() + 240
        while not _ray_processes_started(proc.pid):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "Ray never started"
            time.sleep(0.02)
        os.kill(proc.pid, sig)
    rc, err = finish(proc)
    assert rc == 128 + sig, f"exit {rc}: {err[-3000:]}"
    assert session_left(proc) == []
    # interrupted before any shard ran: nothing is visible
    assert not glob.glob(os.path.join(out, "manifest", "*.parquet"))
