"""Generated photo-like test images for the benchmarks (bench/gpu.py, bench/methods.py,
bench/throughput.py): smooth gradients and a few flat discs, so that JPEG encodes and decodes them
as it does photos (white noise would be an unrealistically hard case)."""

from __future__ import annotations

import numpy as np


def photo_like(rng, h, w, *, min_radius=10, noise=6.0):
    """One smooth, photo-like RGB image.

    Args:
        rng: a `numpy.random.Generator`; the image depends only on its state.
        h: height in pixels.
        w: width in pixels.
        min_radius: smallest radius of the four flat discs, in pixels (the largest is a third of
            the shorter side).
        noise: standard deviation of the Gaussian noise added to every pixel; 0 adds none and
            draws nothing from `rng`.

    Returns:
        A `(h, w, 3)` uint8 array.
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = 128 + 60 * np.sin(xx / rng.uniform(5, 40) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(5, 40))
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(min_radius, min(h, w) / 3)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    if noise:
        img += rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
