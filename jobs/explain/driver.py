"""The explain job driver: validate -> plan -> skip committed shards -> repair -> distribute -> summarize.

    from bulk_explain.jobs import ExplainConfig, ModelSpec, run_explain
    result = run_explain(ExplainConfig(inputs=("photos/",), output="out/", model=ModelSpec("vgg16")))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

from bulk_explain.jobs.explain.config import MAX_REMOVED_SHARE, NON_RESULT_FIELDS, ConfigError, ExplainConfig
from bulk_explain.jobs.distribute import ActorPool, cluster_resources, connect, plan_workers
from bulk_explain.jobs.explain.explanations_summary import describe_explanations, summarize_explanations
from bulk_explain.jobs.explain.plan import (PlanChanges, PlannedShard, ShardTask, list_inputs, make_plan, match_previous, plan_changes,
                       plan_shards, read_plan, write_plan)
from bulk_explain.jobs.progress import Progress
from bulk_explain.jobs.runtime import (JobInterrupted, as_job_interrupt, ray_startup, read_json as _read_json,
                          redacted as _redacted, s3_endpoint, s3_storage_configured, sigterm_raises,
                          worker_env)
from bulk_explain.workers.faults import fault_point
from bulk_explain.workers.image_io import MAX_IMAGE_PIXELS, OPENCV_PIXEL_CAP_ENV
from bulk_explain.workers.backends import BackendError, BACKEND_ENV, select_backend
from bulk_explain.workers.layout import OutputLayout
from bulk_explain.workers.environment import EnvironmentProblem
from bulk_explain.workers.explain.labels import LabelMatcher, describe_unmatched
from bulk_explain.workers.lease import LeaseOptions, hold_output_lease
from bulk_explain.workers.models import ModelError
from bulk_explain.workers.storage import IMAGE_EXTENSIONS, StorageError, is_temp_name
from bulk_explain.workers.tf_runtime import VERBOSE_ENV, import_backend_quietly, quiet_console, quiet_warnings, tf_log_level
from bulk_explain.workers.explain.writer import marker_agrees, read_part_commit


@dataclasses.dataclass
class JobResult:
    """What a finished (or failed) job did.

    Attributes:
        output: the output root.
        images: inputs in the plan.
        ok, errors: manifest rows by status (all committed shards, including skipped ones).
        empty_maps: ok rows whose CAM is all zeros (no peak; try --cam-method layercam).
        shards, skipped_shards, processed_shards: shard counts.
        failed_shards: shard ids given up after retries (their images have no rows yet).
        removed_shards: shards of the previous plan that are gone (all their inputs removed).
        added_images, changed_images, removed_images: inputs new, modified (size or version) and
            gone since the previous plan in this output; removed_image_uris lists the first 1000 gone.
        rolled_forward_shards: shards committed by a run that died before publishing its part,
            published by this run.
        mismatched_shards: shards whose visible part was not the one their marker committed
            (another attempt's or forged), redone by this run.
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
    mismatched_shards: int = 0
    seconds: float = 0.0
    images_processed: int = 0
    images_per_second: float = 0.0
    startup_seconds: float = 0.0
    processing_seconds: float = 0.0
    error_rate_exceeded: bool = False
    empty_maps: int = 0  # ok rows whose CAM is all zeros (null peaks, cam_empty in the manifest)
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

    from bulk_explain.workers.backends import get_backend

    return {
        "python": platform.python_version(),
        **get_backend().versions(),  # tensorflow, or jax + jaxlib (TF is not imported under jax)
        "keras": keras.__version__,
        "ray": ray.__version__,
        "numpy": numpy.__version__,
        "opencv": cv2.__version__,
        "pyarrow": pyarrow.__version__,
    }


def worker_settings(config: ExplainConfig, activation_layers, target_layer, tf_threads, cpus=None) -> dict:
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
        "max_decoded_bytes": config.max_decoded_bytes,
        "backend": config.backend,
        "precision": config.precision,
        "overlay_max_side": config.overlay_max_side,
        "cpus": cpus,  # the CPUs the worker holds: sizes its read/write pools when not given
        "shard_size": config.shard_size,
        "metrics": list(config.metrics),
        "metric_steps": config.metric_steps,
        "scorecam_channels": config.scorecam_channels,
    }


def inspect_model(config: ExplainConfig) -> dict:
    """Loads the model once in the driver: a bad model is a config error (exit 2) before any
    worker starts, and job.json gets its fingerprint, preprocessing and layers."""
    from bulk_explain.workers.explain.explain_step import ExplainStep
    from bulk_explain.workers.models import load_model

    with quiet_warnings():
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


def _read_part_commits(storage, layout: OutputLayout, shards: List[int]) -> Dict[int, Optional[dict]]:
    """Reads the commit identity in the footer of each shard's visible part, concurrently."""
    if not shards:
        return {}
    with ThreadPoolExecutor(min(16, len(shards))) as pool:
        found = pool.map(lambda s: read_part_commit(storage, layout.manifest_part(s)), shards)
        return dict(zip(shards, found))


def _staged_matches(storage, uri: str, task, marker: Optional[dict] = None) -> bool:
    """A staged part can be published only if it is the part `marker` committed (same attempt and
    content hash in its footer) and holds exactly this shard's inputs and versions."""
    import io

    import pyarrow.parquet as pq

    if marker is not None and not marker_agrees(marker, read_part_commit(storage, uri)):
        return False
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["source_uri", "source_version"])
    except Exception:
        return False
    rows = ShardTask(task.shard, table.column("source_uri").to_pylist(), [], [],
                     table.column("source_version").to_pylist())
    return rows.uris == task.uris and rows.content_hash == task.content_hash


def run_explain(config: ExplainConfig, progress: bool = True, lease: Optional[LeaseOptions] = None) -> JobResult:
    """Runs the bulk explain job: every image under `config.inputs` gets a manifest row, a Grad-CAM
    heatmap and overlay; committed shards of a previous identical run are skipped.

    Args:
        config: the job configuration (validated here, before Ray starts).
        progress: print shard progress, images/s and ETA to stderr.
        lease: how to treat another run's lease on the output (wait, break); None: give up at once.

    Returns:
        JobResult (see its exit_code).

    Raises:
        ConfigError: bad configuration or model (the CLI exits 2).
        OutputBusy: another run holds the output's lease (the CLI exits 4).
        WorkerStartError: no worker could load the model (the CLI exits 1).
        KeyboardInterrupt, JobInterrupted: Ctrl-C / SIGTERM; committed shards are kept and the
            same call resumes.
    """
    with sigterm_raises(), s3_storage_configured(config.s3_endpoint_url), contextlib.ExitStack() as held:
        return _run_explain(config, progress, lambda output: held.enter_context(hold_output_lease(output, lease)))


def _run_explain(config: ExplainConfig, progress: bool, take_lease=lambda output: None) -> JobResult:
    t0 = time.perf_counter()
    quiet_console()
    config = config.validated()
    try:
        # The driver loads the model too: Keras must run the job's backend here before it is imported.
        select_backend(config.backend)
    except BackendError as exc:
        raise ConfigError(str(exc)) from None
    # Credentials, endpoint and write access first (exit 5, one line naming the fix): the lease
    # is the first write to DST and would otherwise fail with a raw storage error.
    _check_access(config)
    take_lease(config.output)  # DST/_lease.json (workers/lease.py): one run per output until we return
    layout = OutputLayout(config.output)
    storage = layout.storage
    fingerprint = config.result_fingerprint()
    log = Progress(total_shards=0, skipped=0, enabled=progress, images_todo=0)

    previous = _read_json(storage, layout.job_json)
    if previous and not config.overwrite and previous.get("result_fingerprint") != fingerprint:
        raise ConfigError(_DIFFERENT_JOB.format(output=config.output, what=_config_diff(previous, config)))

    planned = plan_job(config, layout, fingerprint)
    plan, tasks, changes, files = planned.plan, planned.shards, planned.changes, planned.files
    found, markers, roll_forward, todo = planned.found, planned.markers, planned.roll_forward, planned.todo
    found_inputs, limited, withdrawn = planned.found_inputs, planned.limited, planned.withdrawn
    plan_ids = {t.shard for t in tasks}

    # The model is checked (and fingerprinted) here, before Ray starts, so a bad model is a one-line
    # exit-2 error and not N failing actors. It costs one extra model load in the driver.
    # TensorFlow loads only now (seconds): the access, config and listing checks above answer fast.
    import_backend_quietly(config.backend)  # TensorFlow (quietly: its C++ start-up lines go to fd 2) or JAX
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
                       removed_images=changes.removed, removed_image_uris=changes.removed_uris,
                       mismatched_shards=planned.mismatched)
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
        "explanations": describe_explanations(config),
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
    if result.mismatched_shards:
        log.message(f"redoing {result.mismatched_shards} shards whose visible part is not the one their "
                    "commit marker names (interleaved runs or a replaced file)")
    if result.rolled_forward_shards:
        log.message(f"published {result.rolled_forward_shards} shards committed by an interrupted run")
    if markers:
        log.message(f"{len(markers)} shards already committed, skipping them")
    try:
        with _Workers(config, needed=bool(todo), log=log, model_fingerprint=model_info["fingerprint"]) as workers:
            if todo:
                workers.on_ready = lambda described: _record_workers(storage, layout, job, described)
                workers.run(todo, markers, result, t0)
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ray's wait() turns an exception raised by a signal handler into SystemExit(1):
        # as_job_interrupt says whether it was our SIGTERM.
        interrupt = as_job_interrupt(exc)
        sigterm = isinstance(interrupt, JobInterrupted)
        log.message(f"interrupted ({'SIGTERM' if sigterm else type(exc).__name__}); "
                    f"{len(markers)} committed shards are kept, re-run the same command to resume")
        if interrupt is not exc:
            raise interrupt from None
        raise
    result.processed_shards = len(todo) - len(result.failed_shards)
    for marker in markers.values():
        result.ok += marker["ok"]
        result.errors += marker["error"]
        result.empty_maps += marker.get("empty_maps", 0)
    result.seconds = time.perf_counter() - t0
    failed = set(result.failed_shards)
    result.images_processed = sum(len(t) for t in todo if t.shard not in failed)
    result.images_per_second = result.images_processed / result.seconds if result.seconds else 0.0
    rows = result.ok + result.errors
    result.error_rate_exceeded = bool(rows and result.errors / rows > config.max_error_rate)
    result.max_error_rate = config.max_error_rate
    summary = result.to_dict()
    summary["finished_at"] = time.time()
    summary["explanations"] = summarize_explanations(layout, config)
    storage.write_bytes(layout.summary_json, json.dumps(summary, indent=2).encode())
    if result.empty_maps:
        log.message(f"{result.empty_maps} images have an all-zero {config.cam_method} map (null peaks, "
                    f"cam_empty in the manifest); --cam-method layercam or gradcam++ localizes them")
    log.finish(result)
    return result


@dataclasses.dataclass
class PlannedJob:
    """What `plan_job` decided, before anything in DST is touched."""

    plan: object  # pyarrow.Table, PLAN_SCHEMA
    shards: List[PlannedShard]
    changes: PlanChanges
    files: "_OutputFiles"
    found: Dict[int, dict]  # markers read, by shard
    markers: Dict[int, dict]  # committed shards (marker and visible part agree)
    roll_forward: List[PlannedShard]
    todo: List[PlannedShard]
    mismatched: int = 0
    found_inputs: int = 0  # images the listing found (before --limit)
    limited: Optional[set] = None  # --limit: the first N URIs, else None
    withdrawn: List[PlannedShard] = dataclasses.field(default_factory=list)  # out of --limit's scope, not committed


def _searched(config: ExplainConfig) -> str:
    exts = "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    return f"{', '.join(config.inputs)} (recursively, for {exts} files)"


def _check_removals(config: ExplainConfig, found: int, previous, changes: PlanChanges) -> None:
    """Refuses a listing that finds nothing or drops most of the previous plan: an unmounted share,
    a moved folder or a typo must not delete a finished audit.

    Raises:
        ConfigError: unless `config.allow_removals` (and there is something to remove).
    """
    before = previous.num_rows if previous is not None else 0
    if found == 0 and not (config.allow_removals and before):
        if before:
            raise ConfigError(f"no images found under {_searched(config)}, but the previous run in "
                              f"{config.output} planned {before}; is the input mounted? Pass --allow-removals "
                              "to remove every earlier result")
        raise ConfigError(f"no images found under {_searched(config)}")
    if before and changes.removed > MAX_REMOVED_SHARE * before and not config.allow_removals:
        first = changes.removed_uris[0] if changes.removed_uris else ""
        raise ConfigError(f"{changes.removed} of the {before} images of the previous run in {config.output} are "
                          f"gone (more than {MAX_REMOVED_SHARE:.0%}, e.g. {first}); is the input mounted? Pass "
                          "--allow-removals if the removal is intended")


def _release_memory() -> None:
    """Hands Arrow's freed pages back to the OS after the big temporaries of planning (mimalloc and
    jemalloc keep them otherwise, which would count towards the driver's peak)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def plan_job(config: ExplainConfig, layout: OutputLayout, fingerprint: str) -> PlannedJob:
    """Lists the inputs, plans shards and sorts them into committed, roll-forward and to-do,
    reading only DST (markers and part footers). Nothing is written.

    Memory: Arrow arrays for the listing and the plan; one small `PlannedShard` per shard.

    Raises:
        ConfigError: no images, a mass removal without `allow_removals`, an unreadable input.
    """
    storage = layout.storage
    try:
        listing = list_inputs(config.inputs, verify_content=config.verify_content)
    except StorageError as exc:
        raise ConfigError(str(exc)) from None
    found_inputs = listing.num_rows
    limited = None
    if config.limit is not None and listing.num_rows > config.limit:
        listing, limited = _limit_listing(listing, config.limit, None if config.overwrite else read_plan(layout.plan))
    # The safety check compares with the plan on disk even under --overwrite.
    _release_memory()
    stored = read_plan(layout.plan, columns=("shard", "source_uri", "size", "version"))
    matched = match_previous(listing, stored) if stored is not None and listing.num_rows else None
    _release_memory()
    changes = plan_changes(stored, listing, prev_index=matched)
    _check_removals(config, listing.num_rows, stored, changes)
    if config.overwrite:
        stored, matched, changes = None, None, PlanChanges(added=listing.num_rows)
    # Inputs already planned by an earlier run keep their shard: adding, changing or removing
    # images re-processes only the shards that hold them.
    plan = make_plan(listing, config.shard_size, previous=stored, prev_index=matched)
    del listing, stored, matched
    _release_memory()
    shards = plan_shards(plan)

    files = _existing_files(layout)
    found = {} if config.overwrite else _read_markers(storage, layout, [t.shard for t in shards if t.shard in files.markers])
    # Markers that commit this plan's shard with this configuration; only their parts' footers are read.
    matching = {t.shard for t in shards if t.shard in found and found[t.shard].get("result_fingerprint") == fingerprint
                and found[t.shard].get("content_hash") == t.content_hash}
    parts = _read_part_commits(storage, layout, sorted(s for s in matching if s in files.parts))
    job = PlannedJob(plan=plan, shards=shards, changes=changes, files=files, found=found, markers={},
                     roll_forward=[], todo=[], found_inputs=found_inputs, limited=limited)
    in_scope = None
    if limited is not None:  # only the shards holding one of the first N inputs are processed now
        import pyarrow as pa
        import pyarrow.compute as pc

        hit = plan.filter(pc.is_in(plan.column("source_uri"), value_set=pa.array(sorted(limited), plan.column("source_uri").type)))
        in_scope = set(pc.unique(hit.column("shard")).to_pylist())
    for task in shards:
        marker = found.get(task.shard)
        if in_scope is not None and task.shard not in in_scope:
            if task.shard in matching and task.shard in files.parts and marker_agrees(marker, parts.get(task.shard)):
                job.markers[task.shard] = marker  # committed earlier: counted, kept
            else:
                job.withdrawn.append(task)  # its old part would be stale: hidden until a full run
            continue
        if task.shard not in matching:
            job.todo.append(task)
        elif task.shard in files.parts and marker_agrees(marker, parts.get(task.shard)):
            job.markers[task.shard] = marker
        elif task.shard in files.staged:
            job.roll_forward.append(task)  # committed, then the run died before publishing
        else:
            job.mismatched += task.shard in files.parts  # a part that is not the committed one
            job.todo.append(task)
    return job


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
        if _staged_matches(storage, staged, task, found[task.shard]):
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


def _record_workers(storage, layout: OutputLayout, job: dict, described: List[dict]) -> None:
    """Adds what the workers resolved at start-up (batch size, threads, device) to job.json."""
    job["workers"] = [{k: d.get(k) for k in ("batch_size", "read_threads", "write_threads", "device", "backend",
                                             "precision", "tensorflow_imported")} for d in described]
    job["batch_size"] = sorted({d.get("batch_size") for d in described if d.get("batch_size")})
    storage.write_bytes(layout.job_json, json.dumps(job, indent=2, default=str).encode())


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
    from bulk_explain.workers.storage import storage_for

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

    def __init__(self, config: ExplainConfig, needed: bool, log: Progress, model_fingerprint: str = ""):
        self.config, self.needed, self.log = config, needed, log
        self.model_fingerprint = model_fingerprint
        self.pool = None
        self.started = False
        self.on_ready = None  # called with every worker's describe() once all have loaded

    def __enter__(self):
        if not self.needed:
            return self
        try:
            self._start()
        except BaseException:
            # Also a signal deferred during Ray's start-up, raised once it is up: stop that Ray.
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        config = self.config
        with ray_startup():
            self.started = connect(config.address)
        shape = plan_workers(config.workers, cluster_resources(), config.gpus_per_worker)
        settings = worker_settings(config, config.activation_layers, config.target_layer, shape["tf_threads"],
                                   cpus=shape["num_cpus"])
        # Explicit, not through runtime_env (which Ray logs): the endpoint URL may hold userinfo.
        settings["s3_endpoint_url"] = s3_endpoint(config.s3_endpoint_url)
        settings["model_fingerprint"] = self.model_fingerprint
        # OpenCV reads its pixel cap once, when cv2 loads: set it before the worker imports anything.
        env = worker_env({"TF_CPP_MIN_LOG_LEVEL": tf_log_level(), OPENCV_PIXEL_CAP_ENV: str(MAX_IMAGE_PIXELS),
                          BACKEND_ENV: config.backend})  # set before the worker imports Keras
        if os.environ.get(VERBOSE_ENV):
            env[VERBOSE_ENV] = os.environ[VERBOSE_ENV]
        options = {"num_cpus": shape["num_cpus"], "num_gpus": shape["num_gpus"],
                   "runtime_env": {"env_vars": env},
                   # `progress` answers in its own thread while both shard slots are busy.
                   "concurrency_groups": {_PROGRESS_GROUP: 1}}
        if shape["num_gpus"] == 0 and shape["count"] > 1:
            options["scheduling_strategy"] = "SPREAD"
        from bulk_explain.workers.explain.shard_worker import ExplainWorker

        self.log.message(f"starting {shape['count']} worker(s): {shape['num_cpus']} CPU, {shape['num_gpus']} GPU each")
        self.pool = ActorPool(ExplainWorker, (settings,), shape["count"], options)

    def run(self, todo: List[ShardTask], markers: Dict[int, dict], result: JobResult, t0: float) -> None:
        config, log = self.config, self.log
        self.pool.wait_ready()
        if self.on_ready is not None:
            import ray

            self.on_ready(ray.get([a.describe.remote() for a in self.pool.actors]))
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
