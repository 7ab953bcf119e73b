"""bulk-explain: bulk explanation of Keras CNN classifiers on Ray.

The import names live under this one namespace; in the repository the packages keep their
top-level folders (setuptools' package-dir maps them):

    bulk_explain.jobs      jobs/      driver side: CLI, job runner, one sub-package per job kind
    bulk_explain.workers   workers/   actor side: one sub-package per job kind + shared infrastructure
    bulk_explain.schemas   schemas/   Arrow schemas of the manifests

    from bulk_explain import ExplainConfig, ModelSpec, run_explain
    python -m bulk_explain run --input photos/ --output out/ --model vgg16
"""

import os as _os

# A checkout used without installing it (Ray's `working_dir` upload, `python -m bulk_explain` from
# the repository root): the sub-packages are this folder's siblings. Installed, they are real
# sub-folders and the check below finds nothing to add.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "jobs", "__init__.py")) and \
        not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "jobs")):
    __path__.append(_checkout)  # noqa: F821 (the package's own __path__)

# Arrow's allocator (mimalloc) keeps freed pages for a while by default; the driver's planning
# frees gigabytes of temporaries at 10M inputs, and kept pages would count towards its peak
# (bench/driver_memory.py: 2.4 GB -> 2.2 GB at 10M inputs). Read when pyarrow loads, so only in a
# process that imports bulk_explain before pyarrow; a user's own setting wins.
_os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")

__all__ = ["ConfigError", "ExplainConfig", "JobResult", "ModelSpec", "run_explain"]


def __getattr__(name):
    # Lazy: `python -m bulk_explain --help` must not pay for Ray/pyarrow imports.
    if name in __all__:
        from bulk_explain import jobs

        return getattr(jobs, name)
    raise AttributeError(f"module 'bulk_explain' has no attribute {name!r}")
