"""Runs the same compute on one Keras backend and saves every result, for tests/test_backends.py.

    python tests/backend_probe.py BACKEND OUT.npz [LEGACY.h5]

The backend is chosen before Keras is imported (one backend per process: TensorFlow and JAX are
compared across two processes on the same weights). Saves, under keys prefixed by what ran:
the explain step of a random-weight VGG16 at 64 px (4x4 CAMs) for each CAM method, the lecture's convnet
from a legacy tf.keras 2 .h5 file, a batched filter ascent, and whether TensorFlow was imported.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(backend, out, h5=None):
    from bulk_explain.workers.backends import select_backend

    select_backend(backend)
    import numpy as np

    from bulk_explain.workers.explain.explain_step import ExplainStep
    from bulk_explain.workers.filters.filter_vis import FilterAscent, start_noise
    from bulk_explain.workers.models import ModelSpec, load_model

    results = {}
    rng = np.random.default_rng(0)
    vgg = load_model(ModelSpec(kind="vgg16", weights="random", input_size=64, seed=3))
    from conftest import photo_like  # this script's folder is tests/

    images = np.stack([photo_like(rng, 64, 64) for _ in range(5)])
    requested = np.array([-1, 7, -1, 999, 3], np.int32)
    for method in ("gradcam", "gradcam++", "layercam"):
        step = ExplainStep(vgg, batch_size=6, method=method)  # one padded row
        for key, value in step(images, requested).items():
            results[f"vgg16/{method}/{key}"] = value
    results["vgg16/grids"] = step.activation_maps(images[:2])[0]

    ascent = FilterAscent(vgg.model, "block2_conv1", size=64, steps=4)
    filters = [0, 5, 9, 17]
    starts = np.stack([start_noise(0, "block2_conv1", f, 64) for f in filters])
    res = ascent.ascend(filters, starts, batch_size=4)
    results["ascent/images"], results["ascent/start"], results["ascent/end"] = (
        res.images, res.activation_start, res.activation_end)

    if h5:
        legacy = load_model(ModelSpec(kind="cats_dogs", model_file=h5))
        photos = np.stack([photo_like(rng, 64, 64) for _ in range(6)])
        step = ExplainStep(legacy, batch_size=6, method="gradcam")
        for key, value in step(photos, np.array([0, 1, -1, 0, 1, -1], np.int32)).items():
            results[f"h5/{key}"] = value
    results["tensorflow_imported"] = np.array("tensorflow" in sys.modules)
    np.savez(out, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
