"""The explain job driver: validate -> plan -> skip committed shards -> repair -> distribute -> summarize.

    from jobs import ExplainConfig, ModelSpec, run_explain
    result = run_explain(ExplainConfig(inputs=("photos/",), output="out/", model=ModelSpec("vgg16")))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

from jobs.config import ConfigError, ExplainConfig
from jobs.distribute import ActorPool, cluster_resources, connect, plan_workers
from jobs.explanations_summary import describe_explanations, summarize_explanations
from jobs.plan import ShardTask, iter_shards, list_inputs, make_plan, plan_changes, read_plan, write_plan
from jobs.progress import Progress
from workers.faults import ENV_PREFIX as _FAULT_ENV_PREFIX, fault_point
from workers.image_io import MAX_IMAGE_PIXELS, OPENCV_PIXEL_CAP_ENV
from workers.layout import OutputLayout
from workers.models import ModelError
from workers.storage import StorageError, is_temp_name


@dataclasses.dataclass
class JobResult:
    """What a finished (or failed) job did.

    Attributes:
        output: the output root.
        images: inputs in the plan.
        ok, errors: manifest rows by status (all committed shards, including skipped ones).
        shards, skipped_shards, processed_shards: shard counts.
        failed_shards: shard ids given up after retries (their images have no rows yet).
        removed_shards: shards of the previous plan that are gone (all their inputs removed).
        added_images, changed_images, removed_images: inputs new, modified (size or version) and
            gone since the previous plan in this output; removed_image_uris lists the first 1000 gone.
        rolled_forward_shards: shards committed by a run that died before publishing its part,
            published by this run.
        seconds: wall time of this run.
        images_per_second: images processed by this run / seconds.
        startup_seconds: from the start of the run until every worker had loaded its model.
        processing_seconds: from then until the last shard finished (the pipeline's own time).
        exit_code: 0 finished, 1 shards failed or error rate above the limit.
    """

    output: str
    images: int = 0
    ok: int = 0
    errors: int = 0
    shards: int = 0
    skipped_shards: int = 0
    processed_shards: int = 0
    failed_shards: List[int] = dataclasses.field(default_factory=list)
    failure_reasons: Dict[int, str] = dataclasses.field(default_factory=dict)
    removed_shards: int = 0
    added_images: int = 0
    changed_images: int = 0
    removed_images: int = 0
    removed_image_uris: List[str] = dataclasses.field(default_factory=list)
    rolled_forward_shards: int = 0
    seconds: float = 0.0
    images_processed: int = 0
    images_per_second: float = 0.0
    startup_seconds: float = 0.0
    processing_seconds: float = 0.0
    error_rate_exceeded: bool = False

    @property
    def exit_code(self) -> int:
        return 1 if (self.failed_shards or self.error_rate_exceeded) else 0

    @property
    def manifest_uri(self) -> str:
        return OutputLayout(self.output).manifest_dir

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["failure_reasons"] = {str(k): v for k, v in self.failure_reasons.items()}
        d["exit_code"] = self.exit_code
        return d


def library_versions() -> dict:
    import cv2
    import keras
    import numpy
    import pyarrow
    import ray
    import tensorflow

    return {
        "python": platform.python_version(),
        "tensorflow": tensorflow.__version__,
        "keras": keras.__version__,
        "ray": ray.__version__,
        "numpy": numpy.__version__,
        "opencv": cv2.__version__,
        "pyarrow": pyarrow.__version__,
    }


def worker_settings(config: ExplainConfig, activation_layers, target_layer, tf_threads) -> dict:
    return {
        "model": dataclasses.asdict(config.model),
        "output": config.output,
        "batch_size": config.batch_size,
        "top_k": config.top_k,
        "cam_class": config.cam_class,
        "cam_method": config.cam_method,
        "cam_score": config.cam_score,
        "target_layer": target_layer,
        "activation_layers": list(activation_layers) if activation_layers is not None else None,
        "activation_grids": config.activation_grids,
        "overlay_quality": config.overlay_quality,
        "read_threads": config.read_threads,
        "write_threads": config.write_threads,
        "tf_threads": tf_threads,
        "metrics": list(config.metrics),
        "metric_steps": config.metric_steps,
        "scorecam_channels": config.scorecam_channels,
    }


def inspect_model(config: ExplainConfig) -> dict:
    """Loads the model once in the driver: a bad model is a config error (exit 2) before any
    worker starts, and job.json gets its fingerprint, preprocessing and layers."""
    from workers.explain_step import ExplainStep
    from workers.models import load_model

    loaded = load_model(config.model)
    step = ExplainStep(loaded, batch_size=1, target_layer=config.target_layer,
                       activation_layers=config.activation_layers, method=config.cam_method,
                       cam_score=config.cam_score, top_k=config.top_k, metrics=config.metrics,
                       metric_steps=config.metric_steps, scorecam_channels=config.scorecam_channels)
    if isinstance(config.cam_class, int) and config.cam_class >= loaded.num_classes:
        raise ConfigError(f"--cam-class {config.cam_class} is out of range: the model has {loaded.num_classes} classes")
    info = loaded.describe()
    info.update(
        fingerprint=loaded.fingerprint(),
        target_layer=step.target_layer,
        activation_layers=step.activation_layers,
        class_names_sample=loaded.class_names[:10],
    )
    return info


def _read_json(storage, uri) -> Optional[dict]:
    try:
        return json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, KeyError):
        return None
    except Exception as exc:
        if type(exc).__name__ in ("NoSuchKey", "ClientError") or "Not Found" in str(exc) or "404" in str(exc):
            return None
        raise


@dataclasses.dataclass
class _OutputFiles:
    """What a previous run left under DST, by shard id."""

    parts: Dict[int, str] = dataclasses.field(default_factory=dict)  # manifest/ (visible)
    markers: Dict[int, str] = dataclasses.field(default_factory=dict)  # _commits/
    staged: Dict[int, str] = dataclasses.field(default_factory=dict)  # _staging/
    temps: List[str] = dataclasses.field(default_factory=list)  # crashed atomic writes

    def shards(self):
        return set(self.parts) | set(self.markers) | set(self.staged)

    def uris_of(self, shard: int) -> List[str]:
        # Visible part first: if deleting stops half-way, the shard is at worst invisible.
        return [d[shard] for d in (self.parts, self.markers, self.staged) if shard in d]


def _existing_files(layout: OutputLayout) -> _OutputFiles:
    files = _OutputFiles()
    for folder, kind in ((layout.manifest_dir, files.parts), (layout.commits_dir, files.markers),
                         (layout.staging_dir, files.staged)):
        for uri in layout.storage.list_names(folder):
            shard = OutputLayout.shard_of(uri)
            if is_temp_name(uri):
                files.temps.append(uri)
            elif shard is not None:
                kind[shard] = uri
    return files


def _read_markers(storage, layout: OutputLayout, shards: List[int]) -> Dict[int, dict]:
    """Reads commit markers concurrently (thousands of small GETs on S3)."""
    if not shards:
        return {}
    with ThreadPoolExecutor(min(16, len(shards))) as pool:
        found = pool.map(lambda s: _read_json(storage, layout.commit_marker(s)), shards)
        return {s: m for s, m in zip(shards, found) if m}


def _staged_matches(storage, uri: str, task: ShardTask) -> bool:
    """A staged part can be published only if it holds exactly this shard's inputs and versions."""
    import io

    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["source_uri", "source_version"])
    except Exception:
        return False
    rows = ShardTask(task.shard, table.column("source_uri").to_pylist(), [], [],
                     table.column("source_version").to_pylist())
    return rows.uris == task.uris and rows.content_hash == task.content_hash


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def _redacted(value):
    """Strips `user:password@` from URLs anywhere in a JSON-like value (job.json never holds secrets)."""
    if isinstance(value, str):
        return _USERINFO.sub("***@", value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(v) for v in value]
    return value


class JobInterrupted(SystemExit):
    """SIGTERM while a job runs: raised in the main thread so that workers are stopped and Ray shut
    down on the way out; the process exits 143 (128 + SIGTERM) unless the caller catches it."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


def _raise_interrupted(signum, frame):
    global _sigterm_received
    _sigterm_received = True
    raise JobInterrupted()


_sigterm_owned = False  # True while run_explain owns the SIGTERM handler
_sigterm_received = False


@contextlib.contextmanager
def _sigterm_raises():
    global _sigterm_owned, _sigterm_received
    _sigterm_received = False
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield  # not ours to change: another thread, or the caller has its own handler
        return
    signal.signal(signal.SIGTERM, _raise_interrupted)
    _sigterm_owned = True
    try:
        yield
    finally:
        _sigterm_owned = False
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _reclaim_sigterm() -> None:
    """ray.init installs its own SIGTERM handler (sys.exit(15)); put ours back."""
    if _sigterm_owned and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)


def run_explain(config: ExplainConfig, progress: bool = True) -> JobResult:
    """Runs the bulk explain job: every image under `config.inputs` gets a manifest row, a Grad-CAM
    heatmap and overlay; committed shards of a previous identical run are skipped.

    Args:
        config: the job configuration (validated here, before Ray starts).
        progress: print shard progress, images/s and ETA to stderr.

    Returns:
        JobResult (see its exit_code).

    Raises:
        ConfigError: bad configuration or model (the CLI exits 2).
        WorkerStartError: no worker could load the model (the CLI exits 1).
        KeyboardInterrupt, JobInterrupted: Ctrl-C / SIGTERM; committed shards are kept and the
            same call resumes.
    """
    with _sigterm_raises():
        return _run_explain(config, progress)


def _run_explain(config: ExplainConfig, progress: bool) -> JobResult:
    t0 = time.perf_counter()
    config = config.validated()
    layout = OutputLayout(config.output)
    storage = layout.storage
    fingerprint = config.result_fingerprint()

    previous = _read_json(storage, layout.job_json)
    if previous and not config.overwrite and previous.get("result_fingerprint") != fingerprint:
        raise ConfigError(_DIFFERENT_JOB.format(output=config.output))

    try:
        listing = list_inputs(config.inputs)
    except StorageError as exc:
        raise ConfigError(str(exc)) from None
    # Inputs already planned by an earlier run keep their shard: adding, changing or removing
    # images re-processes only the shards that hold them.
    previous_plan = None if config.overwrite else read_plan(layout.plan)
    changes = plan_changes(previous_plan, listing)
    plan = make_plan(listing, config.shard_size, previous=previous_plan)
    del listing, previous_plan
    tasks = list(iter_shards(plan))
    plan_ids = {t.shard for t in tasks}

    files = _existing_files(layout)
    found = {} if config.overwrite else _read_markers(storage, layout, [t.shard for t in tasks if t.shard in files.markers])
    markers: Dict[int, dict] = {}
    roll_forward: List[ShardTask] = []
    todo: List[ShardTask] = []
    for task in tasks:
        marker = found.get(task.shard)
        if not (marker and marker.get("content_hash") == task.content_hash
                and marker.get("result_fingerprint") == fingerprint):
            todo.append(task)
        elif task.shard in files.parts:
            markers[task.shard] = marker
        elif task.shard in files.staged:
            roll_forward.append(task)  # committed, then the run died before publishing
        else:
            todo.append(task)

    # The model is checked (and fingerprinted) here, before Ray starts, so a bad model is a one-line
    # exit-2 error and not N failing actors. It costs one extra model load in the driver.
    try:
        model_info = inspect_model(config)
    except (ModelError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if previous and not config.overwrite and previous.get("model", {}).get("fingerprint") != model_info["fingerprint"]:
        raise ConfigError(_DIFFERENT_JOB.format(output=config.output))

    # Nothing is written to DST before this point: a refused job leaves it untouched.
    result = JobResult(output=config.output, images=plan.num_rows, shards=len(tasks),
                       added_images=changes.added, changed_images=changes.changed,
                       removed_images=changes.removed, removed_image_uris=changes.removed_uris)
    _repair(layout, files, plan_ids, todo, roll_forward, found, markers, result)
    result.skipped_shards = len(markers)
    fault_point("planned")
    write_plan(plan, layout.plan)
    job = {
        "kind": "explain",
        "config": _redacted(config.to_dict()),
        "result_fingerprint": fingerprint,
        "model": model_info,
        "versions": library_versions(),
        "started_at": time.time(),
        "images": plan.num_rows,
        "shards": len(tasks),
        "explanations": describe_explanations(config),
    }
    storage.write_bytes(layout.job_json, json.dumps(job, indent=2, default=str).encode())

    log = Progress(total_shards=len(tasks), skipped=len(markers), enabled=progress,
                   images_todo=sum(len(t) for t in todo))
    if previous:
        log.message(f"since the last plan: {changes.added} images added, {changes.changed} changed, "
                    f"{changes.removed} removed")
    if changes.removed:
        more = f" (and {changes.removed - len(changes.removed_uris)} more)" if changes.removed > len(changes.removed_uris) else ""
        log.message(f"removed images no longer in the manifest: {', '.join(changes.removed_uris[:5])}"
                    f"{' ...' if changes.removed > 5 else ''}{more}")
    if result.rolled_forward_shards:
        log.message(f"published {result.rolled_forward_shards} shards committed by an interrupted run")
    if markers:
        log.message(f"{len(markers)} shards already committed, skipping them")
    try:
        with _Workers(config, needed=bool(todo), log=log) as workers:
            if todo:
                workers.run(todo, markers, result, t0)
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ray's wait() turns an exception raised by a signal handler into SystemExit(1): the flag
        # says whether it was our SIGTERM.
        sigterm = isinstance(exc, JobInterrupted) or _sigterm_received
        log.message(f"interrupted ({'SIGTERM' if sigterm else type(exc).__name__}); "
                    f"{len(markers)} committed shards are kept, re-run the same command to resume")
        if sigterm and not isinstance(exc, JobInterrupted):
            raise JobInterrupted() from None
        raise
    result.processed_shards = len(todo) - len(result.failed_shards)
    for marker in markers.values():
        result.ok += marker["ok"]
        result.errors += marker["error"]
    result.seconds = time.perf_counter() - t0
    result.images_processed = sum(len(t) for t in todo if t.shard not in result.failed_shards)
    result.images_per_second = result.images_processed / result.seconds if result.seconds else 0.0
    rows = result.ok + result.errors
    result.error_rate_exceeded = bool(rows and result.errors / rows > config.max_error_rate)
    summary = result.to_dict()
    summary["finished_at"] = time.time()
    summary["explanations"] = summarize_explanations(layout, config)
    storage.write_bytes(layout.summary_json, json.dumps(summary, indent=2).encode())
    log.finish(result)
    return result


def _repair(layout: OutputLayout, files: _OutputFiles, plan_ids, todo: List[ShardTask],
            roll_forward: List[ShardTask], found: Dict[int, dict], markers: Dict[int, dict],
            result: JobResult) -> None:
    """Makes DST's visible state match the new plan before any worker starts: afterwards every
    visible part belongs to a shard committed for this plan, so a reader never sees a row twice or
    a stale row, whatever crashed before.

    - temp files of crashed writes are deleted;
    - shards no longer in the plan lose their part, marker, staged part and image files;
    - committed-but-unpublished shards are published from `_staging/` (or redone if that fails);
    - every shard to (re)do loses its visible part first, then its marker and staged part.
    """
    storage = layout.storage
    for uri in files.temps:
        storage.delete(uri)
    gone = sorted(s for s in files.shards() if s not in plan_ids)
    for shard in gone:
        for uri in files.uris_of(shard):
            storage.delete(uri)
        for folder in layout.shard_image_dirs(shard):
            for uri in list(storage.list_names(folder)):
                storage.delete(uri)
    result.removed_shards = len(gone)
    for task in roll_forward:
        staged = files.staged[task.shard]
        if _staged_matches(storage, staged, task):
            storage.write_bytes(layout.manifest_part(task.shard), storage.read_bytes(staged))
            storage.delete(staged)
            markers[task.shard] = found[task.shard]
            result.rolled_forward_shards += 1
        else:
            todo.append(task)
    todo.sort(key=lambda t: t.shard)
    for task in todo:
        for uri in files.uris_of(task.shard):
            storage.delete(uri)


_DIFFERENT_JOB = ("{output} holds results of a different configuration or model; "
                  "use a new --output or pass --overwrite to replace them")


class _Workers:
    """Ray connection and actor pool for one job, started on enter only if there is work."""

    def __init__(self, config: ExplainConfig, needed: bool, log: Progress):
        self.config, self.needed, self.log = config, needed, log
        self.pool = None
        self.started = False

    def __enter__(self):
        if not self.needed:
            return self
        config = self.config
        self.started = connect(config.address)
        _reclaim_sigterm()
        shape = plan_workers(config.workers, cluster_resources(), config.gpus_per_worker)
        settings = worker_settings(config, config.activation_layers, config.target_layer, shape["tf_threads"])
        # OpenCV reads its pixel cap once, when cv2 loads: set it before the worker imports anything.
        env = {"TF_CPP_MIN_LOG_LEVEL": "2", OPENCV_PIXEL_CAP_ENV: str(MAX_IMAGE_PIXELS)}
        for var in ("BULK_EXPLAIN_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            if os.environ.get(var):
                env[var] = os.environ[var]
        env.update({k: v for k, v in os.environ.items() if k.startswith(_FAULT_ENV_PREFIX)})
        options = {"num_cpus": shape["num_cpus"], "num_gpus": shape["num_gpus"],
                   "runtime_env": {"env_vars": env}}
        if shape["num_gpus"] == 0 and shape["count"] > 1:
            options["scheduling_strategy"] = "SPREAD"
        from workers.shard_worker import ExplainWorker

        self.log.message(f"starting {shape['count']} worker(s): {shape['num_cpus']} CPU, {shape['num_gpus']} GPU each")
        try:
            self.pool = ActorPool(ExplainWorker, (settings,), shape["count"], options)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def run(self, todo: List[ShardTask], markers: Dict[int, dict], result: JobResult, t0: float) -> None:
        config, log = self.config, self.log
        self.pool.wait_ready()
        ready = time.perf_counter()
        result.startup_seconds = ready - t0

        def done(task, marker):
            markers[task.shard] = marker
            log.shard_done(len(task), marker)

        def failed(task, reason):
            result.failed_shards.append(task.shard)
            result.failure_reasons[task.shard] = reason
            log.message(f"shard {task.shard} failed after {config.max_shard_retries} retries: {reason}")

        self.pool.run("process_shard", todo, done, failed, max_retries=config.max_shard_retries,
                      extra_args=(config.result_fingerprint(),))
        result.processing_seconds = time.perf_counter() - ready

    def __exit__(self, *exc):
        import ray

        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        if self.started:
            ray.shutdown()
            self.started = False
        return False
