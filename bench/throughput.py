"""Throughput of the explain job against the lecture's per-image procedure and the bare compute
ceiling, on the same generated photo-like JPEGs, in one run (ratios are what matter: absolute
times on shared machines are noise).

    python bench/throughput.py --model vgg16 --images 128
    python bench/throughput.py --model cats_dogs --images 512
    python bench/throughput.py --model cats_dogs --images 512 --backend jax --skip-lecture
    python bench/throughput.py --model vgg16 --compare-xla --skip-lecture   # TF: jit_compile on/off

Prints images/s for:
  lecture   the lecture's procedure, one image at a time: load_img + preprocess, model.predict,
            the activation model's predict (activation summaries), Grad-CAM with a GradientTape,
            cv2 heatmap overlay written as JPEG (as in the lecture) + heatmap PNG
  ceiling   the compiled step on a pre-decoded batch (no decode, no encode, no I/O)
  job       the whole job through the Python API (run_explain: embedded Ray, plan, decode,
            compute, write, manifests): end-to-end wall time including start-up, and the rate
            from "every worker has loaded its model" to "last shard committed" (JobResult's
            startup_seconds / processing_seconds)
and the ratios job/ceiling and job/lecture. Random weights: the work per image is identical.
`--backend jax` runs the ceiling and the job on Keras' JAX backend (the lecture loop is TensorFlow
code: skipped there); `--compare-xla` adds the TensorFlow ceiling with and without XLA.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np

from bench._images import photo_like


def make_images(folder, n, seed=0, size=(480, 640)):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        label = "cats" if i % 2 == 0 else "dogs"
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        p = os.path.join(folder, label, f"img{i:05d}.jpg")
        cv2.imwrite(p, cv2.cvtColor(photo_like(rng, *size), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(p)
    return paths


def lecture_procedure(loaded, paths, out_dir, target_layer, activation_layers):
    """The lecture's code, one image at a time (Chollet ch. 5 / the lecture slides)."""
    import keras
    import tensorflow as tf

    model = loaded.model
    h, w = loaded.preprocessing.size
    activation_model = keras.Model(model.inputs, [model.get_layer(n).output for n in activation_layers])
    grad_model = keras.Model(model.inputs, [model.get_layer(target_layer).output, model.outputs[0]])
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    for i, path in enumerate(paths):
        img = keras.utils.load_img(path, target_size=(h, w))
        x = np.expand_dims(keras.utils.img_to_array(img), 0)
        x = np.asarray(loaded.preprocessing.scale_tensor(tf.constant(x)))
        model.predict(x, verbose=0)  # the lecture prints decode_predictions(preds)
        activations = activation_model.predict(x, verbose=0)
        _ = [(a.mean(), a.std(), a.max(), (a == 0).mean()) for a in activations]
        with tf.GradientTape() as tape:
            conv, out = grad_model(x)
            idx = int(tf.argmax(out[0])) if out.shape[-1] > 1 else 0
            channel = out[:, idx]
        grads = tape.gradient(channel, conv)
        pooled = tf.reduce_mean(grads, axis=(0, 1, 2)).numpy()
        conv = conv.numpy()[0] * pooled
        heatmap = np.maximum(np.mean(conv, axis=-1), 0)
        heatmap /= max(np.max(heatmap), 1e-12)
        original = cv2.imread(path)
        heatmap = cv2.resize(heatmap, (original.shape[1], original.shape[0]))
        heatmap = np.uint8(255 * heatmap)
        superimposed = cv2.applyColorMap(heatmap, cv2.COLORMAP_JET) * 0.4 + original
        cv2.imwrite(os.path.join(out_dir, f"{i}_cam.jpg"), superimposed)
        cv2.imwrite(os.path.join(out_dir, f"{i}_heat.png"), heatmap)
    return len(paths) / (time.perf_counter() - t0)


def compute_ceiling(step, loaded, n_batches=4):
    h, w = loaded.preprocessing.size
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 255, (step.batch_size, h, w, 3), dtype=np.uint8)
    step(batch)  # trace
    t0 = time.perf_counter()
    for _ in range(n_batches):
        step(batch)
    return n_batches * step.batch_size / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vgg16", choices=["vgg16", "cats_dogs"])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--lecture-images", type=int, default=None, help="images for the slow lecture loop")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--shard-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--skip-lecture", action="store_true")
    ap.add_argument("--backend", default="tensorflow", choices=["tensorflow", "jax"])
    ap.add_argument("--compare-xla", action="store_true", help="TensorFlow: ceiling with jit_compile off and on")
    args = ap.parse_args()

    from bulk_explain.workers.backends import get_backend, select_backend

    select_backend(args.backend)  # before Keras is imported
    from bulk_explain.jobs import ExplainConfig, ModelSpec, run_explain
    from bulk_explain.workers.explain.explain_step import ExplainStep
    from bulk_explain.workers.models import load_model

    get_backend().configure(os.cpu_count())
    if args.backend != "tensorflow":
        args.skip_lecture = True  # the lecture's loop is TensorFlow code
    batch = args.batch_size or (16 if args.model == "vgg16" else 32)
    shard = args.shard_size or (32 if args.model == "vgg16" else 128)
    spec = ModelSpec(kind=args.model, weights="random")
    tmp = tempfile.mkdtemp(prefix="bench-throughput-")
    try:
        paths = make_images(os.path.join(tmp, "in"), args.images)
        loaded = load_model(spec)
        step = ExplainStep(loaded, batch_size=batch)
        print(f"model {args.model}, backend {args.backend}, {args.images} JPEGs 640x480, batch {batch}, "
              f"shard {shard}, {os.cpu_count()} CPUs", flush=True)
        ceiling = compute_ceiling(step, loaded)
        print(f"ceiling  {ceiling:8.2f} img/s  (compiled step, pre-decoded batch, no I/O)", flush=True)
        if args.compare_xla and args.backend == "tensorflow":
            for jit in (False, True):
                rate = compute_ceiling(ExplainStep(loaded, batch_size=batch, jit_compile=jit), loaded)
                print(f"ceiling  {rate:8.2f} img/s  (TensorFlow jit_compile={jit})", flush=True)
        lecture = None
        if not args.skip_lecture:
            n_lecture = args.lecture_images or min(len(paths), 16 if args.model == "vgg16" else 64)
            lecture = lecture_procedure(loaded, paths[:n_lecture], os.path.join(tmp, "lecture"),
                                        step.target_layer, step.activation_layers)
            print(f"lecture  {lecture:8.2f} img/s  (per-image procedure, {n_lecture} images)", flush=True)
        del loaded, step
        config = ExplainConfig(inputs=(os.path.join(tmp, "in"),), output=os.path.join(tmp, "out"), model=spec,
                               batch_size=batch, shard_size=shard, workers=args.workers, backend=args.backend)
        t0 = time.perf_counter()
        result = run_explain(config, progress=False)
        wall = time.perf_counter() - t0
        assert result.ok == args.images and result.exit_code == 0, result
        job = args.images / wall
        pipeline = args.images / result.processing_seconds
        print(f"job      {job:8.2f} img/s  (end to end, {wall:.1f}s for {args.images} images, "
              f"incl. {result.startup_seconds:.1f}s start-up: Ray, model checks and loads, trace)")
        print(f"job      {pipeline:8.2f} img/s  (workers ready -> last shard committed: "
              f"{result.processing_seconds:.1f}s of read + compute + write)")
        print(f"ratio job/ceiling        {job / ceiling:5.2f} end-to-end   {pipeline / ceiling:5.2f} after start-up")
        if lecture:
            print(f"ratio job/lecture        {job / lecture:5.2f} end-to-end   {pipeline / lecture:5.2f} after start-up")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
