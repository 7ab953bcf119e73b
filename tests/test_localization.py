"""Grad-CAM localizes: the lecture's convnet, trained here on a synthetic two-class set where the
class is a shape at a random place, points at the object (pointing game) far more often than the
centre-point baseline does."""

import numpy as np
import pytest

SIZE = 64


def make_shapes(n, rng):
    """Class 0: a filled square; class 1: a ring. Same colours, random place, blurred noise."""
    import cv2

    images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    labels = np.arange(n, dtype=np.int32) % 2
    boxes = []
    for i in range(n):
        img = cv2.GaussianBlur(rng.integers(60, 140, (SIZE, SIZE, 3)).astype(np.uint8), (5, 5), 0)
        r = int(rng.integers(7, 10))
        cx, cy = (int(v) for v in rng.integers(r + 1, SIZE - r - 1, 2))
        colour = tuple(int(c) for c in rng.integers(180, 255, 3))
        if labels[i] == 0:
            cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
        else:
            cv2.circle(img, (cx, cy), r, colour, -1)
            cv2.circle(img, (cx, cy), r // 2, (0, 0, 0), -1)
        images[i] = img
        boxes.append((cx - r, cy - r, cx + r, cy + r))
    return images, labels, boxes


@pytest.mark.slow
def test_gradcam_pointing_game_beats_centre_baseline():
    import keras

    from bulk_explain.workers import image_io
    from bulk_explain.workers.explain.explain_step import ExplainStep
    from bulk_explain.workers.models import LoadedModel, build_cats_dogs_convnet
    from bulk_explain.workers.preprocessing import Preprocessing

    rng = np.random.default_rng(0)
    x_train, y_train, _ = make_shapes(800, rng)
    x_test, y_test, boxes = make_shapes(100, rng)
    keras.utils.set_random_seed(0)
    model = build_cats_dogs_convnet(SIZE)
    model.compile(optimizer=keras.optimizers.RMSprop(1e-3), loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x_train / 255.0, y_train, epochs=6, batch_size=32, verbose=0)
    accuracy = model.evaluate(x_test / 255.0, y_test, verbose=0)[1]
    assert accuracy >= 0.9, f"the synthetic task did not train (accuracy {accuracy})"

    loaded = LoadedModel(model, ["square", "ring"], Preprocessing(SIZE, SIZE, "rescale"), "sigmoid")
    # The last conv layer is 4x4 at this input size; the third conv (12x12) is the resolution
    # at which a 16-px object can be pointed at.
    step = ExplainStep(loaded, batch_size=50, target_layer="conv2d_2")
    hits = centre = 0
    for start in range(0, len(x_test), 50):
        out = step(x_test[start : start + 50], y_test[start : start + 50])
        for j in range(50):
            px, py = image_io.cam_peak(image_io.upsample_cam(out["cam"][j], SIZE, SIZE))
            x0, y0, x1, y1 = boxes[start + j]
            hits += x0 <= px * SIZE <= x1 and y0 <= py * SIZE <= y1
            centre += x0 <= SIZE / 2 <= x1 and y0 <= SIZE / 2 <= y1
    assert hits >= 60, f"pointing game {hits}/100"
    assert hits >= 3 * max(centre, 5), f"pointing game {hits}/100 vs centre baseline {centre}/100"
