"""Benchmark: filter visualization, the lecture's one-filter loop vs the batched job, per layer.

    PYTHONPATH=. python3 bench/filters.py                      # all 13 VGG16 conv layers, 150 px
    PYTHONPATH=. python3 bench/filters.py --layers block1_conv1,block3_conv1 --batched-filters 24

The model is VGG16's conv base with RANDOM weights (seeded): ImageNet weights cannot be downloaded
here. The cost of a step does not depend on the weight values (dense convolutions, the same
shapes), so the timings stand for the trained model too; the images do not.

Per layer it prints:
  loop s/filter      the lecture's procedure as written: `gradient_ascent_step` is a tf.function
                     called 30 times from Python with a Python int filter index, so every new
                     filter retraces it (that retrace is part of the lecture's cost and is included).
                     Minimum over --rounds filters, interleaved with the job's timings.
  job s/filter       `FilterAscent.ascend` as a worker runs its first unit of the layer: a fresh
                     compile, the batch-size measurement (which computes real filters) and the rest
                     of the filters, all included, divided by the filters done.
  steady s/filter    one compiled call at the chosen batch, per filter (minimum over --rounds calls,
                     interleaved with the loop): what every further filter of the layer costs once
                     the worker has compiled and measured.
  ratio              loop / steady (and loop / job in brackets).
Then the projected total for every filter of every selected layer: loop = filters x loop s/filter;
job = first-unit time + remaining filters x steady s/filter (one worker, this machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def lecture_generator(model, layer_name, size, steps, lr):
    """The lecture's generate_filter_pattern for one layer, as written (a Python loop of steps)."""
    import keras
    import tensorflow as tf

    feature_extractor = keras.Model(inputs=model.inputs, outputs=model.get_layer(name=layer_name).output)

    def compute_loss(image, filter_index):
        activation = feature_extractor(image)
        filter_activation = activation[:, 2:-2, 2:-2, filter_index]
        return tf.reduce_mean(filter_activation)

    @tf.function
    def gradient_ascent_step(image, filter_index, learning_rate):
        with tf.GradientTape() as tape:
            tape.watch(image)
            loss = compute_loss(image, filter_index)
        grads = tape.gradient(loss, image)
        grads = tf.math.l2_normalize(grads)
        image += learning_rate * grads
        return image

    def generate_filter_pattern(filter_index):
        image = tf.random.uniform(minval=0.4, maxval=0.6, shape=(1, size, size, 3))
        for _ in range(steps):
            image = gradient_ascent_step(image, filter_index, lr)
        return image[0].numpy()

    return generate_filter_pattern


def timed(fn, *args):
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=10.0)
    parser.add_argument("--layers", default="all", help="all or comma-separated VGG16 conv layers")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved loop/job timings per layer (min taken)")
    parser.add_argument("--batched-filters", type=int, default=10, help="filters in the job's first unit")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None, help="fixed batch instead of measuring")
    parser.add_argument("--compare-batches", default=None,
                        help="e.g. 1,4,16: also time one all-steps call per batch size, interleaved with "
                             "the loop, --rounds times (min per filter), and print them")
    args = parser.parse_args(argv)

    from bulk_explain.workers.tf_runtime import import_tensorflow_quietly

    tf = import_tensorflow_quietly()
    tf.get_logger().setLevel("ERROR")  # the lecture loop retraces per filter by design: no warnings
    import keras

    from bulk_explain.workers.filters.filter_vis import FilterAscent, start_noise

    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(args.size, args.size, 3))
    conv = [l.name for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    layers = conv if args.layers == "all" else [l.strip() for l in args.layers.split(",")]
    gpus = tf.config.list_physical_devices("GPU")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{'GPU ' + str(len(gpus)) if gpus else 'no GPU'}; TF {tf.__version__}, Keras {keras.__version__}")
    print(f"VGG16 conv base, RANDOM weights (no ImageNet download here), {args.size} px, {args.steps} steps")
    print(f"{'layer':<14}{'filters':>8}{'loop s/f':>10}{'job s/f':>10}{'steady s/f':>12}{'batch':>7}"
          f"{'ratio':>8}{'(job)':>8}")
    total_loop = total_job = 0.0
    rows = []
    for layer in layers:
        n_filters = int(model.get_layer(layer).output.shape[-1])
        generate = lecture_generator(model, layer, args.size, args.steps, args.learning_rate)
        generate(n_filters - 1)  # the process's first trace, not counted
        ascent = FilterAscent(model, layer, args.size, steps=args.steps, learning_rate=args.learning_rate)
        n = min(args.batched_filters, n_filters)
        starts = np.stack([start_noise(0, layer, f, args.size) for f in range(n)])
        t = time.perf_counter()
        result = ascent.ascend(range(n), starts, batch_size=args.batch_size, auto="measure",
                               max_batch=args.max_batch)
        first_unit = time.perf_counter() - t
        job = first_unit / n
        chosen = ascent.chosen_batch or result.batch_sizes[0]
        # Interleave the loop and the job's steady state so the machine's other load hits both:
        # each round one new filter through the lecture loop, one compiled call at the chosen batch.
        loop_times, job_times = [], []
        for r in range(args.rounds):
            loop_times.append(timed(generate, 1 + r))
            idx = [(n + r * chosen + k) % n_filters for k in range(chosen)]
            imgs = np.stack([start_noise(0, layer, f, args.size) for f in idx])
            job_times.append(timed(ascent.run_batch, imgs, idx) / chosen)
        loop, steady = min(loop_times), min(job_times)
        projected_job = first_unit + (n_filters - n) * steady
        total_loop += n_filters * loop
        total_job += projected_job
        rows.append((layer, n_filters, loop, job, steady, chosen))
        print(f"{layer:<14}{n_filters:>8}{loop:>10.3f}{job:>10.3f}{steady:>12.3f}{chosen:>7}"
              f"{loop / steady:>8.2f}{loop / job:>8.2f}", flush=True)
        if args.compare_batches:
            sizes = [int(b) for b in args.compare_batches.split(",")]
            best = {b: float("inf") for b in sizes}
            best_loop = float("inf")
            for r in range(args.rounds):
                best_loop = min(best_loop, timed(generate, 10 + r))
                for b in sizes:
                    idx = [(7 * r + k) % n_filters for k in range(b)]
                    imgs = np.stack([start_noise(3, layer, f, args.size) for f in idx])
                    if r == 0:
                        ascent.run_batch(imgs, idx, args.steps)  # compile
                    best[b] = min(best[b], timed(ascent.run_batch, imgs, idx, args.steps) / b)
            print(f"{'':<14}all steps in one call, s/filter: "
                  + ", ".join(f"B={b}: {t:.3f}" for b, t in best.items()) + f"; loop {best_loop:.3f}", flush=True)
        if ascent.timings:
            print(f"{'':<14}measured s/filter by (batch, steps per call): "
                  + ", ".join(f"B={b},k={k}: {s:.3f}" for (b, k), s in sorted(ascent.timings.items()))
                  + f"; chosen B={chosen}, k={ascent.steps_per_call}", flush=True)
    n_all = sum(r[1] for r in rows)
    print(f"projected for {n_all} filters ({len(rows)} layers), one worker on this machine: "
          f"loop {total_loop / 60:.1f} min, batched job {total_job / 60:.1f} min, "
          f"ratio {total_loop / total_job:.2f}")


if __name__ == "__main__":
    main()
