"""Preprocessing is a property of the model: input size, pixel scaling and resize interpolation.

The decode threads resize to `size` with `interpolation` and hand uint8 RGB to the compiled step;
the step applies `scaling` inside the graph (so it costs one fused op, not a NumPy pass).
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import cv2

# Keras' load_img default is PIL NEAREST, which samples pixel centres; OpenCV's INTER_NEAREST
# samples top-left corners and shifts the image by up to a pixel. INTER_NEAREST_EXACT matches PIL.
INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST_EXACT,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}

# name -> human description, recorded in job.json
SCALINGS = {
    "rescale": "x / 255 (the lecture's cats/dogs net: ImageDataGenerator(rescale=1./255))",
    "vgg16": "RGB->BGR, minus ImageNet mean [103.939, 116.779, 123.68] (keras.applications.vgg16.preprocess_input, caffe mode)",
    "tf": "x / 127.5 - 1 (MobileNet/Inception style)",
    "none": "raw 0..255 floats (the model rescales inside)",
}

VGG16_BGR_MEAN = (103.939, 116.779, 123.68)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw RGB pixels become model input.

    Attributes:
        height, width: model input size.
        scaling: one of `SCALINGS`.
        interpolation: one of `INTERPOLATIONS`; default "nearest" as Keras' `load_img`.
    """

    height: int
    width: int
    scaling: str
    interpolation: str = "nearest"

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; expected one of {sorted(SCALINGS)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; expected one of {sorted(INTERPOLATIONS)}"
            )
        if self.height < 8 or self.width < 8:
            raise ValueError(f"model input size must be at least 8x8, received {self.height}x{self.width}")

    @property
    def size(self) -> Tuple[int, int]:
        return self.height, self.width

    def resize(self, rgb):
        """Resizes a uint8 HxWx3 RGB array to the model input size."""
        if rgb.shape[0] == self.height and rgb.shape[1] == self.width:
            return rgb
        return cv2.resize(rgb, (self.width, self.height), interpolation=INTERPOLATIONS[self.interpolation])

    def scale_tensor(self, x):
        """Applies the scaling to a float32 RGB batch tensor (inside the compiled step; keras.ops,
        so any Keras backend)."""
        from keras import ops

        x = ops.convert_to_tensor(x, "float32")
        if self.scaling == "rescale":
            return x / 255.0
        if self.scaling == "vgg16":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(VGG16_BGR_MEAN, "float32")
        if self.scaling == "tf":
            return x / 127.5 - 1.0
        return x

    def describe(self) -> dict:
        d = dataclasses.asdict(self)
        d["scaling_description"] = SCALINGS[self.scaling]
        return d
