"""Class-activation-map methods: one base class owns the mechanics, each method only says how
to weight the target layer's channels from its gradients (as pytorch-grad-cam does).

Everything here is written with `keras.ops` (any Keras backend) and runs inside the compiled step,
on whole batches, per image: no reduction ever
crosses the batch axis (the keras-io example averages gradients over the batch, which is only
correct for a batch of one).
"""

from __future__ import annotations

from typing import Dict, Type


class CamMethod:
    """Base: cam = ReLU(sum_k w_k * A^k), normalized to [0, 1] per image (all zeros if max is 0)."""

    name = ""

    def weights(self, grads, activations):
        """Returns channel weights broadcastable to `activations` ([B, h, w, k])."""
        raise NotImplementedError

    def __call__(self, grads, activations):
        from keras import ops

        w = self.weights(grads, activations)
        cam = ops.relu(ops.sum(w * activations, axis=-1))  # [B, h, w]
        peak = ops.max(cam, axis=(1, 2), keepdims=True)
        return ops.divide_no_nan(cam, peak)


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


CAM_METHODS: Dict[str, Type[CamMethod]] = {m.name: m for m in (GradCAM, GradCAMPlusPlus, LayerCAM)}


def cam_method(name: str) -> CamMethod:
    if name not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {name!r}; expected one of {sorted(CAM_METHODS)}")
    return CAM_METHODS[name]()
