"""The output lease (issue 13): one run per DST.

In-process: the storage seam's conditional writes on a local folder and on a real S3 HTTP server
(moto), racing takers, waiting for a dead holder's lease to expire, --break-lease, and expiry
measured on the store's clock with the caller's clock skewed by an hour.

Through the CLI: two drivers started together on one local DST and on one S3 DST (exactly one runs,
the other exits 4 with one line naming the holder, the manifest is exactly-once), and a holder
SIGKILLed mid-run whose output is finished by a run that waits for the expiry, or by one that
breaks the lease at once.
"""

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.dataset as ds
import pytest

from s3_server import FaultyS3Proxy
from test_reliability import ENV, assert_exactly_once, kill_session, make_inputs, wait_flag

from bulk_explain.workers.lease import LEASE_NAME, LeaseOptions, OutputBusy, OutputLease
from bulk_explain.workers.storage import LocalStorage

pytest_plugins = ["s3_server"]

MODEL = ["--model", "cats_dogs", "--weights", "random", "--input-size", "64",
         "--shard-size", "2", "--batch-size", "2", "--quiet"]


def _quiet(_message):
    pass


@pytest.fixture(params=["local", "s3"])
def dst(request, tmp_path):
    """An output root and its storage: a local folder, or a prefix in a fresh moto bucket."""
    if request.param == "local":
        return str(tmp_path / "out"), LocalStorage()
    request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    from bulk_explain.workers.storage_s3 import S3Storage

    return f"s3://{bucket}/audits/out", S3Storage()


def lease(output, storage, duration=30.0, **options):
    return OutputLease(output, LeaseOptions(duration_seconds=duration, **options), storage=storage, log=_quiet)


# ----------------------------------------------------------------------------- storage primitives

def test_conditional_writes_compare_versions(dst):
    output, storage = dst
    uri = storage.join(output, "x.json")
    v1 = storage.create_versioned(uri, b"one")
    assert v1 and storage.create_versioned(uri, b"two") is None
    got = storage.read_versioned(uri)
    assert got.data == b"one" and got.version == v1
    assert storage.replace_versioned(uri, b"three", "not-the-version") is None
    v3 = storage.replace_versioned(uri, b"three", v1)
    assert v3 and v3 != v1 and storage.read_bytes(uri) == b"three"
    assert storage.replace_versioned(uri, b"four", v1) is None  # stale version: refused
    assert storage.delete_versioned(uri, v1) is False and storage.exists(uri)
    assert storage.delete_versioned(uri, v3) is True and not storage.exists(uri)
    assert storage.replace_versioned(uri, b"five", v3) is None and not storage.exists(uri)
    assert storage.read_versioned(uri) is None
    assert storage.conditional_writes_atomic(uri)


def test_racing_creators_and_takers_have_one_winner(dst):
    output, storage = dst
    uri = storage.join(output, "race.json")
    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda i: storage.create_versioned(uri, b"%d" % i), range(8)))
    assert sum(v is not None for v in created) == 1
    seen = storage.read_versioned(uri)
    with ThreadPoolExecutor(8) as pool:
        replaced = list(pool.map(lambda i: storage.replace_versioned(uri, b"t%d" % i, seen.version), range(8)))
    winners = [i for i, v in enumerate(replaced) if v is not None]
    assert len(winners) == 1 and storage.read_bytes(uri) == b"t%d" % winners[0]


def test_s3_without_conditional_writes_falls_back_and_says_so(s3_bucket, s3_endpoint):
    from bulk_explain.workers.storage_s3 import S3Storage

    with FaultyS3Proxy(s3_endpoint, reject_conditional_writes=True) as proxy:
        storage = S3Storage(endpoint_url=proxy.endpoint_url)
        output = f"s3://{s3_bucket}/out"
        messages = []
        held = OutputLease(output, LeaseOptions(duration_seconds=30), storage=storage, log=messages.append)
        with held:
            assert any("lacks conditional writes" in m for m in messages)
            with pytest.raises(OutputBusy):
                lease(output, storage).acquire()  # check-then-write still sees a live holder
        assert not storage.exists(held.uri)
        assert not storage.conditional_writes_atomic(held.uri)


# ----------------------------------------------------------------------------- the lease itself

def test_second_taker_is_busy_and_names_the_holder(dst):
    output, storage = dst
    with lease(output, storage) as first:
        content = json.loads(storage.read_bytes(first.uri))
        assert {"holder", "host", "pid", "started", "heartbeat", "expiry", "duration_seconds"} <= set(content)
        assert content["pid"] == os.getpid() and content["holder"] == first.holder_id
        with pytest.raises(OutputBusy) as busy:
            lease(output, storage).acquire()
        message = str(busy.value)
        assert busy.value.exit_code == 4 and "\n" not in message
        assert output in message and first.holder_id[:12] in message and f"pid {os.getpid()}" in message
    assert not storage.exists(first.uri)  # released
    with lease(output, storage):  # and free again
        pass


def test_heartbeat_renews_and_release_happens_on_exceptions(dst):
    output, storage = dst
    held = lease(output, storage, duration=1.0)
    with pytest.raises(RuntimeError):
        with held:
            first = storage.read_versioned(held.uri).version
            deadline = time.monotonic() + 30
            while storage.read_versioned(held.uri).version == first:
                assert time.monotonic() < deadline, "no heartbeat"
                time.sleep(0.1)
            # Renewed well past its 1 s duration: a taker still finds it live.
            time.sleep(1.5)
            with pytest.raises(OutputBusy):
                lease(output, storage).acquire()
            raise RuntimeError("the job failed")
    assert not storage.exists(held.uri)


def _die(held):
    """What SIGKILL does to a holder: its heartbeat stops, its lease stays."""
    held._stop.set()
    held._thread.join()


def test_dead_holder_is_waited_for_then_taken_over(dst):
    output, storage = dst
    dead = lease(output, storage, duration=2.0).acquire()
    _die(dead)
    with pytest.raises(OutputBusy) as busy:
        lease(output, storage).acquire()
    assert 0 <= busy.value.expires_in <= 2.0
    messages = []
    taker = OutputLease(output, LeaseOptions(wait_seconds=60, duration_seconds=30), storage=storage,
                        log=messages.append)
    with taker:
        assert taker.took_over["holder"] == dead.holder_id
        assert any("waiting for the lease" in m for m in messages)
        assert any("took over the lease" in m and "no heartbeat" in m for m in messages)
        content = json.loads(storage.read_bytes(taker.uri))
        assert content["holder"] == taker.holder_id and content["took_over_from"] == dead.holder_id
        # The dead holder, were it to come back, may not delete what is no longer its lease.
        dead.release()
        assert storage.exists(taker.uri)
    assert not storage.exists(taker.uri)


def test_expired_lease_is_taken_by_exactly_one_of_many(dst):
    output, storage = dst
    dead = lease(output, storage, duration=1.0).acquire()
    _die(dead)
    time.sleep(2.5)
    takers = [lease(output, storage) for _ in range(6)]
    barrier = threading.Barrier(len(takers))

    def take(t):
        barrier.wait()
        try:
            t.acquire()
            return True
        except OutputBusy:
            return False

    with ThreadPoolExecutor(len(takers)) as pool:
        won = list(pool.map(take, takers))
    assert won.count(True) == 1
    winner = takers[won.index(True)]
    assert json.loads(storage.read_bytes(winner.uri))["holder"] == winner.holder_id
    winner.release()


def test_break_lease_takes_a_live_lease_and_the_old_holder_learns(dst):
    output, storage = dst
    old = lease(output, storage, duration=1.0).acquire()
    messages = []
    breaker = OutputLease(output, LeaseOptions(break_lease=True, duration_seconds=30), storage=storage,
                          log=messages.append).acquire()
    assert breaker.took_over["holder"] == old.holder_id and any("--break-lease" in m for m in messages)
    old._thread.join(timeout=30)  # its next heartbeat finds the lease changed
    assert old.lost and old.lost["holder"] == breaker.holder_id
    with pytest.raises(OutputBusy, match="lease lost"):
        old.__exit__(None, None, None)
    assert json.loads(storage.read_bytes(breaker.uri))["holder"] == breaker.holder_id
    breaker.release()
    assert not storage.exists(breaker.uri)


class _SkewedClock:
    """The `time` module as the lease code sees it, with its wall clock off by `offset` seconds
    (monotonic time and sleep unchanged). Only the caller is skewed: the in-process moto server
    stamps its Date headers from the real `time.time`."""

    def __init__(self, offset):
        self.offset = offset

    def __getattr__(self, name):
        return getattr(time, name)

    def time(self):
        return time.time() + self.offset


def test_expiry_uses_the_store_clock_not_the_callers(dst, monkeypatch):
    import bulk_explain.workers.lease

    output, storage = dst
    holder = lease(output, storage, duration=3.0).acquire()
    _die(holder)
    # The caller's clock runs an hour ahead: by it, the lease expired long ago. By the store's
    # clock it is fresh, so it is busy.
    monkeypatch.setattr(bulk_explain.workers.lease, "time", _SkewedClock(3600))
    with pytest.raises(OutputBusy):
        lease(output, storage).acquire()
    # The caller's clock runs an hour behind: by it, the lease is not even written yet. By the
    # store's clock it expires, and it is taken over.
    monkeypatch.setattr(bulk_explain.workers.lease, "time", _SkewedClock(-3600))
    taker = lease(output, storage, wait_seconds=60).acquire()
    assert taker.took_over["holder"] == holder.holder_id
    taker.release()


def test_bad_lease_duration_is_a_one_line_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv("BULK_EXPLAIN_LEASE_SECONDS", "soon")
    with pytest.raises(ValueError, match="BULK_EXPLAIN_LEASE_SECONDS must be a number"):
        LeaseOptions().duration()
    monkeypatch.setenv("BULK_EXPLAIN_LEASE_SECONDS", "0.5")  # a number, but too short: still names the variable
    with pytest.raises(ValueError, match=r"^BULK_EXPLAIN_LEASE_SECONDS must be a number of seconds >= 1, "
                                         r"received '0.5'$"):
        LeaseOptions().duration()
    monkeypatch.setenv("BULK_EXPLAIN_LEASE_SECONDS", " 2.5 ")
    assert LeaseOptions().duration() == 2.5
    assert LeaseOptions(duration_seconds=5).duration() == 5
    with pytest.raises(ValueError, match="at least 1 s"):
        LeaseOptions(duration_seconds=0.1).duration()
    rc = subprocess.run([sys.executable, "-m", "bulk_explain", "run", "--input", str(tmp_path), "--output",
                         str(tmp_path / "o"), *MODEL], env=dict(os.environ, **ENV, BULK_EXPLAIN_LEASE_SECONDS="soon"),
                        capture_output=True, text=True, timeout=120)
    assert rc.returncode == 2 and rc.stderr.count("\n") == 1 and "BULK_EXPLAIN_LEASE_SECONDS" in rc.stderr


# ----------------------------------------------------------------------------- through the CLI

def _start(args, **env):
    # Ray's token auth as the suite sets it up (conftest.py), as in every CLI test.
    return subprocess.Popen([sys.executable, "-m", "bulk_explain", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, **ENV, **env), start_new_session=True)


def _finish(proc, timeout=300):
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc)
    return proc.returncode, err


def _s3_rows(uri):
    from bulk_explain.workers.storage import storage_for

    fs, path = storage_for(uri).filesystem(uri)
    return ds.dataset(path, filesystem=fs, format="parquet").to_table().column("source_uri").to_pylist()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_drivers_started_together_one_runs_the_other_exits_4(where, tmp_path, request):
    inputs = make_inputs(str(tmp_path / "in"), 6)
    if where == "local":
        out = str(tmp_path / "out")
    else:
        request.getfixturevalue("s3_endpoint")
        out = f"s3://{request.getfixturevalue('s3_bucket')}/nightly/out"
    flag = str(tmp_path / "flag")
    args = ["run", "--input", str(tmp_path / "in"), "--output", out, *MODEL]
    # Whichever driver gets the lease stops after planning until the flag is deleted, so the other
    # one meets a live lease however the two are scheduled; the point fires only once (the flag).
    hold = dict(BULK_EXPLAIN_TEST_CRASH_AT="planned", BULK_EXPLAIN_TEST_CRASH_ACTION="wait",
                BULK_EXPLAIN_TEST_CRASH_FLAG=flag)
    procs = [_start(args, **hold), _start(args, **hold)]
    try:
        loser = None
        deadline = time.monotonic() + 240
        while loser is None:
            loser = next((p for p in procs if p.poll() is not None), None)
            assert time.monotonic() < deadline, "neither driver stopped"
            time.sleep(0.1)
        winner = procs[1 - procs.index(loser)]
        rc, err = _finish(loser)
        assert rc == 4, err[-3000:]
        line = err.strip()
        assert "\n" not in line and line.startswith("bulk-explain: error: output is busy:")
        assert f"pid {winner.pid}" in line and out in line
        wait_flag(flag, winner)  # the winner is the one that reached the point
        os.remove(flag)
        rc, err = _finish(winner)
        assert rc == 0, err[-3000:]
    finally:
        for p in procs:
            kill_session(p)
    if where == "local":
        assert_exactly_once(out, inputs)
        assert not os.path.exists(os.path.join(out, LEASE_NAME))
    else:
        rows = _s3_rows(out + "/manifest")
        assert sorted(rows) == sorted(inputs) and len(rows) == len(set(rows))
        from bulk_explain.workers.storage import storage_for

        assert not storage_for(out).exists(out + "/" + LEASE_NAME)


@pytest.mark.slow
def test_holder_killed_mid_run_then_break_lease_or_wait_for_expiry(tmp_path):
    inputs = make_inputs(str(tmp_path / "in"), 8)
    out = str(tmp_path / "out")
    args = ["run", "--input", str(tmp_path / "in"), "--output", out, *MODEL]
    pause = dict(BULK_EXPLAIN_TEST_CRASH_AT="before_stage:1", BULK_EXPLAIN_TEST_CRASH_ACTION="pause")

    # A holder with a long lease is SIGKILLed (with its workers) in the middle of shard 1.
    proc = _start(args, BULK_EXPLAIN_LEASE_SECONDS="600", BULK_EXPLAIN_TEST_CRASH_FLAG=str(tmp_path / "a"), **pause)
    wait_flag(str(tmp_path / "a"), proc)
    kill_session(proc)
    assert json.load(open(os.path.join(out, LEASE_NAME)))["pid"] == proc.pid
    # Its lease outlives it: a plain re-run is refused ...
    rc, err = _finish(_start(args))
    assert rc == 4 and f"pid {proc.pid}" in err, err[-3000:]
    # ... and --break-lease takes it over at once and finishes the output.
    rc, err = _finish(_start([*args, "--break-lease"]))
    assert rc == 0, err[-3000:]
    assert "took over the lease" in err and "--break-lease" in err
    assert_exactly_once(out, inputs)

    # More inputs; a holder with a 3 s lease is killed mid-run; the next run waits for the expiry
    # (on the store's clock), takes over and finishes with every input exactly once.
    inputs += make_inputs(str(tmp_path / "in" / "more"), 4, seed=7)
    proc = _start(args, BULK_EXPLAIN_LEASE_SECONDS="3", BULK_EXPLAIN_TEST_CRASH_FLAG=str(tmp_path / "b"),
                  BULK_EXPLAIN_TEST_CRASH_AT="before_stage", BULK_EXPLAIN_TEST_CRASH_ACTION="pause")
    wait_flag(str(tmp_path / "b"), proc)
    kill_session(proc)
    rc, err = _finish(_start([*args, "--wait-for-lease", "120"]))
    assert rc == 0, err[-3000:]
    assert "took over the lease" in err and "no heartbeat" in err
    assert_exactly_once(out, inputs)
    assert not os.path.exists(os.path.join(out, LEASE_NAME))


def test_explain_and_filters_jobs_take_the_lease_before_any_work(tmp_path):
    from bulk_explain.jobs import ExplainConfig, ModelSpec, run_explain
    from bulk_explain.jobs.filters import FiltersConfig, run_filters

    make_inputs(str(tmp_path / "in"), 2)
    out = str(tmp_path / "out")
    with lease(out, LocalStorage()) as held:
        with pytest.raises(OutputBusy, match=held.holder_id[:12]):
            run_explain(ExplainConfig(inputs=(str(tmp_path / "in"),), output=out,
                                      model=ModelSpec(kind="cats_dogs", weights="random", input_size=64)),
                        progress=False)
        with pytest.raises(OutputBusy, match=held.holder_id[:12]):
            run_filters(FiltersConfig(output=out, model=ModelSpec(kind="vgg16", weights="random"),
                                      layers=("block1_conv1",), size=48, steps=1, progress=False))
        assert sorted(os.listdir(out)) == [LEASE_NAME]  # refused before planning: nothing written
