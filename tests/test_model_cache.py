"""The remote model cache (issue 8 item 5): several processes filling it at once all load the right
model (unique temp names, verified bytes, atomic rename); a truncated or empty cached copy and a
changed source are fetched again; a worker whose model differs from the driver's fails its shards
with the reason. Model files come from the moto S3 server (tests/s3_server.py)."""

import hashlib
import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO

pytest_plugins = ["s3_server"]

# What a worker does before keras.models.load_model: get a local copy. Each process reports the
# sha256 of the bytes at the path it got, at the moment it got it (what Keras would then read).
FILLER = textwrap.dedent("""
    import hashlib, os, sys, time
    from bulk_explain.workers.models import _cache_remote_file
    uri, go, ready = sys.argv[1:4]
    open(ready, "w").close()
    while not os.path.exists(go):   # all four start downloading together
        time.sleep(0.002)
    path = _cache_remote_file(uri)
    print(path, hashlib.sha256(open(path, "rb").read()).hexdigest())
""")


def tiny_model(seed, units=8192):
    """A small classifier whose file is a few MB (a big Dense layer), so downloads overlap."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input(shape=(16, 16, 3)), keras.layers.Conv2D(4, 3, name="conv"),
                             keras.layers.Flatten(), keras.layers.Dense(units, name="wide"),
                             keras.layers.Dense(2, activation="softmax", name="out")], name="tiny")


def fingerprint(model):
    from bulk_explain.workers.models import LoadedModel

    return LoadedModel(model=model, class_names=[], preprocessing=None, output_kind="").fingerprint()


@pytest.fixture
def model_on_s3(tmp_path, s3_client, s3_bucket):
    import keras

    def upload(seed, key="models/m.keras"):
        model = tiny_model(seed)
        path = str(tmp_path / f"m{seed}.keras")
        model.save(path)
        s3_client.upload_file(path, s3_bucket, key)
        # the reference is the file loaded locally (weight paths differ from the in-memory model's)
        return f"s3://{s3_bucket}/{key}", fingerprint(keras.models.load_model(path, compile=False))

    upload.sha256 = lambda seed: hashlib.sha256(open(str(tmp_path / f"m{seed}.keras"), "rb").read()).hexdigest()

    return upload


def cached_files(cache):
    return sorted(os.path.relpath(os.path.join(d, f), cache) for d, _, fs in os.walk(cache) for f in fs)


def test_four_processes_filling_the_cache_at_once_all_load_the_right_model(tmp_path, model_on_s3):
    from bulk_explain.workers.models import load_model_file

    uri, expected = model_on_s3(1)
    cache, go = str(tmp_path / "cache"), str(tmp_path / "go")
    env = dict(os.environ, PYTHONPATH=REPO, XDG_CACHE_HOME=cache)
    ready = [str(tmp_path / f"ready{i}") for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", FILLER, uri, go, r], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in ready]
    while not all(os.path.exists(r) for r in ready):
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll()]
        time.sleep(0.02)
    open(go, "w").close()
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
        path, digest = out.split()
        assert digest == model_on_s3.sha256(1), "a process got a partial or foreign file"
    files = cached_files(os.path.join(cache, "bulk-explain", "models"))
    assert [f.rsplit("/", 1)[-1] for f in files] == [".m.keras.sha256", "m.keras"], files  # no temp files
    os.environ["XDG_CACHE_HOME"], saved = cache, os.environ.get("XDG_CACHE_HOME")
    try:
        assert fingerprint(load_model_file(uri)) == expected  # the file Keras loads is the model
    finally:
        if saved is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = saved


@pytest.mark.parametrize("damage", ["empty", "truncated", "same size, other bytes"])
def test_a_damaged_cached_copy_is_fetched_again(tmp_path, monkeypatch, model_on_s3, damage):
    from bulk_explain.workers.models import _cache_remote_file, load_model_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    uri, expected = model_on_s3(2)
    path = _cache_remote_file(uri)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if damage == "empty":
            f.truncate(0)
        elif damage == "truncated":
            f.truncate(size // 2)
        else:
            f.seek(size // 2)
            f.write(b"\0" * 64)
    assert _cache_remote_file(uri) == path and os.path.getsize(path) == size
    assert fingerprint(load_model_file(uri)) == expected


def test_a_changed_source_is_fetched_again(tmp_path, monkeypatch, model_on_s3):
    from bulk_explain.workers.models import load_model_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    uri, first = model_on_s3(3)
    assert fingerprint(load_model_file(uri)) == first
    same_uri, second = model_on_s3(4)  # new bytes under the same key: a new ETag
    assert same_uri == uri and second != first
    assert fingerprint(load_model_file(uri)) == second


def test_worker_with_another_model_than_the_driver_fails_its_shards_with_the_reason(tmp_path):
    from bulk_explain.jobs.explain.config import ExplainConfig
    from bulk_explain.jobs.explain.driver import worker_settings
    from bulk_explain.jobs.explain.plan import ShardTask
    from bulk_explain.workers.models import ModelError, ModelSpec
    from bulk_explain.workers.explain.shard_worker import ExplainWorker

    config = ExplainConfig(inputs=(str(tmp_path),), output=str(tmp_path / "out"), batch_size=1,
                           model=ModelSpec(kind="cats_dogs", weights="random", input_size=64))
    settings = worker_settings(config, None, None, 1)
    settings["model_fingerprint"] = "0" * 64  # what the driver checked: another model
    worker = ExplainWorker(settings)
    with pytest.raises(ModelError, match="different model than the driver"):
        worker.process_shard(ShardTask(0, [], [], [], []))
    settings["model_fingerprint"] = worker.loaded.fingerprint()
    assert ExplainWorker(settings).model_mismatch is None
