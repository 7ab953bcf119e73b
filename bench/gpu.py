"""One-command GPU benchmark of the explain job's worker and the filter ascent, without Ray or
TensorFlow (a bare GPU box with JAX; see bench/GPU.md for the install steps).

    python bench/gpu.py                 # VGG16 224 px, JAX backend, ~3-4 minutes on one H100/H200
    python bench/gpu.py --tiny          # a seconds-long smoke run of every part (CPU is fine)

It runs the project's own code in this process: `ExplainStep` for the compute-only rates,
`ExplainWorker.process_shard` (read -> compute -> write -> commit, two shards in flight as under
Ray) on generated 640x480 JPEGs on local disk for the end-to-end rates, and `FilterAscent` for all
4,224 VGG16 filters in a child process, twice: with an empty JAX compilation cache (cold) and with
the cache the first child filled (warm). It prints one table:

  compute float32 / mixed_bfloat16   img/s of the compiled step on a pre-decoded uint8 batch
                                     (host->device copy and results back included)
  host ceiling (default, 256 px)     the OpenCV work of one image (decode, resize, CAM upsample,
                                     JET overlay, JPEG + PNG encode) over all cores in threads
  end to end (default, 256 px)       ExplainWorker.process_shard, all shards, wall clock
  filters cold / warm                seconds for every filter of VGG16's 13 conv layers (150 px,
                                     30 steps, lecture settings), ascent only and end to end

Random weights throughout: the work per image and per filter is the same as with ImageNet weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from bench._images import photo_like  # noqa: E402

# The measurement this benchmark is compared with (one H200, 16 cores, 2026-11-26; issue 10).
REFERENCE = {
    "compute float32": 7306, "compute mixed_bfloat16": 12446, "host ceiling default": 1006,
    "host ceiling 256 px": 1957, "end to end default": 900, "end to end 256 px": 1800,
}


def make_inputs(folder, n, unique, size, threads):
    """`n` JPEG files under folder/{cats,dogs}/: `unique` generated images, their bytes repeated
    (decoding a copy costs what decoding the original costs)."""
    rng = np.random.default_rng(0)
    h, w = size
    blobs = [cv2.imencode(".jpg", photo_like(rng, h, w), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
             for _ in range(unique)]
    for label in ("cats", "dogs"):
        os.makedirs(os.path.join(folder, label), exist_ok=True)

    def write(i):
        with open(os.path.join(folder, "cats" if i % 2 else "dogs", f"img{i:06d}.jpg"), "wb") as f:
            f.write(blobs[i % unique])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(n)))
    return blobs


# ---------------------------------------------------------------- parts


def compute_rate(loaded, batch, seconds, precision, min_calls=3):
    """img/s of the compiled explain step on one pre-decoded uint8 batch, repeated."""
    from bulk_explain.workers.explain.explain_step import ExplainStep
    from bulk_explain.workers.models import with_precision

    step = ExplainStep(with_precision(loaded, precision), batch_size=batch)
    h, w = loaded.preprocessing.size
    images = np.random.default_rng(1).integers(0, 255, (batch, h, w, 3), dtype=np.uint8)
    step(images)  # compile
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < min_calls:
        step(images)  # returns NumPy arrays: each call waits for its results
        n += 1
    return n * batch / (time.perf_counter() - t0)


def host_ceiling(blobs, preprocessing, max_side, threads, seconds):
    """img/s of the host-side work of one image over `threads` threads: decode (reduced when
    `max_side` allows), resize to the model, CAM upsample + JET overlay, JPEG + PNG encode."""
    from bulk_explain.workers import image_io

    cam = np.random.default_rng(2).random((14, 14)).astype(np.float32)
    cv2.setNumThreads(1)  # as a GPU worker runs it: one OpenCV thread per pool thread
    model_side = max(preprocessing.size)

    def one(i):
        data = blobs[i % len(blobs)]
        bgr = image_io.decode_bgr(data, image_io.reduced_decode_factor(data, model_side, max_side))
        cv2.cvtColor(preprocessing.resize(bgr), cv2.COLOR_BGR2RGB)
        bgr = image_io.fit_long_side(bgr, max_side)
        heat = image_io.heatmap_uint8(image_io.upsample_cam(cam, bgr.shape[1], bgr.shape[0]))
        image_io.encode_jpeg(image_io.overlay_bgr(bgr, heat))
        image_io.encode_png(heat)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(2 * threads)))  # warm
        n = max(4 * threads, 64)
        while True:
            t0 = time.perf_counter()
            list(pool.map(one, range(n)))
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds or n >= 1 << 20:
                return n / elapsed
            n *= 2


def start_worker(input_dir, spec, batch, shard_size, precision):
    """One ExplainWorker as an actor would hold it, and the plan's shards. Returns
    (worker, tasks, config, start-up seconds)."""
    from bulk_explain.jobs.explain.config import ExplainConfig
    from bulk_explain.jobs.explain.driver import worker_settings
    from bulk_explain.jobs.explain.plan import iter_shards, list_inputs, make_plan
    from bulk_explain.workers.explain.shard_worker import ExplainWorker

    config = ExplainConfig(inputs=(input_dir,), output=os.path.join(os.path.dirname(input_dir), "out"), model=spec,
                           batch_size=batch, shard_size=shard_size, backend="jax", precision=precision).validated()
    tasks = list(iter_shards(make_plan(list_inputs(config.inputs), config.shard_size)))
    settings = worker_settings(config, None, None, None, cpus=os.cpu_count())
    t0 = time.perf_counter()
    worker = ExplainWorker(settings)
    return worker, tasks, config, time.perf_counter() - t0


def end_to_end(worker, tasks, config, out_dir, max_side):
    """img/s of ExplainWorker.process_shard over every shard (two in flight, as the actor runs
    them under Ray), wall clock from the first shard to the last commit; worker start-up excluded.
    The same worker serves both output settings (as two jobs would, one compile saved)."""
    from bulk_explain.workers.layout import OutputLayout

    worker.settings = dict(worker.settings, output=out_dir, overlay_max_side=max_side)
    worker.layout = OutputLayout(out_dir)
    fingerprint = config.result_fingerprint()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        markers = list(pool.map(lambda t: worker.process_shard(t, fingerprint), tasks))
    elapsed = time.perf_counter() - t0
    images = sum(m["ok"] for m in markers)
    errors = sum(m["error"] for m in markers)
    if errors:
        raise RuntimeError(f"{errors} error rows in the end-to-end run")
    return images / elapsed


def filters_child(args):
    """All filters of VGG16's conv layers in this process (run as a child: a fresh process shows
    what the persistent compilation cache saves). Prints one JSON line."""
    t_start = time.perf_counter()
    from bulk_explain.workers.backends import get_backend, select_backend

    select_backend("jax")
    get_backend().configure(None)
    import keras

    from bulk_explain.workers.filters.filter_vis import FilterAscent, deprocess_image, encode_png, start_noise
    from bulk_explain.workers.models import seeded_random_weights

    size, steps = args.filter_size, args.filter_steps
    model = seeded_random_weights(keras.applications.VGG16(include_top=False, weights=None,
                                                           input_shape=(size, size, 3)), 0)
    layers = [l.name for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    if args.layers:
        layers = layers[:args.layers]
    ascent_s, total = 0.0, 0
    encode = ThreadPoolExecutor(os.cpu_count() or 1)
    pngs = []
    for name in layers:
        ascent = FilterAscent(model, name, size=size, steps=steps)
        n = min(ascent.num_filters, args.filters_per_layer or ascent.num_filters)
        starts = np.stack([start_noise(0, name, f, size) for f in range(n)])
        t0 = time.perf_counter()
        result = ascent.ascend(list(range(n)), starts, auto="max", max_batch=args.filter_batch, steps_per_call=1)
        ascent_s += time.perf_counter() - t0
        total += n
        pngs += [encode.submit(lambda im: encode_png(deprocess_image(im)), im) for im in result.images]
    for f in pngs:
        f.result()
    encode.shutdown()
    print(json.dumps({"filters": total, "layers": len(layers), "ascent_s": ascent_s,
                      "total_s": time.perf_counter() - t_start,
                      "tensorflow_imported": sys.modules.get("tensorflow") is not None,
                      "ray_imported": sys.modules.get("ray") is not None}))


def run_filters(args, cache_dir):
    env = dict(os.environ, BULK_EXPLAIN_JAX_CACHE=cache_dir, KERAS_BACKEND="jax",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, os.path.abspath(__file__), "--filters-child", "--filter-size", str(args.filter_size),
           "--filter-steps", str(args.filter_steps), "--filter-batch", str(args.filter_batch),
           "--layers", str(args.layers), "--filters-per-layer", str(args.filters_per_layer)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"filter ascent child failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="seconds-long smoke run: 32 px, few images and filters")
    ap.add_argument("--images", type=int, default=None, help="end-to-end images (default 8192; tiny 8)")
    ap.add_argument("--batch", type=int, default=None, help="float32 batch (default 128; tiny 4)")
    ap.add_argument("--bf16-batch", type=int, default=None, help="mixed_bfloat16 batch (default 256; tiny 4)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per rate measurement (default 10)")
    ap.add_argument("--skip-filters", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs and outputs")
    # the filter ascent child
    ap.add_argument("--filters-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--filter-size", type=int, default=150)
    ap.add_argument("--filter-steps", type=int, default=30)
    ap.add_argument("--filter-batch", type=int, default=256)
    ap.add_argument("--layers", type=int, default=0, help="first N conv layers only (0: all 13)")
    ap.add_argument("--filters-per-layer", type=int, default=0, help="first N filters per layer (0: all)")
    args = ap.parse_args(argv)
    if args.filters_child:
        return filters_child(args)

    tiny = args.tiny
    images = args.images or (8 if tiny else 8192)
    batch = args.batch or (4 if tiny else 128)
    bf16_batch = args.bf16_batch or (4 if tiny else 256)
    min_calls = 1 if tiny else 3
    seconds = args.seconds or (0.5 if tiny else 10.0)
    size = 32 if tiny else 224
    shard_size = 4 if tiny else 1024
    if tiny:
        args.filter_size, args.filter_steps, args.filter_batch = 32, 3, 8
        args.layers, args.filters_per_layer = args.layers or 2, args.filters_per_layer or 4

    from bulk_explain.workers.backends import get_backend, select_backend

    select_backend("jax")  # before Keras is imported; TensorFlow is never imported
    backend = get_backend()
    backend.configure(None)
    import jax
    import keras

    from bulk_explain.workers.models import ModelSpec, load_model
    from bulk_explain.workers.preprocessing import Preprocessing

    cpus = os.cpu_count() or 1
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    print(f"bulk-explain GPU bench: {devices}; {cpus} CPUs; jax {jax.__version__}, keras {keras.__version__}, "
          f"opencv {cv2.__version__}; VGG16 {size} px random weights{' (tiny)' if tiny else ''}", flush=True)
    rows = []

    def row(name, value, unit, note=""):
        ref = REFERENCE.get(name)
        rows.append((name, value, unit, note))
        ratio = f"  ({value / ref:.2f}x the reference {ref:,})" if ref and not tiny else ""
        print(f"  {name:<28} {value:>10,.1f} {unit}{ratio}  {note}", flush=True)

    spec = ModelSpec(kind="vgg16", weights="random", input_size=size)
    loaded = load_model(spec)
    row("compute float32", compute_rate(loaded, batch, seconds, "float32", min_calls), "img/s", f"batch {batch}")
    row("compute mixed_bfloat16", compute_rate(loaded, bf16_batch, seconds, "mixed_bfloat16", min_calls), "img/s",
        f"batch {bf16_batch}")
    del loaded

    tmp = tempfile.mkdtemp(prefix="bulk-explain-gpu-bench-")
    try:
        blobs = make_inputs(os.path.join(tmp, "in"), images, min(images, 256), (480, 640), cpus)
        pre = Preprocessing(size, size, "vgg16")
        for label, max_side in (("default", None), ("256 px", 256)):
            row(f"host ceiling {label}", host_ceiling(blobs, pre, max_side, cpus, seconds), "img/s",
                f"{cpus} threads, OpenCV")
        worker, tasks, config, startup = start_worker(os.path.join(tmp, "in"), spec, batch, shard_size, "float32")
        info = worker.describe()
        for label, max_side in (("default", None), ("256 px", 256)):
            out = os.path.join(tmp, f"out-{label.replace(' ', '')}")
            rate = end_to_end(worker, tasks, config, out, max_side)
            row(f"end to end {label}", rate, "img/s",
                f"{images} JPEGs 640x480, batch {info['batch_size']}, {info['read_threads']}+{info['write_threads']} "
                f"threads, worker start-up {startup:.1f}s")
            shutil.rmtree(out, ignore_errors=True)
        del worker
        if not args.skip_filters:
            cache = os.path.join(tmp, "jax-cache")
            for label in ("cold", "warm"):
                r = run_filters(args, cache)
                if r["tensorflow_imported"] or r["ray_imported"]:
                    raise RuntimeError("the filter child imported TensorFlow or Ray")
                row(f"filters {label} ascent", r["ascent_s"], "s", f"{r['filters']} filters, {r['layers']} layers")
                row(f"filters {label} end to end", r["total_s"], "s", "process start, model, ascent, PNGs")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    leaked = [m for m in ("tensorflow", "ray") if sys.modules.get(m) is not None]
    if leaked:
        raise RuntimeError(f"the benchmark imported {', '.join(leaked)}: the JAX path must not")
    print("| part | value | unit | note |\n|---|---|---|---|")
    for name, value, unit, note in rows:
        print(f"| {name} | {value:,.1f} | {unit} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
