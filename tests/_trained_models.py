"""The lecture's convnet trained here on a synthetic two-class set where the class is a shape at a
random place (class 0: a filled square, class 1: a ring), so the right explanation is known: where
the object is. Shared by the localization, faithfulness and mixed-precision tests."""

import numpy as np

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


def train_shapes_model(n_train, n_test, epochs):
    """The lecture's convnet at SIZE px trained on `make_shapes` images (seed 0 throughout).

    Args:
        n_train: training images.
        n_test: held-out images, drawn after the training ones; the model must classify at least
            90 % of them right (asserted).
        epochs: training epochs (batch size 32, RMSprop 1e-3).

    Returns:
        `(loaded, x_test, y_test, boxes)`: the `LoadedModel` (sigmoid output, classes "square" and
        "ring", rescale preprocessing), the held-out uint8 images, their labels and their objects'
        boxes `(x0, y0, x1, y1)`.
    """
    import keras

    from bulk_explain.workers.models import LoadedModel, build_cats_dogs_convnet
    from bulk_explain.workers.preprocessing import Preprocessing

    rng = np.random.default_rng(0)
    x_train, y_train, _ = make_shapes(n_train, rng)
    x_test, y_test, boxes = make_shapes(n_test, rng)
    keras.utils.set_random_seed(0)
    model = build_cats_dogs_convnet(SIZE)
    model.compile(optimizer=keras.optimizers.RMSprop(1e-3), loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x_train / 255.0, y_train, epochs=epochs, batch_size=32, verbose=0)
    accuracy = model.evaluate(x_test / 255.0, y_test, verbose=0)[1]
    assert accuracy >= 0.9, f"the synthetic task did not train (accuracy {accuracy})"
    loaded = LoadedModel(model, ["square", "ring"], Preprocessing(SIZE, SIZE, "rescale"), "sigmoid")
    return loaded, x_test, y_test, boxes
