"""The filters kind, driver side: config (`config.py`), command (`cli.py`), units (`plan.py`) and
the kind on the shared runner (`driver.py`). Its actor is `bulk_explain.workers.filters.worker`."""

from bulk_explain.jobs.filters.config import FiltersConfig, FiltersConfigError


def __getattr__(name):
    # run_filters pulls in the runner (Ray, pyarrow): only when asked for.
    if name in ("run_filters", "FiltersResult", "FiltersJob"):
        from bulk_explain.jobs.filters import driver

        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FiltersConfig", "FiltersConfigError", "FiltersJob", "FiltersResult", "run_filters"]
