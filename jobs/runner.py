"""One runner for every job kind that computes units of work on Ray actors.

A kind (`UnitJob` subclass: `bulk_explain.jobs.explain.driver`, `bulk_explain.jobs.filters.driver`)
supplies its config, plan, worker and finish; the runner owns the steps every kind must take in the
same order, so a new kind gets them for free:

    validate the config (before Ray, before any write)
    prepare           the kind's own checks: backend, credentials, output access (exit 2 / 5)
    lease             DST/_lease.json, one run per output (`workers/lease.py`, exit 4)
    refuse            a job.json of a different result fingerprint, unless --overwrite (exit 2)
    plan              the kind's units (int `shard` id + `content_hash`); reads DST, writes nothing
    check             the kind's checks that need the plan (the model, the labels)
    sort + repair     `jobs/units.py`: committed / roll forward / to do; DST made to match the plan
    job.json          the kind's record, credentials redacted
    pool              `jobs/distribute.py`'s actor pool: retries, dead actors replaced, progress
    finish            the kind's summary -> summary.json

SIGINT/SIGTERM (`jobs/runtime.py`: exit 130/143, workers and Ray stopped, committed units kept),
the fault points and the S3 endpoint set-up live here too.

    result = run_job(ExplainJob(config, progress=True), lease=LeaseOptions())
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from typing import Any, ClassVar, Dict, List, Optional, Tuple

from bulk_explain.jobs import units as unit_files
from bulk_explain.jobs.validation import ConfigError
from bulk_explain.jobs.runtime import (JobInterrupted, as_job_interrupt, ray_startup, read_json, redacted,
                                       s3_endpoint, s3_storage_configured, sigterm_raises, worker_env)
from bulk_explain.workers.faults import fault_point

_PROGRESS_GROUP = "progress"


@dataclasses.dataclass
class RunCounts:
    """What the runner did with the plan's units; the kind's `finish` turns it into its result.

    Attributes:
        units: units in the plan.
        skipped: committed before this run (including those published by roll forward).
        rolled_forward: committed by a run that died before publishing; published by this run.
        removed: units of the previous plan that are no longer planned.
        mismatched: units whose published part was not the one their marker committed (redone).
        todo: units this run computed or tried to.
        failed, failure_reasons: unit ids given up after retries, and why.
        markers: the commit markers of every committed unit, by id (after the run).
        startup_seconds: run start until every worker had loaded.
        processing_seconds: from then until the last unit finished.
    """

    units: int = 0
    skipped: int = 0
    rolled_forward: int = 0
    removed: int = 0
    mismatched: int = 0
    todo: List[Any] = dataclasses.field(default_factory=list)
    failed: List[int] = dataclasses.field(default_factory=list)
    failure_reasons: Dict[int, str] = dataclasses.field(default_factory=dict)
    markers: Dict[int, dict] = dataclasses.field(default_factory=dict)
    startup_seconds: float = 0.0
    processing_seconds: float = 0.0

    @property
    def computed(self) -> int:
        return len(self.todo) - len(self.failed)


@dataclasses.dataclass
class Plan:
    """A kind's plan: its units and, for a partial run (`--limit`), the ids it may compute."""

    units: List[Any]
    in_scope: Optional[set] = None


class UnitJob:
    """One job kind on the runner. Subclasses set the class attributes and implement the steps.

    Class attributes:
        name: the kind (`job.json` "kind", the lease's job name).
        config_error: the kind's ConfigError subclass (exit 2).
        non_result_fields, option_names: config fields that do not change results, and the options
            of fields not spelled `--field-name` (for the refusal message).
        process_method: the worker method called with (unit, *work_args()).
        unit_noun, item_noun: what a unit and what it holds are called in messages ("shard", "images").

    Instance attributes the steps set: `config` (validated), `layout` (a CommitLayout, by
    `prepare`), `log` (a `bulk_explain.jobs.progress.Progress`), `previous` (DST's job.json before
    this run, or None) and `record` (this run's job.json, written by the runner before the pool).
    """

    name: ClassVar[str] = ""
    config_error: ClassVar[type] = ConfigError
    non_result_fields: ClassVar[Tuple[str, ...]] = ()
    option_names: ClassVar[Dict[str, str]] = {}
    process_method: ClassVar[str] = "process_shard"
    unit_noun: ClassVar[str] = "shard"
    item_noun: ClassVar[str] = "images"

    def __init__(self, config, progress: bool = True):
        from bulk_explain.jobs.progress import Progress

        self.config = config
        self.log = Progress(total_shards=0, skipped=0, images_todo=0, enabled=progress, items=self.item_noun,
                            unit=self.unit_noun)
        self.layout = None
        self.previous: Optional[dict] = None
        self.record: Dict[str, Any] = {}
        self.t0 = time.perf_counter()

    # ---------------------------------------------------------------- steps (override)

    def validated(self, config):
        return config.validated()

    def prepare(self) -> None:
        """Checks that need no lease and no model (credentials, endpoint, output access); sets
        `self.layout`."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """What the results depend on; a different one in DST/job.json is refused unless --overwrite."""
        return self.config.result_fingerprint()

    def refusal(self, previous: dict) -> Exception:
        """The error (the kind's config error: exit 2) for a DST holding other results, naming the
        settings that differ."""
        return self.config_error(different_results(self.config.output, config_difference(
            previous, redacted(self.config.to_dict()), self.non_result_fields, self.option_names)))

    def refuse_other_model(self, recorded: Optional[str], fingerprint: str) -> None:
        """Same settings, other weights (a replaced model file): refused unless --overwrite."""
        if self.previous and not getattr(self.config, "overwrite", False) and recorded != fingerprint:
            raise self.config_error(different_results(self.config.output, "the model's weights or architecture "
                                                                          "(its fingerprint differs)"))

    def max_retries(self) -> int:
        """Attempts per unit after a worker failure."""
        raise NotImplementedError

    def plan(self) -> Plan:
        raise NotImplementedError

    def check(self, plan: Plan, units: "unit_files.SortedUnits") -> None:
        """Checks that need the plan and what DST holds (the model, the labels); nothing is written yet."""

    def staged_ok(self, storage, uri: str, unit, marker: dict) -> bool:
        return unit_files.staged_agrees(storage, uri, unit, marker)

    def before_work(self, plan: Plan, units: unit_files.SortedUnits, counts: RunCounts) -> None:
        """After the repair, before job.json: the kind's own writes (explain: plan.parquet) and messages."""

    def job_record(self) -> dict:
        """The kind's part of job.json (the runner adds kind, config, fingerprint, started_at)."""
        return {}

    def worker(self, shape: Dict[str, Any]) -> Tuple[type, dict, Dict[str, str], Dict[str, Any]]:
        """(actor class, settings, extra env vars, extra actor options) for the pool."""
        raise NotImplementedError

    def work_args(self) -> tuple:
        return (self.fingerprint(),)

    def workers_ready(self, described: List[dict]) -> None:
        """Every worker's `describe()` once all have loaded: recorded in job.json (device, backend...)."""
        self.record["workers"] = described
        self.write_json(self.layout.job_json, self.record)

    def unit_done(self, unit, marker: dict) -> None:
        self.log.shard_done(len(unit) if hasattr(unit, "__len__") else marker.get("rows", 0), marker)

    def batches_done(self, items: int) -> None:
        self.log.batches_done(items)

    def delete_temp_files(self, shards) -> None:
        """After the pool, every worker stopped: the temp files killed attempts left (commit
        folders, the units' image folders). A kind whose images live elsewhere adds its own."""
        unit_files.delete_temp_files(self.layout, shards)

    def finish(self, counts: RunCounts):
        """Returns (result, summary dict); the runner writes summary.json."""
        raise NotImplementedError

    # ---------------------------------------------------------------- shared helpers

    def write_json(self, uri: str, value: dict) -> None:
        self.layout.storage.write_bytes(uri, json.dumps(value, indent=2, default=str).encode())


_DIFFERENT_RESULTS = ("{output} holds results of a different configuration or model ({what}); "
                      "use a new --output or pass --overwrite to replace them")


def different_results(output: str, what: str) -> str:
    """The refusal every kind gives for a DST holding other results (the CLI exits 2)."""
    return _DIFFERENT_RESULTS.format(output=output, what=what)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_difference(previous: dict, config: dict, ignored=(), option_of: Optional[Dict[str, str]] = None) -> str:
    """Which result-changing settings differ between DST/job.json and this run's config dict, e.g.
    `--cam-method: gradcam then, layercam now` (at most three, then a count).

    Args:
        previous: the job.json read from DST.
        config: this run's config as a (redacted) dict.
        ignored: top-level fields that do not change results.
        option_of: dotted field -> option name, where it is not `--field-name`.
    """
    option_of = option_of or {}
    old = dict(previous.get("config") or {})
    ignored = set(ignored)
    old_flat = {k: v for k, v in _flat(old).items() if k.split(".")[0] not in ignored}
    new_flat = {k: v for k, v in _flat(config).items() if k.split(".")[0] not in ignored}
    diffs = []
    for key in sorted(set(old_flat) | set(new_flat)):
        a, b = old_flat.get(key), new_flat.get(key)
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b:
            option = option_of.get(key, "--" + key.split(".")[-1].replace("_", "-"))
            diffs.append(f"{option}: {_show(a)} then, {_show(b)} now")
    return "; ".join(diffs[:3]) + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "") if diffs \
        else "an earlier version of the settings"


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "unset" if value is None else str(value)


def run_job(job: UnitJob, lease=None):
    """Runs `job` through every step (see the module docstring) and returns the kind's result.

    Args:
        job: a kind's `UnitJob` with its config.
        lease: `bulk_explain.workers.lease.LeaseOptions` (wait, break); None: give up at once.

    Raises:
        The kind's config error (exit 2), EnvironmentProblem (exit 5), OutputBusy (exit 4),
        WorkerStartError (exit 1), KeyboardInterrupt / JobInterrupted (130 / 143; committed units kept).
    """
    from bulk_explain.workers.lease import hold_output_lease

    with sigterm_raises(), s3_storage_configured(getattr(job.config, "s3_endpoint_url", None)), \
            contextlib.ExitStack() as held:
        job.config = job.validated(job.config)
        job.prepare()
        held.enter_context(hold_output_lease(job.config.output, lease, job=job.name))
        return _run_locked(job)


def _run_locked(job: UnitJob):
    layout, config = job.layout, job.config
    storage = layout.storage
    fingerprint = job.fingerprint()
    job.previous = previous = read_json(storage, layout.job_json)
    if previous and not getattr(config, "overwrite", False) and previous.get("result_fingerprint") != fingerprint:
        raise job.refusal(previous)

    plan = job.plan()
    files = unit_files.existing_files(layout)
    units = unit_files.sort_units(layout, plan.units, files, fingerprint, getattr(config, "overwrite", False),
                                  plan.in_scope)
    job.check(plan, units)
    # Nothing is written to DST before this point: a refused job leaves it untouched.
    counts = RunCounts(units=len(plan.units), mismatched=units.mismatched)
    try:
        repaired = unit_files.repair(layout, files, (u.shard for u in plan.units), units, job.staged_ok)
    except PermissionError as exc:
        from bulk_explain.workers.environment import EnvironmentProblem

        raise EnvironmentProblem(f"cannot write output {config.output}: {exc}; check the permissions "
                                 "(or credentials) for this output, or choose another --output") from None
    counts.removed, counts.rolled_forward = repaired["removed"], repaired["rolled_forward"]
    counts.markers = units.committed
    counts.skipped = len(units.committed)
    counts.todo = units.todo
    fault_point("planned")
    job.before_work(plan, units, counts)
    record = {"kind": job.name, "config": redacted(config.to_dict()), "result_fingerprint": fingerprint,
              **job.job_record(), "started_at": time.time()}
    job.record = record
    job.write_json(layout.job_json, record)
    if counts.rolled_forward:
        job.log.message(f"published {counts.rolled_forward} {job.unit_noun}s committed by an interrupted run")
    if counts.mismatched:
        job.log.message(f"redoing {counts.mismatched} {job.unit_noun}s whose published part is not the one "
                        "their commit marker names (interleaved runs or a replaced file)")
    if counts.markers:
        job.log.message(f"{len(counts.markers)} {job.unit_noun}s already committed, skipping them")
    if counts.todo:
        try:
            with WorkerPool(job, counts.todo) as pool:
                pool.run(counts)
        except (KeyboardInterrupt, SystemExit) as exc:
            # Ray's wait() turns an exception raised by a signal handler into SystemExit(1):
            # as_job_interrupt says whether it was our SIGTERM.
            interrupt = as_job_interrupt(exc)
            sigterm = isinstance(interrupt, JobInterrupted)
            job.log.message(f"interrupted ({'SIGTERM' if sigterm else type(exc).__name__}); "
                            f"{len(counts.markers)} committed {job.unit_noun}s are kept, re-run the same "
                            "command to resume")
            if interrupt is not exc:
                raise interrupt from None
            raise
        # Every worker of this run has stopped and the lease keeps other runs out: a temp file
        # left now is a killed attempt's (a node that left mid-write), never a write in progress.
        job.delete_temp_files([u.shard for u in counts.todo])
    result, summary = job.finish(counts)
    job.write_json(layout.summary_json, summary)
    return result


class WorkerPool:
    """Ray (embedded or `--address`) and the kind's actor pool for one run; stopped on exit, also
    on Ctrl-C/SIGTERM and on a signal that arrived while Ray was starting."""

    def __init__(self, job: UnitJob, todo: List[Any]):
        self.job, self.todo = job, todo
        self.pool = None
        self.started = False

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        from bulk_explain.jobs.distribute import ActorPool, cluster_resources, connect, plan_workers

        job, config = self.job, self.job.config
        with ray_startup():
            self.started = connect(config.address)
        shape = plan_workers(config.workers, cluster_resources(), getattr(config, "gpus_per_worker", None))
        cls, settings, env, extra = job.worker(shape)
        # Explicit, not through runtime_env (which Ray logs): the endpoint URL may hold userinfo.
        settings = dict(settings, s3_endpoint_url=s3_endpoint(getattr(config, "s3_endpoint_url", None)))
        from bulk_explain.workers.tf_runtime import VERBOSE_ENV, tf_log_level

        quiet = {"TF_CPP_MIN_LOG_LEVEL": tf_log_level()}
        if os.environ.get(VERBOSE_ENV):
            quiet[VERBOSE_ENV] = os.environ[VERBOSE_ENV]
        options = {"num_cpus": shape["num_cpus"], "num_gpus": shape["num_gpus"],
                   "runtime_env": {"env_vars": worker_env({**quiet, **env})}, **extra}
        if hasattr(cls, "progress"):  # answers in its own thread while the unit slots are busy
            options["concurrency_groups"] = {_PROGRESS_GROUP: 1}
        count = shape["count"]
        if config.workers is None:  # no more actors than units to compute
            count = max(1, min(count, len(self.todo)))
        if shape["num_gpus"] == 0 and count > 1:
            options["scheduling_strategy"] = "SPREAD"
        job.log.message(f"starting {count} worker(s): {shape['num_cpus']} CPU, {shape['num_gpus']} GPU each")
        self.pool = ActorPool(cls, (settings,), count, options)

    def run(self, counts: RunCounts) -> None:
        import ray

        job = self.job
        self.pool.wait_ready()
        if hasattr(self.pool.actors[0], "describe"):
            job.workers_ready(ray.get([a.describe.remote() for a in self.pool.actors]))
        ready = time.perf_counter()
        counts.startup_seconds = ready - job.t0
        retries = job.max_retries()

        def done(unit, marker):
            counts.markers[unit.shard] = marker
            job.unit_done(unit, marker)

        def failed(unit, reason):
            counts.failed.append(unit.shard)
            counts.failure_reasons[unit.shard] = reason
            job.log.message(f"{job.unit_noun} {unit.shard} failed after {retries} retries: {reason}")

        stop = threading.Event()
        poller = None
        if hasattr(self.pool.actors[0], "progress"):
            poller = threading.Thread(target=self._poll_progress, args=(stop,), name="progress", daemon=True)
            poller.start()
        try:
            self.pool.run(job.process_method, counts.todo, done, failed, max_retries=retries,
                          extra_args=job.work_args())
        finally:
            stop.set()
            if poller is not None:
                poller.join(timeout=5)
        counts.processing_seconds = time.perf_counter() - ready

    def _poll_progress(self, stop: threading.Event, every_s: float = 1.0) -> None:
        """Sums the workers' per-batch counters every second. Best effort: a worker that is busy
        starting, dying or replaced is simply not counted this time."""
        import ray

        while not stop.wait(every_s):
            pool = self.pool
            if pool is None:
                return
            try:
                refs = [a.progress.options(concurrency_group=_PROGRESS_GROUP).remote() for a in pool.actors]
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=every_s)
                total = 0
                for ref in ready:
                    try:
                        total += int(ray.get(ref))
                    except Exception:
                        pass
            except Exception:
                continue
            self.job.batches_done(total)

    def __exit__(self, *exc):
        import ray

        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        if self.started:
            ray.shutdown()
            self.started = False
        return False
