"""The filters job: config and CLI validation, model loading without a classifier top, the worker
in-process, and end to end (CLI on embedded Ray, random-weight VGG16, two layers) with resume."""

import argparse
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pyarrow.parquet as pq
import pytest

from bulk_explain.jobs.filters import config as filters_config
from bulk_explain.jobs.filters.config import FiltersConfig, FiltersConfigError
from bulk_explain.jobs.filters.driver import run_filters, worker_settings
from bulk_explain.jobs.filters.plan import plan_units
from bulk_explain.workers.filters.layout import FiltersLayout
from bulk_explain.workers.filters.worker import FilterWorker
from bulk_explain.workers.models import ModelError, ModelSpec, load_feature_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(argv):
    parser = argparse.ArgumentParser()
    filters_config.add_arguments(parser)
    return filters_config.config_from_args(parser.parse_args(argv))


def test_config_from_args_defaults_and_layers(tmp_path):
    config = _parse(["--model", "vgg16", "--weights", "random", "--output", str(tmp_path / "o"),
                     "--layers", "block1_conv1, block2_conv1"])
    assert config.layers == ("block1_conv1", "block2_conv1")
    assert (config.steps, config.learning_rate, config.noise_seed, config.size) == (30, 10.0, 0, None)
    # --seed seeds the random weights, as in `bulk-explain run`; --noise-seed the start noise
    seeded = _parse(["--model", "vgg16", "--weights", "random", "--output", str(tmp_path / "o"), "--seed", "3",
                     "--noise-seed", "5"])
    assert (seeded.model.seed, seeded.noise_seed) == (3, 5)
    assert _parse(["--model", "vgg16", "--output", str(tmp_path), "--model-seed", "4"]).model.seed == 4  # old name
    assert config.output == str(tmp_path / "o") and os.path.isabs(config.output)
    assert _parse(["--model", "vgg16", "--output", str(tmp_path)]).layers is None  # --layers all


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "vgg16", "--steps", "0"], "steps must be an integer >= 1"),
        (["--model", "vgg16", "--size", "8"], "size must be an integer >= 16"),
        (["--model", "vgg16", "--learning-rate", "-1"], "learning rate must be a finite number > 0"),
        (["--model", "vgg16", "--learning-rate", "nan"], "learning rate must be a finite number > 0"),
        (["--model", "vgg16", "--batch-size", "0"], "batch size must be an integer >= 1"),
        (["--model", "vgg16", "--layers", "all,block1_conv1"], "--layers all cannot be combined"),
        (["--model", "vgg16", "--layers", ","], "--layers must be all or comma-separated"),
        (["--model", "vgg16", "--weights", "/nonexistent/w.h5"], "--weights must be imagenet, random or an existing file"),
        (["--model", "keras"], "--model keras needs --model-file"),
        (["--model", "keras", "--model-file", "/nonexistent/m.keras"], "model file not found"),
        (["--model", "cats_dogs"], "--model cats_dogs needs --model-file"),
    ],
)
def test_bad_config_is_one_line_value_error(tmp_path, argv, message):
    with pytest.raises(FiltersConfigError) as info:
        _parse(argv + ["--output", str(tmp_path / "out")])
    assert isinstance(info.value, ValueError)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_output_that_is_a_file_is_rejected(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(FiltersConfigError, match="not a folder"):
        _parse(["--model", "vgg16", "--output", str(path)])


def _conv_base_file(path, size=None):
    """A size-agnostic conv base without a classifier top, saved as .keras."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(3)
    inputs = keras.Input(shape=(size, size, 3))
    x = layers.Conv2D(6, 3, activation="relu", name="first")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(10, 3, activation="relu", name="second")(x)
    keras.Model(inputs, x, name="conv_base").save(path)
    return str(path)


def test_conv_base_without_top_loads_and_worker_commits_a_unit(tmp_path):
    from bulk_explain.workers.commit import marker_agrees, read_part_commit

    model_file = _conv_base_file(tmp_path / "base.keras")
    spec = ModelSpec(kind="keras", model_file=model_file)
    loaded, size = load_feature_model(spec, 40)
    assert size == 40 and len(loaded.model.outputs[0].shape) == 4  # no classifier: accepted
    assert loaded.resolve_layers(None) == ["first", "second"]
    with pytest.raises(ModelError, match="no layer 'nope'"):
        loaded.resolve_layers(["nope"])

    config = FiltersConfig(output=str(tmp_path / "out"), model=spec, size=40, steps=4).validated()
    key = "ab" * 8
    settings = worker_settings(config, 40, loaded.fingerprint(), key)
    worker = FilterWorker(settings)  # loads the model itself and checks the fingerprint
    unit = plan_units(["first", "second"], {"first": 6, "second": 10}, 5, key)[3]
    assert (unit.shard, unit.layer, unit.start, unit.stop) == (3, "second", 5, 10)
    marker = worker.process(unit, "f" * 64)
    assert marker["rows"] == 5 and marker["content_hash"] == unit.content_hash
    layout = FiltersLayout(config.output)
    # the shared commit protocol: marker, then the part published with the marker's attempt in its footer
    assert os.path.exists(layout.commit_marker(3)) and not os.path.exists(layout.staged_part(3))
    assert marker_agrees(marker, read_part_commit(layout.storage, layout.manifest_part(3)))
    part = pq.read_table(layout.manifest_part(3))
    assert part.column("filter_index").to_pylist() == [5, 6, 7, 8, 9]
    for uri in part.column("image_uri").to_pylist():
        assert os.path.exists(uri) and uri.endswith(f"-{key[:12]}.png")  # named by the settings key
    import cv2

    img = cv2.imread(part.column("image_uri")[0].as_py())
    crop = round(25 * 40 / 150)
    assert img.shape == (40 - 2 * crop, 40 - 2 * crop, 3)

    bad = dict(settings, model_fingerprint="0" * 64)
    with pytest.raises(ModelError, match="different model"):
        FilterWorker(bad)


def test_fixed_input_model_rejects_other_size(tmp_path):
    model_file = _conv_base_file(tmp_path / "fixed.keras", size=32)
    spec = ModelSpec(kind="keras", model_file=model_file)
    assert load_feature_model(spec, None)[1] == 32  # default size follows the model
    with pytest.raises(ModelError, match="use --size 32"):
        load_feature_model(spec, 48)


def test_vgg16_conv_base_at_any_size():
    loaded, size = load_feature_model(ModelSpec(kind="vgg16", weights="random"), 48)
    assert size == 48 and loaded.model.input_shape == (None, 48, 48, 3)
    assert len(loaded.resolve_layers(None)) == 13
    assert loaded.layer_geometry("block4_conv1", 48)["border_used"] == [2, 2]
    assert loaded.layer_geometry("block5_conv1", 48)["border_used"] == [1, 1]
    with pytest.raises(ModelError, match="cannot build VGG16 at 16 px"):
        load_feature_model(ModelSpec(kind="vgg16", weights="random"), 16)


LAYERS = ["block1_conv1", "block1_conv2"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One CLI run in a subprocess (its own embedded Ray): VGG16, random weights, 2 layers, 48 px."""
    out = tmp_path_factory.mktemp("filters") / "vis"
    cmd = [sys.executable, "-m", "bulk_explain", "filters", "--model", "vgg16", "--weights", "random",
           "--output", str(out), "--layers", ",".join(LAYERS), "--size", "48", "--steps", "4",
           "--filters-per-unit", "32", "--weights-filters", "4", "--weights-channels", "5"]
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Later tests re-run into `out` (in random order): keep this run's own summary.
    shutil.copy(out / "filters" / "summary.json", out.parent / "first_run_summary.json")
    return out, proc


def test_cli_end_to_end_manifest_images_and_sheets(cli_run):
    out, proc = cli_run
    table = pq.read_table(out / "filters" / "manifest.parquet")
    assert table.schema.metadata[b"bulk_explain.schema"] == b"filter_manifest"
    for column in ("layer", "filter_index", "image_uri", "activation_start", "activation_end", "dead"):
        assert column in table.column_names
    rows = table.to_pylist()
    assert len(rows) == 128
    assert sorted((r["layer"], r["filter_index"]) for r in rows) == [(l, i) for l in LAYERS for i in range(64)]
    for r in rows:
        assert os.path.isabs(r["image_uri"]) and os.path.exists(r["image_uri"])
        assert r["steps"] == 4 and r["size"] == 48 and r["seed"] == 0
        assert r["dead"] == (r["activation_start"] == 0 and r["activation_end"] == 0)
    assert len({r["model_fingerprint"] for r in rows}) == 1

    import cv2

    tile = 48 - 2 * 8
    for layer in LAYERS:
        sheet = cv2.imread(str(out / "filters" / "sheets" / f"{layer}.png"))
        assert sheet.shape == (4 * tile + 3 * 5, 16 * tile + 15 * 5, 3)  # 64 filters, 16 a row
    color = cv2.imread(str(out / "weights" / "block1_conv1_color.png"))
    assert color is not None and len(os.listdir(out / "weights" / "block1_conv1")) == 64
    gray = cv2.imread(str(out / "weights" / "block1_conv2_channels.png"), cv2.IMREAD_UNCHANGED)
    assert gray.ndim == 2 and gray.shape == (4 * 24 + 3 * 2, 5 * 24 + 4 * 2)

    summary = json.loads((out.parent / "first_run_summary.json").read_text())
    assert summary["units"] == 4 and summary["computed_units"] == 4 and summary["skipped_units"] == 0
    for layer in LAYERS:
        s = summary["layers"][layer]
        assert s["filters"] == 64 and 0.0 <= s["dead_share"] <= 1.0 and s["complete"]
    job = json.loads((out / "filters" / "job.json").read_text())
    assert job["resolved"]["size"] == 48 and job["settings"]["steps"] == 4
    assert "as is" in job["ascent_input"]


def test_second_run_skips_every_unit(cli_run, ray_init_calls):
    out, _ = cli_run
    before = pq.read_table(out / "filters" / "manifest.parquet")
    mtimes = {p: os.path.getmtime(p) for p in before.column("image_uri").to_pylist()}
    config = FiltersConfig(output=str(out), model=ModelSpec(kind="vgg16", weights="random"),
                           layers=tuple(LAYERS), size=48, steps=4, filters_per_unit=32,
                           weights_filters=4, weights_channels=5, progress=False)
    result = run_filters(config)
    assert ray_init_calls == []  # nothing to compute: Ray was not started (not merely stopped again)
    assert result.exit_code == 0
    assert result.units == 4 and result.skipped_units == 4 and result.computed_units == 0
    after = pq.read_table(out / "filters" / "manifest.parquet")
    assert after.equals(before)
    assert all(os.path.getmtime(p) == t for p, t in mtimes.items())


def test_resume_recomputes_only_uncommitted_unit(cli_run, ray_local, tmp_path):
    import shutil

    shared_out, _ = cli_run
    out = tmp_path / "vis"  # a private copy: the module's output stays as the other tests read it
    shutil.copytree(shared_out, out)
    before = pq.read_table(out / "filters" / "manifest.parquet")
    os.remove(FiltersLayout(str(out)).commit_marker(3))  # block1_conv2's filters 32-63
    # what a worker killed mid-write leaves: a temp file beside the images and one in _staging/
    temps = [out / "filters" / "block1_conv2" / f"_tmp-{'ab' * 16}-block1_conv2_0040-0123456789ab.png.tmp",
             out / "filters" / "_staging" / f"_tmp-{'ab' * 16}-shard-00003.parquet.tmp"]
    for path in temps:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half an image")
    config = FiltersConfig(output=str(out), model=ModelSpec(kind="vgg16", weights="random"),
                           layers=tuple(LAYERS), size=48, steps=4, filters_per_unit=32,
                           weights_filters=4, weights_channels=5, progress=False)
    result = run_filters(config)
    assert result.computed_units == 1 and result.skipped_units == 3
    assert [p for p in temps if p.exists()] == []
    after = pq.read_table(out / "filters" / "manifest.parquet")
    assert after.num_rows == 128
    # recomputed from the same seeded noise with the same model: the same activations
    np.testing.assert_allclose(after.column("activation_end").to_numpy(),
                               before.column("activation_end").to_numpy(), rtol=1e-4, atol=1e-6)


def test_unknown_layer_fails_before_ray(tmp_path, ray_init_calls):
    config = FiltersConfig(output=str(tmp_path / "o"), model=ModelSpec(kind="vgg16", weights="random"),
                           layers=("block9_conv9",), size=32, progress=False)
    with pytest.raises(ValueError, match="no layer 'block9_conv9'"):
        run_filters(config)
    assert ray_init_calls == []


def _cli(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "bulk_explain", "filters", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_s3_output_end_to_end_refusal_overwrite_and_skip(tmp_path, s3_endpoint, s3_client, s3_bucket, ray_init_calls):
    """Every write goes through the storage seam: the whole job against a real S3 server. The CLI
    runs in a subprocess (its own Ray, whose workers get the endpoint and the credentials from the
    environment as on a real machine)."""
    import io

    model_file = _conv_base_file(tmp_path / "base.keras")
    out = f"s3://{s3_bucket}/vis"
    args = ["--model", "keras", "--model-file", model_file, "--output", out, "--size", "24",
            "--filters-per-unit", "4", "--weights-filters", "3", "--weights-channels", "3",
            "--s3-endpoint-url", s3_endpoint, "--quiet"]
    first = _cli(args + ["--steps", "2"])
    assert first.returncode == 0, first.stderr[-3000:]

    def images():
        listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="vis/filters/")["Contents"]
        return {o["Key"] for o in listed if o["Key"].endswith(".png") and "/sheets/" not in o["Key"]}

    old_images = images()
    assert len(old_images) == 16
    refused = _cli(args + ["--steps", "3"])  # other settings in the same DST: refused, nothing touched
    assert refused.returncode == 2 and "--steps: 2 then, 3 now" in refused.stderr.strip().splitlines()[-1]
    assert images() == old_images
    second = _cli(args + ["--steps", "3", "--overwrite"])
    assert second.returncode == 0, second.stderr[-3000:]

    body = s3_client.get_object(Bucket=s3_bucket, Key="vis/filters/manifest.parquet")["Body"].read()
    table = pq.read_table(io.BytesIO(body))
    assert table.num_rows == 16 and set(table.column("steps").to_pylist()) == {3}
    key = table.column("settings_key")[0].as_py()
    for uri in table.column("image_uri").to_pylist():
        assert uri.startswith(f"s3://{s3_bucket}/vis/filters/") and uri.endswith(f"-{key[:12]}.png")
        s3_client.head_object(Bucket=s3_bucket, Key=uri.split("/", 3)[3])
    # the first run's images had other names: never overwritten, kept until the next run
    assert old_images <= images() and len(images()) == 32
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="vis/")["Contents"]}
    for name in ("vis/filters/job.json", "vis/filters/summary.json", "vis/filters/sheets/first.png",
                 "vis/filters/sheets/second.png", "vis/weights/first_color.png", "vis/weights/second_channels.png"):
        assert name in keys
    assert sorted(k for k in keys if "/_commits/" in k) == [f"vis/filters/_commits/shard-{i:05d}.json" for i in range(5)]
    assert sorted(k for k in keys if "/_parts/" in k) == [f"vis/filters/_parts/shard-{i:05d}.parquet" for i in range(5)]
    assert not [k for k in keys if "/_staging/" in k]
    summary = json.loads(s3_client.get_object(Bucket=s3_bucket, Key="vis/filters/summary.json")["Body"].read())
    assert summary["computed_units"] == 5 and summary["settings"]["steps"] == 3

    config = FiltersConfig(output=out, model=ModelSpec(kind="keras", model_file=model_file), size=24, steps=3,
                           filters_per_unit=4, weights_filters=3, weights_channels=3, progress=False,
                           s3_endpoint_url=s3_endpoint)
    calls_before = len(ray_init_calls)
    again = run_filters(config)  # in-process: everything committed, so no Ray is needed
    assert len(ray_init_calls) == calls_before
    assert again.computed_units == 0 and again.skipped_units == 5 and again.settings_key == key
    assert images() == {uri.split("/", 3)[3] for uri in table.column("image_uri").to_pylist()}  # old ones gone


@pytest.mark.slow
def test_reader_during_a_rerun_with_other_settings_sees_one_settings_and_every_image(tmp_path):
    """`--overwrite` with other settings: while it runs, a reader of filters/manifest.parquet sees the
    old settings' rows with their (untouched) images; afterwards the new ones; never a mix, never a
    row whose image is missing."""
    import hashlib
    import time

    from test_reliability import wait_flag
    from test_signals import finish, start

    out = str(tmp_path / "vis")
    base = ["filters", "--output", out, "--model", "cats_dogs", "--weights", "random", "--input-size", "64",
            "--size", "64", "--layers", "conv2d", "--filters-per-unit", "8", "--workers", "1", "--batch-size", "8",
            "--quiet"]
    rc, err = finish(start(base + ["--steps", "2"]), timeout=300)
    assert rc == 0, err[-3000:]
    manifest = os.path.join(out, "filters", "manifest.parquet")

    def read():
        rows = pq.read_table(manifest).to_pylist()
        assert len(rows) == 32
        assert len({(r["steps"], r["settings_key"]) for r in rows}) == 1  # one settings, never a mix
        images = {}
        for r in rows:
            assert r["image_uri"].endswith(f"-{r['settings_key'][:12]}.png")
            with open(r["image_uri"], "rb") as f:  # present (FileNotFoundError otherwise)
                images[r["image_uri"]] = hashlib.sha256(f.read()).hexdigest()
        return rows[0]["steps"], images

    steps, old = read()
    assert steps == 2
    flag = str(tmp_path / "flag")
    proc = start(base + ["--steps", "3", "--overwrite"], "after_marker:2", flag, action="hold")
    try:
        wait_flag(flag, proc)
        # units 0-2 of the new settings are committed and their images written; readers see the old
        steps, now = read()
        assert steps == 2 and now == old  # same rows, the same image bytes
        open(flag + ".go", "w").close()
        while proc.poll() is None:
            steps, now = read()
            assert now == old or steps == 3
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            open(flag + ".go", "w").close()
    rc, err = finish(proc, timeout=300)
    assert rc == 0, err[-3000:]
    steps, new = read()
    assert steps == 3 and not set(new) & set(old)
    assert all(os.path.exists(u) for u in old)  # deleted by the next run, not under a reader's feet
    rc, err = finish(start(base + ["--steps", "3"]), timeout=300)
    assert rc == 0, err[-3000:]
    assert read()[1] == new and not any(os.path.exists(u) for u in old)
