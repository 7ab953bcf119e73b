"""The explain job's configuration: one frozen dataclass, validated before Ray starts, saved as
`DST/job.json` beside the outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional, Tuple, Union

from bulk_explain.jobs.validation import ConfigError, require_int  # noqa: F401 (ConfigError: re-exported)
from bulk_explain.workers.models import WEIGHTS_FROM_MODEL_FILE, ModelSpec, model_kinds
from bulk_explain.workers.explain.cam_methods import parse_methods
from bulk_explain.workers.explain.faithfulness import DEFAULT_STEPS, parse_metrics
from bulk_explain.workers.preprocessing import INTERPOLATIONS, SCALINGS
from bulk_explain.workers.storage import StorageError, normalize_uri, scheme_of, storage_for

DEFAULT_SHARD_SIZE = 256
DEFAULT_BATCH_SIZE = 32
# A re-run whose listing would drop more than this share of the previous plan's inputs is refused
# unless `allow_removals`: an unmounted share or a moved folder must not wipe a night's audit.
MAX_REMOVED_SHARE = 0.5
# Decoded (full-size) images a worker actor holds at once, summed over its in-flight shards.
DEFAULT_MAX_DECODED_BYTES = 2 * 1024**3


# Settings that change where and how fast a job runs, not its manifest rows: outside the result
# fingerprint, so changing them never refuses a re-run.
NON_RESULT_FIELDS = ("inputs", "output", "address", "workers", "gpus_per_worker", "batch_size", "shard_size",
                     "read_threads", "write_threads", "overwrite", "max_error_rate", "max_shard_retries",
                     "s3_endpoint_url", "strict_labels", "limit", "allow_removals", "verify_content",
                     "max_decoded_bytes")

# `batch_size="auto"`: on a GPU the largest power of two that fits (found at worker start-up, halved
# on out-of-memory); on a CPU DEFAULT_BATCH_SIZE.
AUTO_BATCH = "auto"
BACKENDS = ("tensorflow", "jax")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


@dataclasses.dataclass(frozen=True)
class ExplainConfig:
    """Everything an explain job needs. Build it, call `validated()`, pass it to `run_explain`.

    Attributes:
        inputs: local folders or s3:// prefixes, scanned recursively for images.
        output: local folder or s3:// prefix for outputs and manifests.
        model: which model and weights (see `bulk_explain.workers.models.ModelSpec`).
        batch_size: images per compiled step (fixed shape; the tail is padded), or "auto": on a GPU
            the largest power of two that fits, found when the worker starts; on a CPU 32.
        shard_size: images per shard, the unit of work and of commit.
        address: None for an embedded local Ray; "auto" or "HOST:PORT"/"ray://..." to join a cluster.
        workers: number of model actors; None = one per GPU, else one per node on CPU.
        gpus_per_worker: GPUs each actor reserves even if the cluster has none yet (autoscaling).
        top_k: classes reported per image.
        cam_class: "pred" (explain the predicted class), "label" (the folder label's class) or an index.
        cam_method: "gradcam", "gradcam++", "layercam" or "scorecam", or several comma-separated
            ("gradcam,scorecam"): one row per image with a map per method (`explanations`); the
            gradcam_* columns hold the first.
        cam_score: "logit" (pre-activation score, the paper) or "probability" (the lecture).
        target_layer: conv layer for the CAM; None = last Conv2D.
        activation_layers: layers to summarize; None = every Conv2D and pooling layer.
        activation_grids: channel-grid PNGs for the first N images of each shard (0 = none).
        overlay_quality: JPEG quality of overlays.
        read_threads, write_threads: decode/encode pool sizes inside each worker; None = derived
            from the CPUs the worker holds.
        overwrite: recompute everything, replacing a previous job in `output`.
        max_error_rate: fraction of error rows above which the job exits non-zero.
        max_shard_retries: attempts per shard after a worker failure before it is reported failed.
        s3_endpoint_url: S3-compatible endpoint (MinIO, Ceph, moto); credentials never go here.
        allow_removals: accept a listing that finds no images, or that drops more than
            `MAX_REMOVED_SHARE` of the previous plan's inputs (refused by default).
        verify_content: local inputs' version is a SHA-256 of their bytes instead of size and
            mtime (every input is read in full by the driver on every run).
        max_decoded_bytes: decoded images each worker actor holds at once (default 2 GiB).
        strict_labels: with cam_class "label", a folder label that names no class is an error
            (otherwise a warning, and those images explain the predicted class).
        limit: process only the first N inputs of the sorted listing (trying settings); inputs an
            earlier run in the same output planned stay in the plan (see `bulk_explain.jobs.explain.driver`).
        backend: Keras backend of the driver and every worker: "tensorflow" or "jax".
        precision: Keras dtype policy of the model: "float32", "mixed_bfloat16", "mixed_float16";
            probabilities, CAMs and statistics are computed in float32 either way.
        overlay_max_side: overlays and heatmaps are written with their long side at most this
            many pixels (None: the original size); JPEGs are then decoded at 1/2, 1/4 or 1/8 scale
            by libjpeg when that is still at least the model input and this size.
        metrics: faithfulness metrics per image and method: "deletion", "insertion", "road".
        metric_steps: deletion / insertion steps K.
        scorecam_channels: Score-CAM scores the N most activated channels (None = 128, 0 = all).
    """

    inputs: Tuple[str, ...]
    output: str
    model: ModelSpec
    batch_size: Union[int, str] = DEFAULT_BATCH_SIZE
    shard_size: int = DEFAULT_SHARD_SIZE
    address: Optional[str] = None
    workers: Optional[int] = None
    gpus_per_worker: Optional[float] = None
    top_k: int = 5
    cam_class: Union[str, int] = "pred"
    cam_method: str = "gradcam"
    cam_score: str = "logit"
    target_layer: Optional[str] = None
    activation_layers: Optional[Tuple[str, ...]] = None
    activation_grids: int = 0
    overlay_quality: int = 90
    read_threads: Optional[int] = None
    write_threads: Optional[int] = None
    overwrite: bool = False
    max_error_rate: float = 1.0
    max_shard_retries: int = 2
    s3_endpoint_url: Optional[str] = None
    allow_removals: bool = False
    verify_content: bool = False
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    strict_labels: bool = False
    limit: Optional[int] = None
    backend: str = "tensorflow"
    precision: str = "float32"
    overlay_max_side: Optional[int] = None
    metrics: Tuple[str, ...] = ()
    metric_steps: int = DEFAULT_STEPS
    scorecam_channels: Optional[int] = None

    # ------------------------------------------------------------------ validation

    def validated(self) -> "ExplainConfig":
        """Returns a normalized copy (absolute paths) after checking everything checkable
        without loading the model.

        Raises:
            ConfigError: with a one-line reason.
        """
        if isinstance(self.inputs, str):
            raise ConfigError("inputs must be a list of folders/prefixes, received a single string")
        if not self.inputs:
            raise ConfigError("at least one --input is required")
        try:
            inputs = tuple(dict.fromkeys(normalize_uri(i) for i in self.inputs))
            output = normalize_uri(self.output)
            for uri in (*inputs, output):
                storage_for(uri)
        except StorageError as exc:
            raise ConfigError(str(exc)) from None
        for uri in inputs:
            if scheme_of(uri) == "file" and not os.path.isdir(uri):
                raise ConfigError(f"input folder not found: {uri}")
            if scheme_of(uri) == scheme_of(output) and storage_for(output).is_inside(output, uri):
                raise ConfigError(f"output {output} is inside input {uri}: outputs would be re-read as inputs")
            if scheme_of(uri) == scheme_of(output) and storage_for(output).is_inside(uri, output):
                raise ConfigError(f"input {uri} is inside output {output}: a re-run would delete or "
                                  "rewrite its own inputs; choose an --output outside the inputs")
        if scheme_of(output) == "file" and os.path.exists(output) and not os.path.isdir(output):
            raise ConfigError(f"output exists and is not a folder: {output}")
        m = self.model
        if m.kind not in model_kinds():
            raise ConfigError(f"unknown model {m.kind!r}; expected one of {', '.join(model_kinds())}")
        for path, what in ((m.model_file, "model file"), (m.class_names_file, "class names file")):
            if path and scheme_of(path) == "file" and not os.path.isfile(path):
                raise ConfigError(f"{what} not found: {path}")
        if m.model_file and m.weights != WEIGHTS_FROM_MODEL_FILE:
            raise ConfigError(
                f"--weights {m.weights} conflicts with --model-file {m.model_file}: the model file carries its "
                "own weights; drop --weights (or drop --model-file)")
        if m.weights == WEIGHTS_FROM_MODEL_FILE and not m.model_file:
            raise ConfigError(f"--weights {WEIGHTS_FROM_MODEL_FILE} needs --model-file PATH")
        if m.weights not in ("imagenet", "random", WEIGHTS_FROM_MODEL_FILE) and not os.path.isfile(m.weights):
            raise ConfigError(f"--weights must be imagenet, random or an existing file, received {m.weights!r}")
        if m.kind == "keras" and not m.model_file:
            raise ConfigError("--model keras needs --model-file PATH")
        if m.kind == "cats_dogs" and not m.model_file and m.weights == "imagenet":
            raise ConfigError("--model cats_dogs needs --model-file PATH (or --weights random for a demo)")
        if m.scaling is not None and m.scaling not in SCALINGS:
            raise ConfigError(f"unknown --scaling {m.scaling!r}; expected one of {', '.join(SCALINGS)}")
        if m.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"unknown --interpolation {m.interpolation!r}; expected one of {', '.join(INTERPOLATIONS)}"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown --backend {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown --precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if self.overlay_max_side is not None and (not isinstance(self.overlay_max_side, int)
                                                  or isinstance(self.overlay_max_side, bool)
                                                  or self.overlay_max_side < 16):
            raise ConfigError(f"overlay max side must be an integer >= 16 pixels, received {self.overlay_max_side!r}")
        batch_size = self.batch_size
        if isinstance(batch_size, str) and batch_size != AUTO_BATCH:
            try:
                batch_size = int(batch_size)
            except ValueError:
                raise ConfigError(f"batch size must be an integer >= 1 or auto, received {batch_size!r}") from None
        for name, value, low in (
            ("batch size", 1 if batch_size == AUTO_BATCH else batch_size, 1),
            ("shard size", self.shard_size, 1),
            ("top-k", self.top_k, 1),
            ("read threads", 1 if self.read_threads is None else self.read_threads, 1),
            ("write threads", 1 if self.write_threads is None else self.write_threads, 1),
            ("activation grids", self.activation_grids, 0),
            ("max shard retries", self.max_shard_retries, 0),
            ("max decoded bytes", self.max_decoded_bytes, 1),
        ):
            require_int(name, value, low, ConfigError)
        require_int("limit", self.limit, 1, ConfigError, optional=True)
        require_int("workers", self.workers, 1, ConfigError, optional=True)
        if self.gpus_per_worker is not None and not (0 < self.gpus_per_worker <= 8):
            raise ConfigError(f"gpus per worker must be within (0, 8], received {self.gpus_per_worker!r}")
        if not (1 <= self.overlay_quality <= 100):
            raise ConfigError(f"overlay quality must be 1..100, received {self.overlay_quality}")
        if not (0.0 <= self.max_error_rate <= 1.0):
            raise ConfigError(f"max error rate must be within 0..1, received {self.max_error_rate}")
        cam_class = self.cam_class
        if isinstance(cam_class, str) and cam_class not in ("pred", "label"):
            try:
                cam_class = int(cam_class)
            except ValueError:
                raise ConfigError(f"--cam-class must be pred, label or a class index, received {cam_class!r}") from None
        if isinstance(cam_class, int) and cam_class < 0:
            raise ConfigError(f"--cam-class index must be >= 0, received {cam_class}")
        try:
            cam_methods = ",".join(parse_methods(self.cam_method))
            metrics = tuple(parse_metrics(self.metrics))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"--cam-method / --metrics: {exc}") from None
        if isinstance(self.metric_steps, bool) or not isinstance(self.metric_steps, int) or not 1 <= self.metric_steps <= 1000:
            raise ConfigError(f"--metric-steps must be an integer within 1..1000, received {self.metric_steps!r}")
        if self.scorecam_channels is not None and (
                isinstance(self.scorecam_channels, bool) or not isinstance(self.scorecam_channels, int)
                or self.scorecam_channels < 0):
            raise ConfigError(f"--scorecam-channels must be an integer >= 0 (0 = all), received {self.scorecam_channels!r}")
        if self.cam_score not in ("logit", "probability"):
            raise ConfigError(f"--cam-score must be logit or probability, received {self.cam_score!r}")
        model = m
        if m.model_file and scheme_of(m.model_file) == "file":
            model = dataclasses.replace(model, model_file=os.path.abspath(m.model_file))
        if m.weights not in ("imagenet", "random", WEIGHTS_FROM_MODEL_FILE):
            model = dataclasses.replace(model, weights=os.path.abspath(m.weights))
        if m.class_names_file:
            model = dataclasses.replace(model, class_names_file=os.path.abspath(m.class_names_file))
        return dataclasses.replace(
            self,
            inputs=inputs,
            output=output,
            model=model,
            cam_class=cam_class,
            batch_size=batch_size,
            cam_method=cam_methods,
            metrics=metrics,
            activation_layers=tuple(self.activation_layers) if self.activation_layers is not None else None,
        )

    # ------------------------------------------------------------------ serialization

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExplainConfig":
        d = dict(d)
        d["model"] = ModelSpec(**d["model"])
        d["inputs"] = tuple(d["inputs"])
        if d.get("activation_layers") is not None:
            d["activation_layers"] = tuple(d["activation_layers"])
        if d.get("metrics") is not None:
            d["metrics"] = tuple(d["metrics"])
        return cls(**d)

    def result_fingerprint(self) -> str:
        """Hash of every setting that changes manifest rows; where/how fast it runs is excluded."""
        d = self.to_dict()
        for key in NON_RESULT_FIELDS:
            d.pop(key, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
