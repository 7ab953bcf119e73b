"""The CLI end to end with `--backend jax`: the same files, schema and predictions as TensorFlow,
and neither the driver nor a worker imports TensorFlow."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import REPO, photo_like, write_image

from bulk_explain.schemas.image_manifest import IMAGE_MANIFEST_SCHEMA

# Runs the CLI in this process and, under jax, exits 7 if the driver imported TensorFlow.
DRIVER = ("import sys; from bulk_explain.jobs.cli import main; rc = main(sys.argv[1:]); "
          "sys.exit(7 if rc == 0 and 'jax' in sys.argv and 'tensorflow' in sys.modules else rc)")


def _run(args):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", RAY_DEDUP_LOGS="0")
    env.pop("KERAS_BACKEND", None)
    return subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd=REPO)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.slow
def test_cli_jax_backend_same_contract_as_tensorflow(tmp_path):
    pytest.importorskip("jax")
    rng = np.random.default_rng(5)
    for i in range(5):
        write_image(str(tmp_path / "in" / ("cats" if i % 2 else "dogs") / f"{i}.jpg"), photo_like(rng, 60, 80))
    outs = {}
    for backend in ("tensorflow", "jax"):
        out = str(tmp_path / f"out_{backend}")
        args = ["run", "--input", str(tmp_path / "in"), "--output", out, "--model", "cats_dogs",
                "--weights", "random", "--input-size", "64", "--shard-size", "3", "--quiet",
                "--backend", backend, "--overlay-max-side", "40"]
        proc = _run(args)
        assert proc.returncode == 0, f"{backend}: rc {proc.returncode} {proc.stderr[-3000:]}"
        outs[backend] = out
    tf_out, jax_out = outs["tensorflow"], outs["jax"]
    assert _files(tf_out) == _files(jax_out)  # same files, same names
    for out in (tf_out, jax_out):
        for part in os.listdir(os.path.join(out, "manifest")):
            assert pq.read_schema(os.path.join(out, "manifest", part)).remove_metadata().equals(
                IMAGE_MANIFEST_SCHEMA.remove_metadata())
    rows = {b: sorted(ds.dataset(os.path.join(o, "manifest")).to_table().to_pylist(), key=lambda r: r["source_uri"])
            for b, o in outs.items()}
    for a, b in zip(rows["tensorflow"], rows["jax"]):
        assert a["status"] == b["status"] == "ok"
        # the same seeded random weights on both backends: the same predictions
        assert (a["pred_index"], a["gradcam_index"], a["width"], a["height"]) == \
               (b["pred_index"], b["gradcam_index"], b["width"], b["height"]) and (a["width"], a["height"]) == (80, 60)
        assert abs(a["pred_score"] - b["pred_score"]) < 1e-4
        assert [s["layer"] for s in a["activations"]] == [s["layer"] for s in b["activations"]]
        np.testing.assert_allclose([s["mean"] for s in a["activations"]], [s["mean"] for s in b["activations"]],
                                   rtol=1e-4, atol=1e-6)
    import cv2

    overlay = cv2.imread(rows["jax"][0]["gradcam_overlay_uri"])
    assert overlay.shape[:2] == (30, 40)  # --overlay-max-side 40 on an 80x60 image
    jobs = {b: json.load(open(os.path.join(o, "job.json"))) for b, o in outs.items()}
    assert jobs["jax"]["config"]["backend"] == "jax" and "tensorflow" not in jobs["jax"]["versions"]
    assert jobs["jax"]["versions"]["jax"] and jobs["tensorflow"]["versions"]["tensorflow"]
    assert jobs["jax"]["result_fingerprint"] != jobs["tensorflow"]["result_fingerprint"]
    assert jobs["jax"]["batch_size"] == [32]  # --batch-size auto on a CPU
    assert [w["tensorflow_imported"] for w in jobs["jax"]["workers"]] == [False]
    assert [w["tensorflow_imported"] for w in jobs["tensorflow"]["workers"]] == [True]
    assert all(w["backend"] == "jax" and w["read_threads"] >= 4 for w in jobs["jax"]["workers"])


@pytest.mark.slow
def test_filters_cli_jax_backend_same_filters_as_tensorflow(tmp_path):
    """The filters kind on the backend seam too: same seeded weights and noise, same activations,
    no TensorFlow in the driver or the worker under jax."""
    pytest.importorskip("jax")
    tables, jobs = {}, {}
    for backend in ("tensorflow", "jax"):
        out = str(tmp_path / f"vis_{backend}")
        proc = _run(["filters", "--output", out, "--model", "cats_dogs", "--weights", "random", "--input-size", "48",
                     "--size", "48", "--layers", "conv2d_1", "--steps", "3", "--filters-per-unit", "32",
                     "--weights-filters", "2", "--weights-channels", "2", "--quiet", "--backend", backend])
        assert proc.returncode == 0, f"{backend}: rc {proc.returncode} {proc.stderr[-3000:]}"
        tables[backend] = pq.read_table(os.path.join(out, "filters", "manifest.parquet")).sort_by("filter_index")
        jobs[backend] = json.load(open(os.path.join(out, "filters", "job.json")))
    a, b = tables["tensorflow"], tables["jax"]
    assert a.num_rows == b.num_rows == 64
    assert a.column("model_fingerprint").to_pylist() == b.column("model_fingerprint").to_pylist()
    np.testing.assert_allclose(a.column("activation_start").to_numpy(), b.column("activation_start").to_numpy(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.column("activation_end").to_numpy(), b.column("activation_end").to_numpy(),
                               rtol=2e-3, atol=1e-4)
    assert [w["tensorflow_imported"] for w in jobs["jax"]["workers"]] == [False]
    assert [w["backend"] for w in jobs["jax"]["workers"]] == ["jax"] and "tensorflow" not in jobs["jax"]["versions"]
