"""Data safety (issue 8): a run never destroys, corrupts or silently keeps stale results.

Empty or unmounted inputs and mass removals are refused and leave DST untouched; input and output
may not contain each other; a rewrite that keeps the mtime is recomputed; a visible part that is not
the one its commit marker names is redone; two overlapping drivers end exactly-once after a plain
re-run; names that differ only by a "\\xNN" escape stay two inputs; the driver holds no per-input
Python objects for shards it skips; workers bound decoded bytes, not image counts."""

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import REPO, photo_like, write_image

MODEL = dict(kind="cats_dogs", weights="random", input_size=64)
CLI_MODEL = ["--model", "cats_dogs", "--weights", "random", "--input-size", "64"]
ENV = dict(PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", RAY_DEDUP_LOGS="0")


def _config(root, out, **kw):
    from bulk_explain.jobs import ExplainConfig, ModelSpec

    kw.setdefault("shard_size", 2)
    return ExplainConfig(inputs=(root,), output=out, batch_size=2, model=ModelSpec(**MODEL), **kw)


def _images(root, n, seed=0, ext="jpg", size=(36, 44)):
    rng = np.random.default_rng(seed)
    return sorted(write_image(os.path.join(root, "cats" if i % 2 else "dogs", f"{i:03d}.{ext}"),
                              photo_like(rng, *size)) for i in range(n))


def _snapshot(root):
    """Every file under `root` with a hash of its bytes."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _rows(out):
    table = ds.dataset(os.path.join(out, "manifest")).to_table()
    uris = table.column("source_uri").to_pylist()
    assert len(uris) == len(set(uris)), "a row appears twice"
    return {r["source_uri"]: r for r in table.to_pylist()}


def _assert_consistent(out, inputs):
    """Exactly once, every visible part is the part its marker committed, every referenced image
    file exists and no staged part is left."""
    from bulk_explain.workers.commit import marker_agrees, read_part_commit
    from bulk_explain.workers.storage import LocalStorage

    rows = _rows(out)
    assert sorted(rows) == sorted(inputs)
    for name in os.listdir(os.path.join(out, "manifest")):
        marker = json.load(open(os.path.join(out, "_commits", name.replace(".parquet", ".json"))))
        part = read_part_commit(LocalStorage(), os.path.join(out, "manifest", name))
        assert marker_agrees(marker, part), (name, marker, part)
    for r in rows.values():
        assert r["status"] == "ok", r["error"]
        assert os.path.exists(r["gradcam_overlay_uri"]) and os.path.exists(r["gradcam_heatmap_uri"])
    staging = os.path.join(out, "_staging")
    assert not os.path.isdir(staging) or os.listdir(staging) == []
    return rows


# ----------------------------------------------------------------------------- 1. removals

def test_empty_unmounted_or_unreadable_input_keeps_every_earlier_result(ray_local, tmp_path, monkeypatch):
    from bulk_explain.jobs import run_explain
    from bulk_explain.jobs.explain.config import ConfigError

    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    inputs = _images(root, 6)
    assert run_explain(_config(root, out), progress=False).exit_code == 0
    before = _snapshot(out)

    # an unmounted share: the folder is there and empty
    shutil.move(root, str(tmp_path / "elsewhere"))
    os.makedirs(root)
    with pytest.raises(ConfigError, match="no images found under .*previous run .* planned 6.*--allow-removals"):
        run_explain(_config(root, out), progress=False)
    assert _snapshot(out) == before
    shutil.rmtree(root)
    shutil.move(str(tmp_path / "elsewhere"), root)

    # a folder that cannot be read is an error, not "3 images removed"
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("cats"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ConfigError, match="cannot list folder .*cats: Permission denied"):
        run_explain(_config(root, out), progress=False)
    monkeypatch.undo()
    assert _snapshot(out) == before

    # more than half of the inputs gone: refused; with allow_removals: done, and reported
    for path in inputs[:4]:
        os.remove(path)
    with pytest.raises(ConfigError, match="4 of the 6 images .* are gone .*--allow-removals"):
        run_explain(_config(root, out), progress=False)
    assert _snapshot(out) == before
    result = run_explain(_config(root, out, allow_removals=True), progress=False)
    assert result.exit_code == 0 and result.removed_images == 4
    assert sorted(_rows(out)) == inputs[4:]


def test_cli_no_images_and_nested_input_output_exit_2_with_one_line(tmp_path):
    empty, out = tmp_path / "empty", tmp_path / "out"
    (empty / "cats").mkdir(parents=True)
    (empty / "cats" / "notes.txt").write_text("not an image")
    env = dict(os.environ, **ENV)
    cases = [
        (["--input", str(empty), "--output", str(out)], f"no images found under {empty} (recursively, for jpg/"),
        (["--input", str(out / "overlays"), "--output", str(out)], "is inside output"),
    ]
    (out / "overlays").mkdir(parents=True)
    for args, expected in cases:
        proc = subprocess.run([sys.executable, "-m", "bulk_explain", "run", *args, *CLI_MODEL], capture_output=True,
                              text=True, env=env, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["overlays"]  # nothing written


def test_input_and_output_may_not_contain_each_other_local_and_s3(tmp_path):
    from bulk_explain.jobs import ExplainConfig, ModelSpec
    from bulk_explain.jobs.explain.config import ConfigError

    (tmp_path / "data" / "in").mkdir(parents=True)
    for inputs, output, expected in [
        ((str(tmp_path / "data" / "in"),), str(tmp_path / "data"), "is inside output"),
        ((str(tmp_path / "data"),), str(tmp_path / "data" / "out"), "is inside input"),
        (("s3://bucket/audit/overlays",), "s3://bucket/audit/", "is inside output"),
        (("s3://bucket/photos",), "s3://bucket/photos/audit", "is inside input"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            ExplainConfig(inputs=inputs, output=output, model=ModelSpec(**MODEL)).validated()
    # siblings that share a name prefix are not nested
    ExplainConfig(inputs=("s3://bucket/photos",), output="s3://bucket/photos-audit",
                  model=ModelSpec(**MODEL)).validated()


# ----------------------------------------------------------------------------- 2. versions

def _rewrite_keeping_mtime(path, rgb):
    st = os.stat(path)
    write_image(path, rgb)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p, rsync -t or tar do
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns
    return st.st_size


def test_rewrite_keeping_mtime_with_a_new_size_is_recomputed(ray_local, tmp_path):
    from bulk_explain.jobs import run_explain

    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    paths = _images(root, 4, ext="bmp", size=(20, 24))
    assert run_explain(_config(root, out), progress=False).exit_code == 0
    old = _rows(out)
    old_size = _rewrite_keeping_mtime(paths[1], photo_like(np.random.default_rng(3), 30, 24))
    assert os.path.getsize(paths[1]) != old_size
    result = run_explain(_config(root, out), progress=False)
    assert (result.changed_images, result.processed_shards, result.skipped_shards) == (1, 1, 1)
    rows = _rows(out)
    assert rows[paths[1]]["image_id"] != old[paths[1]]["image_id"] and rows[paths[1]]["height"] == 30
    assert rows[paths[1]]["image_id"] == hashlib.sha256(open(paths[1], "rb").read()).hexdigest()
    assert rows[paths[3]] == old[paths[3]]


def test_verify_content_sees_a_rewrite_with_the_same_size_and_mtime(tmp_path):
    """The driver redoes a shard exactly when its content hash changes (tested end to end above);
    with --verify-content the version, and so the hash, follows the bytes."""
    from bulk_explain.jobs.explain.plan import list_inputs, make_plan, plan_shards

    root = str(tmp_path / "in")
    paths = _images(root, 4, ext="bmp", size=(20, 24))  # BMP: same dimensions, same file size

    def hashes(verify):
        return {s.shard: s.content_hash for s in plan_shards(make_plan(list_inputs([root], verify), 2))}

    before, before_plain = hashes(True), hashes(False)
    listing = list_inputs([root], verify_content=True)
    assert listing.column("version").to_pylist()[0] == \
        "sha256:" + hashlib.sha256(open(paths[0], "rb").read()).hexdigest()[:32]
    size = _rewrite_keeping_mtime(paths[2], photo_like(np.random.default_rng(4), 20, 24))
    assert os.path.getsize(paths[2]) == size
    after = hashes(True)
    assert after[0] == before[0] and after[1] != before[1]
    assert hashes(False) == before_plain  # what size + mtime cannot see (documented)


# ----------------------------------------------------------------------------- 3. commits

def _rewrite_part(path, **meta):
    """The same rows, with footer metadata keys replaced (a part of another attempt / content)."""
    table = pq.read_table(path)
    md = dict(table.schema.metadata)
    md.update({f"bulk_explain.{k}".encode(): v.encode() for k, v in meta.items()})
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(md), buf)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def test_forged_or_foreign_parts_are_redone_not_trusted(ray_local, tmp_path, monkeypatch):
    from bulk_explain.jobs import run_explain

    from bulk_explain.jobs.explain.plan import PlannedShard

    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    inputs = _images(root, 10, seed=4)
    assert run_explain(_config(root, out), progress=False).exit_code == 0
    rows = _assert_consistent(out, inputs)
    part = lambda s: os.path.join(out, "manifest", f"shard-{s:05d}.parquet")  # noqa: E731
    marker = lambda s: json.load(open(os.path.join(out, "_commits", f"shard-{s:05d}.json")))  # noqa: E731
    assert marker(0)["attempt_id"] == pq.read_schema(part(0)).metadata[b"bulk_explain.attempt_id"].decode()

    _rewrite_part(part(0), attempt_id="0" * 32)  # another attempt's part under this marker
    shutil.copyfile(part(2), part(1))  # shard 2's rows where shard 1's part belongs
    # shard 3: committed, not yet published, and the staged part is another attempt's
    os.makedirs(os.path.join(out, "_staging"), exist_ok=True)
    staged = os.path.join(out, "_staging", "shard-00003.parquet")
    shutil.move(part(3), staged)
    _rewrite_part(staged, attempt_id="f" * 32)

    # shard 2: a part without any commit identity (by hand, or by an older version)
    pq.write_table(pq.read_table(part(2)).replace_schema_metadata({}), part(2))

    made = []  # shards that became per-input Python objects in the driver
    real = PlannedShard.task
    monkeypatch.setattr(PlannedShard, "task", lambda self: made.append(self.shard) or real(self))
    result = run_explain(_config(root, out), progress=False)
    assert result.exit_code == 0
    assert (result.mismatched_shards, result.rolled_forward_shards) == (3, 0)
    assert (result.processed_shards, result.skipped_shards) == (4, 1)
    # each redone shard was materialized once, when sent to a worker; never the skipped shard 4
    # (shard 3's foreign staged part was refused from its footer alone)
    assert sorted(made) == [0, 1, 2, 3]
    again = _assert_consistent(out, inputs)
    assert again[inputs[8]] == rows[inputs[8]]  # shard 4 untouched


def _wait_for(path, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and open(path).read().endswith("\n")):
        if proc.poll() is not None:
            raise AssertionError(f"driver A ended (rc {proc.returncode}) early:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "fault point never reached"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_overlapping_drivers_end_exactly_once_after_a_plain_rerun(ray_local, tmp_path):
    """Driver A stops right after writing shard 1's commit marker; meanwhile an image of shard 1
    is rewritten, two images are added and driver B runs to the end (it redoes shard 1). Then A
    goes on. A plain re-run must leave every input exactly once, the changed image's new row,
    every part agreeing with its marker and every referenced file present."""
    from bulk_explain.jobs import run_explain

    root, out, flag = str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "flag")
    inputs = _images(root, 8, seed=6)
    env = dict(os.environ, **ENV, BULK_EXPLAIN_TEST_CRASH_AT="after_marker:1",
               BULK_EXPLAIN_TEST_CRASH_ACTION="hold", BULK_EXPLAIN_TEST_CRASH_FLAG=flag)
    a = subprocess.Popen([sys.executable, "-m", "bulk_explain", "run", "--input", root, "--output", out, *CLI_MODEL,
                          "--shard-size", "2", "--batch-size", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        _wait_for(flag, a)
        plan = pq.read_table(os.path.join(out, "plan.parquet"))
        shard_of = dict(zip(plan.column("source_uri").to_pylist(), plan.column("shard").to_pylist()))
        changed = [u for u in inputs if shard_of[u] == 1][0]
        st = os.stat(changed)
        write_image(changed, photo_like(np.random.default_rng(60), 50, 30))
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))
        added = _images(str(tmp_path / "in" / "zebras"), 2, seed=61)

        # The output lease (workers/lease.py) would refuse B (exit 4): B breaks it, as an operator
        # could, so this test proves the commit protocol's own self-check, independent of the lease.
        from bulk_explain.workers.lease import LeaseOptions

        b = run_explain(_config(root, out), progress=False, lease=LeaseOptions(break_lease=True))
        assert b.exit_code == 0 and b.changed_images == 1 and b.added_images == 2
        open(flag + ".go", "w").close()
        _, err = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            os.killpg(a.pid, 9)
            a.wait()
    result = run_explain(_config(root, out), progress=False)
    assert result.exit_code == 0
    rows = _assert_consistent(out, inputs + added)
    assert rows[changed]["image_id"] == hashlib.sha256(open(changed, "rb").read()).hexdigest()
    assert rows[changed]["height"] == 50
    summary = json.load(open(os.path.join(out, "summary.json")))
    plan = pq.read_table(os.path.join(out, "plan.parquet"))
    assert summary["images"] == plan.num_rows == len(rows)
    assert dict(zip(plan.column("source_uri").to_pylist(), plan.column("shard").to_pylist())) == \
        {u: r["shard"] for u, r in rows.items()}
    # and A's worker had found that its marker was replaced, so it did not publish over B's commit
    assert "redone by another run" in err, err[-3000:]


# ----------------------------------------------------------------------------- 5. names

def test_raw_byte_name_and_literal_escape_name_are_two_inputs(tmp_path):
    from bulk_explain.jobs.explain.plan import list_inputs
    from bulk_explain.workers.storage import storage_for

    root = tmp_path / "in"
    root.mkdir()
    raw = os.path.join(os.fsencode(str(root)), b"\xe9.jpg")
    with open(raw, "wb") as f:
        f.write(b"raw byte name")
    (root / "\\xe9.jpg").write_bytes(b"literal backslash name")
    (root / "\\x5cxe9.jpg").write_bytes(b"an escape of the escape")
    listing = list_inputs([str(root)])
    uris = listing.column("source_uri").to_pylist()
    assert len(uris) == len(set(uris)) == 3
    contents = sorted(storage_for(u).read_bytes(u) for u in uris)
    assert contents == [b"an escape of the escape", b"literal backslash name", b"raw byte name"]


# ----------------------------------------------------------------------------- 4. scale

def test_plan_is_64_bit_text_and_shards_are_references_until_sent(tmp_path):
    from bulk_explain.jobs.explain.plan import ShardTask, iter_shards, list_inputs, make_plan, plan_shards

    root = str(tmp_path / "in")
    inputs = _images(root, 6, seed=8)
    listing = list_inputs([root])
    assert {listing.schema.field(n).type for n in ("source_uri", "version")} == {pa.large_string()}
    assert listing.schema.field("label").type == pa.dictionary(pa.int32(), pa.large_string())  # few distinct
    plan = make_plan(listing, 2)
    assert {plan.schema.field(n).type for n in ("source_uri", "label", "version")} == {pa.large_string()}
    shards = plan_shards(plan)
    assert [(s.shard, s.content_hash, len(s)) for s in shards] == \
        [(t.shard, t.content_hash, len(t)) for t in iter_shards(plan)]
    sent = pickle.loads(pickle.dumps(shards[1]))  # what Ray sends a worker
    assert isinstance(sent, ShardTask) and sent.uris == inputs[2:4] and sent.content_hash == shards[1].content_hash
    assert not hasattr(shards[1], "__dict__")  # a few slots per shard, no per-input lists


def test_worker_read_ahead_is_bounded_by_decoded_bytes(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from bulk_explain.jobs.explain.plan import ShardTask
    from bulk_explain.workers.preprocessing import Preprocessing
    from bulk_explain.workers.explain.reader import ByteBudget, iter_decoded_batches

    paths = _images(str(tmp_path / "in"), 24, seed=9, size=(100, 120))
    task = ShardTask(0, paths, [None] * 24, [1] * 24, ["1"] * 24)
    pre = Preprocessing(height=16, width=16, scaling="rescale")
    one = 100 * 120 * 3 + 16 * 16 * 3
    budget = ByteBudget(3 * one)
    seen = []
    with ThreadPoolExecutor(4) as pool:
        for batch in iter_decoded_batches(task, pre, 2, pool, lookahead_batches=6, budget=budget):
            seen += [(item.position, item.ok) for item in batch]
            time.sleep(0.05)  # compute: the readers would run 12 images ahead without the budget
            del batch
    assert seen == [(i, True) for i in range(24)]
    # the budget plus the one batch the consumer waits for, never the 12-image window
    assert one * 2 <= budget.peak <= 3 * one + 2 * one, budget.peak / one
    assert budget.used == 0


def test_part_footer_is_read_with_a_ranged_get_on_s3(s3_bucket, s3_endpoint):
    from bulk_explain.workers.storage_s3 import S3Storage
    from bulk_explain.workers.commit import PART_ATTEMPT, PART_CONTENT_HASH, PART_SHARD, read_part_commit

    storage = S3Storage()
    table = pa.table({"x": pa.array(np.arange(200_000))})  # a part much larger than its footer
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({PART_SHARD: "7", PART_CONTENT_HASH: "c" * 32,
                                                  PART_ATTEMPT: "a" * 32}), buf)
    uri = f"s3://{s3_bucket}/out/manifest/shard-00007.parquet"
    storage.write_bytes(uri, buf.getvalue())
    tail = storage.read_tail(uri, 1000)
    assert tail == buf.getvalue()[-1000:]
    assert storage.read_tail(uri, 10**9) == buf.getvalue()  # shorter object: all of it
    info = read_part_commit(storage, uri)
    assert (info["shard"], info["content_hash"], info["attempt_id"]) == ("7", "c" * 32, "a" * 32)
    assert read_part_commit(storage, f"s3://{s3_bucket}/out/manifest/shard-00008.parquet") is None
