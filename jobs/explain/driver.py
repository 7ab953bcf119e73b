"""The explain kind's driver side on the shared runner (`bulk_explain.jobs.runner`): its plan (the
sorted input listing cut into shards, `plan.py`), its checks (model, labels), its worker
(`workers/explain/shard_worker.py`) and its finish (totals, error rate, explanation summaries).

    from bulk_explain import ExplainConfig, ModelSpec, run_explain
    result = run_explain(ExplainConfig(inputs=("photos/",), output="out/", model=ModelSpec("vgg16")))
"""

from __future__ import annotations

import dataclasses
import platform
import time
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bulk_explain.jobs.explain.config import MAX_REMOVED_SHARE, NON_RESULT_FIELDS, ConfigError, ExplainConfig
from bulk_explain.jobs.explain.explanations_summary import describe_explanations, summarize_explanations
from bulk_explain.jobs.explain.plan import (PlanChanges, PlannedShard, PreviousPlan, ShardTask, list_inputs,
                                            make_plan, plan_changes, plan_shards, release_memory, write_plan)
from bulk_explain.jobs.progress import Progress
from bulk_explain.jobs.runner import Plan, RunCounts, UnitJob, run_job
from bulk_explain.jobs.units import SortedUnits, staged_agrees
from bulk_explain.workers.backends import BACKEND_ENV, BackendError, select_backend
from bulk_explain.workers.environment import EnvironmentProblem
from bulk_explain.workers.explain.labels import LabelMatcher, describe_unmatched
from bulk_explain.workers.image_io import MAX_IMAGE_PIXELS, OPENCV_PIXEL_CAP_ENV
from bulk_explain.workers.layout import OutputLayout
from bulk_explain.workers.lease import LeaseOptions
from bulk_explain.workers.models import ModelError
from bulk_explain.workers.storage import IMAGE_EXTENSIONS, StorageError
from bulk_explain.workers.tf_runtime import import_backend_quietly, quiet_console, quiet_warnings


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


def _staged_matches(storage, uri: str, task, marker: Optional[dict] = None) -> bool:
    """A staged part can be published only if it is the part `marker` committed (same attempt and
    content hash in its footer) and holds exactly this shard's inputs and versions."""
    import io

    import pyarrow.parquet as pq

    if marker is not None and not staged_agrees(storage, uri, task, marker):
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
    return run_job(ExplainJob(config, progress), lease)


# ExplainConfig fields -> the option a user passes (names that differ from --field-name).
_OPTION_OF = {"model.kind": "--model", "model.weights": "--weights", "model.model_file": "--model-file",
              "model.class_names_file": "--class-names", "model.seed": "--seed"}


class ExplainJob(UnitJob):
    """The explain kind on the runner (`bulk_explain.jobs.runner`): units are shards of the sorted
    input listing; the worker is `ExplainWorker`; finish = totals, error rate, explanation summaries."""

    name = "explain"
    non_result_fields = NON_RESULT_FIELDS
    option_names = _OPTION_OF

    def prepare(self) -> None:
        quiet_console()
        try:
            # The driver loads the model too: Keras must run the job's backend here before it is imported.
            select_backend(self.config.backend)
        except BackendError as exc:
            raise ConfigError(str(exc)) from None
        # Credentials, endpoint and write access first (exit 5, one line naming the fix): the lease
        # is the first write to DST and would otherwise fail with a raw storage error.
        _check_access(self.config)
        self.layout = OutputLayout(self.config.output)

    def max_retries(self) -> int:
        return self.config.max_shard_retries

    def plan(self) -> Plan:
        planned = plan_inputs(self.config, self.layout)
        self.planned = planned
        return Plan(units=planned.shards, in_scope=planned.in_scope)

    def check(self, plan: Plan, units: SortedUnits) -> None:
        config = self.config
        # The model is checked (and fingerprinted) here, before Ray starts, so a bad model is a one-line
        # exit-2 error and not N failing actors. It costs one extra model load in the driver.
        # TensorFlow loads only now (seconds): the access, config and listing checks above answer fast.
        import_backend_quietly(config.backend)  # TensorFlow (quietly: its C++ start-up lines go to fd 2) or JAX
        try:
            model_info = inspect_model(config)
        except (ModelError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        class_names = model_info.pop(_CLASS_NAMES)
        self.refuse_other_model((self.previous or {}).get("model", {}).get("fingerprint"), model_info["fingerprint"])
        self.model_info = model_info
        check_labels(config, self.planned.plan, class_names, self.log)
        todo = units.todo + units.roll_forward
        # After the checks (an error stays one line), before Ray starts (the slow part of a small run).
        limited = self.planned.limited
        self.log.message(f"found {self.planned.found_inputs} inputs"
                         + (f" (--limit {config.limit}: using the first {config.limit})" if limited is not None else "")
                         + f"; {sum(len(t) for t in todo)} to process in {len(todo)} of {len(plan.units)} shards")

    def staged_ok(self, storage, uri: str, unit, marker: dict) -> bool:
        return _staged_matches(storage, uri, unit, marker)

    def before_work(self, plan: Plan, units: SortedUnits, counts: RunCounts) -> None:
        layout, changes = self.layout, self.planned.changes
        try:
            write_plan(self.planned.plan, layout.plan)
        except PermissionError as exc:
            raise EnvironmentProblem(f"cannot write output {self.config.output}: {exc}; check the permissions "
                                     "(or credentials) for this output, or choose another --output") from None
        self.log.reset(total_shards=len(plan.units), skipped=len(counts.markers),
                       images_todo=sum(len(t) for t in counts.todo))
        if self.previous:
            self.log.message(f"since the last plan: {changes.added} images added, {changes.changed} changed, "
                             f"{changes.removed} removed")
        if changes.removed:
            more = (f" (and {changes.removed - len(changes.removed_uris)} more)"
                    if changes.removed > len(changes.removed_uris) else "")
            self.log.message(f"removed images no longer in the manifest: {', '.join(changes.removed_uris[:5])}"
                             f"{' ...' if changes.removed > 5 else ''}{more}")

    def job_record(self) -> dict:
        plan = self.planned.plan
        return {"model": self.model_info, "versions": library_versions(), "images": plan.num_rows,
                "shards": len(self.planned.shards), "explanations": describe_explanations(self.config)}

    def worker(self, shape):
        from bulk_explain.workers.explain.shard_worker import ExplainWorker

        config = self.config
        settings = worker_settings(config, config.activation_layers, config.target_layer, shape["tf_threads"],
                                   cpus=shape["num_cpus"])
        settings["model_fingerprint"] = self.model_info["fingerprint"]
        # OpenCV reads its pixel cap once, when cv2 loads: set it before the worker imports anything.
        env = {OPENCV_PIXEL_CAP_ENV: str(MAX_IMAGE_PIXELS), BACKEND_ENV: config.backend}  # before Keras loads
        return ExplainWorker, settings, env, {}

    def workers_ready(self, described: List[dict]) -> None:
        """Adds what the workers resolved at start-up (batch size, threads, device) to job.json."""
        record = self.record
        record["workers"] = [{k: d.get(k) for k in ("batch_size", "read_threads", "write_threads", "device", "backend",
                                                    "precision", "tensorflow_imported")} for d in described]
        record["batch_size"] = sorted({d.get("batch_size") for d in described if d.get("batch_size")})
        self.write_json(self.layout.job_json, record)

    def finish(self, counts: RunCounts):
        config, planned = self.config, self.planned
        changes = planned.changes
        result = JobResult(output=config.output, images=planned.plan.num_rows, shards=counts.units,
                           added_images=changes.added, changed_images=changes.changed,
                           removed_images=changes.removed, removed_image_uris=changes.removed_uris,
                           mismatched_shards=counts.mismatched, removed_shards=counts.removed,
                           rolled_forward_shards=counts.rolled_forward, skipped_shards=counts.skipped,
                           failed_shards=list(counts.failed), failure_reasons=dict(counts.failure_reasons),
                           startup_seconds=counts.startup_seconds, processing_seconds=counts.processing_seconds)
        result.processed_shards = counts.computed
        for marker in counts.markers.values():
            result.ok += marker["ok"]
            result.errors += marker["error"]
            result.empty_maps += marker.get("empty_maps", 0)
        result.seconds = time.perf_counter() - self.t0
        failed = set(result.failed_shards)
        result.images_processed = sum(len(t) for t in counts.todo if t.shard not in failed)
        result.images_per_second = result.images_processed / result.seconds if result.seconds else 0.0
        rows = result.ok + result.errors
        result.error_rate_exceeded = bool(rows and result.errors / rows > config.max_error_rate)
        result.max_error_rate = config.max_error_rate
        summary = result.to_dict()
        summary["finished_at"] = time.time()
        summary["explanations"] = summarize_explanations(self.layout, config)
        if result.empty_maps:
            self.log.message(f"{result.empty_maps} images have an all-zero {config.cam_method} map (null peaks, "
                             f"cam_empty in the manifest); --cam-method layercam or gradcam++ localizes them")
        self.log.finish(result)
        return result, summary


@dataclasses.dataclass
class PlannedInputs:
    """What `plan_inputs` decided, before anything in DST is touched."""

    plan: object  # pyarrow.Table, PLAN_SCHEMA
    shards: List[PlannedShard]
    changes: PlanChanges
    found_inputs: int = 0  # images the listing found (before --limit)
    limited: Optional[set] = None  # --limit: the first N URIs, else None
    in_scope: Optional[set] = None  # --limit: the shards holding one of them, else None


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


def plan_inputs(config: ExplainConfig, layout: OutputLayout) -> PlannedInputs:
    """Lists the inputs and plans shards (the previous `plan.parquet` keeps its inputs' shards).
    Reads only the listing and DST's plan; nothing is written.

    Memory: the previous plan as 32 bytes of keys per input (`PreviousPlan`), the listing and then
    the plan as Arrow arrays, one small `PlannedShard` per shard.

    Raises:
        ConfigError: no images, a mass removal without `allow_removals`, an unreadable input.
    """
    # The previous plan is read (and compacted to keys, no text) before the listing exists: the
    # driver never holds both plans' text at once. The safety check compares with the plan on
    # disk even under --overwrite.
    stored = PreviousPlan.read(layout.plan)
    release_memory()
    try:
        listing = list_inputs(config.inputs, verify_content=config.verify_content)
    except StorageError as exc:
        raise ConfigError(str(exc)) from None
    found_inputs = listing.num_rows
    matched = stored.match(listing) if stored is not None else None
    limited = None
    if config.limit is not None and listing.num_rows > config.limit:
        # --limit N: the first N inputs, plus the inputs the plan on disk already holds that still
        # exist (a limited run never reports them removed or drops their committed shards).
        keep = np.arange(listing.num_rows) < config.limit
        limited = set(listing.column("source_uri").slice(0, config.limit).to_pylist())
        if matched is not None and not config.overwrite:
            keep |= matched >= 0
        listing = listing.filter(pa.array(keep))
        matched = matched[keep] if matched is not None else None
        del keep
    changes = plan_changes(stored, listing, prev_index=matched)
    _check_removals(config, listing.num_rows, stored, changes)
    if config.overwrite:
        stored, matched, changes = None, None, PlanChanges(added=listing.num_rows)
    elif stored is not None:
        stored.drop_keys()  # matched: only the shard ids are needed from here on
    release_memory()
    # Inputs already planned by an earlier run keep their shard: adding, changing or removing
    # images re-processes only the shards that hold them.
    plan = make_plan(listing, config.shard_size, previous=stored, prev_index=matched)
    del listing, stored, matched
    release_memory()
    shards = plan_shards(plan)

    in_scope = None
    if limited is not None:  # only the shards holding one of the first N inputs are processed now
        hit = plan.filter(pc.is_in(plan.column("source_uri"), value_set=pa.array(sorted(limited), plan.column("source_uri").type)))
        in_scope = set(pc.unique(hit.column("shard")).to_pylist())
    return PlannedInputs(plan=plan, shards=shards, changes=changes, found_inputs=found_inputs, limited=limited,
                         in_scope=in_scope)


def _check_access(config: ExplainConfig) -> None:
    """Credentials, endpoints and output permissions, checked before the model loads (exit 5)."""
    from bulk_explain.workers.storage import storage_for

    try:
        for uri in config.inputs:
            storage_for(uri).check_access(uri, write=False)
        storage_for(config.output).check_access(config.output, write=True)
    except StorageError as exc:  # e.g. a bucket that does not exist: the command line is wrong
        raise ConfigError(str(exc)) from None
