"""`bulk-explain` command line: a thin layer over the Python API (jobs.run_explain, ...).

Exit codes: 0 the job finished (per-image errors are manifest rows), 1 shards failed, the error
rate passed --max-error-rate, or an unexpected error (one line; the traceback with --verbose),
2 bad command line or configuration (one line on stderr), 3 an audit gate failed (one line per
failed gate), 4 the output is busy (another run holds its lease, DST/_lease.json; one line naming
the holder), 5 environment problem: credentials,
S3 endpoint, output permissions, no network for downloading weights (one line naming the fix).
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


EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 5


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every option with a default; options whose default is "unset"
    (None) or off (store_true) say in their own help text what happens without them."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    first = str(message).strip().splitlines()[0] if str(message).strip() else "error"
    print(f"bulk-explain: error: {first}", file=sys.stderr)
    return code


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
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


def _add_lease_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait-for-lease", type=float, default=0.0, metavar="SECONDS",
                   help="when another run holds the output, wait up to this long for it (else exit 4)")
    p.add_argument("--break-lease", action="store_true",
                   help="DANGEROUS: take the output's lease from its holder at once (only if that run is dead)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bulk-explain", description="Bulk explanation of Keras CNN classifiers on Ray.",
                     epilog="Exit codes: 0 finished, 1 shards failed or --max-error-rate passed, 2 bad command "
                            "line or configuration, 5 environment problem (credentials, endpoint, permissions, "
                            "network). `bulk-explain COMMAND --help` lists a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                                title="commands")

    run = sub.add_parser("run", help="predictions, activation summaries and Grad-CAM for every image",
                         formatter_class=_HelpFormatter)
    run.add_argument("--input", action="append", required=True, metavar="SRC",
                     help="folder or s3://bucket/prefix (repeatable)")
    run.add_argument("--output", required=True, metavar="DST", help="folder or s3://bucket/prefix")
    _add_model_arguments(run)
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
    from bulk_explain.jobs.audit import cli as audit_cli

    run.add_argument("--audit", action="store_true", help="audit the output after a successful run (exit 3 if a --gate fails)")
    audit_cli.add_gate_arguments(run)
    audit = sub.add_parser("audit", help="audit an explain output: label issues, drift, where the model looks, gates")
    audit_cli.add_arguments(audit)
    _add_lease_arguments(audit)
    _add_verbose(audit)
    _add_lease_arguments(run)
    _add_verbose(run)

    try:
        from bulk_explain.jobs.filters import job as filters_job
    except ImportError:
        filters_job = None
    if filters_job is not None:
        filters = sub.add_parser("filters", help="visualize every filter of conv layers by gradient ascent",
                                 formatter_class=_HelpFormatter)
        filters_job.add_arguments(filters)
        _add_lease_arguments(filters)
        _add_verbose(filters)
    return parser


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show TensorFlow/CUDA/Ray start-up messages, Python warnings and tracebacks")


def _batch_size(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, received {text!r}") from None


def explain_config_from_args(args):
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


def _lease_options(args):
    from bulk_explain.workers.lease import LeaseOptions

    if args.wait_for_lease < 0:
        from bulk_explain.jobs.explain.config import ConfigError

        raise ConfigError(f"--wait-for-lease must be >= 0 seconds, received {args.wait_for_lease:g}")
    options = LeaseOptions(wait_seconds=args.wait_for_lease, break_lease=args.break_lease)
    try:
        options.duration()  # a bad BULK_EXPLAIN_LEASE_SECONDS is a one-line exit 2 before any work
    except ValueError as exc:
        from bulk_explain.jobs.explain.config import ConfigError

        raise ConfigError(str(exc)) from None
    return options


def main(argv: Optional[List[str]] = None) -> int:
    from bulk_explain.jobs.runtime import restore_default_signals

    # Ctrl-C must give exit 130 even when started with SIGINT ignored (`cmd &` in a script).
    restore_default_signals()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:  # plain `bulk-explain`: say what it can do
        parser.print_help()
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        return _fail(str(exc))
    from bulk_explain.workers.tf_runtime import VERBOSE_ENV, import_tensorflow_quietly, quiet_console

    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    # Before TensorFlow is imported: its C++ log level is read once, when it loads.
    quiet_console(global_warnings=True)
    from bulk_explain.jobs.explain.config import ConfigError
    from bulk_explain.jobs.distribute import WorkerStartError
    from bulk_explain.workers.lease import OutputBusy
    from bulk_explain.workers.environment import EnvironmentProblem

    from bulk_explain.workers.models import ModelError

    config_errors = (ConfigError, ModelError)  # ours: the command line, the config or the model is wrong
    try:
        from bulk_explain.jobs.filters.job import FiltersConfigError

        config_errors += (FiltersConfigError,)
    except ImportError:
        pass
    from bulk_explain.workers.backends import BackendError

    try:
        # Validate first (cheap, no TensorFlow), so a bad command line answers in a second.
        lease = _lease_options(args)
        if args.command == "audit" or getattr(args, "audit", False) or getattr(args, "gate", None):
            audit_config = _audit_config(args)
            if audit_config is None:
                return 5
        if args.command == "audit":
            return _run_audit(audit_config, args, lease)
        if args.command == "run":
            from bulk_explain.jobs.explain.driver import run_explain

            config = explain_config_from_args(args).validated()
            result = run_explain(config, progress=not args.quiet, lease=lease)  # imports TensorFlow after its fast checks
            if args.audit and result.exit_code == 0:
                return _run_audit(audit_config, args, lease)
        else:
            from bulk_explain.jobs.filters import job as filters_job

            config = filters_job.config_from_args(args)
            import_tensorflow_quietly()
            result = filters_job.run_filters(config, lease=lease)
    except OutputBusy as exc:
        return _fail(str(exc), OutputBusy.exit_code)
    except config_errors + (BackendError,) as exc:
        return _fail(str(exc))
    except EnvironmentProblem as exc:
        return _fail(str(exc), EXIT_ENVIRONMENT)
    except WorkerStartError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        print("bulk-explain: interrupted; committed shards are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as exc:  # not a configuration mistake: exit 1, one line unless --verbose
        if args.verbose:
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _fail(f"{type(exc).__name__}: {text} (committed shards are kept; re-run with --verbose "
                     "for the traceback)", EXIT_FAILED)
    return int(getattr(result, "exit_code", 0))


def _audit_config(args):
    """The audit's validated config, or None after a one-line message when the extra is missing."""
    from bulk_explain.jobs import audit
    from bulk_explain.jobs.audit import cli as audit_cli

    if args.command == "run" and args.gate and not args.audit:
        from bulk_explain.jobs.explain.config import ConfigError

        raise ConfigError("--gate applies to the audit: add --audit (or run `bulk-explain audit --gate ...`)")
    try:
        audit.require_dependencies()
    except ImportError as exc:
        print(f"bulk-explain: error: {exc}", file=sys.stderr)
        return None
    return audit_cli.config_from_args(args, output=args.output)


def _run_audit(config, args, lease=None) -> int:
    from bulk_explain.jobs.audit import run_audit
    from bulk_explain.workers.lease import hold_output_lease

    # The audit writes under DST/audits/ and reads the manifest: one writer per output, as for runs.
    with hold_output_lease(config.output, lease, job="audit"):
        result = run_audit(config, progress=not args.quiet)
    for line in result.failed_gates:
        print(f"bulk-explain: {line}", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
