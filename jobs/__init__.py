"""bulk-explain jobs: the Python API. One entry point per job kind, each taking a frozen config.

    from bulk_explain.jobs import ExplainConfig, ModelSpec, run_explain
    result = run_explain(ExplainConfig(inputs=("photos",), output="out", model=ModelSpec("vgg16", weights="random")))
"""

from bulk_explain.jobs.explain.config import ConfigError, ExplainConfig
from bulk_explain.jobs.explain.driver import JobResult, run_explain
from bulk_explain.workers.models import ModelSpec

__all__ = ["ConfigError", "ExplainConfig", "JobResult", "ModelSpec", "run_explain"]
