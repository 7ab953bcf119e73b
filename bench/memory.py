"""Resident memory of a long job: does a worker grow per shard?

    python bench/memory.py                      # 3000 small JPEGs, shards of 25, cats_dogs net
    python bench/memory.py --images 6000 --shard-size 50 --model vgg16 --input-size 64

Generates small JPEGs of varying sizes, runs the explain job through the Python API (embedded Ray,
one worker), and reads back the commit markers: each worker writes its own resident set size
(/proc/self/statm) into the marker of every shard it commits. Prints RSS at the first and last
shard, the maximum, and the growth per 100 shards fitted over the second half of the run (after
TensorFlow's and the allocators' warm-up), plus the driver's RSS before and after.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np


def make_images(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = int(rng.integers(48, 200)), int(rng.integers(48, 200))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = 128 + 60 * np.sin(xx / rng.uniform(4, 30))[..., None] * np.cos(yy / rng.uniform(4, 30))[..., None]
        img = np.clip(img + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        label = "cats" if i % 2 else "dogs"
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        cv2.imwrite(os.path.join(folder, label, f"{i:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 85])


def own_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--shard-size", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model", default="cats_dogs", choices=["cats_dogs", "vgg16"])
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--activation-grids", type=int, default=0)
    p.add_argument("--keep", help="keep inputs/outputs in this folder")
    args = p.parse_args(argv)

    from bulk_explain.jobs import ExplainConfig, ModelSpec, run_explain

    work = args.keep or tempfile.mkdtemp(prefix="bulk-explain-memory-")
    src, dst = os.path.join(work, "in"), os.path.join(work, "out")
    try:
        if not os.path.isdir(src):
            t = time.perf_counter()
            make_images(src, args.images)
            print(f"generated {args.images} JPEGs in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        shutil.rmtree(dst, ignore_errors=True)
        driver_before = own_rss_mb()
        config = ExplainConfig(inputs=(src,), output=dst, batch_size=args.batch_size, shard_size=args.shard_size,
                               activation_grids=args.activation_grids,
                               model=ModelSpec(kind=args.model, weights="random", input_size=args.input_size))
        result = run_explain(config, progress=False)
        driver_after = own_rss_mb()
        markers = [json.load(open(f)) for f in glob.glob(os.path.join(dst, "_commits", "*.json"))]
        markers.sort(key=lambda m: m["committed_at"])
        rss = np.array([m["worker_rss_bytes"] for m in markers], np.float64) / 2**20
        pids = sorted({m["worker_pid"] for m in markers})
        n = len(rss)
        half = rss[n // 2:]
        slope = np.polyfit(np.arange(len(half)), half, 1)[0] * 100 if len(half) > 2 else float("nan")
        print(f"job: {result.images} images, {n} shards of {args.shard_size}, {result.seconds:.0f}s "
              f"({result.images_per_second:.1f} img/s), exit {result.exit_code}, worker pids {pids}")
        print(f"worker RSS MB: first shard {rss[0]:.0f}, last shard {rss[-1]:.0f}, max {rss.max():.0f}, "
              f"min {rss.min():.0f}; growth over the second half: {slope:+.1f} MB per 100 shards")
        step = max(1, n // 12)
        print("shard#:RSS  " + "  ".join(f"{i}:{rss[i]:.0f}" for i in range(0, n, step)) + f"  {n - 1}:{rss[-1]:.0f}")
        print(f"driver RSS MB: {driver_before:.0f} before the job, {driver_after:.0f} after")
        return 0 if result.exit_code == 0 else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
