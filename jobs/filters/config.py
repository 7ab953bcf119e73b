"""The filters kind's config: one frozen dataclass, validated before Ray starts, and its CLI options.

    FiltersConfig(output="vis/", model=ModelSpec("vgg16", weights="random")).validated()
    bulk-explain filters --model vgg16 --weights imagenet --output vis/
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Optional, Tuple

from bulk_explain.jobs.validation import ConfigError, require_int
from bulk_explain.workers.models import ModelSpec, model_kinds

ALGORITHM = "lecture-gradient-ascent/1"
DEFAULT_FILTERS_PER_UNIT = 64
BACKENDS = ("tensorflow", "jax")
# Where and how fast, not what: a change of these never refuses a DST (units are re-cut by
# `filters_per_unit`, whose content hashes then differ).
NON_RESULT_FIELDS = ("output", "address", "workers", "batch_size", "filters_per_unit", "max_unit_retries",
                     "progress", "s3_endpoint_url", "overwrite", "weights_filters", "weights_channels",
                     "sheet_columns")


class FiltersConfigError(ConfigError):
    """The filters job cannot start as configured. The message is one line meant for the user."""


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
        noise_seed: seeds the start noise (uniform 0.4..0.6 per (noise_seed, layer, filter)); the
            model's random weights are seeded by `model.seed` (`--seed`, as in `bulk-explain run`).
        batch_size: filters per compiled call; None = measured per layer on CPU, 64 on GPU
            (halved on out-of-memory either way).
        address, workers: Ray cluster and number of worker actors (see jobs/distribute.py).
        weights_filters, weights_channels: N filters x M channels in the weight plots.
        filters_per_unit: filters per unit of work and of commit.
        sheet_columns: filters per contact-sheet row.
        max_unit_retries: attempts per unit after a worker failure.
        progress: progress lines on stderr.
        s3_endpoint_url: S3-compatible endpoint for s3:// outputs.
        overwrite: replace the results of another model or other settings in DST (refused otherwise).
        backend: the Keras backend of the driver and the workers (tensorflow or jax).
    """

    output: str
    model: ModelSpec
    layers: Optional[Tuple[str, ...]] = None
    steps: int = 30
    learning_rate: float = 10.0
    size: Optional[int] = None
    noise_seed: int = 0
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
    overwrite: bool = False
    backend: str = "tensorflow"

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
            ("noise seed", self.noise_seed, 0),
            ("weights filters", self.weights_filters, 1),
            ("weights channels", self.weights_channels, 1),
            ("filters per unit", self.filters_per_unit, 1),
            ("sheet columns", self.sheet_columns, 1),
            ("max unit retries", self.max_unit_retries, 0),
        ):
            require_int(name, value, low, FiltersConfigError)
        for name, value, low in (("size", self.size, 16), ("batch size", self.batch_size, 1),
                                 ("workers", self.workers, 1), ("input size", m.input_size, 8)):
            require_int(name, value, low, FiltersConfigError, optional=True)
        if self.backend not in BACKENDS:
            raise FiltersConfigError(f"unknown --backend {self.backend!r}; expected one of {', '.join(BACKENDS)}")
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

    def result_fingerprint(self) -> str:
        """sha256 of the settings the filter images and rows depend on (not where or how fast
        they are computed); a DST holding another fingerprint is refused unless `overwrite`."""
        d = self.to_dict()
        for key in NON_RESULT_FIELDS:
            d.pop(key, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict) -> "FiltersConfig":
        d = dict(d)
        d["model"] = ModelSpec(**d["model"])
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        return cls(**d)


def add_arguments(parser) -> None:
    """Adds the `bulk-explain filters` options to an argparse parser."""
    p = parser
    p.add_argument("--model", required=True, choices=model_kinds(), help="model kind")
    p.add_argument("--model-file", help=".keras or legacy .h5 model file (cats_dogs, keras); a conv base works")
    p.add_argument("--weights", default=None,
                   help="imagenet (Keras' download, cached), random (seeded by --seed), or a weights/model file; "
                        "default: the --model-file's own weights when one is given, else imagenet")
    p.add_argument("--output", required=True, metavar="DST", help="folder or s3://bucket/prefix")
    p.add_argument("--layers", default="all", help="all (every Conv2D layer) or comma-separated layer names")
    p.add_argument("--steps", type=int, default=30, help="gradient ascent steps (lecture: 30)")
    p.add_argument("--size", type=int, default=None,
                   help="square image size (default 150, or the model's fixed input size)")
    p.add_argument("--learning-rate", type=float, default=10.0, help="step length (lecture: 10)")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the start noise")
    p.add_argument("--batch-size", type=int, default=None,
                   help="filters per compiled call (default: measured per layer on CPU, 64 on GPU)")
    p.add_argument("--address", default=None, help="Ray: omit for embedded local Ray; auto or HOST:PORT for a cluster")
    p.add_argument("--workers", type=int, default=None, help="worker actors (default: one per GPU, else per node)")
    p.add_argument("--weights-filters", type=int, default=16, help="filters (rows) in the weight plots")
    p.add_argument("--weights-channels", type=int, default=16, help="input channels (columns) in the weight plots")
    p.add_argument("--input-size", type=int, default=None,
                   help="input size to build size-agnostic or random-weight models at (default: --size)")
    # --seed means the same in every kind (the random weights); --model-seed was its old name here.
    p.add_argument("--seed", "--model-seed", dest="seed", type=int, default=0, help="seed for --weights random")
    p.add_argument("--filters-per-unit", type=int, default=DEFAULT_FILTERS_PER_UNIT,
                   help="filters per unit of work and of commit")
    p.add_argument("--sheet-columns", type=int, default=16, help="filters per contact-sheet row")
    p.add_argument("--unsafe-model-code", action="store_true",
                   help="allow Lambda layers / custom code in model files (only for files you trust)")
    p.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (MinIO, Ceph...)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of another model or other settings in DST (refused otherwise)")
    p.add_argument("--backend", default="tensorflow", choices=BACKENDS,
                   help="Keras backend of the driver and the workers (jax needs the jax extra)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def config_from_args(args) -> FiltersConfig:
    """FiltersConfig from parsed arguments, validated. Raises FiltersConfigError (a ValueError)."""
    spec = ModelSpec(
        kind=args.model,
        weights=args.weights,
        model_file=args.model_file,
        input_size=args.input_size,
        seed=args.seed,
        unsafe_model_code=bool(getattr(args, "unsafe_model_code", False)),
    )
    return FiltersConfig(
        output=args.output,
        model=spec,
        layers=args.layers,
        steps=args.steps,
        learning_rate=args.learning_rate,
        size=args.size,
        noise_seed=args.noise_seed,
        batch_size=args.batch_size,
        address=args.address,
        workers=args.workers,
        weights_filters=args.weights_filters,
        weights_channels=args.weights_channels,
        filters_per_unit=getattr(args, "filters_per_unit", DEFAULT_FILTERS_PER_UNIT),
        sheet_columns=getattr(args, "sheet_columns", 16),
        progress=not getattr(args, "quiet", False),
        s3_endpoint_url=getattr(args, "s3_endpoint_url", None),
        overwrite=bool(getattr(args, "overwrite", False)),
        backend=getattr(args, "backend", "tensorflow"),
    ).validated()
