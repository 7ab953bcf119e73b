"""Bad command lines and configs exit 2 with one line on stderr, before any Ray starts."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, photo_like, write_image


def run(args):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "bulk_explain", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    write_image(str(root / "a" / "x.jpg"), photo_like(np.random.default_rng(0), 40, 40))
    return root


def _cases(folder, tmp):
    good = ["--input", str(folder), "--output", str(tmp / "o")]
    return [
        (["run", *good, "--model", "resnet9000"], "invalid choice"),
        (["run", "--output", str(tmp / "o"), "--model", "vgg16"], "--input"),
        (["run", *good, "--model", "cats_dogs", "--model-file", str(tmp / "missing.h5")], "model file not found"),
        (["run", *good, "--model", "keras"], "--model-file"),
        (["run", "--input", str(folder), "--output", str(folder / "a" / "out"), "--model", "vgg16", "--weights", "random"],
         "inside input"),
        (["run", "--input", str(tmp / "nope"), "--output", str(tmp / "o"), "--model", "vgg16"], "input folder not found"),
        (["run", *good, "--model", "vgg16", "--weights", "random", "--batch-size", "0"], "batch size"),
        (["run", *good, "--model", "vgg16", "--weights", "random", "--batch-size", "many"], "expected an integer or auto"),
        (["run", *good, "--model", "vgg16", "--weights", "/no/such/weights.h5"], "--weights"),
        (["run", *good, "--model", "vgg16", "--weights", "random", "--cam-class", "dogs"], "--cam-class"),
        (["run", *good, "--model", "vgg16", "--weights", "random", "--interpolation", "fancy"], "interpolation"),
        (["run", "--input", "gs://bucket/x", "--output", str(tmp / "o"), "--model", "vgg16"], "unsupported storage scheme"),
        (["explode"], "invalid choice"),
    ]


def test_bad_command_lines_exit_2_with_one_line(folder, tmp_path):
    for args, expected in _cases(folder, tmp_path):
        proc = run(args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr[-1500:])
        assert len(lines) == 1, (args, proc.stderr[-1500:])
        assert expected in lines[0], (args, lines[0])
        assert not os.path.exists(tmp_path / "o" / "job.json")


def _save(model, path):
    model.save(path)
    return str(path)


def test_models_that_cannot_be_explained_exit_2(folder, tmp_path):
    import keras

    dense = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    no_conv = _save(dense, tmp_path / "dense.keras")
    conv = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3)])  # no classifier head
    not_classifier = _save(conv, tmp_path / "conv.keras")
    with open(tmp_path / "garbage.h5", "wb") as f:
        f.write(b"not hdf5")
    base = ["run", "--input", str(folder), "--output", str(tmp_path / "o"), "--model", "keras", "--model-file"]
    for path, expected in ((no_conv, "no top-level Conv2D"), (not_classifier, "not a classifier"),
                           (str(tmp_path / "garbage.h5"), "cannot load model file")):
        proc = run([*base, path])
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr[-1500:]


def test_lambda_layer_refused_without_unsafe_flag(folder, tmp_path):
    import keras

    model = keras.Sequential([
        keras.Input((16, 16, 3)),
        keras.layers.Lambda(lambda x: x * 2.0),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(2, activation="softmax"),
    ])
    path = _save(model, tmp_path / "lambda.keras")
    args = ["run", "--input", str(folder), "--output", str(tmp_path / "o"), "--model", "keras", "--model-file", path]
    proc = run(args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-1500:]
    assert "--unsafe-model-code" in lines[0]
    assert not os.path.exists(tmp_path / "o" / "job.json")

    # the same model with the flag: loaded, explained, one ok row
    proc = run([*args, "--unsafe-model-code", "--scaling", "rescale"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pyarrow.dataset as ds

    rows = ds.dataset(str(tmp_path / "o" / "manifest")).to_table().to_pylist()
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["pred_index"] in (0, 1)
    job = __import__("json").load(open(tmp_path / "o" / "job.json"))
    assert job["config"]["model"]["unsafe_model_code"] is True
