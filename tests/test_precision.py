"""Mixed precision (Keras dtype policy) against float32 on a trained model: the same top-1 and
nearly the same CAMs; probabilities, CAMs and statistics come back float32."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def trained():
    """The lecture's convnet at 64 px, trained briefly on the synthetic squares-vs-rings task."""
    import keras

    from _trained_models import make_shapes
    from bulk_explain.workers.models import LoadedModel, build_cats_dogs_convnet, seeded_random_weights
    from bulk_explain.workers.preprocessing import Preprocessing

    rng = np.random.default_rng(0)
    x_train, y_train, _ = make_shapes(600, rng)
    x_test, _, _ = make_shapes(200, rng)
    model = seeded_random_weights(build_cats_dogs_convnet(64), 0)
    model.compile(optimizer=keras.optimizers.RMSprop(1e-3), loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x_train / 255.0, y_train, epochs=4, batch_size=32, verbose=0)
    loaded = LoadedModel(model, ["square", "ring"], Preprocessing(64, 64, "rescale"), "sigmoid")
    return loaded, x_test


def test_mixed_bfloat16_matches_float32(trained):
    from bulk_explain.workers.explain.explain_step import ExplainStep
    from bulk_explain.workers.models import with_precision

    loaded, images = trained
    mixed = with_precision(loaded, "mixed_bfloat16")
    assert mixed.model.layers[0].compute_dtype == "bfloat16" and mixed.model.layers[0].kernel.dtype == "float32"
    assert [l.name for l in mixed.model.layers] == [l.name for l in loaded.model.layers]
    assert loaded.model.layers[0].compute_dtype == "float32"  # the original is not changed
    results = {}
    for name, model in (("float32", loaded), ("mixed_bfloat16", mixed)):
        step = ExplainStep(model, batch_size=100, target_layer="conv2d_2")
        outs = [step(images[i:i + 100]) for i in range(0, len(images), 100)]
        results[name] = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    f32, bf16 = results["float32"], results["mixed_bfloat16"]
    for key in ("cam", "stats", "pred_score", "top_score"):
        assert bf16[key].dtype == np.float32, key
    assert f32["pred_score"].mean() > 0.8, "the model did not train: agreement would be meaningless"
    agreement = float(np.mean(f32["pred_index"] == bf16["pred_index"]))
    assert agreement >= 0.99, f"top-1 agreement {agreement}"
    cam_corr = float(np.corrcoef(f32["cam"].ravel(), bf16["cam"].ravel())[0, 1])
    assert cam_corr >= 0.98, f"CAM correlation {cam_corr}"
    assert not np.array_equal(f32["cam"], bf16["cam"])  # it really ran in bfloat16


def test_unknown_precision_is_refused(trained):
    from bulk_explain.workers.models import ModelError, with_precision

    with pytest.raises(ModelError, match="unknown precision 'float8'"):
        with_precision(trained[0], "float8")
