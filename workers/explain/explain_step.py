"""The compute stage: ONE compiled step per batch, on the process' Keras backend (TensorFlow or JAX).

For a fixed-shape uint8 batch it returns, per image: class probabilities' top-k, the predicted
class, the class-activation map of the explained class at the target layer's resolution, and
activation statistics (mean, std, max, zero_fraction) of every summarized layer, all reduced in
the graph so only small arrays cross back to Python. The step is written with `keras.ops`; the
gradient and the compile go through `bulk_explain.workers.backends`. Under a mixed precision policy the model
runs in bfloat16/float16 and everything reported (probabilities, CAM, statistics) is float32.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from bulk_explain.workers.explain.cam_methods import ModelContext, cam_method, parse_methods
from bulk_explain.workers.explain.faithfulness import DEFAULT_STEPS, FaithfulnessEvaluator
from bulk_explain.workers.models import LoadedModel, ModelError

CAM_SCORES = ("logit", "probability")


def _linear_clone(layer):
    """A copy of `layer` with a linear activation (the caller's model is never mutated)."""
    config = layer.get_config()
    config["activation"] = "linear"
    config["name"] = layer.name + "_logits"
    linear = layer.__class__.from_config(config)
    linear.build(layer.input.shape)
    linear.set_weights(layer.get_weights())
    return linear


def _logits(last, x):
    """The final layer's pre-activation output for its input `x` (softmax/sigmoid removed)."""
    import keras

    if isinstance(last, (keras.layers.Softmax, keras.layers.Activation)):
        return x
    act = getattr(last, "activation", None)
    if act is None or getattr(act, "__name__", "") == "linear":
        return last(x)
    return _linear_clone(last)(x)


def build_explain_graph(model, map_layers, target_layer):
    """A Keras model: [input, delta] -> [outputs of `map_layers`..., pre-activation logits].

    `delta` (zeros, the target layer's output shape) is added to the target layer's output, and
    every later layer consumes the sum. d score / d delta is then d score / d(target maps) on any
    backend: a gradient with respect to a model *input*, which JAX's functional `grad` can take
    (it cannot differentiate with respect to an intermediate tensor the way a TF tape does), and it
    works for any graph, skip connections around the target layer included.

    Sequential models are re-chained on a fresh Input: a Sequential loaded from a legacy .h5 can
    hold several graph nodes per layer, and mixing `layer.output` of one node with the logits of
    another gives tensors with no gradient path between them. Functional models are re-run node by
    node with the same layer objects (shared weights, nothing copied).
    """
    import keras

    last = model.layers[-1]
    target_shape = tuple(model.get_layer(target_layer).output.shape[1:])
    inputs = keras.Input(shape=model.inputs[0].shape[1:], dtype=model.inputs[0].dtype)
    delta = keras.Input(shape=target_shape, dtype="float32", name="cam_delta")
    captured = {}

    def call(layer, *args, **kwargs):
        if layer is last:
            out = _logits(last, args[0])
        else:
            out = layer(*args, **kwargs)
        if layer.name == target_layer:
            out = keras.ops.add(out, keras.ops.cast(delta, out.dtype))
        captured[layer.name] = out
        return out

    if isinstance(model, keras.Sequential):
        x = inputs
        for layer in model.layers:
            x = call(layer, x)
        logits = x
    else:
        logits = model._run_through_graph([inputs], operation_fn=lambda op: op, call_fn=call)
        logits = keras.tree.flatten(logits)[0]
    outputs = [captured[n] for n in map_layers] + [logits]
    return keras.Model([inputs, delta], outputs, name="explain_graph")


class ExplainStep:
    """Builds and owns the compiled per-batch step for one model.

    Args:
        loaded: the model and its metadata.
        batch_size: the fixed batch size of the compiled step (short batches are padded).
        target_layer: Conv layer for the CAM; default the last Conv2D.
        activation_layers: layers to summarize; default every Conv2D and pooling layer.
        method: CAM method name ("gradcam", "gradcam++", "layercam", "scorecam"), or several
            ("gradcam,scorecam" or a list): all from one forward pass and one gradient; `cam` is
            the first method's map, `cams` holds all of them.
        cam_score: "logit" (pre-activation y^c, the paper) or "probability" (the lecture).
        top_k: how many classes to report per image.
        jit_compile: TensorFlow only: XLA-compile the step (None: the backend's measured default).
        metrics: faithfulness metrics per method ("deletion", "insertion", "road"); see
            `workers/explain/faithfulness.py`.
        metric_steps: deletion / insertion steps.
        scorecam_channels: Score-CAM's cap on scored channels (None = its default, 0 = all).

    Raises:
        ModelError: a named layer does not exist or has the wrong rank.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        batch_size: int,
        target_layer: Optional[str] = None,
        activation_layers: Optional[Sequence[str]] = None,
        method: str = "gradcam",
        cam_score: str = "logit",
        top_k: int = 5,
        jit_compile: Optional[bool] = None,
        metrics: Sequence[str] = (),
        metric_steps: int = DEFAULT_STEPS,
        scorecam_channels: Optional[int] = None,
    ):
        from bulk_explain.workers.backends import get_backend

        if cam_score not in CAM_SCORES:
            raise ValueError(f"cam_score must be one of {CAM_SCORES}, received {cam_score!r}")
        self.backend = get_backend()
        self.loaded = loaded
        self.batch_size = int(batch_size)
        model = loaded.model
        self.target_layer = target_layer or loaded.conv_layer_names()[-1]
        self.activation_layers = list(
            activation_layers if activation_layers is not None else loaded.default_activation_layers()
        )
        names = [l.name for l in model.layers]
        for name in [self.target_layer, *self.activation_layers]:
            if name not in names:
                raise ModelError(f"layer {name!r} not found in model; it has: {', '.join(names)}")
        for name in [self.target_layer, *self.activation_layers]:
            rank = len(model.get_layer(name).output.shape)
            if rank != 4:
                raise ModelError(f"layer {name!r} must output (batch, h, w, channels) maps, its rank is {rank}")
        self.top_k = max(1, min(int(top_k), loaded.num_classes))
        self.cam_score = cam_score
        self.method_names = parse_methods(method)
        self.methods = [cam_method(n, max_channels=scorecam_channels) for n in self.method_names]
        self.method = self.methods[0]
        self.evaluator = FaithfulnessEvaluator(metrics, metric_steps) if metrics else None
        # Score-CAM and the metrics batch perturbed images: at most this many per forward pass.
        self.images_per_forward = 2 * self.batch_size

        # One graph with every tensor we need: target maps (+ the zero delta the gradient is taken
        # against), summarized maps, logits.
        map_layers = list(dict.fromkeys([self.target_layer, *self.activation_layers]))
        self._act_index = [map_layers.index(n) for n in self.activation_layers]
        self._graph = build_explain_graph(model, map_layers, self.target_layer)
        self._map_layers = map_layers
        self._target_shape = tuple(int(d) for d in model.get_layer(self.target_layer).output.shape[1:])
        self._compiled = self.backend.compile(self._step, [self._graph], jit_compile=jit_compile)
        self._maps_fn = None
        self._metrics_compiled = None
        if self.evaluator is not None:
            self._metrics_compiled = self.backend.compile(self._metrics_step, [self._graph], jit_compile=jit_compile)

    # ------------------------------------------------------------------ graph

    def _probabilities(self, logits):
        from keras import ops

        kind = self.loaded.output_kind
        if kind == "sigmoid" and logits.shape[-1] == 1:
            p = ops.sigmoid(logits[:, 0])
            return ops.stack([1.0 - p, p], axis=1)
        if kind == "sigmoid":
            return ops.sigmoid(logits)  # multi-label: independent probabilities
        return ops.softmax(logits, axis=-1)

    def _class_score(self, logits, probs, cls):
        """y^c per image: the pre-activation score (or the probability), never summed over classes."""
        from keras import ops

        if self.cam_score == "probability":
            return _take_per_row(probs, cls)
        if self.loaded.output_kind == "sigmoid" and logits.shape[-1] == 1:
            # Binary sigmoid: the logit favours class 1; class 0's score is its negation.
            return ops.where(cls == 1, logits[:, 0], -logits[:, 0])
        return _take_per_row(logits, cls)

    def _head(self, requested_class):
        """outputs -> (summed class score, (probs, pred, cls)); everything in float32."""
        from keras import ops

        def head(outputs):
            logits = ops.cast(outputs[-1], "float32")
            probs = self._probabilities(logits)
            pred = ops.cast(ops.argmax(probs, axis=1), "int32")
            num = probs.shape[1]
            valid = (requested_class >= 0) & (requested_class < num)
            cls = ops.where(valid, requested_class, pred)
            # Summing per-image scores keeps each image's gradient its own: image i's score
            # depends only on image i (inference mode), so d(sum)/dA_i = dy_i/dA_i.
            score = ops.sum(self._class_score(logits, probs, cls))
            return score, (probs, pred, cls)

        return head

    def _scaled(self, images):
        from keras import ops

        return self.loaded.preprocessing.scale_tensor(ops.cast(images, "float32"))

    def _step(self, images, requested_class):
        from keras import ops

        x = self._scaled(images)
        delta = ops.zeros((images.shape[0],) + self._target_shape, "float32")
        requested_class = ops.cast(requested_class, "int32")
        outs, (probs, pred, cls), grads = self.backend.value_and_grad(
            self._graph, [x, delta], 1, self._head(requested_class))
        maps = [ops.cast(m, "float32") for m in outs[:-1]]
        target = maps[0]
        cams = self._all_cams(ops.cast(grads, "float32"), target, x, cls)
        cam = cams[:, 0]
        stats = []
        for i in self._act_index:
            a = maps[i]
            stats.append(
                ops.stack(
                    [
                        ops.mean(a, axis=(1, 2, 3)),
                        ops.std(a, axis=(1, 2, 3)),
                        ops.max(a, axis=(1, 2, 3)),
                        ops.mean(ops.cast(ops.equal(a, 0.0), "float32"), axis=(1, 2, 3)),
                    ],
                    axis=1,
                )
            )
        stats = ops.stack(stats, axis=1) if stats else ops.zeros((images.shape[0], 0, 4), "float32")
        top_scores, top_index = ops.top_k(probs, k=self.top_k)
        return {
            "pred_index": pred,
            "pred_score": _take_per_row(probs, pred),
            "cam_index": cls,
            "cam": cam,
            "cams": cams,  # [B, methods, h, w]
            "stats": stats,  # [B, layers, (mean, std, max, zero_fraction)]
            "top_index": ops.cast(top_index, "int32"),
            "top_score": top_scores,
        }

    def _maps(self, images):
        from keras import ops

        x = self._scaled(images)
        delta = ops.zeros((images.shape[0],) + self._target_shape, "float32")
        outs = self._graph([x, delta], training=False)
        return [ops.cast(outs[i], "float32") for i in self._act_index]

    # ------------------------------------------------------------------ public

    def __call__(self, images: np.ndarray, requested_class: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
        """Runs the compiled step on up to `batch_size` uint8 RGB images of the model's input size.

        Args:
            images: [n, h, w, 3] uint8, n <= batch_size (padded here, results trimmed).
            requested_class: [n] int32 class to explain per image, -1 for the predicted class.

        Returns:
            dict of numpy arrays with leading dimension n.

        Raises:
            ValueError: more than `batch_size` images.
        """
        n = images.shape[0]
        if n > self.batch_size:
            raise ValueError(f"batch of {n} images exceeds the compiled batch size {self.batch_size}")
        if requested_class is None:
            requested_class = np.full((n,), -1, np.int32)
        if n < self.batch_size:
            pad = self.batch_size - n
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            requested_class = np.concatenate([requested_class, np.full((pad,), -1, np.int32)])
        out = self._compiled(np.ascontiguousarray(images, np.uint8), requested_class.astype(np.int32))
        out = {k: np.asarray(v) for k, v in out.items()}
        if self.evaluator is not None:
            out.update(self._metrics_all_methods(images, out["cams"], out["cam_index"]))
        return {k: v[:n] for k, v in out.items()}

    def activation_maps(self, images: np.ndarray) -> List[np.ndarray]:
        """Full activation maps of the summarized layers for a few images (channel grids), float32."""
        if self._maps_fn is None:
            self._maps_fn = self.backend.compile(self._maps, [self._graph])
        return [np.asarray(m) for m in self._maps_fn(np.ascontiguousarray(images, np.uint8))]

    # ------------------------------------------------------------ several methods, Score-CAM, metrics
    # Score-CAM (`needs_model` methods) and the faithfulness metrics run forward passes of the model
    # on perturbed batches; everything here is keras.ops, compiled by the backend like the step.

    def _class_probability(self, model_inputs, classes):
        """Probability of each image's class on scaled model inputs, [N]."""
        from keras import ops

        delta = ops.zeros((model_inputs.shape[0],) + self._target_shape, "float32")
        logits = ops.cast(self._graph([model_inputs, delta], training=False)[-1], "float32")
        return _take_per_row(self._probabilities(logits), ops.cast(classes, "int32"))

    def _all_cams(self, grads, target, x, cls):
        """[B, methods, h, w]: every method's normalized map from the same forward pass and gradient."""
        import keras

        context = ModelContext(inputs=x, classes=cls, class_probability=self._class_probability,
                               images_per_forward=self.images_per_forward)
        return keras.ops.stack([m.explain(grads, target, context) for m in self.methods], axis=1)

    def _metrics_step(self, images, maps, classes):
        def probability(pixels, cls):
            return self._class_probability(self.loaded.preprocessing.scale_tensor(pixels), cls)

        return self.evaluator(images, maps, classes, probability)

    def _metrics_all_methods(self, images, cams, classes):
        """Per method, one compiled call for the whole batch: {output: [B, methods, ...]}."""
        per_method = [self._metrics_compiled(images, cams[:, m].astype(np.float32), classes.astype(np.int32))
                      for m in range(len(self.methods))]
        return {k: np.stack([np.asarray(r[k]) for r in per_method], axis=1) for k in per_method[0]}

    def faithfulness(self, images: np.ndarray, maps: np.ndarray, classes: np.ndarray) -> Dict[str, np.ndarray]:
        """The metrics of arbitrary maps (e.g. a random or inverted map, as baselines).

        Args:
            images: [n, H, W, 3] uint8 at the model input size, n <= batch_size.
            maps: [n, h, w] float maps, any resolution.
            classes: [n] int32 class to score per image.

        Returns:
            {output: [n, ...]} as `FaithfulnessEvaluator`.

        Raises:
            ValueError: the step was built without metrics, or the batch is too large.
        """
        if self.evaluator is None:
            raise ValueError("this ExplainStep was built without metrics; pass metrics=(...)")
        n = images.shape[0]
        if n > self.batch_size:
            raise ValueError(f"batch of {n} images exceeds the compiled batch size {self.batch_size}")
        pad = self.batch_size - n
        images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        maps = np.concatenate([maps, np.zeros((pad,) + maps.shape[1:], maps.dtype)]).astype(np.float32)
        classes = np.concatenate([classes, np.zeros(pad, np.int32)]).astype(np.int32)
        out = self._metrics_compiled(images, maps, classes)
        return {k: np.asarray(v)[:n] for k, v in out.items()}


def _take_per_row(values, index):
    """values[i, index[i]] for every row i (a one-hot sum: the same ops on every backend)."""
    from keras import ops

    onehot = ops.one_hot(index, values.shape[-1], dtype=values.dtype)
    return ops.sum(values * onehot, axis=-1)
