"""Faithfulness metrics of saliency maps, for whole batches inside the compiled path.

Does the map point at what the model uses? Each metric perturbs the image in the order the map
ranks its pixels and reads the probability of the explained class on every perturbed image:

- deletion (Petsiuk et al. 2018, RISE): replace the most relevant pixels by a blurred copy of the
  image, K steps from 0 to 100 %; AUC of the probability curve, low = faithful.
- insertion (same paper): start from the blurred image and reveal the original pixels, most relevant
  first; AUC, high = faithful.
- road (Rong et al. 2022, ROAD): remove 10/30/50/70/90 % of the pixels, most relevant first (MoRF,
  low = faithful) and least relevant first (LeRF, high = faithful), filling them by noisy linear
  imputation (each removed pixel the weighted mean of its 8 neighbours, solved as one linear
  system, plus Gaussian noise) so that the shape of the removed region does not leak the class
  the way a constant fill does.

Shared definitions: the map of each method is upsampled bilinearly to the model input size; pixels
are ranked by value, most relevant first, ties by row-major index (stable sort); perturbations are
applied to the 0..255 RGB pixels before the model's own scaling; the score is the probability of the
explained class (softmax, or sigmoid / 1 - sigmoid for a single-unit binary model). Every number
and choice is in `describe()`, which the driver writes to job.json.

Numeric code uses `keras.ops` only (backend-neutral); loops over steps are `keras.ops.fori_loop`,
so a batch's perturbed images run in one compiled call, one batch of B images per forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Sequence, Tuple, Type

import numpy as np

DEFAULT_STEPS = 16
ROAD_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
# RISE's blur for the deletion baseline and the insertion start (its code: kernel 11, sigma 5).
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0
# ROAD's imputation: weights of the 8 neighbours (its code), noise sigma 0.01 of the pixel range.
ROAD_NEIGHBOUR_WEIGHTS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))
ROAD_NOISE = 0.01 * 255.0
ROAD_NOISE_SEED = 0
ROAD_CG_ITERATIONS = 32  # at full size; see `linear_impute`
_CASCADE_MIN_SIDE = 16

SCORE_DESCRIPTION = ("probability of the explained class: softmax, or sigmoid (1 - sigmoid for "
                     "class 0) of a single-unit binary model; never the logit")
MAP_DESCRIPTION = ("each method's map upsampled bilinearly to the model input size; pixels ranked "
                   "by map value, most relevant first, ties by row-major index; perturbations on "
                   "the 0..255 RGB pixels before the model's scaling")


@dataclasses.dataclass
class MetricContext:
    """One batch as every metric sees it.

    Attributes:
        pixels: [B, H, W, 3] float32 RGB in 0..255 (model input size, before scaling).
        rank: [B, H*W] int32, 0 = the most relevant pixel.
        classes: [B] int32 explained class.
        class_probability: `(pixels [B, H, W, 3], classes [B]) -> [B]`, scaling included.
        blurred: [B, H, W, 3] the blurred image (deletion baseline, insertion start).
    """

    pixels: object
    rank: object
    classes: object
    class_probability: Callable
    blurred: object


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(pixels, size: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA):
    """Separable Gaussian blur of [B, H, W, C] with mirrored borders (no dark frame from zero
    padding; cv2's BORDER_REFLECT_101)."""
    import keras

    ops = keras.ops
    channels = pixels.shape[-1]
    half = size // 2
    k = gaussian_kernel(size, sigma)
    x = ops.pad(pixels, [[0, 0], [half, half], [half, half], [0, 0]], mode="reflect")
    kv = np.tile(k[:, None, None, None], (1, 1, channels, 1))
    kh = np.tile(k[None, :, None, None], (1, 1, channels, 1))
    x = ops.depthwise_conv(x, kv, strides=1, padding="valid")
    return ops.depthwise_conv(x, kh, strides=1, padding="valid")


def pixel_ranks(maps):
    """[B, H, W] maps -> [B, H*W] int32 rank of each pixel, 0 = highest value, ties by index."""
    import keras

    ops = keras.ops
    flat = ops.reshape(maps, (maps.shape[0], -1))
    order = ops.argsort(-flat, axis=-1)  # stable: equal values keep row-major order
    return ops.cast(ops.argsort(order, axis=-1), "int32")  # inverse permutation


def probability_curve(count: int, make_batch: Callable, classes, class_probability):
    """[B, count] class probability of `make_batch(i)` for i in 0..count-1, one forward pass of
    B images per step, all inside one compiled loop."""
    import keras

    ops = keras.ops

    def body(i, acc):
        p = class_probability(make_batch(i), classes)
        return acc + ops.one_hot(i, count)[:, None] * p[None, :]

    acc = ops.fori_loop(0, count, body, ops.zeros((count, classes.shape[0]), "float32"))
    return ops.transpose(acc)


def trapezoid_auc(curve):
    """Area under a curve sampled at 0, 1/K, ..., 1 (RISE: (sum - ends/2) / K)."""
    import keras

    ops = keras.ops
    k = curve.shape[-1] - 1
    return (ops.sum(curve, axis=-1) - 0.5 * (curve[..., 0] + curve[..., -1])) / k


def _conjugate_gradients(pixels, removed, init, iterations: int):
    """`iterations` CG steps on ROAD's system from `init` (only its removed pixels are used)."""
    import keras

    ops = keras.ops
    channels = pixels.shape[-1]
    kernel = np.tile(np.asarray(ROAD_NEIGHBOUR_WEIGHTS, np.float32)[:, :, None, None], (1, 1, channels, 1))

    def neighbours(v):  # zero padding: outside pixels contribute nothing
        return ops.depthwise_conv(v, kernel, strides=1, padding="same")

    kept = 1.0 - removed
    weight_sum = neighbours(ops.ones((1,) + tuple(pixels.shape[1:]), "float32"))

    def system(v):
        return removed * (weight_sum * v - neighbours(removed * v))

    def dot(a, b):
        return ops.sum(a * b, axis=(1, 2), keepdims=True)

    def safe_div(a, b):
        return ops.where(b > 1e-20, a / ops.where(b > 1e-20, b, 1.0), 0.0)

    v = removed * init
    r = removed * neighbours(kept * pixels) - system(v)
    rs = dot(r, r)

    def body(_, state):
        v, r, p, rs = state
        ap = system(p)
        alpha = safe_div(rs, dot(p, ap))
        v = v + alpha * p
        r = r - alpha * ap
        rs_new = dot(r, r)
        p = r + safe_div(rs_new, rs) * p
        return v, r, p, rs_new

    v, _, _, _ = ops.fori_loop(0, iterations, body, (v, r, r, rs))
    return kept * pixels + removed * v


def linear_impute(pixels, removed, iterations: int = ROAD_CG_ITERATIONS):
    """ROAD's linear imputation: every removed pixel equals the weighted mean of its in-image
    neighbours (`ROAD_NEIGHBOUR_WEIGHTS`, renormalized at the border), kept pixels stay.

    ROAD solves this sparse system with a direct solver per image. Here it is solved for the whole
    batch inside the graph by conjugate gradients (the system, multiplied by each row's weight
    sum, is symmetric positive definite wherever a removed region touches a kept pixel), started
    from the solution at half resolution (a 2x2 block is kept if any of its pixels is, with their
    mean), recursively down to 16-32 px where CG runs 2 * side iterations from the mean of the
    kept pixels; each finer level runs half the iterations of the level below, `iterations` at
    full size. Plain CG needs about 2 * side iterations at full size (448 at 224 px); this costs
    about 60 full-size iterations at 224 px. Measured against a direct sparse solve (smooth images,
    10-90 % removed as one blob, 64-224 px): mean error 0.05-1.0, max 3 grey levels, below ROAD's
    noise (sigma 2.55). A removed region with no kept neighbour keeps the mean of the kept pixels
    (the direct system is singular there).

    Args:
        pixels: [B, H, W, C] float32.
        removed: [B, H, W, 1] float32, 1 = removed.
        iterations: CG iterations at full size.

    Returns:
        [B, H, W, C] with the removed pixels imputed (no noise).
    """
    import keras

    ops = keras.ops
    h, w = pixels.shape[1], pixels.shape[2]
    kept = 1.0 - removed
    if min(h, w) >= 2 * _CASCADE_MIN_SIDE:
        total = ops.average_pool(kept * pixels, 2, 2, padding="same")
        share = ops.average_pool(kept, 2, 2, padding="same")
        coarse = linear_impute(total / ops.maximum(share, 1e-12), ops.cast(share <= 0, "float32"), 2 * iterations)
        init = ops.image.resize(coarse, (h, w), interpolation="bilinear")
        return _conjugate_gradients(pixels, removed, init, iterations)
    n_kept = ops.sum(kept, axis=(1, 2), keepdims=True)
    mean_kept = ops.sum(kept * pixels, axis=(1, 2), keepdims=True) / ops.maximum(n_kept, 1.0)
    return _conjugate_gradients(pixels, removed, mean_kept + 0.0 * pixels, 2 * max(h, w))


class FaithfulnessMetric:
    """A metric: `compute(context)` returns named per-image arrays; `describe()` goes to job.json."""

    name = ""

    def __init__(self, steps: int = DEFAULT_STEPS):
        self.steps = int(steps)

    def outputs(self) -> Tuple[str, ...]:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def compute(self, ctx: MetricContext) -> Dict[str, object]:
        raise NotImplementedError


class _CausalMetric(FaithfulnessMetric):
    """RISE's deletion / insertion: step i of K shows `start` except the (i*N)//K most relevant
    pixels, which show `end`; AUC by the trapezoid rule over x = i/K."""

    def _ends(self, ctx: MetricContext):
        raise NotImplementedError

    def outputs(self):
        return (f"{self.name}_auc", f"{self.name}_curve")

    def compute(self, ctx):
        import keras

        ops = keras.ops
        start, end = self._ends(ctx)
        b, h, w, c = ctx.pixels.shape
        n = h * w
        steps = self.steps

        def make_batch(i):
            shown = ops.reshape(ctx.rank < (i * n) // steps, (b, h, w, 1))
            return ops.where(shown, end, start)

        curve = probability_curve(steps + 1, make_batch, ctx.classes, ctx.class_probability)
        return {f"{self.name}_auc": trapezoid_auc(curve), f"{self.name}_curve": curve}


class Deletion(_CausalMetric):
    name = "deletion"

    def _ends(self, ctx):
        return ctx.pixels, ctx.blurred

    def describe(self):
        return {
            "paper": "Petsiuk et al. 2018 (RISE), deletion",
            "steps": self.steps,
            "pixels_at_step_i": "floor(i * H * W / steps) most relevant, i = 0..steps",
            "baseline": f"the image blurred: Gaussian kernel {BLUR_KERNEL}, sigma {BLUR_SIGMA} px at the "
                        "model input size, mirrored borders",
            "auc": "trapezoid over x = i / steps in [0, 1]; lower = more faithful",
        }


class Insertion(_CausalMetric):
    name = "insertion"

    def _ends(self, ctx):
        return ctx.blurred, ctx.pixels

    def describe(self):
        d = Deletion(self.steps).describe()
        d.update(paper="Petsiuk et al. 2018 (RISE), insertion",
                 baseline=d["baseline"] + " (the start; the most relevant original pixels are revealed)",
                 auc="trapezoid over x = i / steps in [0, 1]; higher = more faithful")
        return d


class Road(FaithfulnessMetric):
    """ROAD at `ROAD_FRACTIONS`, MoRF and LeRF, with noisy linear imputation."""

    name = "road"

    def outputs(self):
        return ("road_morf", "road_lerf")

    def describe(self):
        return {
            "paper": "Rong et al. 2022 (ROAD), noisy linear imputation",
            "fractions": list(ROAD_FRACTIONS),
            "morf": "probability after removing that fraction of the most relevant pixels; lower = more faithful",
            "lerf": "probability after removing that fraction of the least relevant pixels; higher = more faithful",
            "imputation": "removed pixel = weighted mean of its 8 neighbours (1/6 direct, 1/12 diagonal, "
                          "renormalized at borders), the whole removed region solved jointly (ROAD: direct "
                          f"sparse solve; here conjugate gradients, {ROAD_CG_ITERATIONS} iterations at full "
                          "size started from the half-size solution, recursively; measured mean error "
                          "<= 1, max 3 grey levels against the direct solve)",
            "noise": f"Gaussian, sigma {ROAD_NOISE:.2f} grey levels (0.01 of the range) on removed "
                     f"pixels; a fixed pattern per fraction and order (seed {ROAD_NOISE_SEED}), the "
                     "same for every image, so results are reproducible; no clipping",
        }

    def compute(self, ctx):
        import keras

        ops = keras.ops
        b, h, w, c = ctx.pixels.shape
        n = h * w
        f = len(ROAD_FRACTIONS)
        counts = np.array([int(round(x * n)) for x in ROAD_FRACTIONS] * 2, np.int32)
        morf = np.array([True] * f + [False] * f)
        noise = (np.random.default_rng(ROAD_NOISE_SEED).standard_normal((2 * f, h, w, c)) * ROAD_NOISE).astype(np.float32)

        def make_batch(i):
            count = ops.take(counts, i)
            removed = ops.where(ops.take(morf, i), ctx.rank < count, ctx.rank >= n - count)
            removed = ops.cast(ops.reshape(removed, (b, h, w, 1)), "float32")
            filled = linear_impute(ctx.pixels, removed)
            return filled + removed * ops.take(noise, i, axis=0)[None]

        curve = probability_curve(2 * f, make_batch, ctx.classes, ctx.class_probability)
        return {"road_morf": curve[:, :f], "road_lerf": curve[:, f:]}


METRICS: Dict[str, Type[FaithfulnessMetric]] = {m.name: m for m in (Deletion, Insertion, Road)}


def parse_metrics(value) -> List[str]:
    """`"deletion,road"` (or a list) -> unique metric names in registry order of the request.

    Raises:
        ValueError: a name not in the registry.
    """
    names = value.split(",") if isinstance(value, str) else list(value or ())
    names = list(dict.fromkeys(n.strip() for n in names if n and n.strip()))
    for name in names:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; expected some of {', '.join(METRICS)}")
    return names


class FaithfulnessEvaluator:
    """Runs the chosen metrics on a batch of maps of one method.

    Args:
        metrics: metric names (see `METRICS`).
        steps: deletion / insertion steps K.
    """

    def __init__(self, metrics: Sequence[str], steps: int = DEFAULT_STEPS):
        if int(steps) < 1:
            raise ValueError(f"metric steps must be >= 1, received {steps!r}")
        self.steps = int(steps)
        self.metrics = [METRICS[name](self.steps) for name in parse_metrics(metrics)]

    @property
    def names(self) -> List[str]:
        return [m.name for m in self.metrics]

    def describe(self) -> dict:
        return {
            "score": SCORE_DESCRIPTION,
            "map": MAP_DESCRIPTION,
            **{m.name: m.describe() for m in self.metrics},
        }

    def __call__(self, images, maps, classes, class_probability) -> Dict[str, object]:
        """Metrics of one method's maps for a batch.

        Args:
            images: [B, H, W, 3] RGB (uint8 or float 0..255) at the model input size.
            maps: [B, h, w] the method's maps (any resolution; upsampled here).
            classes: [B] int32 explained class per image.
            class_probability: `(pixels float [N, H, W, 3], classes [N]) -> [N]`.

        Returns:
            dict of [B, ...] tensors, the keys of every metric's `outputs()`.
        """
        import keras

        ops = keras.ops
        pixels = ops.cast(images, "float32")
        h, w = pixels.shape[1], pixels.shape[2]
        full = ops.image.resize(ops.cast(maps, "float32")[..., None], (h, w), interpolation="bilinear")[..., 0]
        ctx = MetricContext(pixels=pixels, rank=pixel_ranks(full), classes=classes,
                            class_probability=class_probability,
                            blurred=gaussian_blur(pixels) if any(isinstance(m, _CausalMetric) for m in self.metrics) else None)
        out = {}
        for metric in self.metrics:
            out.update(metric.compute(ctx))
        return out


def forward_passes_per_image(metrics: Sequence[str], steps: int = DEFAULT_STEPS) -> int:
    """How many extra forward passes per image and method the metrics cost (for docs/bench)."""
    per = {"deletion": steps + 1, "insertion": steps + 1, "road": 2 * len(ROAD_FRACTIONS)}
    return sum(per[m] for m in parse_metrics(metrics))


def mean_interval(values: Sequence[float]) -> dict:
    """Mean and normal-approximation 95 % interval (mean +- 1.96 s / sqrt(n)); NaNs are skipped."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None}
    mean = float(x.mean())
    if n < 2:
        return {"n": n, "mean": mean, "ci95": None}
    half = 1.96 * float(x.std(ddof=1)) / math.sqrt(n)
    return {"n": n, "mean": mean, "ci95": [mean - half, mean + half]}
