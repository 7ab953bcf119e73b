"""The S3 backend of the storage seam against a real S3 HTTP server (moto) on loopback.

Listing thousands of keys page by page, awkward key names, whole-object writes, conditional writes,
pyarrow reading Parquet through the backend's filesystem, and S3's failure modes (503 SlowDown,
connection resets, bodies cut off mid-stream) injected by a proxy.
"""

import hashlib
import io
import math
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from s3_server import FaultyS3Proxy, populate_bucket
from bulk_explain.workers.storage import FileEntry, StorageError, storage_for
from bulk_explain.workers.storage_s3 import S3Storage, split_uri

# The S3 fixtures (s3_server, s3_endpoint, s3_client, s3_bucket, s3_proxy). tests/conftest.py should register
# the same plugin first; naming it here too keeps this file runnable on its own.
pytest_plugins = ["s3_server"]

N_IMAGES = 5_000


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(scope="module")
def big_prefix(s3_server, s3_client):
    """A bucket with 5,000 images under `big/` in 50 folders, plus things listing must skip."""
    bucket = "test-big-listing"
    s3_client.create_bucket(Bucket=bucket)
    images = {f"big/class {i % 50:02d}/img {i:05d}.jpg": f"jpeg {i}".encode() for i in range(N_IMAGES)}
    noise = {
        "big/class 00/notes.txt": b"not an image",           # wrong extension
        "big/.hidden/img.jpg": b"hidden folder",              # hidden folder
        "big/class 01/.img.jpg": b"hidden file",              # hidden file (macOS ._ files)
        "big/class 02/": b"",                                 # "folder" marker object
        "big2/img 00000.jpg": b"sibling prefix, not under big/",
        "bi/img.jpg": b"shorter prefix",
    }
    how = populate_bucket(s3_client, bucket, {**images, **noise})
    return bucket, images, noise, how


def _list_calls(proxy):
    return [parse_qs(urlsplit(p).query) for p in proxy.requests_matching("GET", "list-type=2")]


def test_lists_5000_objects_completely_with_etags(big_prefix, s3_endpoint):
    bucket, images, noise, _ = big_prefix
    with FaultyS3Proxy(s3_endpoint) as proxy:
        storage = S3Storage(endpoint_url=proxy.endpoint_url)
        entries = list(storage.list_files(f"s3://{bucket}/big/"))
        calls = _list_calls(proxy)

    uris = [e.uri for e in entries]
    assert len(uris) == len(set(uris)) == N_IMAGES
    assert set(uris) == {f"s3://{bucket}/{k}" for k in images}
    by_uri = {e.uri: e for e in entries}
    for key in ("big/class 07/img 00007.jpg", "big/class 49/img 04999.jpg"):
        entry = by_uri[f"s3://{bucket}/{key}"]
        assert entry == FileEntry(uri=entry.uri, size=len(images[key]), version=_md5(images[key]))
    # 5,000 images + 4 skipped objects under big/ at the default 1000 keys per request.
    assert len(calls) == math.ceil((N_IMAGES + 4) / 1000)
    assert all(c["max-keys"] == ["1000"] and c["prefix"] == ["big/"] for c in calls)
    # Sorting and shards are the planner's; the listing must at least be the same set every time.
    assert {e.uri for e in S3Storage(endpoint_url=s3_endpoint).list_files(f"s3://{bucket}/big")} == set(uris)


def test_page_size_from_environment_is_respected(big_prefix, s3_endpoint, monkeypatch):
    bucket, images, _, _ = big_prefix
    monkeypatch.setenv("BULK_EXPLAIN_S3_PAGE_SIZE", "700")
    with FaultyS3Proxy(s3_endpoint) as proxy:
        entries = list(S3Storage(endpoint_url=proxy.endpoint_url).list_files(f"s3://{bucket}/big"))
        calls = _list_calls(proxy)
    assert len(entries) == N_IMAGES
    assert len(calls) == math.ceil((N_IMAGES + 4) / 700) == 8
    assert [c["max-keys"] for c in calls] == [["700"]] * 8
    assert all("continuation-token" in c for c in calls[1:])

    for bad in ("5000", "1.5"):  # out of range; not an integer
        monkeypatch.setenv("BULK_EXPLAIN_S3_PAGE_SIZE", bad)
        with pytest.raises(StorageError, match=rf"^BULK_EXPLAIN_S3_PAGE_SIZE must be an integer from 1 to 1000, "
                                               rf"received '{bad}'$"):
            next(S3Storage(endpoint_url=s3_endpoint).list_files(f"s3://{bucket}/big"))


def test_listing_is_streamed_page_by_page(big_prefix, s3_endpoint):
    """The first entries arrive after one request: a huge prefix never sits in memory at once."""
    bucket, _, _, _ = big_prefix
    with FaultyS3Proxy(s3_endpoint) as proxy:
        listing = S3Storage(endpoint_url=proxy.endpoint_url, page_size=100).list_files(
            f"s3://{bucket}/big/")
        first = [next(listing) for _ in range(50)]
        assert len(_list_calls(proxy)) == 1
        listing.close()
    assert all(e.uri.startswith(f"s3://{bucket}/big/") for e in first)


def test_listing_survives_throttling_and_resets(big_prefix, s3_endpoint):
    bucket, images, _, _ = big_prefix
    with FaultyS3Proxy(s3_endpoint, throttle_every=3, reset_every=4) as proxy:
        entries = list(S3Storage(endpoint_url=proxy.endpoint_url).list_files(f"s3://{bucket}/big/"))
        assert proxy.throttled >= 1 and proxy.resets >= 1
    assert sorted(e.uri for e in entries) == sorted(f"s3://{bucket}/{k}" for k in images)


AWKWARD_KEYS = [
    "pets/my cats/Tom and Jerry.jpg",
    "pets/Ünïcödé 猫/ねこ 1.jpeg",
    "pets/emoji 🐶/dog+plus%20percent.png",
    "pets/q?a#b&c=d/x.JPG",
    "pets/  leading spaces/ trailing .jpg",
]


def test_keys_with_spaces_and_unicode_round_trip(s3_bucket):
    storage = S3Storage()
    root = f"s3://{s3_bucket}/pets"
    written = {}
    for i, key in enumerate(AWKWARD_KEYS):
        uri = storage.join(f"s3://{s3_bucket}", *key.split("/"))
        assert uri == f"s3://{s3_bucket}/{key}"
        written[uri] = f"image {i}".encode() * (i + 1)
        storage.write_bytes(uri, written[uri])

    listed = {e.uri: e for e in storage.list_files(root)}
    assert set(listed) == set(written)
    for uri, data in written.items():
        assert split_uri(uri) == (s3_bucket, uri[len(f"s3://{s3_bucket}/"):])
        assert storage.read_bytes(uri) == data
        assert storage.exists(uri)
        assert listed[uri].size == len(data) and listed[uri].version == _md5(data)
    assert set(storage.list_names(root + "/")) == set(written)
    assert storage.exists(f"s3://{s3_bucket}/pets/Ünïcödé 猫")  # a "folder"
    assert not storage.exists(f"s3://{s3_bucket}/pets/Ünïcödé")  # not a folder: a name prefix


def test_storage_for_registers_backend_and_normalizes(s3_endpoint):
    storage = storage_for("s3://some-bucket/x")
    assert isinstance(storage, S3Storage)
    assert storage.normalize("S3://bucket/a b/c") == "s3://bucket/a b/c"
    assert storage.join("s3://bucket/out/", "manifest", "part-00001.parquet") == \
        "s3://bucket/out/manifest/part-00001.parquet"
    assert storage.join("s3://bucket", "x") == "s3://bucket/x"
    assert storage.is_inside("s3://bucket/out/sub", "s3://bucket/out/")
    assert not storage.is_inside("s3://bucket/output", "s3://bucket/out")
    with pytest.raises(StorageError):
        split_uri("s3:///key")


def test_write_replaces_whole_objects_only(s3_bucket):
    """Concurrent readers see one complete version or the other, never a mix, never a part."""
    storage = S3Storage()
    uri = f"s3://{s3_bucket}/out/manifest/part-00000.parquet"
    versions = [bytes([65 + v]) * (512 * 1024) for v in range(4)]
    storage.write_bytes(uri, versions[0])
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(storage.read_bytes(uri))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(12):
        storage.write_bytes(uri, versions[i % 4])
    stop.set()
    for t in threads:
        t.join()
    assert seen and all(data in versions for data in seen)
    assert storage.read_bytes(uri) == versions[11 % 4]
    # One PUT, no temporary objects left beside it.
    assert list(storage.list_names(f"s3://{s3_bucket}/out")) == [uri]


def test_write_bytes_if_absent(s3_bucket, s3_endpoint):
    storage = S3Storage()
    uri = f"s3://{s3_bucket}/out/_commits/00003.json"
    assert storage.write_bytes_if_absent(uri, b"first") is True
    assert storage.write_bytes_if_absent(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"

    race = f"s3://{s3_bucket}/out/_commits/00004.json"
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: storage.write_bytes_if_absent(race, b"%d" % i), range(8)))
    assert results.count(True) == 1
    assert storage.read_bytes(race) == b"%d" % results.index(True)


def test_write_bytes_if_absent_falls_back_without_conditional_puts(s3_bucket, s3_endpoint):
    with FaultyS3Proxy(s3_endpoint, reject_conditional_writes=True) as proxy:
        storage = S3Storage(endpoint_url=proxy.endpoint_url)
        uri = f"s3://{s3_bucket}/out/_commits/00001.json"
        assert storage.write_bytes_if_absent(uri, b"one") is True
        assert storage.write_bytes_if_absent(uri, b"two") is False
        assert storage.write_bytes_if_absent(f"s3://{s3_bucket}/out/_commits/00002.json", b"x")
        # The 501 is asked once per bucket, then remembered.
        conditional = [p for m, p, _ in proxy.log if m == "PUT"]
        assert len(conditional) == 3  # rejected conditional PUT, then 2 plain PUTs
    assert storage.read_bytes(uri) == b"one"


def test_missing_things(s3_bucket):
    storage = S3Storage()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"s3://{s3_bucket}/nope.jpg")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://no-such-bucket-here/nope.jpg")
    assert not storage.exists(f"s3://{s3_bucket}/nope.jpg")
    assert not storage.exists("s3://no-such-bucket-here/x")
    storage.delete(f"s3://{s3_bucket}/nope.jpg")  # no error, like a local delete
    with pytest.raises(StorageError, match="no objects"):
        list(storage.list_files(f"s3://{s3_bucket}/empty/"))
    with pytest.raises(StorageError, match="does not exist"):
        list(storage.list_files("s3://no-such-bucket-here/data/"))
    assert list(storage.list_names(f"s3://{s3_bucket}/empty")) == []
    assert list(storage.list_names("s3://no-such-bucket-here/x")) == []

    uri = f"s3://{s3_bucket}/a/b.jpg"
    storage.write_bytes(uri, b"x")
    storage.delete(uri)
    assert not storage.exists(uri)


def _manifest_parts(storage, root, n_parts=3, rows_per_part=40):
    expected = []
    for part in range(n_parts):
        rows = [{"source_uri": f"s3://in/k {part}-{i}.jpg", "status": "ok", "shard": part,
                 "pred_score": float(i) / 7} for i in range(rows_per_part)]
        expected += rows
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        storage.write_bytes(storage.join(root, "manifest", f"part-{part:05d}.parquet"), buf.getvalue())
    return expected


def test_pyarrow_reads_parquet_written_through_the_backend(s3_bucket):
    storage = S3Storage()
    root = f"s3://{s3_bucket}/audits/run 1"
    expected = _manifest_parts(storage, root)
    fs, path = storage.filesystem(storage.join(root, "manifest"))
    assert path == f"{s3_bucket}/audits/run 1/manifest"
    table = ds.dataset(path, filesystem=fs, format="parquet").to_table()
    got = sorted(table.to_pylist(), key=lambda r: r["source_uri"])
    assert got == sorted(expected, key=lambda r: r["source_uri"])


def test_pyarrow_reads_through_throttling(s3_bucket, s3_proxy):
    expected = _manifest_parts(S3Storage(), f"s3://{s3_bucket}/out")
    storage = S3Storage(endpoint_url=s3_proxy.endpoint_url)
    fs, path = storage.filesystem(f"s3://{s3_bucket}/out/manifest")
    table = ds.dataset(path, filesystem=fs, format="parquet").to_table()
    assert table.num_rows == len(expected)
    assert s3_proxy.throttled >= 1


def test_standard_aws_endpoint_variable_is_enough(s3_bucket, s3_endpoint, monkeypatch):
    """Without --s3-endpoint-url, boto3's own AWS_ENDPOINT_URL reaches the store (and pyarrow)."""
    monkeypatch.delenv("BULK_EXPLAIN_S3_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    storage = S3Storage()
    assert storage.configured_endpoint() is None
    uri = f"s3://{s3_bucket}/std/part.parquet"
    buf = io.BytesIO()
    pq.write_table(pa.table({"x": [1, 2, 3]}), buf)
    storage.write_bytes(uri, buf.getvalue())
    assert storage.endpoint_url() == s3_endpoint
    fs, path = storage.filesystem(f"s3://{s3_bucket}/std")
    assert ds.dataset(path, filesystem=fs, format="parquet").to_table().column("x").to_pylist() == [1, 2, 3]


def test_reads_writes_and_listing_survive_s3_failures(s3_bucket, s3_endpoint):
    """503 SlowDown, connection resets and bodies cut mid-stream: nothing lost, nothing corrupt."""
    objects = {f"s3://{s3_bucket}/in/cls {i % 3}/img {i}.png": (b"%05d" % i) * (50 + i)
               for i in range(60)}
    with FaultyS3Proxy(s3_endpoint, throttle_every=3, reset_every=5, truncate_every=4) as proxy:
        storage = S3Storage(endpoint_url=proxy.endpoint_url, page_size=25)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kv: storage.write_bytes(*kv), objects.items()))
            read = dict(zip(objects, pool.map(storage.read_bytes, objects)))
        listed = {e.uri for e in storage.list_files(f"s3://{s3_bucket}/in")}
        assert proxy.throttled > 5 and proxy.resets > 3 and proxy.truncated > 3
    assert read == objects
    assert listed == set(objects)


def test_no_credentials_in_pickles_reprs_or_logs(s3_bucket, monkeypatch, caplog):
    secret = "s3cr3t-never-print-me-0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage = S3Storage()
    with caplog.at_level("DEBUG", logger="bulk_explain.workers.storage_s3"):
        storage.write_bytes(f"s3://{s3_bucket}/k.jpg", b"x")
        storage.filesystem(f"s3://{s3_bucket}")
    assert secret not in caplog.text and secret not in repr(storage)
    blob = pickle.dumps(storage)
    assert secret.encode() not in blob
    clone = pickle.loads(blob)
    assert clone.read_bytes(f"s3://{s3_bucket}/k.jpg") == b"x"
