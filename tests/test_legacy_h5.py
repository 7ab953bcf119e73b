"""A legacy .h5 saved by tf.keras 2 (the lecture's cats_and_dogs_small_1.h5 format) loads and runs."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

SAVE_WITH_TF_KERAS = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tf_keras as keras
    from tf_keras import layers
    keras.utils.set_random_seed(0)
    # The lecture's architecture, as tf.keras 2 saved it (at 64 px to keep the test fast).
    model = keras.Sequential([
        layers.Conv2D(32, (3, 3), activation="relu", input_shape=(64, 64, 3)),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(128, (3, 3), activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(128, (3, 3), activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.Flatten(),
        layers.Dropout(0.5),
        layers.Dense(512, activation="relu"),
        layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(loss="binary_crossentropy", optimizer=keras.optimizers.RMSprop(learning_rate=1e-4), metrics=["acc"])
    x = np.random.default_rng(0).random((4, 64, 64, 3)).astype("float32")
    np.save(sys.argv[2], model.predict(x, verbose=0))
    np.save(sys.argv[3], x)
    model.save(sys.argv[1])
    """
)


def test_tf_keras2_h5_loads_and_explains(tmp_path):
    pytest.importorskip("tf_keras")
    h5, preds, inputs = tmp_path / "cats_and_dogs_small_1.h5", tmp_path / "p.npy", tmp_path / "x.npy"
    proc = subprocess.run([sys.executable, "-c", SAVE_WITH_TF_KERAS, str(h5), str(preds), str(inputs)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(h5, "rb") as f:
        assert f.read(8) == b"\x89HDF\r\n\x1a\n"  # really the legacy HDF5 format

    from bulk_explain.workers.explain.explain_step import ExplainStep
    from bulk_explain.workers.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(kind="cats_dogs", model_file=str(h5)))
    assert loaded.output_kind == "sigmoid" and loaded.class_names == ["cat", "dog"]
    assert loaded.preprocessing.size == (64, 64) and loaded.preprocessing.scaling == "rescale"
    x = np.load(inputs)
    # Keras 3 reproduces tf.keras 2's predictions from the same file.
    np.testing.assert_allclose(loaded.model.predict(x, verbose=0), np.load(preds), atol=1e-5)
    step = ExplainStep(loaded, batch_size=4)
    out = step((x * 255).astype(np.uint8))
    assert out["cam"].shape == (4, 4, 4) and step.target_layer == loaded.conv_layer_names()[-1]
