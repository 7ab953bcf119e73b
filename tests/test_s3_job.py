"""The whole explain job through the CLI against a real S3 HTTP server (moto) on loopback.

S3 -> S3, local -> S3 and S3 -> local, with awkward keys (spaces, unicode), a corrupt image and labels
from key "folders"; the manifest read back from S3 with pyarrow; every input exactly once; output
URIs that are s3:// objects decoding at the original size; no credentials in job.json, summary.json
or the logs; the same job through a proxy answering a share of requests with 503 SlowDown (and
dropping some connections); and a second run that skips every committed shard.

The endpoint reaches the job only through --s3-endpoint-url (the endpoint variables the fixture sets
are removed from the subprocess's environment), credentials only through boto3's standard chain
(the environment), with values distinctive enough to search for.
"""

import hashlib
import json
import os
import subprocess
import sys
import uuid

import cv2
import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from conftest import REPO, photo_like
from s3_server import FaultyS3Proxy, put_objects

pytest_plugins = ["s3_server"]

# moto accepts any key pair; these are unique strings that must never show up in an output or a log.
ACCESS_KEY = "AKIABULKEXPLAINS3JOB"
SECRET_KEY = "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"

SHARD_SIZE = 3
MODEL_ARGS = ["--model", "cats_dogs", "--weights", "random", "--input-size", "64",
              "--shard-size", str(SHARD_SIZE), "--batch-size", "4"]

# key below the input prefix -> (width, height), or None for bytes that do not decode
DATASET = {
    "cats/cat 1.jpg": (61, 47),
    "cats/Tom and Jerry.jpeg": (40, 52),
    "cats/broken.jpg": None,
    "dogs/ねこ 犬 2.png": (58, 44),
    "dogs/dog+plus%20percent.png": (35, 70),
    "Ünïcödé 猫/  two  spaces .jpg": (80, 33),
    "Ünïcödé 猫/deep/nested.bmp": (29, 31),
    "top.webp": (36, 36),
}
N_SHARDS = -(-len(DATASET) // SHARD_SIZE)


def _encode(rel, size, rng):
    if size is None:
        return b"\xff\xd8\xff\xe0 this is not really a jpeg"
    rgb = photo_like(rng, size[1], size[0])
    ok, buf = cv2.imencode(os.path.splitext(rel)[1], cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok, rel
    return buf.tobytes()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(11)
    return {rel: _encode(rel, size, rng) for rel, size in DATASET.items()}


def expected_label(rel):
    parent = os.path.dirname(rel)
    return os.path.basename(parent) if parent else None


def job_env(**extra):
    """The environment of a user's shell: credentials in the standard variables, no endpoint."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3",
               AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    for name in ("BULK_EXPLAIN_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        env.pop(name, None)
    env.update(extra)
    return env


def run_cli(args, endpoint):
    cmd = [sys.executable, "-m", "bulk_explain", "run", *args, *MODEL_ARGS, "--s3-endpoint-url", endpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=job_env(), timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert secret not in proc.stdout and secret not in proc.stderr
    return proc


def new_bucket(s3_client):
    name = f"s3job-{uuid.uuid4().hex[:10]}"
    s3_client.create_bucket(Bucket=name)
    return name


def arrow_fs(endpoint):
    scheme, _, hostport = endpoint.partition("://")
    return pafs.S3FileSystem(endpoint_override=hostport, scheme=scheme, region="us-east-1",
                             access_key=ACCESS_KEY, secret_key=SECRET_KEY)


def read_manifest_s3(endpoint, bucket, prefix):
    """The committed rows, read with pyarrow's own S3 filesystem straight from the server."""
    dataset = ds.dataset(f"{bucket}/{prefix}/manifest", filesystem=arrow_fs(endpoint), format="parquet")
    assert len(dataset.files) == N_SHARDS  # one part per shard
    return dataset.to_table().to_pylist()


def get_object(s3_client, uri):
    assert uri.startswith("s3://"), uri
    bucket, _, key = uri[len("s3://"):].partition("/")
    s3_client.head_object(Bucket=bucket, Key=key)  # exists as an object, not only as a listing entry
    return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()


def load_output(uri, s3_client):
    if uri.startswith("s3://"):
        data = get_object(s3_client, uri)
    else:
        assert os.path.isabs(uri), uri
        with open(uri, "rb") as f:
            data = f.read()
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def check_rows(rows, images, source_root, out_root, s3_client):
    """Every input exactly once, with the right status, size, label, id and outputs under out_root."""
    sources = [r["source_uri"] for r in rows]
    assert len(sources) == len(set(sources)) == len(images)
    assert set(sources) == {f"{source_root}/{rel}" for rel in images}
    for row in rows:
        rel = row["source_uri"][len(source_root) + 1:]
        size = DATASET[rel]
        assert row["label"] == expected_label(rel), rel
        assert row["image_id"] == hashlib.sha256(images[rel]).hexdigest()
        if size is None:
            assert row["status"] == "error" and row["error"] and "\n" not in row["error"]
            assert row["gradcam_overlay_uri"] is None and row["gradcam_heatmap_uri"] is None
            continue
        assert row["status"] == "ok", (rel, row["error"])
        assert (row["width"], row["height"]) == size
        for column in ("gradcam_overlay_uri", "gradcam_heatmap_uri"):
            assert row[column].startswith(out_root + "/"), row[column]
        overlay = load_output(row["gradcam_overlay_uri"], s3_client)
        heat = load_output(row["gradcam_heatmap_uri"], s3_client)
        assert overlay.shape == (size[1], size[0], 3), rel
        assert heat.shape == (size[1], size[0]) and heat.dtype == np.uint8, rel
        assert row["cam_empty"] or (0 <= row["cam_peak_x"] <= 1 and 0 <= row["cam_peak_y"] <= 1)
        assert row["pred_label"] in ("cat", "dog")


def check_no_credentials(blobs):
    for name, data in blobs.items():
        assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, name
        assert b"aws_secret" not in data.lower() and b"secret_access_key" not in data.lower(), name


def small_objects(s3_client, bucket, prefix):
    """Every non-image object under the prefix (json, parquet): what could carry a credential."""
    out = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", ()):
            if item["Key"].endswith((".json", ".parquet")):
                out[item["Key"]] = s3_client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return out


@pytest.fixture(scope="module")
def s3_input(s3_server, s3_client, images):
    bucket = new_bucket(s3_client)
    put_objects(s3_client, bucket, {f"in/{rel}": data for rel, data in images.items()})
    # Listed but never planned: a non-image and a hidden folder under the prefix, a sibling prefix.
    put_objects(s3_client, bucket, {"in/cats/notes.txt": b"not an image",
                                    "in/.cache/x.jpg": images["cats/cat 1.jpg"],
                                    "in2/sibling.jpg": images["cats/cat 1.jpg"]})
    return bucket


@pytest.fixture(scope="module")
def s3_to_s3(s3_server, s3_client, s3_input):
    """The first run, and what it wrote, read right away: a later test re-runs into the same
    output (rewriting summary.json), so the checks of this run must not read it again later."""
    args = ["--input", f"s3://{s3_input}/in/", "--output", f"s3://{s3_input}/out/"]
    proc = run_cli(args, s3_server)
    written = small_objects(s3_client, s3_input, "out")
    return args, proc, written


def test_s3_to_s3(s3_to_s3, s3_endpoint, s3_client, s3_input, images):
    _, proc, written = s3_to_s3
    assert f"shards {N_SHARDS}/{N_SHARDS}" in proc.stderr
    rows = read_manifest_s3(s3_endpoint, s3_input, "out")
    check_rows(rows, images, f"s3://{s3_input}/in", f"s3://{s3_input}/out", s3_client)
    assert sorted({r["shard"] for r in rows}) == list(range(N_SHARDS))

    job = json.loads(written["out/job.json"])
    summary = json.loads(written["out/summary.json"])
    assert [i.rstrip("/") for i in job["config"]["inputs"]] == [f"s3://{s3_input}/in"]
    assert job["config"]["s3_endpoint_url"] == s3_endpoint  # where, never who
    assert summary["ok"] == len(images) - 1 and summary["errors"] == 1
    assert summary["shards"] == N_SHARDS and summary["processed_shards"] == N_SHARDS
    for marker in range(N_SHARDS):
        get_object(s3_client, f"s3://{s3_input}/out/_commits/shard-{marker:05d}.json")
    assert {"out/job.json", "out/summary.json", "out/plan.parquet"} <= set(written)
    check_no_credentials(written)


def test_manifest_through_the_jobs_own_filesystem(s3_to_s3, s3_endpoint, s3_input):
    """What docs/cluster.md tells users: storage_for(uri).filesystem(uri) reads the committed rows."""
    from bulk_explain.workers.storage import storage_for

    uri = f"s3://{s3_input}/out/manifest"
    fs, path = storage_for(uri).filesystem(uri)
    table = ds.dataset(path, filesystem=fs, format="parquet").to_table()
    assert table.num_rows == len(DATASET)
    assert table.column("status").to_pylist().count("error") == 1


def test_second_run_skips_committed_shards(s3_to_s3, s3_endpoint, s3_client, s3_input, images):
    args, _, _ = s3_to_s3
    before = {k: v for k, v in small_objects(s3_client, s3_input, "out").items() if "manifest/" in k}
    proc = run_cli(args, s3_endpoint)
    assert f"{N_SHARDS} shards already committed" in proc.stderr
    assert "starting" not in proc.stderr  # no workers were started for nothing
    summary = json.loads(get_object(s3_client, f"s3://{s3_input}/out/summary.json"))
    assert summary["skipped_shards"] == N_SHARDS and summary["processed_shards"] == 0
    assert summary["ok"] == len(images) - 1 and summary["errors"] == 1
    after = {k: v for k, v in small_objects(s3_client, s3_input, "out").items() if "manifest/" in k}
    assert after == before  # the parts were not rewritten
    check_rows(read_manifest_s3(s3_endpoint, s3_input, "out"), images, f"s3://{s3_input}/in",
               f"s3://{s3_input}/out", s3_client)


def test_local_to_s3(s3_endpoint, s3_client, images, tmp_path):
    root = tmp_path / "photos"
    for rel, data in images.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    bucket = new_bucket(s3_client)
    run_cli(["--input", str(root), "--output", f"s3://{bucket}/audits/run 1"], s3_endpoint)
    rows = read_manifest_s3(s3_endpoint, bucket, "audits/run 1")
    check_rows(rows, images, str(root), f"s3://{bucket}/audits/run 1", s3_client)
    blobs = small_objects(s3_client, bucket, "audits/run 1")
    assert {"audits/run 1/job.json", "audits/run 1/summary.json"} <= set(blobs)
    check_no_credentials(blobs)


def test_s3_to_local(s3_endpoint, s3_client, s3_input, images, tmp_path):
    out = tmp_path / "local out"
    run_cli(["--input", f"s3://{s3_input}/in", "--output", str(out)], s3_endpoint)
    dataset = ds.dataset(str(out / "manifest"))
    assert len(dataset.files) == N_SHARDS
    check_rows(dataset.to_table().to_pylist(), images, f"s3://{s3_input}/in", str(out), s3_client)
    blobs = {name: (out / name).read_bytes() for name in ("job.json", "summary.json")}
    check_no_credentials(blobs)
    assert json.loads(blobs["summary.json"])["errors"] == 1


def test_s3_to_s3_through_throttling_proxy(s3_endpoint, s3_client, s3_input, images):
    """Every 3rd distinct request is first answered 503 SlowDown, every 7th first loses its
    connection: retries cost time, never rows."""
    with FaultyS3Proxy(s3_endpoint, throttle_every=3, reset_every=7) as proxy:
        proc = run_cli(["--input", f"s3://{s3_input}/in", "--output", f"s3://{s3_input}/throttled"],
                       proxy.endpoint_url)
        throttled, resets, distinct = proxy.throttled, proxy.resets, proxy.distinct
        puts = proxy.requests_matching("PUT")
        log = list(proxy.log)
    # The job's requests really went through the proxy, faults were injected, and every request
    # that met a fault was sent again by the job (botocore's retries) until it went through: a
    # client that gave up after a 503 or a reset would leave a faulted request with no later
    # successful attempt.
    assert distinct >= 3 * len(DATASET) and throttled >= 1 and resets >= 1
    faulted = {(m, p) for m, p, fault in log if fault}
    went_through = {(m, p) for m, p, fault in log if fault is None}
    assert faulted and faulted <= went_through, sorted(faulted - went_through)[:5]
    assert any("/throttled/manifest/" in p for p in puts) and any("/throttled/_commits/" in p for p in puts)
    assert "retrying" not in proc.stderr  # botocore's retries absorbed it: no shard had to be redone
    rows = read_manifest_s3(s3_endpoint, s3_input, "throttled")
    check_rows(rows, images, f"s3://{s3_input}/in", f"s3://{s3_input}/throttled", s3_client)
    summary = json.loads(get_object(s3_client, f"s3://{s3_input}/throttled/summary.json"))
    assert summary["ok"] == len(images) - 1 and summary["errors"] == 1 and summary["failed_shards"] == []


def test_incremental_rerun_after_an_etag_change(s3_endpoint, ray_local, s3_client, images):
    """On S3 an object's version is its ETag: re-uploading the same bytes (new LastModified, same
    ETag) redoes nothing, new bytes under the same key redo that one shard and replace its row."""
    from bulk_explain.jobs import ExplainConfig, ModelSpec, run_explain

    bucket = new_bucket(s3_client)
    keys = sorted(rel for rel, size in DATASET.items() if size is not None)[:4]
    put_objects(s3_client, bucket, {f"in/{rel}": images[rel] for rel in keys})
    config = ExplainConfig(inputs=(f"s3://{bucket}/in",), output=f"s3://{bucket}/out", batch_size=2, shard_size=2,
                           model=ModelSpec(kind="cats_dogs", weights="random", input_size=64))
    first = run_explain(config, progress=False)
    assert first.exit_code == 0 and first.ok == 4 and first.processed_shards == 2

    def rows():
        fs, path = arrow_fs(s3_endpoint), f"{bucket}/out/manifest"
        return {r["source_uri"]: r for r in ds.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()}

    before = rows()
    same, changed = keys[0], keys[3]  # in shards 0 and 1
    put_objects(s3_client, bucket, {f"in/{same}": images[same]})  # same bytes: same ETag
    new_bytes = _encode(changed, DATASET[changed], np.random.default_rng(99))
    assert new_bytes != images[changed]
    put_objects(s3_client, bucket, {f"in/{changed}": new_bytes})
    second = run_explain(config, progress=False)
    assert second.exit_code == 0
    assert (second.changed_images, second.added_images, second.removed_images) == (1, 0, 0)
    assert (second.processed_shards, second.skipped_shards) == (1, 1)
    after = rows()
    assert sorted(after) == sorted(before)
    uri = f"s3://{bucket}/in/{changed}"
    assert after[uri]["image_id"] == hashlib.sha256(new_bytes).hexdigest() != before[uri]["image_id"]
    assert after[uri]["source_version"] != before[uri]["source_version"]
    for key in keys[:2]:  # shard 0 was skipped: its rows are the very same
        assert after[f"s3://{bucket}/in/{key}"] == before[f"s3://{bucket}/in/{key}"]
