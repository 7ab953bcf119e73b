"""Exactly-once under crashes (issue 5): the driver SIGKILLed at several points, Ctrl-C and SIGTERM,
a worker process killed mid-shard, a shard that keeps killing its worker, and a node leaving a
2-node cluster. After each, `pyarrow.dataset(DST/manifest)` never shows a row twice or an
uncommitted part, and a re-run of the same command completes with every input exactly once."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import REPO, photo_like, write_image


MODEL = ["--model", "cats_dogs", "--weights", "random", "--input-size", "64"]
ENV = dict(PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", RAY_DEDUP_LOGS="0")


def make_inputs(root, n, seed=0):
    rng = np.random.default_rng(seed)
    return sorted(write_image(os.path.join(root, "cats" if i % 2 else "dogs", f"{i:03d}.jpg"), photo_like(rng, 36, 44))
                  for i in range(n))


# ----------------------------------------------------------------------------- processes

def _session_pids(sid):
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # session id; skip zombies
            pids.append(int(name))
    return pids


def kill_session(proc):
    """SIGKILLs the driver, then everything it started (the CLI runs in its own session, so this
    touches only this test's processes): the machine the job ran on is gone."""
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while True:
        left = _session_pids(proc.pid)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.monotonic() < deadline, f"processes survive: {left}"
        time.sleep(0.2)


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


def assert_session_ends(proc, timeout=90):
    """After the driver exited on its own (Ctrl-C, SIGTERM): nothing it started may outlive it, no
    Ray worker, raylet or GCS (they run in the driver's session: start_new_session=True). A bounded
    wait lets processes that were already told to stop finish exiting; whatever is still there is
    killed (so the next step starts clean) and reported as a failure."""
    assert proc.returncode is not None
    deadline = time.monotonic() + timeout
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: _cmdline(pid) for pid in _session_pids(proc.pid)}
    if left:
        kill_session(proc)
    assert not left, f"still running after the driver exited: {left}"


def start(args, fault=None, flag=None, action="pause"):
    env = dict(os.environ, **ENV)
    if fault:
        env.update(BULK_EXPLAIN_TEST_CRASH_AT=fault, BULK_EXPLAIN_TEST_CRASH_ACTION=action,
                   BULK_EXPLAIN_TEST_CRASH_FLAG=flag)
    return subprocess.Popen([sys.executable, "-m", "bulk_explain", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)


def wait_flag(flag, proc, timeout=300):
    """Waits until the fault point fired; returns (pid, shard) written by the process that hit it."""
    deadline = time.monotonic() + timeout
    while True:
        if os.path.exists(flag):
            text = open(flag).read()
            if text.endswith("\n"):
                pid, shard = map(int, text.split())
                return pid, shard
        if proc.poll() is not None:
            raise AssertionError(f"job ended (rc {proc.returncode}) before its fault point:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "fault point never reached"
        time.sleep(0.05)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


# ----------------------------------------------------------------------------- invariants

def content_hash(uris, versions):
    """The commit marker's content hash, as documented (ARCHITECTURE.md, Output protocol) and
    recomputed here rather than with the code that wrote it: sha256 over "uri NUL version LF" per
    row in order, first 32 hex digits."""
    import hashlib

    h = hashlib.sha256()
    for uri, version in zip(uris, versions):
        h.update(uri.encode("utf-8", "surrogateescape") + b"\0" + version.encode() + b"\n")
    return h.hexdigest()[:32]


def visible_state(out):
    """Checks what a reader sees now; returns {source_uri: shard} of the visible rows."""
    manifest = os.path.join(out, "manifest")
    if not os.path.isdir(manifest):
        return {}
    dataset = ds.dataset(manifest)
    assert all(os.path.basename(f).startswith("shard-") for f in dataset.files), dataset.files
    seen = {}
    for path in dataset.files:
        shard = int(os.path.basename(path)[6:11])
        table = pq.read_table(path)
        # a visible part belongs to a commit marker, and holds exactly the inputs that marker hashed
        marker = json.load(open(os.path.join(out, "_commits", f"shard-{shard:05d}.json")))
        uris = table.column("source_uri").to_pylist()
        assert content_hash(uris, table.column("source_version").to_pylist()) == marker["content_hash"]
        assert len(uris) == marker["rows"]
        for uri in uris:
            assert uri not in seen, f"{uri} visible twice"
            seen[uri] = shard
    return seen


def committed_parts(out):
    """{shard: (sha256 of its visible part's bytes, its commit marker)} for every visible shard: a
    shard that survives unchanged keeps both (a redone shard gets a new attempt, so new bytes)."""
    import hashlib

    manifest = os.path.join(out, "manifest")
    found = {}
    for name in sorted(os.listdir(manifest)) if os.path.isdir(manifest) else []:
        if name.startswith("shard-") and name.endswith(".parquet"):
            shard = int(name[6:11])
            with open(os.path.join(manifest, name), "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            found[shard] = (digest, json.load(open(os.path.join(out, "_commits", f"shard-{shard:05d}.json"))))
    return found


def assert_survived(before, out):
    """Every shard visible in `before` (committed_parts) is still visible, with the same bytes and
    marker: the resume kept committed rows as they were, it neither deleted nor redid them."""
    after = committed_parts(out)
    lost = sorted(s for s in before if s not in after)
    changed = sorted(s for s in before if s in after and after[s] != before[s])
    assert not lost and not changed, f"committed shards lost {lost}, rewritten {changed}"


def assert_exactly_once(out, inputs):
    seen = visible_state(out)
    assert sorted(seen) == sorted(inputs)
    table = ds.dataset(os.path.join(out, "manifest")).to_table()
    assert table.num_rows == len(inputs) and set(table.column("status").to_pylist()) == {"ok"}
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith("_tmp-")]
    assert leftovers == []
    staging = os.path.join(out, "_staging")
    assert not os.path.isdir(staging) or os.listdir(staging) == []


# ----------------------------------------------------------------------------- tests

def test_driver_killed_at_every_step_then_resumed(tmp_path):
    inputs = make_inputs(str(tmp_path / "in"), 24)
    out = str(tmp_path / "out")
    # Each step SIGKILLs the driver, whose output lease then holds DST until it expires
    # (tests/test_lease.py covers that); the next step re-runs as an operator who knows the
    # previous run is dead: --break-lease.
    args = ["run", "--input", str(tmp_path / "in"), "--output", out, *MODEL, "--shard-size", "2", "--batch-size", "2",
            "--break-lease"]
    flags = tmp_path / "flags"
    flags.mkdir()

    # A. during listing: nothing was written, nothing is visible
    proc = start(args, "listing", str(flags / "a"))
    wait_flag(str(flags / "a"), proc)
    kill_session(proc)
    assert visible_state(out) == {} and not os.path.exists(os.path.join(out, "job.json"))

    # B. mid-shards, between a shard's part and its marker: the staged part is invisible
    proc = start(args, "after_stage", str(flags / "b"))
    _, b_shard = wait_flag(str(flags / "b"), proc)
    kill_session(proc)
    seen = visible_state(out)
    assert b_shard not in seen.values()
    assert os.path.exists(os.path.join(out, "_staging", f"shard-{b_shard:05d}.parquet"))
    assert not os.path.exists(os.path.join(out, "_commits", f"shard-{b_shard:05d}.json"))

    # C. between the marker (commit point) and publishing the part: committed, not yet visible
    proc = start(args, "after_marker", str(flags / "c"))
    _, c_shard = wait_flag(str(flags / "c"), proc)
    kill_session(proc)
    seen = visible_state(out)
    assert c_shard not in seen.values()
    assert os.path.exists(os.path.join(out, "_commits", f"shard-{c_shard:05d}.json"))
    committed_before_d = len(seen) // 2
    before_d, parts_before_d = seen, committed_parts(out)

    # D. Ctrl-C while a shard is in flight: exit 130, committed work kept; this run first
    #    published shard C from _staging/ ("roll forward")
    proc = start(args, "before_stage", str(flags / "d"))
    wait_flag(str(flags / "d"), proc)
    os.kill(proc.pid, signal.SIGINT)
    rc, err = finish(proc, timeout=120)
    assert rc == 130, err[-3000:]
    assert "re-run the same command to resume" in err
    assert "published 1 shards committed by an interrupted run" in err
    assert_survived(parts_before_d, out)  # what B and C left visible is still there, not redone
    seen = visible_state(out)
    assert c_shard in seen.values() and len(seen) // 2 >= committed_before_d + 1
    assert before_d.items() <= seen.items()  # every row committed before is still there, same shard
    assert_session_ends(proc)  # workers and Ray stopped with the driver

    # E. SIGTERM (what `ray job stop`, Kubernetes and systemd send): exit 143, work kept
    before_e, parts_before_e = visible_state(out), committed_parts(out)
    proc = start(args, "before_stage", str(flags / "e"))
    wait_flag(str(flags / "e"), proc)
    os.kill(proc.pid, signal.SIGTERM)
    rc, err = finish(proc, timeout=120)
    assert rc == 143, err[-3000:]
    assert "interrupted (SIGTERM)" in err
    assert_survived(parts_before_e, out)  # shard C (rolled forward by D) at least
    seen = visible_state(out)
    assert before_e and before_e.items() <= seen.items()  # committed rows survived the interruption
    assert_session_ends(proc)

    # F. a worker process SIGKILLed mid-shard: the actor is replaced, the shard retried, the job
    #    completes with every input exactly once
    proc = start(args, "before_stage", str(flags / "f"))
    worker_pid, _ = wait_flag(str(flags / "f"), proc)
    assert worker_pid != proc.pid
    os.kill(worker_pid, signal.SIGKILL)
    rc, err = finish(proc)
    assert rc == 0, err[-3000:]
    assert "retrying shard" in err
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["failed_shards"] == [] and summary["shards"] == 12 and summary["skipped_shards"] > 0
    assert_exactly_once(out, inputs)

    # and the finished output re-runs as a no-op
    rc, err = finish(start(args))
    assert rc == 0 and "12 shards already committed" in err
    assert_exactly_once(out, inputs)


def test_shard_that_keeps_killing_its_worker_fails_after_bounded_retries(ray_local, tmp_path, monkeypatch, capsys):
    from bulk_explain.jobs import ExplainConfig, ModelSpec, run_explain

    inputs = make_inputs(str(tmp_path / "in"), 8, seed=1)
    out = str(tmp_path / "out")

    def config():  # the default retry policy (README: retried twice, then reported failed)
        return ExplainConfig(inputs=(str(tmp_path / "in"),), output=out, batch_size=2, shard_size=2,
                             model=ModelSpec(kind="cats_dogs", weights="random", input_size=64))

    assert run_explain(config(), progress=False).exit_code == 0
    old_ids = {u: r["image_id"] for u, r in _rows(out).items()}
    # an image of shard 3 changes, and every attempt at shard 3 now kills its worker (os._exit)
    write_image(inputs[7], photo_like(np.random.default_rng(9), 50, 30))
    monkeypatch.setenv("BULK_EXPLAIN_TEST_CRASH_AT", "before_stage:3")
    capsys.readouterr()
    result = run_explain(config(), progress=False)
    assert result.exit_code == 1 and result.failed_shards == [3] and result.skipped_shards == 3
    retries = [line for line in capsys.readouterr().err.splitlines() if "retrying" in line]
    assert len(retries) == 2, retries  # 1 attempt + 2 retries, then given up
    assert "died" in result.failure_reasons[3].lower() or "exit" in result.failure_reasons[3].lower()
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["failed_shards"] == [3] and summary["exit_code"] == 1
    # the failed shard is absent, not stale: its previous rows were withdrawn before the retry
    seen = visible_state(out)
    assert sorted(seen) == inputs[:6]

    monkeypatch.delenv("BULK_EXPLAIN_TEST_CRASH_AT")
    again = run_explain(config(), progress=False)
    assert again.exit_code == 0 and again.processed_shards == 1 and again.skipped_shards == 3
    assert_exactly_once(out, inputs)
    new_ids = {u: r["image_id"] for u, r in _rows(out).items()}
    assert [u for u in inputs if new_ids[u] != old_ids[u]] == [inputs[7]]



API_INTERRUPT_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import ray
    from bulk_explain.jobs import ExplainConfig, ModelSpec, run_explain

    root, out = sys.argv[1:3]
    config = ExplainConfig(inputs=(root,), output=out, batch_size=2, shard_size=2,
                           model=ModelSpec(kind="cats_dogs", weights="random", input_size=64))

    def others():  # every process of this session but this one: Ray's GCS, raylet, agents, workers
        me, found = os.getpid(), {}
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != me:
                try:
                    fields = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()
                    cmd = open(f"/proc/{name}/cmdline", "rb").read().replace(b"\\0", b" ")[:120].decode(errors="replace")
                except OSError:
                    continue
                if int(fields[3]) == me and fields[0] != "Z":
                    found[int(name)] = cmd
        return found

    try:
        run_explain(config, progress=False)
        outcome = "returned"
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    except SystemExit as exc:
        outcome = f"SystemExit({exc.code})"
    # The caller goes on (a notebook, a service): what the job started must stop now, on the way out
    # of run_explain, not when this interpreter exits (Ray's atexit hook would hide a leak there).
    deadline = time.monotonic() + 90
    while others() and time.monotonic() < deadline:
        time.sleep(0.2)
    print(json.dumps({"outcome": outcome, "ray_initialized": ray.is_initialized(), "left": others()}), flush=True)
""")


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_interrupted_api_call_stops_its_workers_and_ray_before_it_returns(tmp_path, signame):
    """Ctrl-C / SIGTERM during `run_explain` in a process that lives on: the workers and the Ray
    that the call started are stopped by the call itself. (The CLI steps D and E above cannot tell:
    Ray's own atexit hook shuts Ray down when the driver process exits anyway.)"""
    make_inputs(str(tmp_path / "in"), 4, seed=4)
    flag = str(tmp_path / "flag")
    env = dict(os.environ, **ENV, BULK_EXPLAIN_TEST_CRASH_AT="before_stage", BULK_EXPLAIN_TEST_CRASH_ACTION="pause",
               BULK_EXPLAIN_TEST_CRASH_FLAG=flag)
    proc = subprocess.Popen([sys.executable, "-c", API_INTERRUPT_SCRIPT, str(tmp_path / "in"), str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        worker_pid, _ = wait_flag(flag, proc)  # a worker is in the middle of a shard
        assert worker_pid != proc.pid
        os.kill(proc.pid, getattr(signal, signame))
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        kill_session(proc)
    assert proc.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["outcome"] == ("KeyboardInterrupt" if signame == "SIGINT" else "SystemExit(143)"), report
    assert report["ray_initialized"] is False, report
    assert report["left"] == {}, f"still running after run_explain returned: {report['left']}"


def test_interrupted_run_in_the_callers_ray_kills_its_actors_and_leaves_ray_up(ray_local, tmp_path, monkeypatch):
    """Ctrl-C during `run_explain` in a Ray the caller started: Ray stays up (it is the caller's),
    but the job's actors are killed on the way out, so they hold no CPUs or GPUs afterwards."""
    from ray.exceptions import RayActorError

    from bulk_explain.jobs import ExplainConfig, ModelSpec, run_explain
    from bulk_explain.jobs.distribute import ActorPool
    from bulk_explain.jobs.progress import Progress

    make_inputs(str(tmp_path / "in"), 6, seed=5)
    pools = []
    real_init = ActorPool.__init__
    monkeypatch.setattr(ActorPool, "__init__", lambda self, *a, **k: pools.append(self) or real_init(self, *a, **k))

    def ctrl_c(self, images, marker):  # the first shard committed, then the user presses Ctrl-C
        raise KeyboardInterrupt()

    monkeypatch.setattr(Progress, "shard_done", ctrl_c)
    config = ExplainConfig(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), batch_size=2, shard_size=2,
                           model=ModelSpec(kind="cats_dogs", weights="random", input_size=64))
    with pytest.raises(KeyboardInterrupt):
        run_explain(config, progress=False)
    assert ray_local.is_initialized()
    actors = [a for pool in pools for a in pool.actors]
    assert actors
    alive = []
    for actor in actors:
        try:
            ray_local.get(actor.ping.remote(), timeout=120)
            alive.append(actor)
        except RayActorError:
            pass
    assert alive == [], f"{len(alive)} of the job's actors still run after the interrupt"

def _rows(out):
    return {r["source_uri"]: r for r in ds.dataset(os.path.join(out, "manifest")).to_table().to_pylist()}


CLUSTER_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time
    import ray
    from ray.cluster_utils import Cluster

    root, out, flag = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)

    from bulk_explain.jobs import ExplainConfig, ModelSpec, run_explain

    config = ExplainConfig(inputs=(root,), output=out, address=cluster.address, workers=2, shard_size=2,
                           batch_size=2, model=ModelSpec(kind="cats_dogs", weights="random", input_size=64))
    box = {}
    job = threading.Thread(target=lambda: box.update(result=run_explain(config, progress=True)))
    job.start()
    while not (os.path.exists(flag) and open(flag).read().endswith("\\n")):
        assert job.is_alive(), "job ended before the fault point"
        time.sleep(0.05)
    pid = int(open(flag).read().split()[0])

    def ancestors(pid):
        while pid > 1:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
            yield pid

    raylets = {n.all_processes["raylet"][0].process.pid: n for n in workers}
    victim = [raylets[p] for p in ancestors(pid) if p in raylets][0]
    cluster.remove_node(victim)  # the node hosting a worker that is in the middle of a shard
    print("removed node", victim.node_id, file=sys.stderr, flush=True)
    job.join(timeout=300)
    assert not job.is_alive()
    print(json.dumps(box["result"].to_dict()))
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.slow
def test_node_leaving_a_two_node_cluster(tmp_path):
    inputs = make_inputs(str(tmp_path / "in"), 16, seed=2)
    out, flag = str(tmp_path / "out"), str(tmp_path / "flag")
    env = dict(os.environ, **ENV, BULK_EXPLAIN_TEST_CRASH_AT="before_stage", BULK_EXPLAIN_TEST_CRASH_ACTION="pause",
               BULK_EXPLAIN_TEST_CRASH_FLAG=flag)
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT, str(tmp_path / "in"), out, flag],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=420)
    finally:
        kill_session(proc)
    assert proc.returncode == 0, stderr[-4000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert "removed node" in stderr and "retrying shard" in stderr
    assert result["exit_code"] == 0 and result["failed_shards"] == [] and result["ok"] == 16
    assert_exactly_once(out, inputs)


def test_roll_forward_checks_the_staged_part_and_temp_files_are_deleted(ray_local, tmp_path):
    """A marker whose staged part holds other rows is not published (the shard is redone), even
    when the part's footer names that marker's commit; a matching one is (roll forward); temp
    files of crashed writes are deleted."""
    import shutil

    from bulk_explain.jobs import ExplainConfig, ModelSpec, run_explain
    from bulk_explain.workers.storage import storage_for
    from bulk_explain.workers.commit import marker_agrees, read_part_commit

    inputs = make_inputs(str(tmp_path / "in"), 8, seed=3)
    out = str(tmp_path / "out")
    config = ExplainConfig(inputs=(str(tmp_path / "in"),), output=out, batch_size=2, shard_size=2,
                           model=ModelSpec(kind="cats_dogs", weights="random", input_size=64))
    assert run_explain(config, progress=False).exit_code == 0
    manifest, staging = os.path.join(out, "manifest"), os.path.join(out, "_staging")
    os.makedirs(staging, exist_ok=True)
    part = lambda folder, shard: os.path.join(folder, f"shard-{shard:05d}.parquet")  # noqa: E731
    # shard 0: died between marker and publish -> published from _staging/
    shutil.move(part(manifest, 0), part(staging, 0))
    # shard 1: its marker is there, but the staged bytes are shard 2's rows -> must not be published
    os.remove(part(manifest, 1))
    shutil.copy(part(manifest, 2), part(staging, 1))
    # shard 3: the staged part's footer names shard 3's commit (attempt, content hash, shard), but
    # its rows are shard 2's -> must not be published either: the rows are checked, not the footer alone
    os.remove(part(manifest, 3))
    rows_of_2 = pq.read_table(part(manifest, 2))
    marker_3 = json.load(open(os.path.join(out, "_commits", "shard-00003.json")))
    footer = dict(rows_of_2.schema.metadata)
    footer.update({b"bulk_explain.attempt_id": marker_3["attempt_id"].encode(),
                   b"bulk_explain.content_hash": marker_3["content_hash"].encode(), b"bulk_explain.shard": b"3"})
    pq.write_table(rows_of_2.replace_schema_metadata(footer), part(staging, 3))
    assert marker_agrees(marker_3, read_part_commit(storage_for(part(staging, 3)), part(staging, 3)))
    temps = [os.path.join(out, folder, f"_tmp-{'ab' * 16}-{name}.tmp")
             for folder, name in (("manifest", "shard-00001.parquet"), ("_commits", "shard-00001.json"),
                                  ("_staging", "shard-00003.parquet"), ("overlays/00001", "00000-0123456789abcdef.jpg"))]
    for path in temps:
        with open(path, "wb") as f:
            f.write(b"half a write")

    result = run_explain(config, progress=False)
    assert result.exit_code == 0
    assert result.rolled_forward_shards == 1
    assert (result.processed_shards, result.skipped_shards) == (2, 2)  # 1 and 3 redone; 0 and 2 kept
    assert [p for p in temps if os.path.exists(p)] == []
    assert_exactly_once(out, inputs)
