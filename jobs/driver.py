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

from jobs.config import NON_RESULT_FIELDS, ConfigError, ExplainConfig
from jobs.distribute import ActorPool, cluster_resources, connect, plan_workers
from jobs.plan import ShardTask, iter_shards, list_inputs, make_plan, plan_changes, read_plan, write_plan
from jobs.progress import Progress
from workers.faults import ENV_PREFIX as _FAULT_ENV_PREFIX, fault_point
from workers.image_io import MAX_IMAGE_PIXELS, OPENCV_PIXEL_CAP_ENV
from workers.layout import OutputLayout
from workers.environment import EnvironmentProblem
from workers.labels import LabelMatcher, describe_unmatched
from workers.models import ModelError
from workers.storage import StorageError, is_temp_name
from workers.tf_runtime import VERBOSE_ENV, import_tensorflow_quietly, quiet_console, quiet_warnings, tf_log_level


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
    max_error_rate: float = 1.0

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
    }


def inspect_model(config: ExplainConfig) -> dict:
    """Loads the model once in the driver: a bad model is a config error (exit 2) before any
    worker starts, and job.json gets its fingerprint, preprocessing and layers."""
    from workers.explain_step import ExplainStep
    from workers.models import load_model

    with quiet_warnings():
        loaded = load_model(config.model)
    step = ExplainStep(loaded, batch_size=1, target_layer=config.target_layer,
                       activation_layers=config.activation_layers, method=config.cam_method,
                       cam_score=config.cam_score, top_k=config.top_k)
    if isinstance(config.cam_class, int) and config.cam_class >= loaded.num_classes:
        raise ConfigError(f"--cam-class {config.cam_class} is out of range: the model has {loaded.num_classes} classes")
    info = loaded.describe()
    info.update(
        fingerprint=loaded.fingerprint(),
        target_layer=step.target_layer,
        activation_layers=step.activation_layers,
        class_names_sample=loaded.class_names[:10],
    )
    info[_CLASS_NAMES] = list(loaded.class_names)  # for the label check; not written to job.json
    return info


_CLASS_NAMES = "_class_names"


def check_labels(config: ExplainConfig, plan, class_names, log: Progress) -> None:
    """With `--cam-class label`, folders whose name matches no class would silently explain the
    prediction: warn with counts per folder, or with `strict_labels` refuse the job (exit 2)."""
    import pyarrow.compute as pc

    if config.cam_class != "label" or plan.num_rows == 0:
        return
    counts = pc.value_counts(plan.column("label")).to_pylist()
    pairs = [(c["values"], c["counts"]) for c in counts]
    unmatched = LabelMatcher(class_names).unmatched(pairs)
    no_folder = sum(n for label, n in pairs if label is None)
    if not unmatched and not no_folder:
        return
    names = ", ".join(class_names[:5]) + (", ..." if len(class_names) > 5 else "")
    parts = []
    if unmatched:
        parts.append(f"folders that name no class of the model ({names}): {describe_unmatched(unmatched)}")
    if no_folder:
        parts.append(f"{no_folder} images directly in an input folder (no label)")
    if config.strict_labels:
        raise ConfigError(f"--cam-class label with --strict-labels: {'; '.join(parts)}")
    images = sum(unmatched.values()) + no_folder
    log.message(f"warning: {images} images explain their predicted class instead of their label: "
                f"{'; '.join(parts)} (--strict-labels makes this an error)")


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
    quiet_console()
    config = config.validated()
    layout = OutputLayout(config.output)
    storage = layout.storage
    fingerprint = config.result_fingerprint()
    log = Progress(total_shards=0, skipped=0, enabled=progress, images_todo=0)
    _check_access(config)

    previous = _read_json(storage, layout.job_json)
    if previous and not config.overwrite and previous.get("result_fingerprint") != fingerprint:
        raise ConfigError(_DIFFERENT_JOB.format(output=config.output, what=_config_diff(previous, config)))

    try:
        listing = list_inputs(config.inputs)
    except StorageError as exc:
        raise ConfigError(str(exc)) from None
    found_inputs = listing.num_rows
    limited = None
    if config.limit is not None and listing.num_rows > config.limit:
        listing, limited = _limit_listing(listing, config.limit, None if config.overwrite else read_plan(layout.plan))
    # Inputs already planned by an earlier run keep their shard: adding, changing or removing
    # images re-processes only the shards that hold them.
    previous_plan = None if config.overwrite else read_plan(layout.plan)
    changes = plan_changes(previous_plan, listing)
    plan = make_plan(listing, config.shard_size, previous=previous_plan)
    del listing, previous_plan
    tasks = list(iter_shards(plan))
    plan_ids = {t.shard for t in tasks}
    if limited is not None:  # only the shards holding one of the first N inputs are processed now
        in_scope = {t.shard for t in tasks if any(u in limited for u in t.uris)}
    else:
        in_scope = plan_ids
    withdrawn: List[ShardTask] = []  # out of --limit's scope and not committed for this plan

    files = _existing_files(layout)
    found = {} if config.overwrite else _read_markers(storage, layout, [t.shard for t in tasks if t.shard in files.markers])
    markers: Dict[int, dict] = {}
    roll_forward: List[ShardTask] = []
    todo: List[ShardTask] = []
    for task in tasks:
        marker = found.get(task.shard)
        if task.shard not in in_scope:
            if (marker and marker.get("content_hash") == task.content_hash
                    and marker.get("result_fingerprint") == fingerprint and task.shard in files.parts):
                markers[task.shard] = marker  # committed earlier: counted, kept
            else:
                withdrawn.append(task)  # its old part would be stale: hidden until a full run
            continue
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
    # TensorFlow loads only now (seconds): the access, config and listing checks above answer fast.
    import_tensorflow_quietly()  # before anything else imports it: its C++ start-up lines go to fd 2
    try:
        model_info = inspect_model(config)
    except (ModelError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    class_names = model_info.pop(_CLASS_NAMES)
    if previous and not config.overwrite and previous.get("model", {}).get("fingerprint") != model_info["fingerprint"]:
        raise ConfigError(_DIFFERENT_JOB.format(
            output=config.output, what="the model's weights or architecture (its fingerprint differs)"))
    check_labels(config, plan, class_names, log)
    # After the checks (an error stays one line), before Ray starts (the slow part of a small run).
    log.message(f"found {found_inputs} inputs"
                + (f" (--limit {config.limit}: using the first {config.limit})" if limited is not None else "")
                + f"; {sum(len(t) for t in todo)} to process in {len(todo)} of {len(tasks)} shards")

    # Nothing is written to DST before this point: a refused job leaves it untouched.
    result = JobResult(output=config.output, images=plan.num_rows, shards=len(tasks),
                       added_images=changes.added, changed_images=changes.changed,
                       removed_images=changes.removed, removed_image_uris=changes.removed_uris)
    try:
        _repair(layout, files, plan_ids, todo, roll_forward, found, markers, result)
        for task in withdrawn:
            for uri in files.uris_of(task.shard):
                storage.delete(uri)
        result.skipped_shards = len(markers)
        fault_point("planned")
        write_plan(plan, layout.plan)
    except PermissionError as exc:
        raise EnvironmentProblem(f"cannot write output {config.output}: {exc}; check the permissions "
                                 "(or credentials) for this output, or choose another --output") from None
    job = {
        "kind": "explain",
        "config": _redacted(config.to_dict()),
        "result_fingerprint": fingerprint,
        "model": model_info,
        "versions": library_versions(),
        "started_at": time.time(),
        "images": plan.num_rows,
        "shards": len(tasks),
    }
    storage.write_bytes(layout.job_json, json.dumps(job, indent=2, default=str).encode())

    log.reset(total_shards=len(tasks), skipped=len(markers), images_todo=sum(len(t) for t in todo))
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
    result.max_error_rate = config.max_error_rate
    summary = result.to_dict()
    summary["finished_at"] = time.time()
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


_DIFFERENT_JOB = ("{output} holds results of a different configuration or model ({what}); "
                  "use a new --output or pass --overwrite to replace them")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ExplainConfig fields -> the option a user passes (names that differ from --field-name).
_OPTION_OF = {"model.kind": "--model", "model.weights": "--weights", "model.model_file": "--model-file",
              "model.class_names_file": "--class-names", "model.seed": "--seed"}


def _config_diff(previous: dict, config: ExplainConfig) -> str:
    """Which result-changing settings differ between DST/job.json and this run, e.g.
    `--cam-method: gradcam then, layercam now`."""
    old = dict(previous.get("config") or {})
    new = _redacted(config.to_dict())
    ignored = set(NON_RESULT_FIELDS)
    old_flat = {k: v for k, v in _flat(old).items() if k.split(".")[0] not in ignored}
    new_flat = {k: v for k, v in _flat(new).items() if k.split(".")[0] not in ignored}
    diffs = []
    for key in sorted(set(old_flat) | set(new_flat)):
        a, b = old_flat.get(key), new_flat.get(key)
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b:
            option = _OPTION_OF.get(key, "--" + key.split(".")[-1].replace("_", "-"))
            diffs.append(f"{option}: {_show(a)} then, {_show(b)} now")
    return "; ".join(diffs[:3]) + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "") if diffs \
        else "an earlier version of the settings"


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "unset" if value is None else str(value)


def _check_access(config: ExplainConfig) -> None:
    """Credentials, endpoints and output permissions, checked before the model loads (exit 5)."""
    from workers.storage import storage_for

    try:
        for uri in config.inputs:
            storage_for(uri).check_access(uri, write=False)
        storage_for(config.output).check_access(config.output, write=True)
    except StorageError as exc:  # e.g. a bucket that does not exist: the command line is wrong
        raise ConfigError(str(exc)) from None


def _limit_listing(listing, limit: int, previous_plan):
    """`--limit N`: the first N inputs of the sorted listing, plus the inputs an earlier plan in this
    output already holds that still exist (so a limited run never reports them removed or drops
    their committed shards). Returns (listing to plan, set of the first N URIs)."""
    import pyarrow.compute as pc

    first = listing.slice(0, limit)
    wanted = set(first.column("source_uri").to_pylist())
    if previous_plan is None or previous_plan.num_rows == 0:
        return first, wanted
    keep = pc.or_(pc.is_in(listing.column("source_uri"), value_set=previous_plan.column("source_uri").combine_chunks()),
                  pc.is_in(listing.column("source_uri"), value_set=first.column("source_uri").combine_chunks()))
    return listing.filter(keep), wanted


_PROGRESS_GROUP = "progress"


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
        env = {"TF_CPP_MIN_LOG_LEVEL": tf_log_level(), OPENCV_PIXEL_CAP_ENV: str(MAX_IMAGE_PIXELS)}
        for var in ("BULK_EXPLAIN_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", VERBOSE_ENV):
            if os.environ.get(var):
                env[var] = os.environ[var]
        env.update({k: v for k, v in os.environ.items() if k.startswith(_FAULT_ENV_PREFIX)})
        options = {"num_cpus": shape["num_cpus"], "num_gpus": shape["num_gpus"],
                   "runtime_env": {"env_vars": env},
                   # `progress` answers in its own thread while both shard slots are busy.
                   "concurrency_groups": {_PROGRESS_GROUP: 1}}
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

        stop = threading.Event()
        poller = threading.Thread(target=self._poll_progress, args=(stop,), name="progress", daemon=True)
        poller.start()

        def failed(task, reason):
            result.failed_shards.append(task.shard)
            result.failure_reasons[task.shard] = reason
            log.message(f"shard {task.shard} failed after {config.max_shard_retries} retries: {reason}")

        try:
            self.pool.run("process_shard", todo, done, failed, max_retries=config.max_shard_retries,
                          extra_args=(config.result_fingerprint(),))
        finally:
            stop.set()
            poller.join(timeout=5)
        result.processing_seconds = time.perf_counter() - ready

    def _poll_progress(self, stop: threading.Event, every_s: float = 1.0) -> None:
        """Sums the workers' per-batch counters every second for `Progress.batches_done`. Best
        effort: a worker that is busy starting, dying or replaced is simply not counted this time."""
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
            self.log.batches_done(total)

    def __exit__(self, *exc):
        import ray

        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        if self.started:
            ray.shutdown()
            self.started = False
        return False
