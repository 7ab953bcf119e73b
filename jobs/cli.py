"""`bulk-explain` command line: a thin layer over the Python API (jobs.run_explain, ...).

Exit codes: 0 the job finished (per-image errors are manifest rows), 1 shards failed or the error
rate passed --max-error-rate, 2 bad command line or configuration (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def _fail(message: str) -> int:
    first = str(message).strip().splitlines()[0] if str(message).strip() else "error"
    print(f"bulk-explain: error: {first}", file=sys.stderr)
    return 2


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    from workers.models import model_kinds

    p.add_argument("--model", required=True, choices=model_kinds(), help="model kind")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (Keras' download, cached), random (seeded), or a weights/model file")
    p.add_argument("--model-file", help=".keras or legacy .h5 model file (cats_dogs, keras)")
    p.add_argument("--input-size", type=int, help="input size where the architecture allows it")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    p.add_argument("--unsafe-model-code", action="store_true",
                   help="allow Lambda layers / custom code in model files (only for files you trust)")
    p.add_argument("--address", default=None, help="Ray: omit for embedded local Ray; auto or HOST:PORT for a cluster")
    p.add_argument("--workers", type=int, default=None, help="model actors (default: one per GPU, else per node)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs each worker reserves, even before an autoscaling cluster has GPU nodes")
    p.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (MinIO, Ceph...)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bulk-explain", description="Bulk explanation of Keras CNN classifiers on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="predictions, activation summaries and Grad-CAM for every image")
    run.add_argument("--input", action="append", required=True, metavar="SRC",
                     help="folder or s3://bucket/prefix (repeatable)")
    run.add_argument("--output", required=True, metavar="DST", help="folder or s3://bucket/prefix")
    _add_model_arguments(run)
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--shard-size", type=int, default=256)
    run.add_argument("--top-k", type=int, default=5)
    run.add_argument("--cam-class", default="pred", help="pred, label (the folder's class) or a class index")
    run.add_argument("--cam-method", default="gradcam",
                     help="gradcam, gradcam++, layercam, scorecam, or several comma-separated "
                          "(gradcam,scorecam): a map per method in the same row; the first fills gradcam_*")
    run.add_argument("--cam-score", default="logit", choices=["logit", "probability"],
                     help="logit: pre-activation class score (the paper); probability: the lecture's")
    run.add_argument("--metrics", default="",
                     help="faithfulness per image and method, comma-separated: deletion, insertion, road")
    run.add_argument("--metric-steps", type=int, default=16, help="deletion/insertion steps (RISE's K)")
    run.add_argument("--scorecam-channels", type=int, default=None,
                     help="Score-CAM scores the N most activated channels (default 128; 0 = all)")
    run.add_argument("--target-layer", default=None, help="conv layer for the CAM (default: last Conv2D)")
    run.add_argument("--activation-layers", default=None,
                     help="comma-separated layers to summarize (default: every Conv2D and pooling layer)")
    run.add_argument("--activation-grids", type=int, default=0,
                     help="channel-grid PNGs for the first N images of each shard")
    run.add_argument("--scaling", default=None, help="preprocessing: rescale, vgg16, tf or none (keras models)")
    run.add_argument("--interpolation", default="nearest", help="resize: nearest (Keras load_img), bilinear, ...")
    run.add_argument("--class-names", default=None, help="class names file (one per line or a JSON list)")
    run.add_argument("--overlay-quality", type=int, default=90)
    run.add_argument("--read-threads", type=int, default=4)
    run.add_argument("--write-threads", type=int, default=4)
    run.add_argument("--max-error-rate", type=float, default=1.0,
                     help="exit 1 when more than this fraction of images are error rows")
    run.add_argument("--overwrite", action="store_true", help="recompute everything in DST")
    run.add_argument("--quiet", action="store_true", help="no progress lines")

    try:
        from jobs import filters_job
    except ImportError:
        filters_job = None
    if filters_job is not None:
        filters = sub.add_parser("filters", help="visualize every filter of conv layers by gradient ascent")
        filters_job.add_arguments(filters)
    return parser


def explain_config_from_args(args):
    from jobs.config import ExplainConfig
    from workers.models import ModelSpec

    spec = ModelSpec(
        kind=args.model,
        weights=args.weights,
        model_file=args.model_file,
        input_size=args.input_size,
        scaling=args.scaling,
        interpolation=args.interpolation,
        class_names_file=args.class_names,
        seed=args.seed,
        unsafe_model_code=args.unsafe_model_code,
    )
    layers = tuple(l.strip() for l in args.activation_layers.split(",") if l.strip()) if args.activation_layers else None
    return ExplainConfig(
        inputs=tuple(args.input),
        output=args.output,
        model=spec,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        address=args.address,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        top_k=args.top_k,
        cam_class=args.cam_class,
        cam_method=args.cam_method,
        cam_score=args.cam_score,
        target_layer=args.target_layer,
        activation_layers=layers,
        activation_grids=args.activation_grids,
        overlay_quality=args.overlay_quality,
        read_threads=args.read_threads,
        write_threads=args.write_threads,
        overwrite=args.overwrite,
        max_error_rate=args.max_error_rate,
        s3_endpoint_url=args.s3_endpoint_url,
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        metric_steps=args.metric_steps,
        scorecam_channels=args.scorecam_channels,
    )


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        return _fail(str(exc))
    from jobs.config import ConfigError
    from jobs.distribute import WorkerStartError
    from workers.tf_runtime import import_tensorflow_quietly

    try:
        # Validate first (cheap, no TensorFlow), so a bad command line answers in a second.
        if args.command == "run":
            from jobs.driver import run_explain

            config = explain_config_from_args(args).validated()
            import_tensorflow_quietly()
            result = run_explain(config, progress=not args.quiet)
        else:
            from jobs import filters_job

            config = filters_job.config_from_args(args)
            import_tensorflow_quietly()
            result = filters_job.run_filters(config)
    except (ConfigError, ValueError) as exc:
        return _fail(str(exc))
    except WorkerStartError as exc:
        print(f"bulk-explain: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bulk-explain: interrupted; committed shards are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130
    return int(getattr(result, "exit_code", 0))


if __name__ == "__main__":
    sys.exit(main())
