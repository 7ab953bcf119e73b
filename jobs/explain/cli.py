"""`bulk-explain run`: the explain kind's options, its config from them, and the command."""

from __future__ import annotations

import argparse

from bulk_explain.jobs.commands import Command, register_command


def _batch_size(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, received {text!r}") from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    from bulk_explain.workers.models import model_kinds

    p.add_argument("--model", required=True, choices=model_kinds(), help="model kind")
    p.add_argument("--weights", default=None,
                   help="imagenet (Keras' download, cached), random (seeded by --seed), or a weights file; "
                        "default: the --model-file's own weights when one is given, else imagenet")
    p.add_argument("--model-file", help=".keras or legacy .h5 model file (cats_dogs, keras)")
    p.add_argument("--input-size", type=int,
                   help="input size where the architecture allows it (default: the model's own)")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    p.add_argument("--unsafe-model-code", action="store_true",
                   help="allow Lambda layers / custom code in model files (only for files you trust)")
    p.add_argument("--address", default=None, help="Ray: omit for embedded local Ray; auto or HOST:PORT for a cluster")
    p.add_argument("--workers", type=int, default=None, help="model actors (default: one per GPU, else per node)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs each worker reserves, even before an autoscaling cluster has GPU nodes "
                        "(default: 1 per worker where GPUs exist, none on CPU-only clusters)")
    p.add_argument("--s3-endpoint-url", default=None,
                   help="S3-compatible endpoint (MinIO, Ceph...); default: AWS, or AWS_ENDPOINT_URL_S3")


def add_arguments(run: argparse.ArgumentParser) -> None:
    from bulk_explain.jobs.audit import cli as audit_cli

    run.add_argument("--input", action="append", required=True, metavar="SRC",
                     help="folder or s3://bucket/prefix (repeatable)")
    run.add_argument("--output", required=True, metavar="DST", help="folder or s3://bucket/prefix")
    add_model_arguments(run)
    run.add_argument("--batch-size", type=_batch_size, default="auto",
                     help="images per compiled step, or auto: on a GPU the largest power of two "
                          "that fits, on a CPU 32")
    run.add_argument("--shard-size", type=int, default=256, help="images per unit of work and of commit")
    run.add_argument("--top-k", type=int, default=5, help="classes per image in the manifest")
    run.add_argument("--cam-class", default="pred",
                     help="pred, label (the folder's class: cats/ matches cat) or a class index")
    run.add_argument("--strict-labels", action="store_true",
                     help="with --cam-class label: a folder that names no class is an error (exit 2) "
                          "instead of a warning")
    run.add_argument("--limit", type=int, default=None, metavar="N",
                     help="process only the first N inputs of the sorted listing, to try settings "
                          "(a later run without --limit in the same output does the rest)")
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
    run.add_argument("--scaling", default=None,
                     help="preprocessing: rescale, vgg16, tf or none (default: the model kind's own; rescale "
                          "for keras models)")
    run.add_argument("--interpolation", default="nearest", help="resize: nearest (Keras load_img), bilinear, ...")
    run.add_argument("--class-names", default=None,
                     help="class names file, one per line or a JSON list (default: ImageNet's for vgg16, "
                          "cat/dog for cats_dogs, indices for keras)")
    run.add_argument("--overlay-quality", type=int, default=90, help="JPEG quality of the overlays (1-100)")
    run.add_argument("--read-threads", type=int, default=None,
                     help="decode threads per worker (default: derived from the CPUs the worker holds)")
    run.add_argument("--write-threads", type=int, default=None,
                     help="encode/write threads per worker (default: derived from the CPUs the worker holds)")
    run.add_argument("--backend", default="tensorflow", choices=["tensorflow", "jax"],
                     help="Keras backend of the driver and the workers (jax needs the jax extra)")
    run.add_argument("--precision", default="float32", choices=["float32", "mixed_bfloat16", "mixed_float16"],
                     help="Keras dtype policy of the model; CAMs, statistics and probabilities stay float32")
    run.add_argument("--overlay-max-side", type=int, default=None, metavar="N",
                     help="write overlays and heatmaps with the long side at most N px (default: original size)")
    run.add_argument("--max-error-rate", type=float, default=1.0,
                     help="exit 1 when more than this fraction of images are error rows")
    run.add_argument("--overwrite", action="store_true", help="recompute everything in DST")
    run.add_argument("--allow-removals", action="store_true",
                     help="accept a listing with no images or without more than half of the previous run's "
                          "images (refused by default: an unmounted input must not wipe DST)")
    run.add_argument("--verify-content", action="store_true",
                     help="detect changed images by a SHA-256 of their bytes, not size+mtime "
                          "(reads every input in full on every run)")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    run.add_argument("--audit", action="store_true", help="audit the output after a successful run (exit 3 if a --gate fails)")
    audit_cli.add_gate_arguments(run)


def explain_config_from_args(args):
    """ExplainConfig from parsed arguments (not validated yet)."""
    from bulk_explain.jobs.explain.config import ExplainConfig
    from bulk_explain.workers.models import ModelSpec

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
        allow_removals=args.allow_removals,
        verify_content=args.verify_content,
        strict_labels=args.strict_labels,
        limit=args.limit,
        backend=args.backend,
        precision=args.precision,
        overlay_max_side=args.overlay_max_side,
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        metric_steps=args.metric_steps,
        scorecam_channels=args.scorecam_channels,
    )


def run_command(args, lease) -> int:
    from bulk_explain.jobs.audit import cli as audit_cli
    from bulk_explain.jobs.explain.driver import run_explain

    # Validate first (cheap, no TensorFlow), so a bad command line answers in a second.
    audit_config = audit_cli.config_for_run(args)
    config = explain_config_from_args(args).validated()
    result = run_explain(config, progress=not args.quiet, lease=lease)  # imports TensorFlow after its fast checks
    if audit_config is not None and result.exit_code == 0:
        return audit_cli.run_audit_command(audit_config, args, lease)
    return int(result.exit_code)


register_command(Command(name="run", help="predictions, activation summaries and Grad-CAM for every image",
                         add_arguments=add_arguments, run=run_command))
