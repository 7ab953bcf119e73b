"""Class-activation-map methods: one base class owns the mechanics, each method only says how
to weight the target layer's channels from its gradients (as pytorch-grad-cam does).

Everything here is written with `keras.ops` (any Keras backend) and runs inside the compiled step,
on whole batches, per image: no reduction ever
crosses the batch axis (the keras-io example averages gradients over the batch, which is only
correct for a batch of one).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Type, Union


@dataclasses.dataclass
class ModelContext:
    """What a method that runs the model itself (Score-CAM) gets besides the activations.

    Attributes:
        inputs: the batch as the model sees it (after scaling), [B, H, W, 3].
        classes: the explained class per image, [B] int32.
        class_probability: `(model_inputs [N, H, W, 3], classes [N]) -> [N]` probability of each
            image's class (softmax, or sigmoid for a single-unit binary model).
        images_per_forward: how many images one forward pass may hold (memory bound).
    """

    inputs: object
    classes: object
    class_probability: Callable
    images_per_forward: int


class CamMethod:
    """Base: cam = ReLU(sum_k w_k * A^k), normalized to [0, 1] per image (all zeros if max is 0)."""

    name = ""
    # Hook for methods whose channel weights come from forward passes of the model on perturbed
    # inputs instead of gradients (Score-CAM): they set this and implement `model_weights`.
    needs_model = False
    option_names: Sequence[str] = ()  # constructor options the method takes (see `cam_method`)

    def weights(self, grads, activations):
        """Returns channel weights broadcastable to `activations` ([B, h, w, k])."""
        raise NotImplementedError

    def __call__(self, grads, activations):
        from keras import ops

        w = self.weights(grads, activations)
        cam = ops.relu(ops.sum(w * activations, axis=-1))  # [B, h, w]
        peak = ops.max(cam, axis=(1, 2), keepdims=True)
        return ops.divide_no_nan(cam, peak)

    def describe(self) -> dict:
        """What job.json records about the method."""
        return {"name": self.name, "weights": (type(self).__doc__ or "").strip().splitlines()[0]}

    def model_weights(self, activations, context: ModelContext):
        """Channel weights [B, 1, 1, k] from forward passes of the model (methods with `needs_model`)."""
        raise NotImplementedError(f"{type(self).__name__} does not run the model")

    def explain(self, grads, activations, context: Optional[ModelContext] = None):
        """The normalized map [B, h, w]: from gradients, or from `model_weights` for `needs_model`
        methods (`grads` may then be None)."""
        if not self.needs_model:
            return self(grads, activations)
        import keras

        ops = keras.ops
        w = self.model_weights(activations, context)
        cam = ops.relu(ops.sum(w * activations, axis=-1))
        peak = ops.max(cam, axis=(1, 2), keepdims=True)
        return ops.where(peak > 0, cam / ops.where(peak > 0, peak, 1.0), 0.0)


class GradCAM(CamMethod):
    """Selvaraju et al. 2016: alpha_k = spatial mean of dy^c/dA^k."""

    name = "gradcam"

    def weights(self, grads, activations):
        from keras import ops

        return ops.mean(grads, axis=(1, 2), keepdims=True)


class GradCAMPlusPlus(CamMethod):
    """Chattopadhay et al. 2018, with the exponential-score closed form used by their code."""

    name = "gradcam++"

    def weights(self, grads, activations):
        from keras import ops

        g2, g3 = grads**2, grads**3
        sum_a = ops.sum(activations, axis=(1, 2), keepdims=True)
        alpha = ops.divide_no_nan(g2, 2.0 * g2 + sum_a * g3)
        return ops.sum(alpha * ops.relu(grads), axis=(1, 2), keepdims=True)


class LayerCAM(CamMethod):
    """Jiang et al. 2021: element-wise weights ReLU(dy^c/dA), finer maps from earlier layers."""

    name = "layercam"

    def weights(self, grads, activations):
        from keras import ops

        return ops.relu(grads)


# Score-CAM runs one forward pass per channel and image: 128 covers every channel of the
# lecture's convnet's last conv layer and the 128 most activated of VGG16's 512.
SCORECAM_DEFAULT_CHANNELS = 128


class ScoreCAM(CamMethod):
    """Wang et al. 2020: w_k = p_c(X * s(up(A^k))), gradient-free.

    Each channel map A^k of the target layer is upsampled bilinearly to the model input size and
    min-max normalized per image to [0, 1] (s); the model input X (after scaling, as the authors'
    code masks the normalized tensor) is multiplied by it, and the weight is the explained class's
    probability on that masked input: softmax, or the sigmoid (1 - sigmoid for class 0) of a
    single-unit binary model, as in the paper's released code, which also drops the baseline term
    f(X_b) of the paper's equation. A channel whose upsampled map is constant gets weight 0 (the
    code skips it). All masked inputs of a batch run inside the compiled step, several channels
    per forward pass.

    Args:
        max_channels: only the N channels with the highest spatial-mean activation of each image
            are scored (the others get weight 0); 0 = all. Default `SCORECAM_DEFAULT_CHANNELS`.
    """

    name = "scorecam"
    needs_model = True
    option_names = ("max_channels",)

    def __init__(self, max_channels: Optional[int] = None):
        self.max_channels = SCORECAM_DEFAULT_CHANNELS if max_channels is None else int(max_channels)
        if self.max_channels < 0:
            raise ValueError(f"Score-CAM channels must be >= 0 (0 = all), received {max_channels!r}")

    def describe(self) -> dict:
        return {
            "name": self.name,
            "weights": "probability of the explained class on the model input times each upsampled "
                       "(bilinear), min-max normalized channel map; constant maps weigh 0",
            "score": "softmax probability; sigmoid (1 - sigmoid for class 0) for a single-unit model",
            "max_channels": self.max_channels or "all",
            "channel_choice": "top N by spatial-mean activation, per image",
        }

    def model_weights(self, activations, context: ModelContext):
        import keras

        ops = keras.ops
        b, _, _, k = activations.shape
        height, width = context.inputs.shape[1], context.inputs.shape[2]
        n = k if self.max_channels == 0 else min(k, self.max_channels)
        chosen, index = activations, None
        if n < k:
            _, index = ops.top_k(ops.mean(activations, axis=(1, 2)), n)  # [B, n]; ties: lower index
            chosen = ops.take_along_axis(activations, index[:, None, None, :], axis=-1)
        per = max(1, min(n, context.images_per_forward // b))  # channels per forward pass
        chunks = -(-n // per)
        if chunks * per > n:
            chosen = ops.pad(chosen, [[0, 0], [0, 0], [0, 0], [0, chunks * per - n]])
        # [chunks, B, h, w, per]: one slice per forward pass, taken inside the loop
        by_chunk = ops.transpose(ops.reshape(chosen, chosen.shape[:3] + (chunks, per)), (3, 0, 1, 2, 4))
        classes = ops.repeat(context.classes, per, axis=0)  # image-major, as the masked batch below

        def body(i, acc):
            maps = ops.image.resize(ops.take(by_chunk, i, axis=0), (height, width), interpolation="bilinear")
            low = ops.min(maps, axis=(1, 2), keepdims=True)
            span = ops.max(maps, axis=(1, 2), keepdims=True) - low
            masks = ops.where(span > 0, (maps - low) / ops.where(span > 0, span, 1.0), 0.0)  # [B, H, W, per]
            masked = context.inputs[:, None] * ops.transpose(masks, (0, 3, 1, 2))[..., None]
            p = context.class_probability(ops.reshape(masked, (b * per, height, width, -1)), classes)
            p = ops.where(ops.reshape(span, (b * per,)) > 0, p, 0.0)
            return acc + ops.one_hot(i, chunks)[:, None, None] * ops.reshape(p, (1, b, per))

        scores = ops.fori_loop(0, chunks, body, ops.zeros((chunks, b, per), "float32"))
        scores = ops.reshape(ops.transpose(scores, (1, 0, 2)), (b, chunks * per))[:, :n]
        if index is not None:  # back to all k channels; unscored ones weigh 0
            scores = ops.sum(ops.one_hot(index, k) * scores[..., None], axis=1)
        return scores[:, None, None, :]


CAM_METHODS: Dict[str, Type[CamMethod]] = {
    m.name: m for m in (GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM)
}


def cam_method(name: str, **options) -> CamMethod:
    """One method by registry name; `options` go to methods that take them (Score-CAM's
    `max_channels`), others ignore them."""
    if name not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {name!r}; expected one of {sorted(CAM_METHODS)}")
    cls = CAM_METHODS[name]
    return cls(**{k: v for k, v in options.items() if k in cls.option_names})


def parse_methods(value: Union[str, Sequence[str]]) -> List[str]:
    """`"gradcam,scorecam"` (or a list) -> unique method names in order.

    Raises:
        ValueError: empty, or a name not in the registry.
    """
    names = value.split(",") if isinstance(value, str) else list(value)
    names = list(dict.fromkeys(n.strip() for n in names if n and n.strip()))
    if not names:
        raise ValueError(f"expected one or more CAM methods ({', '.join(CAM_METHODS)}), received {value!r}")
    for name in names:
        if name not in CAM_METHODS:
            raise ValueError(f"unknown CAM method {name!r}; expected one of {', '.join(CAM_METHODS)}")
    return names
