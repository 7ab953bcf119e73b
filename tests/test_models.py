"""Model registry: offline ImageNet names, weights files, keras kind, fingerprints."""

import json

import numpy as np
import pytest

from bulk_explain.workers.models import ModelError, ModelSpec, imagenet_class_names, load_model, model_kinds


def test_registry_lists_the_three_kinds():
    assert set(model_kinds()) >= {"vgg16", "cats_dogs", "keras"}
    with pytest.raises(ModelError, match="unknown model 'resnet'"):
        load_model(ModelSpec(kind="resnet"))


def test_imagenet_class_names_offline_in_keras_spelling():
    names = imagenet_class_names()
    assert len(names) == 1000
    # decode_predictions' spelling, as printed in the lecture for the elephant picture
    assert names[386] == "African_elephant" and names[101] == "tusker" and names[385] == "Indian_elephant"
    assert names[0] == "tench"


def test_vgg16_from_a_weights_file_and_fingerprints(tmp_path):
    a = load_model(ModelSpec(kind="vgg16", weights="random", input_size=32, seed=1))
    assert a.preprocessing.scaling == "vgg16" and a.preprocessing.size == (32, 32)
    assert a.class_names[386] == "African_elephant"
    path = str(tmp_path / "vgg.weights.h5")
    a.model.save_weights(path)
    b = load_model(ModelSpec(kind="vgg16", weights=path, input_size=32))
    assert a.fingerprint() == b.fingerprint()  # same weights, same fingerprint
    c = load_model(ModelSpec(kind="vgg16", weights="random", input_size=32, seed=2))
    assert c.fingerprint() != a.fingerprint()
    with pytest.raises(ModelError, match="224 px"):
        load_model(ModelSpec(kind="vgg16", weights="imagenet", input_size=64))


def test_keras_kind_reads_size_and_class_names(tmp_path):
    import keras

    model = keras.Sequential([
        keras.Input((40, 30, 3)),
        keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
        keras.layers.GlobalAveragePooling2D(name="gap"),
        keras.layers.Dense(3, name="logits"),
        keras.layers.Softmax(name="probs"),
    ])
    path = str(tmp_path / "m.keras")
    model.save(path)
    names = tmp_path / "names.txt"
    names.write_text("red\ngreen\nblue\n")
    loaded = load_model(ModelSpec(kind="keras", model_file=path, class_names_file=str(names), scaling="tf"))
    assert loaded.preprocessing.size == (40, 30) and loaded.preprocessing.scaling == "tf"
    assert loaded.class_names == ["red", "green", "blue"] and loaded.output_kind == "softmax"
    (tmp_path / "two.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(ModelError, match="expects 3 class names, received 2"):
        load_model(ModelSpec(kind="keras", model_file=path, class_names_file=str(tmp_path / "two.json")))

    # a separate Softmax layer: the CAM score is its input (the logits), not the probability
    from test_gradcam import reference_cam
    from bulk_explain.workers.explain.explain_step import ExplainStep

    step = ExplainStep(loaded, batch_size=2)
    images = np.random.default_rng(0).integers(0, 255, (2, 40, 30, 3), dtype=np.uint8)
    out = step(images)
    x = (images / 127.5 - 1).astype("float32")
    probs = model.predict(x, verbose=0)
    np.testing.assert_allclose(out["top_score"][:, 0], probs.max(axis=1), atol=1e-5)
    assert out["cam"].shape == (2, 38, 28)
    conv_logits = keras.Model(model.inputs, [model.get_layer("c1").output, model.get_layer("logits").output])
    for i in range(2):
        cls = int(np.argmax(probs[i]))
        by_logit = reference_cam(conv_logits, x[i], cls, score="logit")
        by_probability = reference_cam(conv_logits, x[i], cls, score="probability")
        assert np.abs(by_logit - by_probability).max() > 0.05  # the assertion below can tell them apart
        np.testing.assert_allclose(out["cam"][i], by_logit, atol=1e-4)
