"""`bulk-explain audit` (and `run ... --audit`): options, config, the command."""

from __future__ import annotations

from bulk_explain.jobs.commands import Command, register_command

from bulk_explain.jobs.audit.config import (BORDER, CLUSTER_SAMPLE_PER_CLASS, LABEL_FILTER, LABEL_FILTERS, LOW_CONFIDENCE_BELOW,
                               MAX_CLUSTER_CLASSES, MAX_CLUSTERS, THUMBNAILS_PER_CHECK, AuditConfig)


def add_arguments(p) -> None:
    p.add_argument("--output", required=True, metavar="DST", help="an explain job's output: folder or s3://bucket/prefix")
    add_gate_arguments(p)
    p.add_argument("--baseline", default="previous",
                   help="previous (the latest finished audit), an audit id, or none (default: previous)")
    p.add_argument("--low-confidence", type=float, default=LOW_CONFIDENCE_BELOW,
                   help=f"top probability under which an image counts as unsure (default {LOW_CONFIDENCE_BELOW})")
    p.add_argument("--border", type=float, default=BORDER,
                   help=f"border width as a fraction of the side for cam_border (default {BORDER})")
    p.add_argument("--cluster-sample", type=int, default=CLUSTER_SAMPLE_PER_CLASS,
                   help=f"most images per class that spectral clustering sees (default {CLUSTER_SAMPLE_PER_CLASS})")
    p.add_argument("--max-clusters", type=int, default=MAX_CLUSTERS, help=f"largest k (default {MAX_CLUSTERS})")
    p.add_argument("--cluster-classes", type=int, default=MAX_CLUSTER_CLASSES,
                   help=f"cluster the N most frequent predicted classes (default {MAX_CLUSTER_CLASSES})")
    p.add_argument("--thumbnails", type=int, default=THUMBNAILS_PER_CHECK,
                   help=f"worst-ranked images shown per check (default {THUMBNAILS_PER_CHECK})")
    p.add_argument("--label-filter", default=LABEL_FILTER, choices=LABEL_FILTERS,
                   help=f"cleanlab find_label_issues filter_by (default {LABEL_FILTER}; prune_by_noise_rate is "
                        "confident learning's more conservative estimate)")
    p.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (MinIO, Ceph...)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def add_gate_arguments(p) -> None:
    p.add_argument("--gate", action="append", default=[], metavar="CHECK<=X",
                   help="fail (exit 3) unless the check's value satisfies it, e.g. label_issues<=0.02, drift<=0.2 "
                        "(repeatable)")


def config_from_args(args, output=None) -> AuditConfig:
    return AuditConfig(
        output=output or args.output,
        baseline=getattr(args, "baseline", "previous"),
        gates=tuple(args.gate or ()),
        low_confidence_below=getattr(args, "low_confidence", LOW_CONFIDENCE_BELOW),
        border=getattr(args, "border", BORDER),
        cluster_sample_per_class=getattr(args, "cluster_sample", CLUSTER_SAMPLE_PER_CLASS),
        max_clusters=getattr(args, "max_clusters", MAX_CLUSTERS),
        max_cluster_classes=getattr(args, "cluster_classes", MAX_CLUSTER_CLASSES),
        thumbnails_per_check=getattr(args, "thumbnails", THUMBNAILS_PER_CHECK),
        label_filter=getattr(args, "label_filter", LABEL_FILTER),
        s3_endpoint_url=getattr(args, "s3_endpoint_url", None),
    ).validated()


def config_for_run(args):
    """`bulk-explain run --audit [--gate ...]`: the audit's validated config, or None without --audit.

    Raises:
        ConfigError: --gate without --audit.
        EnvironmentProblem: the audit extra is not installed (one line naming it).
    """
    if args.gate and not args.audit:
        from bulk_explain.jobs.validation import ConfigError

        raise ConfigError("--gate applies to the audit: add --audit (or run `bulk-explain audit --gate ...`)")
    if not args.audit:
        return None
    _require()
    return config_from_args(args, output=args.output)


def _require() -> None:
    from bulk_explain.jobs import audit
    from bulk_explain.workers.environment import EnvironmentProblem

    try:
        audit.require_dependencies()
    except ImportError as exc:
        raise EnvironmentProblem(str(exc)) from None


def run_audit_command(config: AuditConfig, args, lease=None) -> int:
    """Runs the audit holding DST's lease (it writes DST/audits/ and reads the manifest: one
    writer per output, as for runs); prints one line per failed gate; returns the exit code.

    SIGTERM (a scheduler stopping the audit) raises `JobInterrupted` here as in every job, so the
    lease is released on the way out and the process exits 143: the next scheduled run or audit
    of DST is not refused (exit 4) until the lease expires.
    """
    import sys

    from bulk_explain.jobs.audit import run_audit
    from bulk_explain.jobs.runtime import sigterm_raises
    from bulk_explain.workers.lease import hold_output_lease

    with sigterm_raises(), hold_output_lease(config.output, lease, job="audit"):
        result = run_audit(config, progress=not args.quiet)
    for line in result.failed_gates:
        print(f"bulk-explain: {line}", file=sys.stderr)
    return result.exit_code


def _run(args, lease) -> int:
    return run_audit_command(config_from_args(args), args, lease)


register_command(Command(name="audit", help="audit an explain output: label issues, drift, where the model looks, gates",
                         add_arguments=add_arguments, run=_run, requires=_require, defaults_in_help=False))
