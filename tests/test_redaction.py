"""Credentials and endpoints (issue 8 item 7, issue 9, issue 15): URL userinfo is redacted whatever
characters the password holds; the S3 endpoint reaches workers through their settings, never
through os.environ or Ray's runtime_env; small JSON files (markers, job.json) are "missing" only when
the backend says FileNotFoundError, any other read error stops the job (exit 5 from the CLI) in both
job kinds."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from bulk_explain.jobs.runtime import EnvironmentProblem, read_json, redact, redacted, s3_storage_configured, worker_env
from bulk_explain.workers.storage import LocalStorage, storage_for


@pytest.mark.parametrize("text,expected", [
    ("http://KEY:SECRET/with/slash@host:9000", "http://***@host:9000"),
    ("http://user:p@ss@host", "http://***@host"),
    ("http://KEY:SE/CR@ET@minio.local/bucket/a@b.jpg", "http://***@minio.local/bucket/a@b.jpg"),
    ("https://user:pw@h.example.com/a/b@c", "https://***@h.example.com/a/b@c"),
    ("http://token@host/x", "http://***@host/x"),
    ("see http://u:p@h and http://v:q/r@g end", "see http://***@h and http://***@g end"),
    # no credentials: unchanged, even with "@" in a key or path
    ("s3://bucket/photos/me@home.jpg", "s3://bucket/photos/me@home.jpg"),
    ("/data/a@b.jpg", "/data/a@b.jpg"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_redact(text, expected):
    assert redact(text) == expected


def test_redacted_walks_json_like_values():
    value = {"s3_endpoint_url": "http://u:s3cr/et@h:9", "inputs": ["s3://b/me@x.jpg"], "n": 3, "none": None}
    assert redacted(value) == {"s3_endpoint_url": "http://***@h:9", "inputs": ["s3://b/me@x.jpg"], "n": 3,
                               "none": None}


# ------------------------------------------------------------------------- reading markers


class DenyingStorage(LocalStorage):
    """A local backend whose reads of `denied` fail like an S3 AccessDenied / 5xx would."""

    def __init__(self, denied, error):
        self.denied, self.error = denied, error

    def read_bytes(self, uri):
        if os.path.basename(uri) == self.denied:
            raise self.error
        return super().read_bytes(uri)


def test_read_json_missing_is_none_and_every_other_error_raises(tmp_path):
    storage = LocalStorage()
    (tmp_path / "ok.json").write_text('{"a": 1}')
    (tmp_path / "bad.json").write_text('{"a": ')
    assert read_json(storage, str(tmp_path / "ok.json")) == {"a": 1}
    assert read_json(storage, str(tmp_path / "missing.json")) is None
    # an error whose text merely contains "404" is not "missing"
    for error in (PermissionError("access denied to s3://b/_commits/shard-00001.json (AccessDenied)"),
                  OSError("S3 error on s3://b/_commits/shard-00404.json: InternalError")):
        with pytest.raises(EnvironmentProblem, match="cannot read"):
            read_json(DenyingStorage("ok.json", error), str(tmp_path / "ok.json"))
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(EnvironmentProblem):
        read_json(storage, str(tmp_path / "dir.json"))
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json(storage, str(tmp_path / "bad.json"))


@pytest.mark.parametrize("kind", ["explain", "filters"])
def test_unreadable_marker_fails_both_job_kinds_instead_of_recomputing(tmp_path, kind):
    """Both kinds read their markers through the runner's shared `sort_units`: an AccessDenied
    marker stops the job (exit 5) instead of counting as "not committed" and being recomputed."""
    from bulk_explain.jobs.units import existing_files, read_markers, sort_units
    from bulk_explain.workers.filters.layout import FiltersLayout
    from bulk_explain.workers.layout import OutputLayout

    layout = OutputLayout(str(tmp_path / "out")) if kind == "explain" else FiltersLayout(str(tmp_path / "out"))
    for shard in (0, 1):
        layout.storage.write_bytes(layout.commit_marker(shard), b'{"content_hash": "x"}')
    assert read_markers(LocalStorage(), layout, [0, 1]) == {0: {"content_hash": "x"}, 1: {"content_hash": "x"}}
    denied = PermissionError("access denied (AccessDenied)")
    storage = DenyingStorage(os.path.basename(layout.commit_marker(1)), denied)
    with pytest.raises(EnvironmentProblem):
        read_markers(storage, layout, [0, 1])

    class Unit:
        def __init__(self, shard):
            self.shard, self.content_hash = shard, "x"

    layout.storage = storage  # what sort_units reads through
    with pytest.raises(EnvironmentProblem, match="cannot read"):
        sort_units(layout, [Unit(0), Unit(1)], existing_files(layout), "f")


def test_cli_exits_5_with_one_line_when_job_json_cannot_be_read(tmp_path):
    from test_reliability import ENV, MODEL, make_inputs

    make_inputs(str(tmp_path / "in"), 1)
    out = tmp_path / "out"
    (out / "job.json").mkdir(parents=True)  # exists, and reading it fails (not "missing")
    proc = subprocess.run([sys.executable, "-m", "bulk_explain", "run", "--input", str(tmp_path / "in"), "--output",
                           str(out), *MODEL], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, **ENV))
    assert proc.returncode == 5, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("bulk-explain: error: cannot read ") and "Traceback" not in proc.stderr
    assert os.listdir(out) == ["job.json"]  # nothing recomputed or written


# ------------------------------------------------------------------------- the S3 endpoint


def test_config_validation_writes_no_environment(monkeypatch, tmp_path):
    from bulk_explain.jobs.explain.config import ExplainConfig
    from bulk_explain.jobs.filters.config import FiltersConfig
    from bulk_explain.workers.models import ModelSpec

    monkeypatch.delenv("BULK_EXPLAIN_S3_ENDPOINT_URL", raising=False)
    before = dict(os.environ)
    (tmp_path / "in").mkdir()
    ExplainConfig(inputs=(str(tmp_path / "in"),), output="s3://bucket/out", s3_endpoint_url="http://u:p@h:9",
                  model=ModelSpec(kind="cats_dogs", weights="random")).validated()
    FiltersConfig(output="s3://bucket/vis", s3_endpoint_url="http://u:p@h:9",
                  model=ModelSpec(kind="cats_dogs", weights="random")).validated()
    assert dict(os.environ) == before


def test_job_endpoint_goes_to_the_backend_constructor_and_is_restored(monkeypatch):
    monkeypatch.delenv("BULK_EXPLAIN_S3_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    before = storage_for("s3://b/k").configured_endpoint()
    with s3_storage_configured("http://10.0.0.5:9000"):
        assert storage_for("s3://b/k").configured_endpoint() == "http://10.0.0.5:9000"
        assert "BULK_EXPLAIN_S3_ENDPOINT_URL" not in os.environ
    assert storage_for("s3://b/k").configured_endpoint() == before
    # without --s3-endpoint-url, the user's variable is what the driver resolves and hands on
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://10.0.0.6:9000")
    with s3_storage_configured(None):
        assert storage_for("s3://b/k").configured_endpoint() == "http://10.0.0.6:9000"


def test_worker_env_forwards_fault_points_but_no_endpoint(monkeypatch):
    monkeypatch.setenv("BULK_EXPLAIN_S3_ENDPOINT_URL", "http://u:secret@h:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://u:secret@h:9")
    monkeypatch.setenv("BULK_EXPLAIN_TEST_CRASH_AT", "after_marker")
    env = worker_env({"X": "1"})
    assert env["BULK_EXPLAIN_TEST_CRASH_AT"] == "after_marker" and env["X"] == "1"
    assert not any("secret" in v for v in env.values())
