"""Filter visualization by gradient ascent in input space (the lecture's procedure), batched.

The lecture (Chollet, Deep Learning with Python, 9.4.2) visualizes one filter at a time:

    image = uniform(0.4, 0.6, (1, 150, 150, 3))
    repeat 30 times:
        loss  = mean(feature_extractor(image)[:, 2:-2, 2:-2, filter_index])
        grads = l2_normalize(d loss / d image)
        image += 10 * grads
    deprocess: standardize, x64 + 128, clip to 0..255, centre-crop 25 px

`FilterAscent` runs the same procedure for B filters at once, one filter per batch element, by
default all steps inside one compiled call:

* each element's loss is the mean of *its own* filter's channel (a gather with batch_dims=1), and
  the summed loss gives each element exactly the gradient it would get alone (the elements never
  interact: the model runs with training=False);
* the gradient is L2-normalized **per element** (axis 1, 2, 3). Normalizing the whole batch tensor,
  the naive port of the lecture's `tf.math.l2_normalize(grads)`, couples the filters: every step
  size then depends on which other filters share the batch;
* the start noise comes from a generator seeded per (seed, layer, filter), so a filter starts from
  the same image whether it runs alone, in a batch of 4 or of 128.

As in the lecture, the image tensor goes into the feature extractor as it is: no model
preprocessing (no VGG16 mean subtraction) is applied during the ascent.

The ascent is written with `keras.ops`; its gradient and compile go through `bulk_explain.workers.backends`
(TensorFlow: GradientTape + tf.function; JAX: stateless_call + jax.value_and_grad + jax.jit).

The steps are unrolled inside one compiled function (a Python loop over a fixed step count): measured
here, a `tf.while_loop` body ran 3x slower on CPU than the same steps unrolled, because graph
optimizations do not reach inside the loop body. Tracing 30 unrolled steps costs 2-8 s of host
time per layer and batch size, though, so `steps_per_call` can split the steps over several calls
of a k-step function (same arithmetic, same results): the CPU measurement in `ascend` weighs the
lecture's one step per call against one call for all steps, and the filters job runs one step per
call on a GPU, where calls are queued asynchronously and the compile is what costs.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

LECTURE_SIZE = 150
LECTURE_CROP = 25
LECTURE_BORDER = 2
# A larger batch is tried only if saving this share of the layer's time could pay for its compile.
EXPECTED_BATCH_GAIN = 0.25


# ---------------------------------------------------------------- start noise and deprocessing


def start_noise(seed: int, layer: str, filter_index: int, size: int) -> np.ndarray:
    """The start image of one filter: uniform 0.4..0.6, float32, shape (size, size, 3).

    The generator is seeded by (seed, layer, filter_index) only, so the noise does not depend on
    the batch a filter runs in.
    """
    seq = np.random.SeedSequence([int(seed), zlib.crc32(layer.encode("utf-8")), int(filter_index)])
    rng = np.random.default_rng(seq)
    return rng.uniform(0.4, 0.6, size=(size, size, 3)).astype(np.float32)


def crop_for_size(size: int) -> int:
    """The lecture's 25-px crop at 150 px, scaled to `size`."""
    return int(round(LECTURE_CROP * size / LECTURE_SIZE))


def deprocess_image(image: np.ndarray, crop: Optional[int] = None) -> np.ndarray:
    """The lecture's deprocess_image: standardize, x64 + 128, clip, uint8, centre-crop.

    Args:
        image: float HxWx3 ascent result (not modified).
        crop: pixels cut from each side; default the lecture's 25 px scaled to the image size.

    A constant image (std 0) becomes uniform 128 instead of the lecture's NaN.
    """
    image = np.array(image, dtype=np.float32, copy=True)
    if crop is None:
        crop = crop_for_size(image.shape[0])
    image -= image.mean()
    std = image.std()
    if std > 0:
        image /= std
    image *= 64
    image += 128
    image = np.clip(image, 0, 255).astype("uint8")
    if crop > 0:
        image = image[crop:-crop, crop:-crop, :]
    return image


def contact_sheet(tiles: Sequence[np.ndarray], per_row: int = 16, margin: int = 5,
                  background: int = 0) -> np.ndarray:
    """Stitches equal-size tiles into the lecture's grid: `per_row` tiles a row, `margin` px apart.

    Width = c*w + (c-1)*margin with c = min(per_row, len(tiles)); height likewise with
    ceil(len(tiles)/per_row) rows. Tiles are HxW (gray) or HxWxC; the sheet has the tiles' layout.
    """
    if not tiles:
        raise ValueError("contact sheet needs at least one tile")
    h, w = tiles[0].shape[:2]
    cols = min(per_row, len(tiles))
    rows = int(math.ceil(len(tiles) / per_row))
    shape = (rows * h + (rows - 1) * margin, cols * w + (cols - 1) * margin) + tuple(tiles[0].shape[2:])
    sheet = np.full(shape, background, dtype=tiles[0].dtype)
    for k, tile in enumerate(tiles):
        if tile.shape != tiles[0].shape:
            raise ValueError(f"tile {k} has shape {tile.shape}, expected {tiles[0].shape}")
        r, c = divmod(k, per_row)
        y, x = r * (h + margin), c * (w + margin)
        sheet[y:y + h, x:x + w] = tile
    return sheet


def encode_png(image: np.ndarray, channel_order: str = "RGB") -> bytes:
    """PNG bytes of a uint8 HxW or HxWx3 image whose channels are in `channel_order`."""
    import cv2

    if image.ndim == 3 and image.shape[2] == 3 and channel_order == "RGB":
        image = image[:, :, ::-1]  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """RGB (or gray) uint8 array from PNG bytes."""
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError("not a decodable image")
    if image.ndim == 3:
        image = image[:, :, ::-1]
    return np.ascontiguousarray(image)


# ---------------------------------------------------------------- batched ascent


@dataclasses.dataclass
class AscentResult:
    """Outputs for n filters, in the order asked.

    Attributes:
        images: float32 (n, size, size, 3) final images (before deprocessing).
        activation_start: float32 (n,) loss (mean filter activation, border cut) on the start noise.
        activation_end: float32 (n,) loss on the final image.
        batch_sizes: batch size of each compiled call made (padding included).
        seconds: wall time spent.
    """

    images: np.ndarray
    activation_start: np.ndarray
    activation_end: np.ndarray
    batch_sizes: List[int]
    seconds: float


def is_oom(exc: BaseException) -> bool:
    """True if `exc` is the Keras backend's device out-of-memory error."""
    from bulk_explain.workers.backends import get_backend

    return get_backend().is_oom(exc)


class FilterAscent:
    """Gradient ascent for the filters of one layer, B filters per compiled call.

    Args:
        model: a Keras model with one (batch, H, W, 3) input.
        layer_name: a layer with a 4-D (batch, h, w, filters) output.
        size: square image size.
        steps, learning_rate: the lecture's 30 and 10.
        border: activation pixels cut on each side in the loss (the lecture's 2); reduced where the
            layer's output is too small to keep any pixel (then `border_used` says what was cut).
    """

    def __init__(self, model, layer_name: str, size: int, steps: int = 30, learning_rate: float = 10.0,
                 border: int = LECTURE_BORDER):
        import keras

        if steps < 1:
            raise ValueError(f"steps must be >= 1, received {steps}")
        layer = model.get_layer(layer_name)
        self.layer_name = layer_name
        self.size = int(size)
        self.steps = int(steps)
        self.learning_rate = float(learning_rate)
        self.extractor = keras.Model(model.inputs, layer.output)
        out = self.extractor.compute_output_shape((1, self.size, self.size, 3))
        if len(out) != 4:
            raise ValueError(f"layer {layer_name!r} output is {tuple(out)}, expected (batch, h, w, filters)")
        _, oh, ow, channels = out
        if oh is None or ow is None or oh < 1 or ow < 1:
            raise ValueError(f"layer {layer_name!r} has no spatial output at input size {size}")
        self.num_filters = int(channels)
        self.output_hw = (int(oh), int(ow))
        # The lecture cuts 2 px per side; keep at least one pixel where the map is smaller than 5 px.
        self.border_used = (min(border, (int(oh) - 1) // 2), min(border, (int(ow) - 1) // 2))
        self._compiled: Dict[Tuple, Callable] = {}
        # Steps per compiled call: all of them (one call per batch) unless the CPU measurement
        # found the lecture's one step per call cheaper for this layer (its compile is 30x cheaper).
        self.steps_per_call = self.steps
        self.timings: Dict[Tuple[int, int], float] = {}  # (batch, steps per call) -> s per filter
        self.chosen_batch: Optional[int] = None  # the measured choice, reused by later calls

    # -------------------------------------------------------------- compiled step

    def _loss_of(self, act, filter_index):
        """Per-filter loss from the layer's output `act` (B, h, w, filters): the mean of each
        element's own filter channel, border cut."""
        from keras import ops

        act = ops.cast(act, "float32")
        bh, bw = self.border_used
        h, w = self.output_hw
        # Each element's own filter first, then the border cut: cutting the border of all channels
        # first made the gradient materialize and pad the whole map (3x slower per call, measured).
        index = ops.broadcast_to(ops.reshape(filter_index, (-1, 1, 1, 1)), (act.shape[0], h, w, 1))
        own = ops.take_along_axis(act, index, axis=3)[..., 0]  # (B, h, w)
        own = own[:, bh:h - bh, bw:w - bw]
        return ops.mean(own, axis=(1, 2))

    def _loss(self, x, filter_index):
        return self._loss_of(self.extractor(x, training=False), filter_index)

    def _function(self, batch: int, steps_per_call: Optional[int] = None):
        """The compiled ascent of `steps_per_call` unrolled steps for `batch` filters (one compiled
        function per batch shape and step count, through the backend seam).

        With all the steps in one call it returns (image, start activation, end activation);
        with fewer, (image, activation before this call's first step).
        """
        k = steps_per_call or self.steps_per_call
        fn = self._compiled.get((batch, k))
        if fn is not None:
            return fn
        from keras import ops

        from bulk_explain.workers.backends import get_backend

        backend = get_backend()
        lr, whole = self.learning_rate, k == self.steps

        def ascend(images, filter_index):
            x = images
            start = None

            def head(act):
                per_filter = self._loss_of(act, filter_index)
                return ops.sum(per_filter), per_filter

            for _ in range(k):  # unrolled: one graph for all k steps
                _, per_filter, grads = backend.value_and_grad(self.extractor, [x], 0, head)
                if start is None:
                    start = per_filter
                # per filter, never per batch: tf.math.l2_normalize(grads, axis=[1, 2, 3])
                sq = ops.sum(ops.square(grads), axis=(1, 2, 3), keepdims=True)
                grads = grads * ops.rsqrt(ops.maximum(sq, 1e-12))
                x = x + lr * grads
            if whole:
                return x, start, self._loss(x, filter_index)
            return x, start

        fn = backend.compile(ascend, [self.extractor])
        self._compiled[(batch, k)] = fn
        return fn

    def _loss_function(self, batch: int):
        fn = self._compiled.get((batch, "loss"))
        if fn is None:
            from bulk_explain.workers.backends import get_backend

            fn = get_backend().compile(self._loss, [self.extractor])
            self._compiled[(batch, "loss")] = fn
        return fn

    def compiled_sizes(self) -> List[int]:
        """Batch sizes compiled for the current steps per call."""
        return sorted(b for b, k in self._compiled if k == self.steps_per_call)

    def run_batch(self, images: np.ndarray, filter_indices: Sequence[int], steps_per_call: Optional[int] = None):
        """Runs all steps on exactly len(filter_indices) filters: one compiled call, or steps/k calls
        of a k-step function. Returns (images, activation_start, activation_end) as NumPy arrays.
        Raises the backend's out-of-memory errors."""
        batch = len(filter_indices)
        k = steps_per_call or self.steps_per_call
        if self.steps % k:
            raise ValueError(f"steps per call {k} does not divide steps {self.steps}")
        fn = self._function(batch, k)
        x = np.asarray(images, np.float32)
        idx = np.asarray(filter_indices, np.int32)
        if k == self.steps:
            return fn(x, idx)
        # Chained calls pass backend tensors: the images stay on the device between calls.
        x, start = fn.raw(x, idx)
        for _ in range(self.steps // k - 1):
            x, _ = fn.raw(x, idx)
        end = self._loss_function(batch)(x, idx)
        return np.asarray(x), np.asarray(start), np.asarray(end)

    # -------------------------------------------------------------- many filters

    def ascend(self, filter_indices: Sequence[int], start_images: np.ndarray,
               batch_size: Optional[int] = None, auto: str = "measure",
               max_batch: int = 64, steps_per_call: Optional[int] = None) -> AscentResult:
        """Runs the ascent for `filter_indices` from `start_images` (n, size, size, 3).

        Args:
            batch_size: filters per compiled call; None picks it (see `auto`).
            auto: how to pick when batch_size is None: "measure" (CPU: time one step per call
                against all steps in one call, then B=4, 16, ... on the first real filters, and
                keep the fastest, see `_measure`) or "max" (GPU: `max_batch`, halved on
                out-of-memory).
            max_batch: largest batch tried.
            steps_per_call: gradient steps per compiled call (must divide steps); None keeps the
                current choice (all steps in one call unless a measurement chose otherwise).

        The tail is padded to the batch shape (repeating the last filter) unless a smaller batch
        size is already compiled, in which case the tail is split over compiled sizes.
        A batch that runs out of memory is halved and retried, down to 1.
        """
        t0 = time.perf_counter()
        if steps_per_call is not None:
            if steps_per_call < 1 or self.steps % steps_per_call:
                raise ValueError(f"steps per call {steps_per_call} does not divide steps {self.steps}")
            self.steps_per_call = int(steps_per_call)
        filters = [int(i) for i in filter_indices]
        n = len(filters)
        for f in filters:
            if not 0 <= f < self.num_filters:
                raise ValueError(f"filter index {f} out of range: layer {self.layer_name!r} has {self.num_filters} filters")
        start_images = np.asarray(start_images, np.float32)
        if start_images.shape != (n, self.size, self.size, 3):
            raise ValueError(f"start images shape {start_images.shape}, expected {(n, self.size, self.size, 3)}")
        images = np.empty_like(start_images)
        act_start = np.empty(n, np.float32)
        act_end = np.empty(n, np.float32)
        used: List[int] = []
        pos = 0

        def run(count: int, batch: int, steps_per_call: Optional[int] = None) -> int:
            """Runs filters[pos:pos+count] padded to `batch`; returns how many were done."""
            nonlocal pos
            idx = filters[pos:pos + count]
            imgs = start_images[pos:pos + count]
            if count < batch:
                pad = batch - count
                idx = idx + [idx[-1]] * pad
                imgs = np.concatenate([imgs, np.repeat(imgs[-1:], pad, axis=0)])
            x, s, e = self.run_batch(imgs, idx, steps_per_call)
            images[pos:pos + count] = x[:count]
            act_start[pos:pos + count] = s[:count]
            act_end[pos:pos + count] = e[:count]
            used.append(batch)
            pos += count
            return count

        def run_adaptive(batch: int) -> int:
            """Runs the next min(batch, left) filters, halving on OOM; returns the batch that worked."""
            while True:
                count, shape = self._next_call(min(batch, n - pos), batch)
                try:
                    run(count, shape)
                    return batch
                except Exception as exc:  # noqa: BLE001 - only OOM is retried
                    if not is_oom(exc) or batch == 1:
                        raise
                    self._compiled.pop((batch, self.steps_per_call), None)
                    batch = max(1, batch // 2)

        if batch_size is None and auto == "measure":
            batch_size = self._measure(run, lambda: n - pos, max_batch)
        elif batch_size is None:
            batch_size = max_batch
        batch_size = max(1, min(int(batch_size), max(n, 1)))
        while pos < n:
            batch_size = run_adaptive(batch_size)
        return AscentResult(images, act_start, act_end, used, time.perf_counter() - t0)

    def _next_call(self, count: int, batch: int) -> Tuple[int, int]:
        """(filters to run, batch shape) for the next call when `count` filters remain in a batch.

        A full batch runs as is. A tail runs on the largest already-compiled size that fits (no
        padding, no new compile: on a CPU padded elements cost as much as real ones), else it is
        padded up to the smallest compiled size that holds it, else to `batch`.
        """
        if count >= batch:
            return batch, batch
        compiled = self.compiled_sizes()
        fitting = [b for b in compiled if b <= count]
        if fitting:
            b = max(fitting)
            return b, b
        holding = [b for b in compiled if b >= count]
        return count, min(holding) if holding else batch

    def _measure(self, run, left: Callable[[], int], max_batch: int) -> int:
        """Picks steps per call and batch size by timing real work (results are kept).

        Candidates (batch, steps per call), cheapest to compile first: (1, 1) the lecture's one
        step per call; (1, all steps) unrolled in one call; then (4, k), (16, k), ... with the
        better k. Each runs twice on the next real filters: the first call compiles, the second
        is timed. A candidate is tried only while (a) enough filters are left in this call for
        two batches of it and (b) it can pay for its own compile: a quarter of the layer's
        filters x the best time per filter so far must exceed its expected compile time (the
        compile last measured, x steps for the unrolled graph, whose tracing grows with the
        steps). So a cheap layer such as block1_conv1 stays at the one-step loop and the job is
        never slower than the lecture's loop. A candidate must be 10% faster per filter than
        the best to replace it; the batch search stops at the first that is not.
        The choice is kept for this layer's later calls (a worker keeps its FilterAscent across
        units); with fewer than 2 filters to measure on, nothing is measured or kept.
        """
        if self.chosen_batch is not None:
            return self.chosen_batch
        best, best_t = (1, self.steps_per_call), None
        compile_seconds = {}  # steps per call -> last measured compile time

        def expected_compile(k: int) -> float:
            if k in compile_seconds:
                return compile_seconds[k]
            return max(compile_seconds.values(), default=0.0) * k

        def try_candidate(b: int, k: int) -> Optional[float]:
            if left() < 2 * b:
                return None
            if best_t is not None and EXPECTED_BATCH_GAIN * best_t * self.num_filters <= expected_compile(k):
                return None
            try:
                t = time.perf_counter()
                run(b, b, k)  # compile + warm
                first = time.perf_counter() - t
                t = time.perf_counter()
                run(b, b, k)
                elapsed = time.perf_counter() - t
            except Exception as exc:  # noqa: BLE001 - out of memory ends the search
                if not is_oom(exc) or b == 1:
                    raise
                self._compiled.pop((b, k), None)
                return None
            compile_seconds[k] = max(0.0, first - elapsed)
            self.timings[(b, k)] = elapsed / b
            return elapsed / b

        for k in sorted({1, self.steps}):
            per_filter = try_candidate(1, k)
            if per_filter is not None and (best_t is None or per_filter < 0.9 * best_t):
                best, best_t = (1, k), per_filter
        k = best[1]
        b = 4
        while best_t is not None and b <= max_batch:
            per_filter = try_candidate(b, k)
            if per_filter is None or per_filter >= 0.9 * best_t:
                break
            best, best_t = (b, k), per_filter
            b *= 4
        if self.timings:  # a decision was measured: keep it for this layer's next units
            self.chosen_batch, self.steps_per_call = best
        return best[0]
