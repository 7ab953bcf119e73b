"""The compute stage: ONE compiled TensorFlow step per batch.

For a fixed-shape uint8 batch it returns, per image: class probabilities' top-k, the predicted
class, the class-activation map of the explained class at the target layer's resolution, and
activation statistics (mean, std, max, zero_fraction) of every summarized layer, all reduced in
the graph so only small arrays cross back to Python.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from workers.cam_methods import ModelContext, cam_method, parse_methods
from workers.faithfulness import DEFAULT_STEPS, FaithfulnessEvaluator
from workers.models import LoadedModel, ModelError

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


def build_explain_graph(model, map_layers):
    """A Keras model: input -> [outputs of `map_layers`..., pre-activation logits], one connected graph.

    Sequential models are re-chained on a fresh Input: a Sequential loaded from a legacy .h5 can
    hold several graph nodes per layer, and mixing `layer.output` of one node with the logits of
    another gives tensors with no gradient path between them.
    """
    import keras

    last = model.layers[-1]
    if isinstance(model, keras.Sequential):
        x = inputs = keras.Input(shape=model.inputs[0].shape[1:], dtype=model.inputs[0].dtype)
        by_name = {}
        for layer in model.layers[:-1]:
            x = layer(x)
            by_name[layer.name] = x
        logits = _logits(last, x)
        return keras.Model(inputs, [by_name[n] for n in map_layers] + [logits], name="explain_graph")
    outputs = [model.get_layer(n).output for n in map_layers] + [_logits(last, last.input)]
    return keras.Model(model.inputs, outputs, name="explain_graph")


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
        metrics: faithfulness metrics per method ("deletion", "insertion", "road"); see
            `workers/faithfulness.py`.
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
        metrics: Sequence[str] = (),
        metric_steps: int = DEFAULT_STEPS,
        scorecam_channels: Optional[int] = None,
    ):
        import tensorflow as tf

        if cam_score not in CAM_SCORES:
            raise ValueError(f"cam_score must be one of {CAM_SCORES}, received {cam_score!r}")
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

        # One graph with every tensor we need: target maps, summarized maps, logits.
        map_layers = list(dict.fromkeys([self.target_layer, *self.activation_layers]))
        self._act_index = [map_layers.index(n) for n in self.activation_layers]
        self._graph = build_explain_graph(model, map_layers)
        self._map_layers = map_layers
        h, w = loaded.preprocessing.size
        spec = [
            tf.TensorSpec([self.batch_size, h, w, 3], tf.uint8),
            tf.TensorSpec([self.batch_size], tf.int32),
        ]
        self._compiled = tf.function(self._step, input_signature=spec, reduce_retracing=True)
        self._grid_fn = None
        self._metrics_compiled = None
        if self.evaluator is not None:
            spec = [tf.TensorSpec([self.batch_size, h, w, 3], tf.uint8),
                    tf.TensorSpec([self.batch_size, None, None], tf.float32),
                    tf.TensorSpec([self.batch_size], tf.int32)]
            self._metrics_compiled = tf.function(self._metrics_step, input_signature=spec, reduce_retracing=True)

    # ------------------------------------------------------------------ graph

    def _probabilities(self, logits):
        import tensorflow as tf

        kind = self.loaded.output_kind
        if kind == "sigmoid" and logits.shape[-1] == 1:
            p = tf.sigmoid(logits[:, 0])
            return tf.stack([1.0 - p, p], axis=1)
        if kind == "sigmoid":
            return tf.sigmoid(logits)  # multi-label: independent probabilities
        return tf.nn.softmax(logits, axis=-1)

    def _class_score(self, logits, probs, cls):
        """y^c per image: the pre-activation score (or the probability), never summed over classes."""
        import tensorflow as tf

        if self.cam_score == "probability":
            return tf.gather(probs, cls, axis=1, batch_dims=1)
        if self.loaded.output_kind == "sigmoid" and logits.shape[-1] == 1:
            # Binary sigmoid: the logit favours class 1; class 0's score is its negation.
            return tf.where(cls == 1, logits[:, 0], -logits[:, 0])
        return tf.gather(logits, cls, axis=1, batch_dims=1)

    def _step(self, images, requested_class):
        import tensorflow as tf

        x = self.loaded.preprocessing.scale_tensor(tf.cast(images, tf.float32))
        with tf.GradientTape() as tape:
            outs = self._graph(x, training=False)
            maps, logits = outs[:-1], outs[-1]
            target = maps[0]
            probs = self._probabilities(logits)
            pred = tf.argmax(probs, axis=1, output_type=tf.int32)
            num = tf.shape(probs)[1]
            valid = (requested_class >= 0) & (requested_class < num)
            cls = tf.where(valid, requested_class, pred)
            # Summing per-image scores keeps each image's gradient its own: image i's score
            # depends only on image i (inference mode), so d(sum)/dA_i = dy_i/dA_i.
            score = tf.reduce_sum(self._class_score(logits, probs, cls))
        grads = tape.gradient(score, target)
        cams = self._all_cams(grads, target, x, cls)
        cam = cams[:, 0]
        stats = []
        for i in self._act_index:
            a = maps[i]
            stats.append(
                tf.stack(
                    [
                        tf.reduce_mean(a, axis=(1, 2, 3)),
                        tf.math.reduce_std(a, axis=(1, 2, 3)),
                        tf.reduce_max(a, axis=(1, 2, 3)),
                        tf.reduce_mean(tf.cast(tf.equal(a, 0.0), tf.float32), axis=(1, 2, 3)),
                    ],
                    axis=1,
                )
            )
        stats = tf.stack(stats, axis=1) if stats else tf.zeros([tf.shape(x)[0], 0, 4])
        top_scores, top_index = tf.math.top_k(probs, k=self.top_k)
        return {
            "pred_index": pred,
            "pred_score": tf.gather(probs, pred, axis=1, batch_dims=1),
            "cam_index": cls,
            "cam": cam,
            "cams": cams,  # [B, methods, h, w]
            "stats": stats,  # [B, layers, (mean, std, max, zero_fraction)]
            "top_index": top_index,
            "top_score": top_scores,
        }

    # ------------------------------------------------------------------ public

    def __call__(self, images: np.ndarray, requested_class: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
        """Runs the compiled step on up to `batch_size` uint8 RGB images of the model's input size.

        Args:
            images: [n, h, w, 3] uint8, n <= batch_size (padded here, results trimmed).
            requested_class: [n] int32 class to explain per image, -1 for the predicted class.

        Returns:
            dict of numpy arrays with leading dimension n.
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
        out = self._compiled(images, requested_class.astype(np.int32))
        out = {k: v.numpy() for k, v in out.items()}
        if self.evaluator is not None:
            out.update(self._metrics_all_methods(images, out["cams"], out["cam_index"]))
        return {k: v[:n] for k, v in out.items()}

    def activation_maps(self, images: np.ndarray) -> List[np.ndarray]:
        """Full activation maps of the summarized layers for a few images (channel grids)."""
        import tensorflow as tf

        x = self.loaded.preprocessing.scale_tensor(tf.cast(images, tf.float32))
        outs = self._graph(x, training=False)
        return [outs[i].numpy() for i in self._act_index]

    # ------------------------------------------------------------ several methods, Score-CAM, metrics
    # Score-CAM (`needs_model` methods) and the faithfulness metrics run forward passes of the model
    # on perturbed batches; everything here is keras.ops apart from the tf.function around it.

    def _class_probability(self, model_inputs, classes):
        """Probability of each image's class on scaled model inputs, [N]."""
        import keras

        probs = self._probabilities(self._graph(model_inputs, training=False)[-1])
        return keras.ops.take_along_axis(probs, keras.ops.cast(classes, "int32")[:, None], axis=1)[:, 0]

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
        return {k: np.stack([r[k].numpy() for r in per_method], axis=1) for k in per_method[0]}

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
        return {k: v.numpy()[:n] for k, v in out.items()}
