"""A planted-problem dataset and the lecture's convnet trained on a clean copy, for the audit tests.

Classes: "cat" = a filled square, "dog" = a ring (the lecture's binary convnet, sigmoid: dog = 1),
at a random place on blurred noise. Planted problems: a share of one class's images moved into the
other class's folder (label issues), corrupt files (error rows), a subset of cats that carry only
a small magenta corner tag and no square (the model, trained with such tagged cats, learns the tag
as a shortcut), and later batches with the same or a shifted distribution (drift).
"""

from __future__ import annotations

import os

import cv2
import numpy as np

SIZE = 64
TAG = (255, 0, 255)  # RGB


def draw(rng, kind, tag=False, brightness=0):
    """One RGB image: kind 0 = square (cat), 1 = ring (dog), None = no object."""
    img = cv2.GaussianBlur(rng.integers(60, 140, (SIZE, SIZE, 3)).astype(np.uint8), (5, 5), 0).astype(np.int16)
    img = np.clip(img + brightness, 0, 255).astype(np.uint8)
    if kind is not None:
        # Sizes and contrasts vary, so the model is more sure of some images than of others (as on
        # real data); a saturated model gives confident learning thresholds of ~1.0 and it then
        # misses label errors (measured here: 5 of 8 with uniform, easy objects).
        r = int(rng.integers(4, 10))
        # Objects keep clear of the top-left corner, where the tag goes.
        cx, cy = (int(v) for v in rng.integers(r + 11, SIZE - r - 1, 2))
        colour = tuple(int(c) for c in rng.integers(110, 255, 3))
        if kind == 0:
            cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
        else:
            cv2.circle(img, (cx, cy), r, colour, -1)
            cv2.circle(img, (cx, cy), r // 2, (0, 0, 0), -1)
    if tag:
        img[2:9, 2:9] = TAG
    return img


def train_model(path, seed=0, n=480, epochs=5):
    """Trains the lecture's convnet on clean labels (every 5th cat is tag-only) and saves it."""
    import keras

    from workers.models import build_cats_dogs_convnet

    rng = np.random.default_rng(seed)
    x, y = [], []
    for i in range(n):
        if i % 2:
            x.append(draw(rng, 1)), y.append(1)
        else:
            x.append(draw(rng, None, tag=True) if i % 10 == 0 else draw(rng, 0)), y.append(0)
    keras.utils.set_random_seed(seed)
    model = build_cats_dogs_convnet(SIZE)
    model.compile(optimizer=keras.optimizers.RMSprop(1e-3), loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(np.stack(x) / 255.0, np.array(y), epochs=epochs, batch_size=32, verbose=0)
    model.save(path)
    return path


def write_png(path, rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), path
    return path


def write_batch(root, name, rng, cats=60, tagged=16, dogs=70, swapped=0, corrupt=0, brightness=0):
    """Writes one batch under root/cats and root/dogs; returns {"swapped": [...], "tagged": [...]}.

    `swapped` normal cats are written into dogs/ (their folder label is wrong); `tagged` cats are
    tag-only images in cats/.
    """
    planted = {"swapped": [], "tagged": [], "corrupt": []}
    for i in range(cats):
        folder = "dogs" if i < swapped else "cats"
        p = write_png(os.path.join(root, folder, f"{name}-cat{i:03d}.png"), draw(rng, 0, brightness=brightness))
        if i < swapped:
            planted["swapped"].append(p)
    for i in range(tagged):
        planted["tagged"].append(write_png(os.path.join(root, "cats", f"{name}-tagged{i:03d}.png"),
                                           draw(rng, None, tag=True, brightness=brightness)))
    for i in range(dogs):
        write_png(os.path.join(root, "dogs", f"{name}-dog{i:03d}.png"), draw(rng, 1, brightness=brightness))
    bodies = [b"", b"<!DOCTYPE html><html>not an image</html>", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"]
    for i in range(corrupt):
        p = os.path.join(root, "cats", f"{name}-corrupt{i}.png")
        with open(p, "wb") as f:
            f.write(bodies[i % len(bodies)])
        planted["corrupt"].append(p)
    return planted
