"""A new user's first day (issue 11): every common mistake is one line on stderr with its own exit
code and no traceback, the console carries only our own lines, `--cam-class label` says which
folders match no class, and the manifest says what the model got right.

The CLI tests run the INSTALLED console script `bulk-explain` (PYTHONPATH points it at this
checkout), as a user would.
"""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.dataset as ds
import pytest

from conftest import REPO, photo_like, write_image

EXE = shutil.which("bulk-explain")
pytestmark = pytest.mark.skipif(EXE is None, reason="the bulk-explain console script is not installed")


def cli(args, **env_changes):
    """Runs `bulk-explain ARGS`; env_changes set (str) or remove (None) environment variables."""
    env = dict(os.environ, PYTHONPATH=REPO)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=600)


def one_line(proc, code, expected):
    """Exit `code`, exactly one stderr line containing `expected`, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert expected in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    """cats/ (3 + one broken file), dogs/ (3), birds/ (2): birds names no class of the cats/dogs net."""
    root = tmp_path_factory.mktemp("pets")
    rng = np.random.default_rng(11)
    for label, n in (("cats", 3), ("dogs", 3), ("birds", 2)):
        for i in range(n):
            write_image(str(root / label / f"{i}.jpg"), photo_like(rng, 48, 64))
    (root / "cats" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    return root


def _cats_dogs(pets, out, *extra):
    return ["run", "--input", str(pets), "--output", str(out), "--model", "cats_dogs", "--weights", "random",
            "--input-size", "64", "--batch-size", "4", "--shard-size", "4", "--workers", "1", *extra]


# ---------------------------------------------------------------- label matching (no Ray)


def test_label_matcher_cats_dogs_and_imagenet():
    from bulk_explain.workers.explain.labels import LabelMatcher, resolve_cam_classes
    from bulk_explain.workers.models import CATS_DOGS_CLASSES, imagenet_class_names

    pets = LabelMatcher(CATS_DOGS_CLASSES)
    assert [pets.index(x) for x in ("cats", "dogs", "cat", "Dogs", "birds", None)] == [0, 1, 0, 1, None, None]
    assert pets.unmatched([("cats", 5), ("birds", 3), ("fish", 1), (None, 2)]) == {"birds": 3, "fish": 1}

    names = imagenet_class_names()
    imagenet = LabelMatcher(names)
    retriever = names.index("golden_retriever")
    assert imagenet.index("golden_retriever") == retriever
    assert imagenet.index("Golden Retriever") == retriever  # spaces/case as people name folders
    assert imagenet.index("golden-retrievers") == retriever
    assert imagenet.index("tabby") == names.index("tabby")
    assert imagenet.index("boxes") is None or names[imagenet.index("boxes")].lower() in ("box", "boxes")
    assert imagenet.index("cats") is None  # ImageNet has tabby, tiger_cat, ... but no plain "cat"
    assert list(resolve_cam_classes(["cats", "birds", None], "label", CATS_DOGS_CLASSES)) == [0, -1, -1]
    assert list(resolve_cam_classes(["cats", "birds"], "pred", CATS_DOGS_CLASSES)) == [-1, -1]
    assert list(resolve_cam_classes(["cats", "birds"], 1, CATS_DOGS_CLASSES)) == [1, 1]


def test_cam_spread_is_share_above_half_max():
    from bulk_explain.workers.explain.writer import cam_spread

    focused = np.zeros((10, 10), np.float32)
    focused[2:4, 2:4] = 1.0
    focused[5, 5] = 0.4  # below half the maximum: not counted
    assert cam_spread(focused) == pytest.approx(4 / 100)
    assert cam_spread(np.full((8, 8), 0.3, np.float32)) == pytest.approx(1.0)  # flat map
    assert cam_spread(np.zeros((8, 8), np.float32)) is None  # empty map: no spread


# ---------------------------------------------------------------- weights by model kind


def test_weights_default_by_model_kind_and_conflicts(tmp_path, pets):
    from bulk_explain.jobs.explain.config import ConfigError, ExplainConfig
    from bulk_explain.workers.models import ModelSpec

    model_file = tmp_path / "m.keras"
    model_file.write_bytes(b"placeholder: validation does not load it")
    base = dict(inputs=(str(pets),), output=str(tmp_path / "o"))
    assert ExplainConfig(model=ModelSpec("vgg16"), **base).validated().model.weights == "imagenet"
    with_file = ExplainConfig(model=ModelSpec("cats_dogs", model_file=str(model_file)), **base).validated()
    assert with_file.model.weights == "model-file"  # recorded as such in job.json
    with pytest.raises(ConfigError, match="conflicts with --model-file"):
        ExplainConfig(model=ModelSpec("cats_dogs", weights="random", model_file=str(model_file)), **base).validated()
    with pytest.raises(ConfigError, match="needs --model-file"):
        ExplainConfig(model=ModelSpec("vgg16", weights="model-file"), **base).validated()


# ---------------------------------------------------------------- one line per mistake (CLI)


def test_conflicting_weights_and_model_file_exit_2(pets, tmp_path):
    model_file = tmp_path / "m.h5"
    model_file.write_bytes(b"x")
    proc = cli(["run", "--input", str(pets), "--output", str(tmp_path / "o"), "--model", "cats_dogs",
                "--model-file", str(model_file), "--weights", "random"])
    one_line(proc, 2, "--weights random conflicts with --model-file")


def test_strict_labels_refuses_unmatched_folders_exit_2(pets, tmp_path):
    proc = cli(_cats_dogs(pets, tmp_path / "o", "--cam-class", "label", "--strict-labels"))
    line = one_line(proc, 2, "--strict-labels")
    assert "birds/ (2 images)" in line and "cats/" not in line
    assert not (tmp_path / "o" / "job.json").exists()


def test_s3_without_credentials_exit_5(pets, tmp_path):
    proc = cli(["run", "--input", "s3://some-bucket/photos", "--output", str(tmp_path / "o"), "--model", "vgg16",
                "--weights", "random", "--s3-endpoint-url", "http://127.0.0.1:9"],
               AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_SESSION_TOKEN=None, AWS_PROFILE=None,
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=None,
               AWS_CONTAINER_CREDENTIALS_FULL_URI=None, AWS_WEB_IDENTITY_TOKEN_FILE=None)
    one_line(proc, 5, "no AWS credentials for s3://some-bucket/photos")


def test_s3_unreachable_endpoint_exit_5(pets, tmp_path):
    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    proc = cli(["run", "--input", str(pets), "--output", "s3://out-bucket/run1", "--model", "vgg16",
                "--weights", "random", "--s3-endpoint-url", "http://127.0.0.1:9"],
               AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    one_line(proc, 5, "cannot reach S3 endpoint http://127.0.0.1:9")


def _unloadable_model(tmp_path):
    # If the output were checked after the model load, this file would make it exit 2 instead.
    bad = tmp_path / "garbage.h5"
    bad.write_bytes(b"not hdf5")
    return ["--model", "keras", "--model-file", str(bad)]


def test_output_under_a_file_exit_5_before_model_load(pets, tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = cli(["run", "--input", str(pets), "--output", str(tmp_path / "afile" / "out"), *_unloadable_model(tmp_path)])
    one_line(proc, 5, "is a file, not a folder")


def test_output_under_sys_exit_5(pets, tmp_path):
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no /sys here")
    proc = cli(["run", "--input", str(pets), "--output", "/sys/kernel/bulk-explain-out", *_unloadable_model(tmp_path)])
    one_line(proc, 5, "cannot write output /sys/kernel/bulk-explain-out")
    assert not os.path.exists("/sys/kernel/bulk-explain-out")


def test_output_in_read_only_folder_exit_5(pets, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root ignores mode bits; the immutable attribute stops root too
        if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
            pytest.skip("running as root and chattr +i is not available")
    else:
        ro.chmod(0o555)
    try:
        proc = cli(["run", "--input", str(pets), "--output", str(ro / "out"), *_unloadable_model(tmp_path)])
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
        ro.chmod(0o755)
    one_line(proc, 5, f"cannot write output {ro / 'out'}")
    assert not (ro / "out").exists()  # the probe leaves nothing behind


def test_imagenet_weights_without_network_exit_5(pets, tmp_path):
    # An empty Keras cache and a proxy that refuses connections: the weights cannot be downloaded.
    dead = "http://127.0.0.1:9"
    proc = cli(["run", "--input", str(pets), "--output", str(tmp_path / "o"), "--model", "vgg16"],
               KERAS_HOME=str(tmp_path / "keras"), https_proxy=dead, HTTPS_PROXY=dead, http_proxy=dead,
               HTTP_PROXY=dead, no_proxy=None, NO_PROXY=None)
    one_line(proc, 5, "cannot download VGG16's ImageNet weights")


def test_unexpected_value_error_is_exit_1_not_bad_configuration(pets, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "job.json").write_text("{ truncated")  # json raises a ValueError: not the user's config
    proc = cli(_cats_dogs(pets, out))
    line = one_line(proc, 1, "is not valid JSON")  # names the file and the fix, exit 1 (not 2)
    assert "--verbose" in line
    verbose = cli(_cats_dogs(pets, out, "--verbose"))
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


# ---------------------------------------------------------------- help


def test_help_shows_every_default_and_every_option_has_help():
    from bulk_explain.jobs.cli import build_parser

    proc = cli(["run", "--help"])
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    run = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "run")[1]
    for action in run._actions:
        if action.dest == "help":
            continue
        assert action.help and action.help.strip(), action.option_strings
        if action.default not in (None, False):
            assert f"(default: {action.default})" in text, action.option_strings
    plain = cli([])
    assert plain.returncode == 2
    assert "run" in plain.stdout and "filters" in plain.stdout and "commands" in plain.stdout


# ---------------------------------------------------------------- a whole run, as a user sees it


@pytest.mark.slow  # a whole CLI run with Ray plus a refused re-run: ~40 s idle, 75-120 s on the loaded dev machine
def test_quiet_run_labels_correct_and_failure_reason(pets, tmp_path):
    """A run on this CPU-only machine: stderr holds only our own lines (no TF/CUDA/absl chatter, no
    Keras or Ray warnings, no ANSI codes); the unmatched folder is named with its count; the manifest's
    label_index/correct/cam_spread agree with the predictions; the failure says why."""
    out = tmp_path / "out"
    proc = cli(_cats_dogs(pets, out, "--cam-class", "label", "--max-error-rate", "0"),
               TF_CPP_MIN_LOG_LEVEL=None, RAY_AUTH_MODE=None)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]  # one broken file > --max-error-rate 0
    assert lines and all(l.startswith("[bulk-explain] ") for l in lines), proc.stderr[-3000:]
    assert "\x1b[" not in proc.stderr
    assert any("found 9 inputs; 9 to process in 3 of 3 shards" in l for l in lines), lines
    warning = [l for l in lines if "warning:" in l]
    assert len(warning) == 1 and "birds/ (2 images)" in warning[0] and "--strict-labels" in warning[0]
    assert "finished WITH FAILURES (error rows 1/9 = 11.1% > --max-error-rate 0)" in lines[-1], lines[-1]

    rows = ds.dataset(str(out / "manifest")).to_table().to_pylist()
    assert len(rows) == 9
    index = {"cats": 0, "dogs": 1, "birds": None}
    for r in rows:
        assert r["label_index"] == index[r["label"]], r
        if r["status"] == "error":
            assert r["correct"] is None and r["cam_spread"] is None
            continue
        if r["label_index"] is None:
            assert r["correct"] is None
            assert r["gradcam_index"] == r["pred_index"]  # no class to explain: the prediction
        else:
            assert r["correct"] == (r["pred_index"] == r["label_index"])
            assert r["gradcam_index"] == r["label_index"]
        assert r["cam_spread"] is None or 0.0 < r["cam_spread"] <= 1.0
    assert sum(r["correct"] is not None for r in rows) == 6  # 3 cats + 3 dogs decoded

    # The same output with another CAM method is refused, naming the setting that differs.
    again = cli(_cats_dogs(pets, out, "--cam-class", "label", "--cam-method", "layercam"))
    one_line(again, 2, "--cam-method: gradcam then, layercam now")


# ---------------------------------------------------------------- --limit and progress (in-process)


@pytest.fixture(scope="module")
def cats_dogs_file(tmp_path_factory):
    import keras

    from bulk_explain.workers.models import build_cats_dogs_convnet

    keras.utils.set_random_seed(3)
    path = tmp_path_factory.mktemp("model") / "cats_dogs.keras"
    build_cats_dogs_convnet(64).save(path)
    return str(path)


def _config(pets, out, model_file, **kw):
    from bulk_explain.jobs import ExplainConfig, ModelSpec

    return ExplainConfig(inputs=(str(pets),), output=str(out), model=ModelSpec("cats_dogs", model_file=model_file),
                         batch_size=4, shard_size=2, workers=1, **kw)


def _rows(out):
    return ds.dataset(str(out / "manifest")).to_table(columns=["source_uri"]).column("source_uri").to_pylist()


def test_limit_then_full_run_and_full_then_limit(ray_local, pets, tmp_path, cats_dogs_file):
    from bulk_explain.jobs import run_explain

    out = tmp_path / "out"
    first = run_explain(_config(pets, out, cats_dogs_file, limit=3), progress=False)
    job = json.loads((out / "job.json").read_text())
    assert job["config"]["model"]["weights"] == "model-file"  # the file's own weights, recorded as such
    assert first.images == 3 and len(_rows(out)) == 3
    full = run_explain(_config(pets, out, cats_dogs_file), progress=False)
    assert (full.added_images, full.removed_images) == (6, 0)  # the rest is added, nothing "removed"
    assert sorted(_rows(out)) == sorted(set(_rows(out))) and len(_rows(out)) == 9
    # A limited run on a finished output keeps every committed row and reports nothing removed.
    again = run_explain(_config(pets, out, cats_dogs_file, limit=2), progress=False)
    assert again.removed_images == 0 and again.removed_shards == 0 and again.processed_shards == 0
    assert len(_rows(out)) == 9 and again.images == 9


def test_worker_counts_computed_images_for_progress(tmp_path, pets, cats_dogs_file):
    from bulk_explain.jobs.explain.driver import worker_settings
    from bulk_explain.jobs.explain.plan import iter_shards, list_inputs, make_plan
    from bulk_explain.workers.explain.shard_worker import ExplainWorker

    config = _config(pets, tmp_path / "o", cats_dogs_file).validated()
    worker = ExplainWorker(worker_settings(config, None, None, 1))
    assert worker.progress() == 0
    task = next(iter_shards(make_plan(list_inputs(config.inputs), 5)))
    worker.process_shard(task, config.result_fingerprint())
    assert worker.progress() == len(task) == 5


def test_progress_rate_counts_from_the_first_batch():
    from bulk_explain.jobs.progress import Progress

    stream = io.StringIO()
    log = Progress(total_shards=2, skipped=0, images_todo=10, stream=stream, interval=0.0)
    log.batches_done(2)  # first batch: the rate starts here, start-up excluded
    assert "images 2/10 | ETA after the next batch" in stream.getvalue()
    assert log.rate(now=log._base[0] + 100.0) is None  # one observation is no rate
    log.images_seen = 6
    assert log.rate(now=log._base[0] + 2.0) == pytest.approx(2.0)  # (6 - 2) images in 2 s
    log.batches_done(4)  # never goes backwards
    assert log.images_seen == 6
