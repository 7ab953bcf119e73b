"""The audit job kind: reads an explain output (local or S3) and reports label issues, unsure and
unreadable images, class balance, drift since the previous audit, where the model looks and its
strategy clusters, with gates for nightly runs. No Ray: one process reads the manifest's columns.

    from bulk_explain.jobs.audit import AuditConfig, run_audit
    result = run_audit(AuditConfig(output="out/", gates=("label_issues<=0.02", "drift<=0.2")))
    print(result.report_uri, result.exit_code)

Needs the `audit` extra (cleanlab, scikit-learn, scipy, matplotlib).
"""

from bulk_explain.jobs.audit.config import AuditConfig, Gate, parse_gate

__all__ = ["AuditConfig", "AuditResult", "Gate", "parse_gate", "run_audit", "require_dependencies", "MISSING_DEPENDENCY"]

MISSING_DEPENDENCY = "the audit needs the 'audit' extra (pip install 'bulk-explain[audit]'): {error}"


def require_dependencies() -> None:
    """Imports the audit extra's packages.

    Raises:
        ImportError: with a one-line message naming the extra to install.
    """
    try:
        import cleanlab  # noqa: F401
        import matplotlib  # noqa: F401
        import scipy  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise ImportError(MISSING_DEPENDENCY.format(error=exc)) from None


def run_audit(config, progress: bool = True):
    """See `bulk_explain.jobs.audit.driver.run_audit`."""
    from bulk_explain.jobs.audit.driver import run_audit as _run

    return _run(config, progress=progress)


def __getattr__(name):
    if name == "AuditResult":
        from bulk_explain.jobs.audit.driver import AuditResult

        return AuditResult
    raise AttributeError(name)
