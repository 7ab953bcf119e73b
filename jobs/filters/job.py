"""The `filters` job kind: every filter of the chosen conv layers visualized by the lecture's
gradient ascent, batched and spread over Ray workers, plus filter-weight plots.

    bulk_explain.jobs.filters.job.run_filters(FiltersConfig(output="vis/", model=ModelSpec("vgg16")))
    bulk-explain filters --model vgg16 --weights imagenet --output vis/

Stages (the same seams as the image job):
  plan      the driver loads the model once, resolves the layers and cuts each layer's filters into
            units (layer, filter range) of `filters_per_unit`; unit ids are deterministic.
  compute   `FilterWorker.process(unit)`: start noise per filter, one compiled ascent call per
            batch of filters (workers/filters/filter_vis.py), batch size measured per layer on a CPU and
            maxed (halved on out-of-memory) on a GPU.
  write     per filter a PNG, per unit a manifest part, then the unit's commit marker (last).
  distribute  jobs/distribute.py's actor pool (embedded Ray by default, `--address auto` for a
            cluster).
  finish    the driver writes weight plots, one contact sheet per layer, `manifest.parquet`
            assembled from the committed parts, and `summary.json`.

Output layout under DST:
  filters/job.json, filters/summary.json, filters/manifest.parquet
  filters/<layer>/<layer>_<index>.png         one per filter (deprocessed, centre-cropped)
  filters/sheets/<layer>.png                  contact sheet (`sheet_columns` a row, 5-px margins)
  filters/_parts/<key>/<unit>.parquet         committed manifest parts
  filters/_commits/<key>/<unit>.json          commit markers
  weights/<layer>_channels.png, weights/<layer>_color.png, weights/<layer>/filter_<i>.png
            (the selected layers, plus always the first conv layer's colour view)

Caching: `key` = hash(model fingerprint, steps, learning rate, size, seed, algorithm version). A
run skips every unit already committed under its key, so a second run with the same model and
settings computes nothing. Commits of any other key are removed at the start of a run: the images
live at fixed names, so a different model or setting overwrites them and old commits would lie.

The ascent feeds the image tensor to the model as it is (no VGG16 mean subtraction), exactly as
the lecture does; job.json records this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from bulk_explain.jobs.runtime import (JobInterrupted, as_job_interrupt, ray_startup, read_json, redacted, s3_endpoint,
                          s3_storage_configured, sigterm_raises, worker_env)
from bulk_explain.workers.faults import fault_point
from bulk_explain.workers.models import ModelError, ModelSpec, model_kinds

ALGORITHM = "lecture-gradient-ascent/1"
DEFAULT_FILTERS_PER_UNIT = 64
GPU_MAX_BATCH = 64
# On a GPU each compiled call is enqueued asynchronously, so calling a one-step function 30 times
# costs next to nothing over one 30-step call, while tracing the unrolled 30-step graph costs
# seconds of host time per layer (measured here: 2-8 s per VGG16 layer): 13 layers of it would eat
# the < 60 s budget for all VGG16 filters. Not measured on a GPU yet.
GPU_STEPS_PER_CALL = 1
CPU_MAX_BATCH = 64
INPUT_HANDLING = "the image tensor goes to the model as is (no model preprocessing), as in the lecture"


class FiltersConfigError(ValueError):
    """The filters job cannot start as configured. The message is one line meant for the user."""


# ---------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class FiltersConfig:
    """Everything a filters job needs; `validated()` checks it before Ray starts.

    Attributes:
        output: local folder or s3:// prefix (outputs under DST/filters and DST/weights).
        model: the model (see bulk_explain.workers.models.ModelSpec); vgg16 is built as its conv base
            (include_top=False) at `size`, since the classifier top plays no part.
        layers: layer names; None = every Conv2D layer.
        steps, learning_rate: gradient ascent steps and step length (lecture: 30, 10).
        size: square image size; None = 150, or the model's own input size if it is fixed.
        seed: seeds the start noise (uniform 0.4..0.6 per (seed, layer, filter)).
        batch_size: filters per compiled call; None = measured per layer on CPU, 64 on GPU
            (halved on out-of-memory either way).
        address, workers: Ray cluster and number of worker actors (see jobs/distribute.py).
        weights_filters, weights_channels: N filters x M channels in the weight plots.
        filters_per_unit: filters per unit of work and of commit.
        sheet_columns: filters per contact-sheet row.
        max_unit_retries: attempts per unit after a worker failure.
        progress: progress lines on stderr.
        s3_endpoint_url: S3-compatible endpoint for s3:// outputs.
    """

    output: str
    model: ModelSpec
    layers: Optional[Tuple[str, ...]] = None
    steps: int = 30
    learning_rate: float = 10.0
    size: Optional[int] = None
    seed: int = 0
    batch_size: Optional[int] = None
    address: Optional[str] = None
    workers: Optional[int] = None
    weights_filters: int = 16
    weights_channels: int = 16
    filters_per_unit: int = DEFAULT_FILTERS_PER_UNIT
    sheet_columns: int = 16
    max_unit_retries: int = 2
    progress: bool = True
    s3_endpoint_url: Optional[str] = None

    def validated(self) -> "FiltersConfig":
        """A normalized copy (absolute paths, layers as a tuple) after every check that needs no
        model. Raises FiltersConfigError with a one-line reason."""
        from bulk_explain.workers.storage import StorageError, normalize_uri, scheme_of, storage_for

        if not isinstance(self.output, str) or not self.output.strip():
            raise FiltersConfigError("--output is required")
        try:
            output = normalize_uri(self.output)
            storage_for(output)
        except StorageError as exc:
            raise FiltersConfigError(str(exc)) from None
        if scheme_of(output) == "file" and os.path.exists(output) and not os.path.isdir(output):
            raise FiltersConfigError(f"output exists and is not a folder: {output}")
        m = self.model
        if not isinstance(m, ModelSpec):
            raise FiltersConfigError("model must be a bulk_explain.workers.models.ModelSpec")
        if m.kind not in model_kinds():
            raise FiltersConfigError(f"unknown model {m.kind!r}; expected one of {', '.join(model_kinds())}")
        if m.model_file and scheme_of(m.model_file) == "file" and not os.path.isfile(m.model_file):
            raise FiltersConfigError(f"model file not found: {m.model_file}")
        if m.weights not in ("imagenet", "random", "model-file") and not os.path.isfile(m.weights):
            raise FiltersConfigError(f"--weights must be imagenet, random or an existing file, received {m.weights!r}")
        if m.kind == "keras" and not m.model_file:
            raise FiltersConfigError("--model keras needs --model-file PATH")
        if m.kind == "cats_dogs" and not m.model_file and m.weights == "imagenet":
            raise FiltersConfigError("--model cats_dogs needs --model-file PATH (or --weights random)")
        if m.kind == "vgg16" and m.model_file:
            raise FiltersConfigError("--model vgg16 takes --weights imagenet|random|PATH, not --model-file")
        for name, value, low in (
            ("steps", self.steps, 1),
            ("seed", self.seed, 0),
            ("weights filters", self.weights_filters, 1),
            ("weights channels", self.weights_channels, 1),
            ("filters per unit", self.filters_per_unit, 1),
            ("sheet columns", self.sheet_columns, 1),
            ("max unit retries", self.max_unit_retries, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FiltersConfigError(f"{name} must be an integer >= {low}, received {value!r}")
        for name, value, low in (("size", self.size, 16), ("batch size", self.batch_size, 1),
                                 ("workers", self.workers, 1), ("input size", m.input_size, 8)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise FiltersConfigError(f"{name} must be an integer >= {low}, received {value!r}")
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise FiltersConfigError(f"learning rate must be a finite number > 0, received {lr!r}")
        layers = self.layers
        if isinstance(layers, str):
            layers = None if layers.strip() == "all" else tuple(l.strip() for l in layers.split(","))
        if layers is not None:
            layers = tuple(layers)
            if not layers or any(not isinstance(l, str) or not l.strip() for l in layers):
                raise FiltersConfigError(f"--layers must be all or comma-separated layer names, received {self.layers!r}")
            if "all" in layers:
                if len(layers) > 1:
                    raise FiltersConfigError("--layers all cannot be combined with layer names")
                layers = None
            else:
                layers = tuple(dict.fromkeys(l.strip() for l in layers))
        model = m
        if m.model_file and scheme_of(m.model_file) == "file":
            model = dataclasses.replace(model, model_file=os.path.abspath(m.model_file))
        if m.weights not in ("imagenet", "random", "model-file"):
            model = dataclasses.replace(model, weights=os.path.abspath(m.weights))
        return dataclasses.replace(self, output=output, model=model, layers=layers,
                                   learning_rate=float(lr))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FiltersConfig":
        d = dict(d)
        d["model"] = ModelSpec(**d["model"])
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        return cls(**d)


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    """Adds the `bulk-explain filters` options to an argparse parser."""
    p = parser
    p.add_argument("--model", required=True, choices=model_kinds(), help="model kind")
    p.add_argument("--model-file", help=".keras or legacy .h5 model file (cats_dogs, keras); a conv base works")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (Keras' download, cached), random (seeded by --model-seed), or a weights/model file")
    p.add_argument("--output", required=True, metavar="DST", help="folder or s3://bucket/prefix")
    p.add_argument("--layers", default="all", help="all (every Conv2D layer) or comma-separated layer names")
    p.add_argument("--steps", type=int, default=30, help="gradient ascent steps (lecture: 30)")
    p.add_argument("--size", type=int, default=None,
                   help="square image size (default 150, or the model's fixed input size)")
    p.add_argument("--learning-rate", type=float, default=10.0, help="step length (lecture: 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the start noise")
    p.add_argument("--batch-size", type=int, default=None,
                   help="filters per compiled call (default: measured per layer on CPU, 64 on GPU)")
    p.add_argument("--address", default=None, help="Ray: omit for embedded local Ray; auto or HOST:PORT for a cluster")
    p.add_argument("--workers", type=int, default=None, help="worker actors (default: one per GPU, else per node)")
    p.add_argument("--weights-filters", type=int, default=16, help="filters (rows) in the weight plots")
    p.add_argument("--weights-channels", type=int, default=16, help="input channels (columns) in the weight plots")
    p.add_argument("--input-size", type=int, default=None,
                   help="input size to build size-agnostic or random-weight models at (default: --size)")
    p.add_argument("--model-seed", type=int, default=0, help="seed for --weights random")
    p.add_argument("--filters-per-unit", type=int, default=DEFAULT_FILTERS_PER_UNIT,
                   help="filters per unit of work and of commit")
    p.add_argument("--sheet-columns", type=int, default=16, help="filters per contact-sheet row")
    p.add_argument("--unsafe-model-code", action="store_true",
                   help="allow Lambda layers / custom code in model files (only for files you trust)")
    p.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (MinIO, Ceph...)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def config_from_args(args) -> FiltersConfig:
    """FiltersConfig from parsed arguments, validated. Raises FiltersConfigError (a ValueError)."""
    spec = ModelSpec(
        kind=args.model,
        weights=args.weights,
        model_file=args.model_file,
        input_size=args.input_size,
        seed=getattr(args, "model_seed", 0),
        unsafe_model_code=bool(getattr(args, "unsafe_model_code", False)),
    )
    return FiltersConfig(
        output=args.output,
        model=spec,
        layers=args.layers,
        steps=args.steps,
        learning_rate=args.learning_rate,
        size=args.size,
        seed=args.seed,
        batch_size=args.batch_size,
        address=args.address,
        workers=args.workers,
        weights_filters=args.weights_filters,
        weights_channels=args.weights_channels,
        filters_per_unit=getattr(args, "filters_per_unit", DEFAULT_FILTERS_PER_UNIT),
        sheet_columns=getattr(args, "sheet_columns", 16),
        progress=not getattr(args, "quiet", False),
        s3_endpoint_url=getattr(args, "s3_endpoint_url", None),
    ).validated()


# ---------------------------------------------------------------- model


def _vgg16_conv_base(spec: ModelSpec, size: int):
    """VGG16 without its classifier top, at `size` px; conv weights from spec.weights."""
    import keras

    from bulk_explain.workers.models import load_model_file

    shape = (size, size, 3)
    try:
        if spec.weights == "imagenet":
            return keras.applications.VGG16(include_top=False, weights="imagenet", input_shape=shape)
        keras.utils.set_random_seed(spec.seed)
        base = keras.applications.VGG16(include_top=False, weights=None, input_shape=shape)
    except ValueError as exc:
        raise ModelError(f"cannot build VGG16 at {size} px: {str(exc).splitlines()[0]}") from None
    if spec.weights == "random":
        return base
    path = spec.weights
    if path.endswith(".keras"):
        source = load_model_file(path, safe_mode=not spec.unsafe_model_code)
    else:
        try:
            base.load_weights(path)  # a conv-base ("notop") weights file
            return base
        except Exception:
            source = keras.applications.VGG16(weights=None)
            try:
                source.load_weights(path)
            except Exception as exc:
                raise ModelError(f"cannot load VGG16 weights from {path}: {str(exc).splitlines()[0]}") from None
    for layer in base.layers:
        if not layer.weights:
            continue
        try:
            src = source.get_layer(layer.name)
        except ValueError:
            raise ModelError(f"{path} has no layer {layer.name!r}: not a VGG16") from None
        layer.set_weights(src.get_weights())
    return base


def load_filters_model(spec: ModelSpec, size: Optional[int]):
    """Loads the model for filter visualization: classifier or conv base, no classifier check.

    Returns (LoadedModel, size). Raises ModelError (a ValueError) with a one-line reason.
    """
    from bulk_explain.workers.models import _BUILDERS, LoadedModel, _input_hw
    from bulk_explain.workers.preprocessing import Preprocessing

    if spec.kind == "vgg16":
        s = size or 150
        model = _vgg16_conv_base(spec, s)
        loaded = LoadedModel(model=model, class_names=[], preprocessing=Preprocessing(s, s, "vgg16"),
                             output_kind="features")
    else:
        if spec.kind not in _BUILDERS:
            raise ModelError(f"unknown model {spec.kind!r}; expected one of {', '.join(model_kinds())}")
        build_spec = dataclasses.replace(spec, input_size=spec.input_size or size or 150)
        loaded = _BUILDERS[spec.kind](build_spec)
    hw = _input_hw(loaded.model)
    if hw is not None:
        if hw[0] != hw[1]:
            raise ModelError(f"model takes {hw[0]}x{hw[1]} input; the filter images are square")
        if size is not None and size != hw[0]:
            raise ModelError(f"model {loaded.model.name!r} takes {hw[0]}x{hw[1]} input only: use --size {hw[0]}")
        size = hw[0]
    return loaded, int(size or spec.input_size or 150)


def resolve_layers(model, layers: Optional[Sequence[str]]) -> List[str]:
    """Layer names in model order: every Conv2D for None, else the named ones (checked)."""
    import keras

    conv = [l.name for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    if layers is None:
        if not conv:
            raise ModelError(
                f"model {model.name!r} has no top-level Conv2D layer (a conv base nested as one layer "
                "is not supported: save the conv base itself and pass it with --model keras)")
        return conv
    names = [l.name for l in model.layers]
    for name in layers:
        if name not in names:
            raise ModelError(f"no layer {name!r} in model {model.name!r}; conv layers: {', '.join(conv) or 'none'}")
        shape = model.get_layer(name).output.shape
        if len(shape) != 4:
            raise ModelError(f"layer {name!r} output is {tuple(shape)}: expected (batch, h, w, filters)")
    order = {n: i for i, n in enumerate(names)}
    return sorted(layers, key=order.get)


def layer_geometry(model, layer: str, size: int) -> Dict:
    """Filters and activation map size of `layer` at `size` px (no compute)."""
    import keras

    out = keras.Model(model.inputs, model.get_layer(layer).output).compute_output_shape((1, size, size, 3))
    if out[1] is None or out[1] < 1 or out[2] is None or out[2] < 1:
        raise ModelError(f"layer {layer!r} has no spatial output at --size {size}: use a larger size")
    h, w = int(out[1]), int(out[2])
    # the lecture cuts 2 px per side of the map; FilterAscent keeps at least one pixel
    return {"filters": int(out[3]), "output_hw": [h, w], "border_used": [min(2, (h - 1) // 2), min(2, (w - 1) // 2)]}


# ---------------------------------------------------------------- layout


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


class FiltersLayout:
    """Every path the filters job writes, in one place."""

    def __init__(self, output: str, storage):
        self.output = output
        self.storage = storage
        self.root = storage.join(output, "filters")
        self.weights_root = storage.join(output, "weights")

    def _join(self, *parts):
        return self.storage.join(self.root, *parts)

    @property
    def job_json(self):
        return self._join("job.json")

    @property
    def summary_json(self):
        return self._join("summary.json")

    @property
    def manifest(self):
        return self._join("manifest.parquet")

    def image(self, layer: str, index: int) -> str:
        return self._join(_safe(layer), f"{_safe(layer)}_{index:04d}.png")

    def sheet(self, layer: str) -> str:
        return self._join("sheets", f"{_safe(layer)}.png")

    @property
    def commits_root(self):
        return self._join("_commits")

    @property
    def parts_root(self):
        return self._join("_parts")

    def marker(self, key: str, name: str) -> str:
        return self._join("_commits", key, f"{name}.json")

    def part(self, key: str, unit_id: str) -> str:
        return self._join("_parts", key, f"{unit_id}.parquet")


def unit_id(layer: str, start: int, stop: int) -> str:
    return f"{_safe(layer)}__{start:05d}-{stop:05d}"


def plan_units(layers: Sequence[str], filters: Dict[str, int], per_unit: int) -> List[Dict]:
    """Units (layer, filter range) in layer order; deterministic ids."""
    units = []
    for layer in layers:
        for start in range(0, filters[layer], per_unit):
            stop = min(start + per_unit, filters[layer])
            units.append({"id": unit_id(layer, start, stop), "layer": layer, "start": start, "stop": stop})
    return units


def settings_key(fingerprint: str, settings: Dict) -> str:
    payload = json.dumps({"fingerprint": fingerprint, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- worker


class FilterWorker:
    """Holds one model and processes units; wrapped in a Ray actor by the driver, or used in-process.

    Args:
        settings: plain dict from `worker_settings`.
        loaded: an already loaded model (in-process use); else loaded from settings["model"].
    """

    def __init__(self, settings: dict, loaded=None):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from bulk_explain.workers.storage import storage_for
        from bulk_explain.workers.tf_runtime import configure_tensorflow

        configure_tensorflow(settings.get("tf_threads"))
        import tensorflow as tf

        from bulk_explain.workers.storage import configure_storage

        configure_storage("s3", endpoint_url=settings.get("s3_endpoint_url"))
        self.settings = settings
        if loaded is None:
            loaded, size = load_filters_model(ModelSpec(**settings["model"]), settings["size"])
            fingerprint = loaded.fingerprint()
            if fingerprint != settings["fingerprint"]:
                raise ModelError(
                    f"worker built a different model than the driver (fingerprint {fingerprint[:12]} vs "
                    f"{settings['fingerprint'][:12]}): the model file or weights differ between machines")
        self.loaded = loaded
        self.model = loaded.model
        self.size = int(settings["size"])
        self.gpu = bool(tf.config.list_physical_devices("GPU"))
        self.storage = storage_for(settings["output"])
        self.layout = FiltersLayout(settings["output"], self.storage)
        self._ascents = {}
        self._compute = threading.Lock()  # one ascent at a time per worker; I/O overlaps it
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="filters-write")

    def ping(self) -> dict:
        return {"pid": os.getpid(), "gpu": self.gpu}

    def ascent(self, layer: str):
        from bulk_explain.workers.filters.filter_vis import FilterAscent

        if layer not in self._ascents:
            s = self.settings
            self._ascents[layer] = FilterAscent(self.model, layer, self.size, steps=s["steps"],
                                                learning_rate=s["learning_rate"])
        return self._ascents[layer]

    def process(self, unit: dict, key: str) -> dict:
        """Computes, writes and commits one unit; returns its commit marker."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from bulk_explain.schemas.filter_manifest import FILTER_MANIFEST_SCHEMA
        from bulk_explain.workers.filters.filter_vis import deprocess_image, encode_png, start_noise

        s = self.settings
        t0 = time.perf_counter()
        layer, filters = unit["layer"], list(range(unit["start"], unit["stop"]))
        starts = np.stack([start_noise(s["seed"], layer, f, self.size) for f in filters])
        with self._compute:
            ascent = self.ascent(layer)
            result = ascent.ascend(
                filters, starts, batch_size=s.get("batch_size"),
                auto="max" if self.gpu else "measure",
                max_batch=GPU_MAX_BATCH if self.gpu else CPU_MAX_BATCH,
                steps_per_call=_gpu_steps_per_call(s["steps"]) if self.gpu else None,
            )
            timings = dict(ascent.timings)
            steps_per_call = ascent.steps_per_call
        compute_seconds = result.seconds

        def write(k: int) -> str:
            uri = self.layout.image(layer, filters[k])
            self.storage.write_bytes(uri, encode_png(deprocess_image(result.images[k]), "RGB"))
            return uri

        uris = list(self._io.map(write, range(len(filters))))
        start = result.activation_start.astype(np.float32)
        end = result.activation_end.astype(np.float32)
        n = len(filters)
        table = pa.Table.from_pydict(
            {
                "layer": [layer] * n,
                "filter_index": np.asarray(filters, np.int32),
                "image_uri": uris,
                "activation_start": start,
                "activation_end": end,
                "dead": (start == 0) & (end == 0),
                "steps": np.full(n, s["steps"], np.int32),
                "learning_rate": np.full(n, s["learning_rate"], np.float32),
                "size": np.full(n, self.size, np.int32),
                "seed": np.full(n, s["seed"], np.int64),
                "model_fingerprint": [s["fingerprint"]] * n,
                "settings_key": [key] * n,
            },
            schema=FILTER_MANIFEST_SCHEMA,
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.storage.write_bytes(self.layout.part(key, unit["id"]), sink.getvalue().to_pybytes())
        fault_point("after_stage")
        marker = {
            "unit": unit["id"],
            "layer": layer,
            "start": unit["start"],
            "stop": unit["stop"],
            "rows": n,
            "key": key,
            "fingerprint": s["fingerprint"],
            "batch_sizes": sorted(set(result.batch_sizes)),
            "calls": len(result.batch_sizes),
            "steps_per_call": steps_per_call,
            "measured_seconds_per_filter": {f"B={b},k={k}": t for (b, k), t in sorted(timings.items())},
            "compute_seconds": compute_seconds,
            "seconds": time.perf_counter() - t0,
            "device": "gpu" if self.gpu else "cpu",
            "committed_at": time.time(),
        }
        self.storage.write_bytes(self.layout.marker(key, unit["id"]), json.dumps(marker).encode())
        fault_point("after_marker")
        return marker


def _gpu_steps_per_call(steps: int) -> int:
    return GPU_STEPS_PER_CALL if steps % GPU_STEPS_PER_CALL == 0 else 1


# ---------------------------------------------------------------- driver


@dataclasses.dataclass
class FiltersResult:
    output: str
    manifest_uri: str
    summary_uri: str
    settings_key: str
    fingerprint: str
    layers: List[str]
    filters: int = 0
    units: int = 0
    skipped_units: int = 0
    computed_units: int = 0
    failed_units: List[str] = dataclasses.field(default_factory=list)
    failure_reasons: Dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    summary: Dict = dataclasses.field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed_units else 0


class _Log:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(f"[bulk-explain filters] {text}", file=sys.stderr, flush=True)


def _hms(seconds: float) -> str:
    m, s = divmod(int(max(0, seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def worker_settings(config: FiltersConfig, size: int, fingerprint: str, tf_threads=None) -> dict:
    return {
        "model": dataclasses.asdict(config.model),
        "output": config.output,
        "size": size,
        "steps": config.steps,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "fingerprint": fingerprint,
        "tf_threads": tf_threads,
        # explicit, not in Ray's runtime_env (which Ray logs): the URL may hold userinfo
        "s3_endpoint_url": s3_endpoint(config.s3_endpoint_url),
    }


def _committed(storage, layout: FiltersLayout, key: str) -> Dict[str, dict]:
    """Commit markers under `key`, by name (unit id, "weights-...", "sheet-...")."""
    prefix = layout.storage.join(layout.commits_root, key)
    found = {}
    for uri in storage.list_names(prefix):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".json") and not name.startswith("_tmp"):
            marker = read_json(storage, uri)  # missing (deleted meanwhile): None; unreadable: raises
            if marker is not None:
                found[name[:-len(".json")]] = marker
    return found


def _purge_other_keys(storage, layout: FiltersLayout, key: str) -> int:
    """Deletes commits and parts of other keys (their images are about to be overwritten)."""
    removed = 0
    for root in (layout.commits_root, layout.parts_root):
        own = storage.join(root, key)
        for uri in list(storage.list_names(root)):
            if not storage.is_inside(uri, own):
                storage.delete(uri)
                removed += 1
    return removed


def _run_units(config: FiltersConfig, settings: dict, todo: List[Dict], key: str, markers: Dict[str, dict],
               result: FiltersResult, log: _Log) -> None:
    import ray

    from bulk_explain.jobs.distribute import ActorPool, cluster_resources, connect, plan_workers

    started, pool = False, None
    try:
        with ray_startup():  # a signal meanwhile is honoured once Ray is up, then Ray is stopped
            started = connect(config.address)
        shape = plan_workers(config.workers, cluster_resources())
        count = min(shape["count"], len(todo)) if config.workers is None else shape["count"]
        settings = dict(settings, tf_threads=shape["tf_threads"])
        options = {"num_cpus": shape["num_cpus"], "num_gpus": shape["num_gpus"],
                   "runtime_env": {"env_vars": worker_env()}}
        if shape["num_gpus"] == 0 and count > 1:
            options["scheduling_strategy"] = "SPREAD"
        log(f"starting {count} worker(s): {shape['num_cpus']} CPU, {shape['num_gpus']} GPU each")
        pool = ActorPool(FilterWorker, (settings,), count, options)
        pool.wait_ready()
        total_filters = sum(u["stop"] - u["start"] for u in todo)
        state = {"units": 0, "filters": 0, "t0": time.perf_counter()}

        def done(unit, marker):
            markers[unit["id"]] = marker
            result.computed_units += 1
            state["units"] += 1
            state["filters"] += marker["rows"]
            elapsed = time.perf_counter() - state["t0"]
            rate = state["filters"] / elapsed if elapsed > 0 else 0.0
            eta = (total_filters - state["filters"]) / rate if rate > 0 else 0.0
            log(f"units {state['units']}/{len(todo)} | filters {state['filters']}/{total_filters} | "
                f"{rate:.2f} filters/s | ETA {_hms(eta)} ({unit['id']}, batch {marker['batch_sizes']})")

        def failed(unit, reason):
            result.failed_units.append(unit["id"])
            result.failure_reasons[unit["id"]] = reason
            log(f"unit {unit['id']} failed after {config.max_unit_retries} retries: {reason}")

        pool.run("process", todo, done, failed, max_retries=config.max_unit_retries, extra_args=(key,))
    except (KeyboardInterrupt, SystemExit) as exc:
        interrupt = as_job_interrupt(exc)  # Ray's wait() may have re-wrapped our SIGTERM
        log(f"interrupted ({'SIGTERM' if isinstance(interrupt, JobInterrupted) else type(exc).__name__}); "
            f"{len(markers)} committed units are kept, re-run the same command to resume")
        if interrupt is not exc:
            raise interrupt from None
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        if started:
            ray.shutdown()


def _write_contact_sheet(storage, layout: FiltersLayout, layer: str, n: int, columns: int) -> str:
    from bulk_explain.workers.filters.filter_vis import contact_sheet, decode_png, encode_png

    with ThreadPoolExecutor(max_workers=8) as pool:
        tiles = list(pool.map(lambda i: decode_png(storage.read_bytes(layout.image(layer, i))), range(n)))
    uri = layout.sheet(layer)
    storage.write_bytes(uri, encode_png(contact_sheet(tiles, per_row=columns, margin=5), "RGB"))
    return uri


def _layer_summary(table, layer: str) -> Dict:
    import pyarrow.compute as pc

    rows = table.filter(pc.equal(table["layer"], layer))
    start = rows["activation_start"].to_numpy().astype(np.float64)
    end = rows["activation_end"].to_numpy().astype(np.float64)
    dead = rows["dead"].to_numpy(zero_copy_only=False)
    live = ~dead
    positive = live & (start > 0)
    return {
        "filters": int(len(rows)),
        "dead": int(dead.sum()),
        "dead_share": float(dead.mean()) if len(rows) else 0.0,
        "median_gain": float(np.median(end[live] - start[live])) if live.any() else None,
        "median_ratio": float(np.median(end[positive] / start[positive])) if positive.any() else None,
        "improved_share": float((end[live] > start[live]).mean()) if live.any() else None,
        "median_activation_start": float(np.median(start)) if len(rows) else None,
        "median_activation_end": float(np.median(end)) if len(rows) else None,
    }


def run_filters(config: FiltersConfig, lease=None) -> FiltersResult:
    """Runs the filters job (see the module docstring) holding the output's lease
    (`workers/lease.py`; `lease` is a LeaseOptions, None: give up at once if another run holds it).
    Raises FiltersConfigError / ModelError (ValueErrors) for a bad config or model before any Ray
    work starts, OutputBusy when another run holds the output; KeyboardInterrupt / JobInterrupted
    (SIGTERM, exit 143) with committed units kept."""
    from bulk_explain.workers.lease import hold_output_lease

    with sigterm_raises(), s3_storage_configured(config.s3_endpoint_url):
        config = config.validated()
        with hold_output_lease(config.output, lease, job="filters"):
            return _run_filters(config)


def _run_filters(config: FiltersConfig) -> FiltersResult:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bulk_explain.workers.filters.filter_weights import write_weight_plots
    from bulk_explain.workers.storage import storage_for

    t0 = time.perf_counter()
    config = config.validated()
    log = _Log(config.progress)
    storage = storage_for(config.output)
    layout = FiltersLayout(config.output, storage)

    loaded, size = load_filters_model(config.model, config.size)
    model = loaded.model
    layers = resolve_layers(model, config.layers)
    geometry = {layer: layer_geometry(model, layer, size) for layer in layers}
    fingerprint = loaded.fingerprint()
    settings = {"algorithm": ALGORITHM, "steps": config.steps, "learning_rate": config.learning_rate,
                "size": size, "seed": config.seed}
    key = settings_key(fingerprint, settings)
    result = FiltersResult(output=config.output, manifest_uri=layout.manifest, summary_uri=layout.summary_json,
                           settings_key=key, fingerprint=fingerprint, layers=layers)

    import keras
    import tensorflow as tf

    job = {
        "kind": "filters",
        "config": redacted(config.to_dict()),
        "resolved": {"size": size, "layers": layers, "crop": _crop(size), "geometry": geometry},
        "settings": settings,
        "settings_key": key,
        "model_fingerprint": fingerprint,
        "model": {"name": model.name, "parameters": int(model.count_params()),
                  "preprocessing_at_inference": loaded.preprocessing.describe()},
        "ascent_input": INPUT_HANDLING,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
                     "pyarrow": pa.__version__, "python": sys.version.split()[0]},
        "started_at": time.time(),
    }
    storage.write_bytes(layout.job_json, json.dumps(job, indent=2).encode())
    purged = _purge_other_keys(storage, layout, key)
    if purged:
        log(f"removed {purged} commit files of other models/settings (their images get overwritten)")

    filters = {layer: geometry[layer]["filters"] for layer in layers}
    units = plan_units(layers, filters, config.filters_per_unit)
    markers = _committed(storage, layout, key)
    todo = [u for u in units if u["id"] not in markers]
    result.units = len(units)
    result.skipped_units = len(units) - len(todo)
    result.filters = sum(filters.values())
    log(f"{len(layers)} layer(s), {result.filters} filters at {size} px, {len(units)} units "
        f"({result.skipped_units} already committed under {key})")
    if todo:
        _run_units(config, worker_settings(config, size, fingerprint), todo, key, markers, result, log)

    # weight plots: cheap, but committed like the rest so a repeat run writes nothing
    weights_name = "weights-" + hashlib.sha256(json.dumps(
        [layers, config.weights_filters, config.weights_channels, config.sheet_columns]).encode()).hexdigest()[:12]
    weight_records = (markers.get(weights_name) or {}).get("files")
    if weight_records is None:
        order = "BGR" if loaded.preprocessing.scaling == "vgg16" else "RGB"
        first_conv = resolve_layers(model, None)[0] if any(
            isinstance(l, keras.layers.Conv2D) for l in model.layers) else None
        weight_layers = ([first_conv] if first_conv and first_conv not in layers else []) + list(layers)
        weight_records = write_weight_plots(model, weight_layers, storage, layout.weights_root, config.weights_filters,
                                            config.weights_channels, input_order=order, per_row=config.sheet_columns)
        storage.write_bytes(layout.marker(key, weights_name), json.dumps({"files": weight_records}).encode())

    # contact sheets and the manifest, from committed units only
    parts = []
    per_layer_units = {layer: [u for u in units if u["layer"] == layer] for layer in layers}
    complete = []
    for layer in layers:
        lunits = per_layer_units[layer]
        if all(u["id"] in markers for u in lunits):
            complete.append(layer)
        for u in lunits:
            if u["id"] in markers:
                parts.append(pq.read_table(pa.BufferReader(storage.read_bytes(layout.part(key, u["id"])))))
    for layer in complete:
        name = f"sheet-{_safe(layer)}-{config.sheet_columns}"
        if name not in markers or not storage.exists(layout.sheet(layer)):
            uri = _write_contact_sheet(storage, layout, layer, filters[layer], config.sheet_columns)
            storage.write_bytes(layout.marker(key, name), json.dumps({"uri": uri}).encode())

    from bulk_explain.schemas.filter_manifest import FILTER_MANIFEST_SCHEMA

    table = pa.concat_tables(parts) if parts else FILTER_MANIFEST_SCHEMA.empty_table()
    table = table.replace_schema_metadata(FILTER_MANIFEST_SCHEMA.metadata)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(layout.manifest, sink.getvalue().to_pybytes())

    result.seconds = time.perf_counter() - t0
    per_layer = {}
    for layer in layers:
        lm = [markers[u["id"]] for u in per_layer_units[layer] if u["id"] in markers]
        secs = sum(m.get("compute_seconds", 0.0) for m in lm)
        rows = sum(m["rows"] for m in lm)
        entry = _layer_summary(table, layer)
        entry.update({
            "output_hw": geometry[layer]["output_hw"],
            "border_used": geometry[layer]["border_used"],
            "complete": layer in complete,
            "contact_sheet_uri": layout.sheet(layer) if layer in complete else None,
            "batch_sizes": sorted({b for m in lm for b in m.get("batch_sizes", [])}),
            "steps_per_call": sorted({m["steps_per_call"] for m in lm if "steps_per_call" in m}),
            "compute_seconds": secs,
            "seconds_per_filter": secs / rows if rows else None,
        })
        per_layer[layer] = entry
    summary = {
        "settings_key": key,
        "model_fingerprint": fingerprint,
        "settings": settings,
        "gain_definition": "median_gain = median(activation_end - activation_start) over non-dead filters; "
                           "median_ratio = median(activation_end / activation_start) over filters with start > 0",
        "dead_definition": "activation_start == 0 and activation_end == 0",
        "activation_definition": "mean of the filter's activation map with a 2-px border cut (the lecture's loss)",
        "layers": per_layer,
        "filters": result.filters,
        "rows": table.num_rows,
        "units": result.units,
        "skipped_units": result.skipped_units,
        "computed_units": result.computed_units,
        "failed_units": result.failed_units,
        "failure_reasons": result.failure_reasons,
        "weight_plots": weight_records,
        "seconds": result.seconds,
        "finished_at": time.time(),
    }
    storage.write_bytes(layout.summary_json, json.dumps(summary, indent=2).encode())
    result.summary = summary
    state = "finished" if not result.failed_units else "finished WITH FAILED UNITS"
    log(f"{state}: {table.num_rows} filters in the manifest, {result.computed_units} units computed, "
        f"{result.skipped_units} skipped, {len(result.failed_units)} failed in {result.seconds:.1f}s -> {layout.manifest}")
    return result


def _crop(size: int) -> int:
    from bulk_explain.workers.filters.filter_vis import crop_for_size

    return crop_for_size(size)
