"""The batched compiled step against an independent one-image-at-a-time Grad-CAM (paper / lecture)."""

import numpy as np
import pytest

from conftest import photo_like


def reference_gradcam(model, image_float, target_layer, class_index, sigmoid_binary):
    """Grad-CAM for ONE preprocessed image, written from the paper: y^c pre-activation,
    alpha_k = spatial mean of dy^c/dA^k, cam = ReLU(sum_k alpha_k A^k) / max."""
    import keras
    import tensorflow as tf

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.layers[-1].activation = keras.activations.linear
    grad_model = keras.Model(clone.inputs, [clone.get_layer(target_layer).output, clone.outputs[0]])
    x = tf.constant(image_float[None])
    with tf.GradientTape() as tape:
        conv, logits = grad_model(x, training=False)
        if sigmoid_binary:
            score = logits[0, 0] if class_index == 1 else -logits[0, 0]
        else:
            score = logits[0, class_index]
    grads = tape.gradient(score, conv)[0].numpy()
    conv = conv[0].numpy()
    alpha = grads.mean(axis=(0, 1))
    cam = np.maximum((conv * alpha).sum(axis=-1), 0)
    return cam / cam.max() if cam.max() > 0 else cam


def _mixed_batch(size, n, seed):
    rng = np.random.default_rng(seed)
    imgs = [photo_like(rng, size, size) for _ in range(n - 2)]
    imgs.append(np.zeros((size, size, 3), np.uint8))  # a flat image in the same batch
    imgs.append(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    return np.stack(imgs)


def _check(loaded, images, requested, sigmoid_binary):
    import tensorflow as tf

    from workers.explain_step import ExplainStep

    step = ExplainStep(loaded, batch_size=len(images) + 2)  # padding exercised too
    out = step(images, requested)
    scaled = np.asarray(loaded.preprocessing.scale_tensor(tf.constant(images, tf.float32)))
    for i in range(len(images)):
        cls = int(out["cam_index"][i])
        expected_cls = int(out["pred_index"][i]) if requested[i] < 0 else int(requested[i])
        assert cls == expected_cls
        ref = reference_gradcam(loaded.model, scaled[i], step.target_layer, cls, sigmoid_binary)
        np.testing.assert_allclose(out["cam"][i], ref, atol=1e-4, err_msg=f"image {i}")
    return out


def test_batched_gradcam_equals_single_image_reference_softmax():
    from workers.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(kind="vgg16", weights="random", input_size=48, seed=3))
    assert loaded.output_kind == "softmax"
    images = _mixed_batch(48, 5, seed=0)
    requested = np.array([-1, 7, -1, 999, 3], np.int32)  # 999: out of range -> predicted class
    out = _check(loaded, images, requested, sigmoid_binary=False)
    assert out["cam_index"][1] == 7 and out["cam_index"][4] == 3
    # softmax probabilities: top-k sorted and consistent with pred
    assert np.all(np.diff(out["top_score"], axis=1) <= 1e-7)
    np.testing.assert_array_equal(out["top_index"][:, 0], out["pred_index"])


def test_batched_gradcam_equals_single_image_reference_sigmoid():
    from workers.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(kind="cats_dogs", weights="random", input_size=64, seed=5))
    assert loaded.output_kind == "sigmoid" and loaded.class_names == ["cat", "dog"]
    images = _mixed_batch(64, 6, seed=1)
    # class 0 (cat) uses the negated logit, class 1 (dog) the logit
    requested = np.array([0, 1, -1, 0, 1, -1], np.int32)
    out = _check(loaded, images, requested, sigmoid_binary=True)
    # pred_score is the probability of the predicted class
    p_dog = loaded.model.predict(loaded.preprocessing.scale_tensor(images.astype(np.float32)), verbose=0)[:, 0]
    expected = np.where(p_dog >= 0.5, p_dog, 1 - p_dog)
    np.testing.assert_allclose(out["pred_score"], expected, atol=1e-5)
    np.testing.assert_array_equal(out["pred_index"], (p_dog > 0.5).astype(int))


def test_cam_is_not_averaged_over_the_batch():
    """The keras-io bug: averaging gradients over the batch makes every image's CAM depend on the
    others. Each image's map must be identical whether it is computed alone or in a batch."""
    from workers.explain_step import ExplainStep
    from workers.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(kind="cats_dogs", weights="random", input_size=64, seed=9))
    images = _mixed_batch(64, 4, seed=2)
    step = ExplainStep(loaded, batch_size=4)
    together = step(images)["cam"]
    for i in range(4):
        alone = step(images[i : i + 1])["cam"][0]
        np.testing.assert_allclose(together[i], alone, atol=1e-5)


def test_activation_statistics_match_numpy():
    import keras

    from workers.explain_step import ExplainStep
    from workers.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(kind="cats_dogs", weights="random", input_size=64, seed=2))
    images = _mixed_batch(64, 3, seed=3)
    step = ExplainStep(loaded, batch_size=3)
    out = step(images)
    layers = step.activation_layers
    assert layers == [l.name for l in loaded.model.layers if "conv" in l.name or "pool" in l.name]
    probe = keras.Model(loaded.model.inputs, [loaded.model.get_layer(n).output for n in layers])
    maps = probe(loaded.preprocessing.scale_tensor(images.astype(np.float32)))
    for li, m in enumerate(maps):
        m = m.numpy()
        np.testing.assert_allclose(out["stats"][:, li, 0], m.mean(axis=(1, 2, 3)), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out["stats"][:, li, 1], m.std(axis=(1, 2, 3)), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(out["stats"][:, li, 2], m.max(axis=(1, 2, 3)), rtol=1e-5)
        np.testing.assert_allclose(out["stats"][:, li, 3], (m == 0).mean(axis=(1, 2, 3)), atol=1e-6)


def test_cam_methods_registry_and_probability_score():
    from workers.explain_step import ExplainStep
    from workers.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(kind="cats_dogs", weights="random", input_size=64, seed=4))
    images = _mixed_batch(64, 3, seed=4)
    for method in ("gradcam", "gradcam++", "layercam"):
        for score in ("logit", "probability"):
            cam = ExplainStep(loaded, 3, method=method, cam_score=score)(images)["cam"]
            assert cam.shape == (3, 4, 4) and np.all(cam >= 0) and np.all(cam <= 1 + 1e-6)
    with pytest.raises(ValueError, match="unknown CAM method"):
        ExplainStep(loaded, 3, method="nope")
