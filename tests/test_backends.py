"""TensorFlow and JAX backends give the same results on the same weights; mixed precision stays
close to float32; a JAX process never imports TensorFlow.

Keras picks its backend once per process, so each backend runs in its own subprocess
(tests/backend_probe.py) and the results are compared here.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

PROBE = os.path.join(REPO, "tests", "backend_probe.py")
METHODS = ("gradcam", "gradcam++", "layercam")
# Two model processes (VGG16 compiles for three CAM methods and an ascent on each backend): about
# a minute of CPU.
pytestmark = pytest.mark.slow


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """{backend: npz} from one probe process per backend, run side by side."""
    pytest.importorskip("jax")
    pytest.importorskip("tf_keras")
    from test_legacy_h5 import SAVE_WITH_TF_KERAS

    d = tmp_path_factory.mktemp("backends")
    h5 = str(d / "cats_and_dogs_small_1.h5")
    proc = subprocess.run([sys.executable, "-c", SAVE_WITH_TF_KERAS, h5, str(d / "p.npy"), str(d / "x.npy")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("KERAS_BACKEND", None)
    running = {b: subprocess.Popen([sys.executable, PROBE, b, str(d / f"{b}.npz"), h5], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for b in ("tensorflow", "jax")}
    out = {}
    for backend, p in running.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{backend} probe failed: {err[-3000:]}"
        out[backend] = dict(np.load(d / f"{backend}.npz"))
    return out


def _assert_same_step(tf, jx, prefix):
    for key in ("pred_index", "cam_index", "top_index"):
        np.testing.assert_array_equal(tf[f"{prefix}/{key}"], jx[f"{prefix}/{key}"], err_msg=f"{prefix}/{key}")
    np.testing.assert_allclose(tf[f"{prefix}/top_score"], jx[f"{prefix}/top_score"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(tf[f"{prefix}/pred_score"], jx[f"{prefix}/pred_score"], rtol=1e-4, atol=1e-7)
    cam_tf, cam_jx = tf[f"{prefix}/cam"], jx[f"{prefix}/cam"]
    assert cam_tf.std() > 0, "degenerate CAMs cannot show agreement"
    assert _corr(cam_tf, cam_jx) >= 0.999, f"{prefix}: CAM correlation {_corr(cam_tf, cam_jx)}"
    # statistics within 1e-4 relative (exact zeros, e.g. zero_fraction 0, compare absolutely)
    np.testing.assert_allclose(tf[f"{prefix}/stats"], jx[f"{prefix}/stats"], rtol=1e-4, atol=1e-6)


def test_vgg16_same_weights_same_results(probes):
    tf, jx = probes["tensorflow"], probes["jax"]
    for method in METHODS:
        _assert_same_step(tf, jx, f"vgg16/{method}")
    # requested classes are honoured on both (999 is out of range: the predicted class)
    np.testing.assert_array_equal(jx["vgg16/gradcam/cam_index"][[1, 4]], [7, 3])
    np.testing.assert_allclose(tf["vgg16/grids"], jx["vgg16/grids"], rtol=1e-4, atol=1e-4)


def test_legacy_h5_convnet_same_results(probes):
    tf, jx = probes["tensorflow"], probes["jax"]
    _assert_same_step(tf, jx, "h5")
    assert set(jx["h5/pred_index"]) <= {0, 1}


def test_batched_filter_ascent_same_results(probes):
    tf, jx = probes["tensorflow"], probes["jax"]
    assert not np.allclose(tf["ascent/start"], tf["ascent/end"])  # the ascent moved
    np.testing.assert_allclose(tf["ascent/images"], jx["ascent/images"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tf["ascent/start"], jx["ascent/start"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tf["ascent/end"], jx["ascent/end"], rtol=1e-4, atol=1e-6)


def test_jax_process_never_imports_tensorflow(probes):
    # the probe sees TF where it is used (so the check can fail), and none under JAX, legacy .h5 included
    assert bool(probes["tensorflow"]["tensorflow_imported"])
    assert not bool(probes["jax"]["tensorflow_imported"])
