"""Cost of each CAM method and each faithfulness metric per image, relative to plain Grad-CAM, in
one run on the same pre-decoded images (compute only: the compiled step, no decode, no writes).

    python bench/methods.py                          # the lecture's convnet at 150 px
    python bench/methods.py --model vgg16 --images 8 --batch-size 8

Each configuration is traced once (not timed), then all are timed round-robin `--repeats` times
over all images; the median per image is reported with its ratio to the Grad-CAM-only step. A metric's cost is the
step with Grad-CAM + that metric minus the Grad-CAM-only step. Random weights: the work per image
is identical to trained weights. Ratios are what matter; absolute times on a shared machine are
noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from bench._images import photo_like


def seconds_per_image(step, images):
    b = step.batch_size
    t0 = time.perf_counter()
    for s in range(0, len(images), b):
        step(images[s : s + b])
    return (time.perf_counter() - t0) / len(images)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cats_dogs", choices=["cats_dogs", "vgg16"])
    p.add_argument("--input-size", type=int, default=None, help="default: 150 (cats_dogs), 224 (vgg16)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scorecam-channels", type=int, default=None, help="default: Score-CAM's (128)")
    args = p.parse_args(argv)

    from bulk_explain.workers.explain.explain_step import ExplainStep
    from bulk_explain.workers.models import ModelSpec, load_model

    size = args.input_size or (150 if args.model == "cats_dogs" else 224)
    loaded = load_model(ModelSpec(kind=args.model, weights="random", input_size=size, seed=0))
    rng = np.random.default_rng(0)
    images = np.stack([photo_like(rng, size, size, min_radius=5, noise=0) for _ in range(args.images)])
    configs = [
        ("gradcam", dict(method="gradcam")),
        ("gradcam++", dict(method="gradcam++")),
        ("layercam", dict(method="layercam")),
        ("scorecam", dict(method="scorecam", scorecam_channels=args.scorecam_channels)),
        ("gradcam,gradcam++,layercam", dict(method="gradcam,gradcam++,layercam")),
        ("+ deletion", dict(method="gradcam", metrics=("deletion",))),
        ("+ insertion", dict(method="gradcam", metrics=("insertion",))),
        ("+ road", dict(method="gradcam", metrics=("road",))),
    ]
    print(f"{args.model} {size}px, {args.images} images, batch {args.batch_size}, median of {args.repeats}")
    steps = {}
    for name, kw in configs:
        steps[name] = ExplainStep(loaded, batch_size=args.batch_size, **kw)
        steps[name](images[: args.batch_size])  # trace + warm-up, not timed
    # Round-robin over the configurations, so that load changes on a shared machine hit all alike.
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(seconds_per_image(step, images))
    base = statistics.median(times["gradcam"])
    for name in steps:
        t = statistics.median(times[name])
        extra = f"   metric alone {(t - base) / base:7.1f}x" if name.startswith("+") else ""
        print(f"{name:28s} {t * 1000:9.1f} ms/image   {t / base:7.1f}x Grad-CAM{extra}", flush=True)


if __name__ == "__main__":
    main()
