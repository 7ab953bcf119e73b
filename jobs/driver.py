"""The explain job driver: validate -> plan -> skip committed shards -> distribute -> summarize.

    from jobs import ExplainConfig, ModelSpec, run_explain
    result = run_explain(ExplainConfig(inputs=("photos/",), output="out/", model=ModelSpec("vgg16")))
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional

from jobs.config import ConfigError, ExplainConfig
from jobs.distribute import ActorPool, cluster_resources, connect, plan_workers
from jobs.plan import ShardTask, iter_shards, list_inputs, make_plan, write_plan
from jobs.progress import Progress
from workers.layout import OutputLayout
from workers.models import ModelError
from workers.storage import StorageError


@dataclasses.dataclass
class JobResult:
    """What a finished (or failed) job did.

    Attributes:
        output: the output root.
        images: inputs in the plan.
        ok, errors: manifest rows by status (all committed shards, including skipped ones).
        shards, skipped_shards, processed_shards: shard counts.
        failed_shards: shard ids given up after retries (their images have no rows yet).
        seconds: wall time of this run.
        images_per_second: images processed by this run / seconds.
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
    seconds: float = 0.0
    images_processed: int = 0
    images_per_second: float = 0.0
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
    }


def inspect_model(config: ExplainConfig) -> dict:
    """Loads the model once in the driver: a bad model is a config error (exit 2) before any
    worker starts, and job.json gets its fingerprint, preprocessing and layers."""
    from workers.explain_step import ExplainStep
    from workers.models import load_model

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


def _existing_shard_files(layout: OutputLayout) -> Dict[int, List[str]]:
    files: Dict[int, List[str]] = {}
    for folder in (layout.manifest_dir, layout.commits_dir):
        for uri in layout.storage.list_names(folder):
            shard = OutputLayout.shard_of(uri)
            if shard is not None:
                files.setdefault(shard, []).append(uri)
    return files


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
    """
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
    plan = make_plan(listing, config.shard_size)
    tasks = list(iter_shards(plan, config.shard_size))

    existing = {} if config.overwrite else _existing_shard_files(layout)
    markers: Dict[int, dict] = {}
    todo: List[ShardTask] = []
    for task in tasks:
        marker = _read_json(storage, layout.commit_marker(task.shard)) if task.shard in existing else None
        if marker and marker.get("content_hash") == task.content_hash and marker.get("result_fingerprint") == fingerprint:
            markers[task.shard] = marker
        else:
            todo.append(task)

    log = Progress(total_shards=len(tasks), skipped=len(markers), enabled=progress,
                   images_todo=sum(len(t) for t in todo))
    result = JobResult(output=config.output, images=plan.num_rows, shards=len(tasks),
                       skipped_shards=len(markers))
    # The model is checked (and fingerprinted) here, before Ray starts, so a bad model is a one-line
    # exit-2 error and not N failing actors. It costs one extra model load in the driver.
    try:
        model_info = inspect_model(config)
    except (ModelError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if previous and not config.overwrite and previous.get("model", {}).get("fingerprint") != model_info["fingerprint"]:
        raise ConfigError(_DIFFERENT_JOB.format(output=config.output))

    with _Workers(config, needed=bool(todo), log=log) as workers:
        # Nothing is written to DST before this point: a refused job leaves it untouched.
        if config.overwrite:
            for uris in _existing_shard_files(layout).values():
                for uri in uris:
                    storage.delete(uri)
        # Shards beyond the new plan (inputs were removed) must not leave stale rows behind.
        removed = [s for s in existing if s >= len(tasks)]
        for shard in removed:
            for uri in existing[shard]:
                storage.delete(uri)
        result.removed_shards = len(removed)
        write_plan(plan, layout.plan, config.shard_size)
        job = {
            "kind": "explain",
            "config": config.to_dict(),
            "result_fingerprint": fingerprint,
            "model": model_info,
            "versions": library_versions(),
            "started_at": time.time(),
            "images": plan.num_rows,
            "shards": len(tasks),
        }
        storage.write_bytes(layout.job_json, json.dumps(job, indent=2, default=str).encode())

        if markers:
            log.message(f"{len(markers)} shards already committed, skipping them")
        if todo:
            workers.run(todo, markers, result)
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
    storage.write_bytes(layout.summary_json, json.dumps(summary, indent=2).encode())
    log.finish(result)
    return result


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
        shape = plan_workers(config.workers, cluster_resources(), config.gpus_per_worker)
        settings = worker_settings(config, config.activation_layers, config.target_layer, shape["tf_threads"])
        env = {"TF_CPP_MIN_LOG_LEVEL": "2"}
        for var in ("BULK_EXPLAIN_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            if os.environ.get(var):
                env[var] = os.environ[var]
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

    def run(self, todo: List[ShardTask], markers: Dict[int, dict], result: JobResult) -> None:
        config, log = self.config, self.log
        self.pool.wait_ready()

        def done(task, marker):
            markers[task.shard] = marker
            log.shard_done(len(task), marker)

        def failed(task, reason):
            result.failed_shards.append(task.shard)
            result.failure_reasons[task.shard] = reason
            log.message(f"shard {task.shard} failed after {config.max_shard_retries} retries: {reason}")

        self.pool.run("process_shard", todo, done, failed, max_retries=config.max_shard_retries,
                      extra_args=(config.result_fingerprint(),))

    def __exit__(self, *exc):
        import ray

        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        if self.started:
            ray.shutdown()
            self.started = False
        return False
