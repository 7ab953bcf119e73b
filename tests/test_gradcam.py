"""The batched compiled step against an independent one-image-at-a-time Grad-CAM (paper / lecture)."""

import numpy as np
import pytest

from conftest import photo_like


def conv_and_logits_model(model, target_layer):
    """keras.Model: input -> (target layer maps, pre-activation class scores), from a copy of
    `model` whose last layer's activation is made linear (the caller's model is not touched)."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.layers[-1].activation = keras.activations.linear
    return keras.Model(clone.inputs, [clone.get_layer(target_layer).output, clone.outputs[0]])


def reference_cam(conv_logits, image_float, class_index, method="gradcam", score="logit", sigmoid_binary=False):
    """The CAM of ONE preprocessed image, written from the papers with a plain GradientTape and
    NumPy (no code of the package): y^c is the pre-activation class score ("logit"; for a single
    sigmoid unit the logit, negated for class 0) or the class probability ("probability");
    g = dy^c/dA, A = the target layer's maps, and the channel weights are
      Grad-CAM (Selvaraju et al.):     w_k = mean_ij g_ijk
      Grad-CAM++ (Chattopadhay et al., exponential-score closed form):
                                       a_ijk = g^2 / (2 g^2 + sum_ab A_abk g^3) (0 where 0/0),
                                       w_k = sum_ij a_ijk ReLU(g_ijk)
      Layer-CAM (Jiang et al.):        w_ijk = ReLU(g_ijk) (element-wise)
    cam = ReLU(sum_k w A_k), divided by its maximum (all zeros stays zeros)."""
    import tensorflow as tf

    x = tf.constant(image_float[None], tf.float32)
    with tf.GradientTape() as tape:
        conv, logits = conv_logits(x, training=False)
        if sigmoid_binary:
            p = tf.sigmoid(logits[0, 0])
            if score == "logit":
                y = logits[0, 0] if class_index == 1 else -logits[0, 0]
            else:
                y = p if class_index == 1 else 1.0 - p
        else:
            y = logits[0, class_index] if score == "logit" else tf.nn.softmax(logits[0])[class_index]
    g = tape.gradient(y, conv)[0].numpy().astype(np.float64)
    a = conv[0].numpy().astype(np.float64)
    if method == "gradcam":
        w = g.mean(axis=(0, 1), keepdims=True)
    elif method == "gradcam++":
        g2, g3 = g**2, g**3
        denom = 2.0 * g2 + a.sum(axis=(0, 1), keepdims=True) * g3
        alpha = np.divide(g2, denom, out=np.zeros_like(g2), where=denom != 0)
        w = (alpha * np.maximum(g, 0)).sum(axis=(0, 1), keepdims=True)
    elif method == "layercam":
        w = np.maximum(g, 0)
    else:
        raise AssertionError(method)
    cam = np.maximum((w * a).sum(axis=-1), 0)
    return cam / cam.max() if cam.max() > 0 else cam


def reference_gradcam(model, image_float, target_layer, class_index, sigmoid_binary):
    return reference_cam(conv_and_logits_model(model, target_layer), image_float, class_index,
                         sigmoid_binary=sigmoid_binary)


def last_conv2d(model):
    """The default target layer, looked up here (not with the package's own lookup)."""
    import keras

    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]


def scaled(kind, images):
    """The models' documented preprocessing, from Keras itself / the lecture, not our scale_tensor."""
    import keras

    x = images.astype(np.float32)
    if kind == "vgg16":
        return keras.applications.vgg16.preprocess_input(x.copy())
    assert kind == "cats_dogs"
    return x / 255.0  # ImageDataGenerator(rescale=1./255)


def _mixed_batch(size, n, seed):
    rng = np.random.default_rng(seed)
    imgs = [photo_like(rng, size, size) for _ in range(n - 2)]
    imgs.append(np.zeros((size, size, 3), np.uint8))  # a flat image in the same batch
    imgs.append(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    return np.stack(imgs)


def _check(loaded, kind, images, requested, sigmoid_binary):
    from bulk_explain.workers.explain.explain_step import ExplainStep

    step = ExplainStep(loaded, batch_size=len(images) + 2)  # padding exercised too
    out = step(images, requested)
    target = last_conv2d(loaded.model)
    assert step.target_layer == target
    x = scaled(kind, images)
    conv_logits = conv_and_logits_model(loaded.model, target)
    for i in range(len(images)):
        cls = int(out["cam_index"][i])
        expected_cls = int(out["pred_index"][i]) if requested[i] < 0 else int(requested[i])
        assert cls == expected_cls
        ref = reference_cam(conv_logits, x[i], cls, sigmoid_binary=sigmoid_binary)
        np.testing.assert_allclose(out["cam"][i], ref, atol=1e-4, err_msg=f"image {i}")
    return out


def test_batched_gradcam_equals_single_image_reference_softmax():
    from bulk_explain.workers.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(kind="vgg16", weights="random", input_size=48, seed=3))
    assert loaded.output_kind == "softmax"
    images = _mixed_batch(48, 5, seed=0)
    requested = np.array([-1, 7, -1, 999, 3], np.int32)  # 999: out of range -> predicted class
    out = _check(loaded, "vgg16", images, requested, sigmoid_binary=False)
    assert out["cam_index"][1] == 7 and out["cam_index"][4] == 3
    # softmax probabilities: top-k sorted and consistent with pred
    assert np.all(np.diff(out["top_score"], axis=1) <= 1e-7)
    np.testing.assert_array_equal(out["top_index"][:, 0], out["pred_index"])


def test_batched_gradcam_equals_single_image_reference_sigmoid():
    from bulk_explain.workers.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(kind="cats_dogs", weights="random", input_size=64, seed=5))
    assert loaded.output_kind == "sigmoid" and loaded.class_names == ["cat", "dog"]
    images = _mixed_batch(64, 6, seed=1)
    # class 0 (cat) uses the negated logit, class 1 (dog) the logit
    requested = np.array([0, 1, -1, 0, 1, -1], np.int32)
    out = _check(loaded, "cats_dogs", images, requested, sigmoid_binary=True)
    # pred_score is the probability of the predicted class
    p_dog = loaded.model.predict(scaled("cats_dogs", images), verbose=0)[:, 0]
    expected = np.where(p_dog >= 0.5, p_dog, 1 - p_dog)
    np.testing.assert_allclose(out["pred_score"], expected, atol=1e-5)
    np.testing.assert_array_equal(out["pred_index"], (p_dog > 0.5).astype(int))


def test_cam_is_not_averaged_over_the_batch():
    """The keras-io bug: averaging gradients over the batch makes every image's CAM depend on the
    others. Each image's map must be identical whether it is computed alone or in a batch."""
    from bulk_explain.workers.explain.explain_step import ExplainStep
    from bulk_explain.workers.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(kind="cats_dogs", weights="random", input_size=64, seed=9))
    images = _mixed_batch(64, 4, seed=2)
    step = ExplainStep(loaded, batch_size=4)
    together = step(images)["cam"]
    for i in range(4):
        alone = step(images[i : i + 1])["cam"][0]
        np.testing.assert_allclose(together[i], alone, atol=1e-5)


def test_activation_statistics_match_numpy():
    import keras

    from bulk_explain.workers.explain.explain_step import ExplainStep
    from bulk_explain.workers.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(kind="cats_dogs", weights="random", input_size=64, seed=2))
    images = _mixed_batch(64, 3, seed=3)
    step = ExplainStep(loaded, batch_size=3)
    out = step(images)
    layers = step.activation_layers
    assert layers == [l.name for l in loaded.model.layers if "conv" in l.name or "pool" in l.name]
    probe = keras.Model(loaded.model.inputs, [loaded.model.get_layer(n).output for n in layers])
    maps = probe(scaled("cats_dogs", images))
    for li, m in enumerate(maps):
        m = m.numpy()
        np.testing.assert_allclose(out["stats"][:, li, 0], m.mean(axis=(1, 2, 3)), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out["stats"][:, li, 1], m.std(axis=(1, 2, 3)), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(out["stats"][:, li, 2], m.max(axis=(1, 2, 3)), rtol=1e-5)
        np.testing.assert_allclose(out["stats"][:, li, 3], (m == 0).mean(axis=(1, 2, 3)), atol=1e-6)


def _softmax_model_file(path, size=32):
    """A small softmax classifier whose class scores are far apart (weights scaled up), so the
    probability score is not a rescaled logit: the maps of the two scores differ."""
    import keras

    keras.utils.set_random_seed(21)
    model = keras.Sequential([
        keras.Input((size, size, 3)),
        keras.layers.Conv2D(6, 3, activation="relu", name="c1"),
        keras.layers.Conv2D(8, 3, activation="relu", name="c2"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, activation="softmax", name="probs"),
    ])
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel * 40.0, bias])
    model.save(path)
    return model


METHODS = ("gradcam", "gradcam++", "layercam")


@pytest.fixture(scope="module")
def softmax_case(tmp_path_factory):
    from bulk_explain.workers.models import ModelSpec, load_model

    path = str(tmp_path_factory.mktemp("softmax") / "m.keras")
    model = _softmax_model_file(path)
    loaded = load_model(ModelSpec(kind="keras", model_file=path, scaling="rescale"))
    assert loaded.output_kind == "softmax"
    images = _mixed_batch(32, 4, seed=6)
    images[-2] = photo_like(np.random.default_rng(60), 32, 32)  # no flat image: every map non-zero
    requested = np.array([-1, 0, 2, 1], np.int32)
    return model, loaded, images, requested


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("score", ("logit", "probability"))
def test_cam_method_and_score_equal_one_image_reference(softmax_case, method, score):
    from bulk_explain.workers.explain.explain_step import ExplainStep

    model, loaded, images, requested = softmax_case
    out = ExplainStep(loaded, len(images), method=method, cam_score=score)(images, requested)
    conv_logits = conv_and_logits_model(model, "c2")
    x = images.astype(np.float32) / 255.0
    probs = model.predict(x, verbose=0)
    assert probs.max(axis=1).min() < 0.99  # not saturated: probability gradients are not ~0
    other = "probability" if score == "logit" else "logit"
    for i in range(len(images)):
        cls = int(requested[i]) if requested[i] >= 0 else int(np.argmax(probs[i]))
        assert out["cam_index"][i] == cls
        ref = reference_cam(conv_logits, x[i], cls, method=method, score=score)
        assert ref.max() == 1.0, f"image {i}: an all-zero map would not tell the scores apart"
        np.testing.assert_allclose(out["cam"][i], ref, atol=2e-4, err_msg=f"{method}/{score} image {i}")
        # the other score gives another map here, so a step that ignored cam_score would fail above
        alt = reference_cam(conv_logits, x[i], cls, method=method, score=other)
        assert np.abs(alt - ref).max() > 0.05, f"{method} image {i}: logit and probability maps coincide"


def test_cam_methods_differ_from_each_other(softmax_case):
    from bulk_explain.workers.explain.explain_step import ExplainStep

    _, loaded, images, requested = softmax_case
    cams = {m: ExplainStep(loaded, len(images), method=m)(images, requested)["cam"] for m in METHODS}
    for a in METHODS:
        for b in METHODS:
            if a < b:
                assert np.abs(cams[a] - cams[b]).max() > 0.05, (a, b)


def test_unknown_cam_method_is_refused(softmax_case):
    from bulk_explain.workers.explain.explain_step import ExplainStep

    _, loaded, _, _ = softmax_case
    with pytest.raises(ValueError, match="unknown CAM method"):
        ExplainStep(loaded, 3, method="nope")
