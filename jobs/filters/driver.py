"""The filters kind on the shared runner (`bulk_explain.jobs.runner`): every filter of the chosen
conv layers visualized by the lecture's gradient ascent, batched on Ray workers, plus weight plots.

    from bulk_explain.jobs.filters import FiltersConfig, run_filters
    run_filters(FiltersConfig(output="vis/", model=ModelSpec("vgg16", weights="random")))
    bulk-explain filters --model vgg16 --weights imagenet --output vis/

Steps this kind supplies (the runner does the rest: lease, refusal, repair, pool, signals):
  plan      the driver loads the model once (`load_feature_model`: vgg16 as its conv base),
            resolves the layers and their geometry, and cuts each layer's filters into units of
            `filters_per_unit` (`plan.py`); the settings key = hash(model fingerprint, settings).
  worker    `workers/filters/worker.py`: start noise per filter, one compiled ascent call per batch
            of filters, one PNG per filter (named by the settings key), the unit's part committed.
  finish    weight plots, one contact sheet per complete layer, `filters/manifest.parquet`
            assembled from the committed parts (one atomic write), `summary.json`.

Readers: `filters/manifest.parquet` changes only at the end of a run, in one write. Images are
named per settings key, so a run with other settings (`--overwrite`) never overwrites an image
the visible manifest points to; images no manifest references any more are deleted by the next
run (a reader of the previous manifest keeps its images for a whole run).

The ascent feeds the image tensor to the model as it is (no VGG16 mean subtraction), exactly as
the lecture does; job.json records this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import numpy as np

from bulk_explain.jobs.filters.config import ALGORITHM, NON_RESULT_FIELDS, FiltersConfig, FiltersConfigError
from bulk_explain.jobs.filters.plan import plan_units, settings_key
from bulk_explain.jobs.runner import Plan, RunCounts, UnitJob, run_job
from bulk_explain.jobs.runtime import read_json
from bulk_explain.workers.filters.layout import FiltersLayout, safe_name
from bulk_explain.workers.models import ModelError, load_feature_model
from bulk_explain.workers.storage import is_temp_name

INPUT_HANDLING = "the image tensor goes to the model as is (no model preprocessing), as in the lecture"
_OPTION_OF = {"model.kind": "--model", "model.weights": "--weights", "model.model_file": "--model-file",
              "model.seed": "--seed", "model.input_size": "--input-size"}


@dataclasses.dataclass
class FiltersResult:
    """What a filters run did.

    Attributes:
        units, skipped_units, computed_units: unit counts (skipped = committed before this run).
        failed_units, failure_reasons: unit ids given up after retries, and why.
        settings_key: names this run's filter images; fingerprint: the model's.
    """

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
    failed_units: List[int] = dataclasses.field(default_factory=list)
    failure_reasons: Dict[int, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    summary: Dict = dataclasses.field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed_units else 0


def run_filters(config: FiltersConfig, lease=None, progress: Optional[bool] = None) -> FiltersResult:
    """Runs the filters job (see the module docstring) through the shared runner.

    Args:
        config: the job (validated here, before Ray starts).
        lease: `LeaseOptions` for another run's lease on DST; None: give up at once.
        progress: progress lines on stderr (None: `config.progress`).

    Raises:
        FiltersConfigError / ModelError (ValueErrors, exit 2) before any Ray work; OutputBusy (exit 4);
        EnvironmentProblem (exit 5); KeyboardInterrupt / JobInterrupted (130 / 143) with committed
        units kept.
    """
    return run_job(FiltersJob(config, config.progress if progress is None else progress), lease)


def worker_settings(config: FiltersConfig, size: int, model_fingerprint: str, key: str, tf_threads=None) -> dict:
    """The plain dict a `FilterWorker` is built from."""
    return {
        "model": dataclasses.asdict(config.model),
        "output": config.output,
        "size": size,
        "steps": config.steps,
        "learning_rate": config.learning_rate,
        "seed": config.noise_seed,
        "batch_size": config.batch_size,
        "model_fingerprint": model_fingerprint,
        "settings_key": key,
        "tf_threads": tf_threads,
        "backend": config.backend,
    }


class FiltersJob(UnitJob):
    """The filters kind: units are filter ranges of conv layers; the worker is `FilterWorker`."""

    name = "filters"
    config_error = FiltersConfigError
    non_result_fields = NON_RESULT_FIELDS
    option_names = _OPTION_OF
    process_method = "process"
    unit_noun = "unit"
    item_noun = "filters"

    def prepare(self) -> None:
        from bulk_explain.workers.backends import BackendError, select_backend
        from bulk_explain.workers.storage import StorageError, storage_for

        try:
            select_backend(self.config.backend)  # before Keras is imported here
        except BackendError as exc:
            raise FiltersConfigError(str(exc)) from None
        try:
            storage_for(self.config.output).check_access(self.config.output, write=True)
        except StorageError as exc:
            raise FiltersConfigError(str(exc)) from None
        self.layout = FiltersLayout(self.config.output)

    def max_retries(self) -> int:
        return self.config.max_unit_retries

    def plan(self) -> Plan:
        from bulk_explain.workers.tf_runtime import import_backend_quietly

        config = self.config
        import_backend_quietly(config.backend)  # TensorFlow quietly, or JAX without TensorFlow
        loaded, size = load_feature_model(config.model, config.size)
        layers = loaded.resolve_layers(config.layers)
        self.loaded, self.size, self.layers = loaded, size, layers
        self.geometry = {layer: loaded.layer_geometry(layer, size) for layer in layers}
        self.model_fingerprint = loaded.fingerprint()
        self.settings = {"algorithm": ALGORITHM, "steps": config.steps, "learning_rate": config.learning_rate,
                         "size": size, "seed": config.noise_seed}
        self.key = settings_key(self.model_fingerprint, self.settings)
        self.filters = {layer: self.geometry[layer]["filters"] for layer in layers}
        self.units = plan_units(layers, self.filters, config.filters_per_unit, self.key)
        return Plan(units=self.units)

    def check(self, plan: Plan, units) -> None:
        self.refuse_other_model((self.previous or {}).get("model_fingerprint"), self.model_fingerprint)
        todo = len(units.todo)  # roll-forward units are committed (their marker is the commit point)
        self.log.message(f"{len(self.layers)} layer(s), {sum(self.filters.values())} filters at {self.size} px, "
                         f"{len(plan.units)} units ({len(plan.units) - todo} already committed, key {self.key})")

    def before_work(self, plan: Plan, units, counts: RunCounts) -> None:
        deleted = self._delete_stale_images()
        if deleted:
            self.log.message(f"deleted {deleted} filter images of earlier settings no manifest points to")
        self.log.reset(total_shards=len(plan.units), skipped=counts.skipped,
                       images_todo=sum(len(u) for u in counts.todo))

    def _delete_stale_images(self) -> int:
        """Images of other settings that the visible manifest does not reference (left by a run
        with other settings, or by the run before the manifest was last replaced), and temp files
        of image writes a killed worker left (the lease keeps every other writer out)."""
        storage = self.layout.storage
        referenced = set()
        try:
            import pyarrow.parquet as pq

            data = storage.read_bytes(self.layout.manifest)
            referenced = set(pq.read_table(io.BytesIO(data), columns=["image_uri"]).column("image_uri").to_pylist())
        except FileNotFoundError:
            pass
        own = f"-{self.key[:12]}.png"
        stale = [u for u in self.layout.filter_images(temp_files=True) if u not in referenced and not u.endswith(own)]
        for uri in stale:
            storage.delete(uri)
        return len(stale)

    def delete_temp_files(self, shards) -> None:
        super().delete_temp_files(shards)
        if not self.layout.storage.leaves_temp_files:
            return
        for uri in self.layout.filter_images(temp_files=True):
            if is_temp_name(uri):
                self.layout.storage.delete(uri)

    def job_record(self) -> dict:
        import keras
        import pyarrow as pa

        from bulk_explain.workers.filters.filter_vis import crop_for_size
        from bulk_explain.workers.backends import get_backend

        model = self.loaded.model
        return {
            "resolved": {"size": self.size, "layers": self.layers, "crop": crop_for_size(self.size),
                         "geometry": self.geometry},
            "settings": self.settings,
            "settings_key": self.key,
            "model_fingerprint": self.model_fingerprint,
            "model": {"name": model.name, "parameters": int(model.count_params()),
                      "preprocessing_at_inference": self.loaded.preprocessing.describe()},
            "ascent_input": INPUT_HANDLING,
            "versions": {**get_backend().versions(), "keras": keras.__version__, "numpy": np.__version__,
                         "pyarrow": pa.__version__, "python": sys.version.split()[0]},
        }

    def worker(self, shape):
        from bulk_explain.workers.filters.worker import FilterWorker

        from bulk_explain.workers.backends import BACKEND_ENV

        settings = worker_settings(self.config, self.size, self.model_fingerprint, self.key, shape["tf_threads"])
        return FilterWorker, settings, {BACKEND_ENV: self.config.backend}, {}

    # ---------------------------------------------------------------- finish

    def finish(self, counts: RunCounts):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from bulk_explain.schemas.filter_manifest import FILTER_MANIFEST_SCHEMA

        config, layout, storage = self.config, self.layout, self.layout.storage
        markers = counts.markers
        previous = read_json(storage, layout.summary_json) or {}
        weight_records = self._weight_plots(previous, computed=counts.computed > 0)
        per_layer_units = {layer: [u for u in self.units if u.layer == layer] for layer in self.layers}
        complete = [layer for layer in self.layers if all(u.shard in markers for u in per_layer_units[layer])]
        sheets = self._contact_sheets(complete, previous, {u.layer for u in counts.todo})

        committed = [u for u in self.units if u.shard in markers]
        with ThreadPoolExecutor(max_workers=8) as pool:
            parts = list(pool.map(lambda u: pq.read_table(io.BytesIO(storage.read_bytes(layout.manifest_part(u.shard)))),
                                  committed))
        table = pa.concat_tables(parts) if parts else FILTER_MANIFEST_SCHEMA.empty_table()
        table = table.replace_schema_metadata(FILTER_MANIFEST_SCHEMA.metadata)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(layout.manifest, sink.getvalue().to_pybytes())  # the visible change, one write

        result = FiltersResult(output=config.output, manifest_uri=layout.manifest, summary_uri=layout.summary_json,
                               settings_key=self.key, fingerprint=self.model_fingerprint, layers=self.layers,
                               filters=sum(self.filters.values()), units=counts.units, skipped_units=counts.skipped,
                               computed_units=counts.computed, failed_units=list(counts.failed),
                               failure_reasons=dict(counts.failure_reasons))
        result.seconds = time.perf_counter() - self.t0
        per_layer = {}
        for layer in self.layers:
            lm = [markers[u.shard] for u in per_layer_units[layer] if u.shard in markers]
            secs = sum(m.get("compute_seconds", 0.0) for m in lm)
            rows = sum(m["rows"] for m in lm)
            entry = _layer_summary(table, layer)
            entry.update({
                "output_hw": self.geometry[layer]["output_hw"],
                "border_used": self.geometry[layer]["border_used"],
                "complete": layer in complete,
                "contact_sheet_uri": layout.sheet(layer) if layer in complete else None,
                "sheet_key": sheets.get(layer),
                "batch_sizes": sorted({b for m in lm for b in m.get("batch_sizes", [])}),
                "steps_per_call": sorted({m["steps_per_call"] for m in lm if "steps_per_call" in m}),
                "compute_seconds": secs,
                "seconds_per_filter": secs / rows if rows else None,
            })
            per_layer[layer] = entry
        summary = {
            "settings_key": self.key,
            "model_fingerprint": self.model_fingerprint,
            "settings": self.settings,
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
            "rolled_forward_units": counts.rolled_forward,
            "removed_units": counts.removed,
            "mismatched_units": counts.mismatched,
            "failed_units": result.failed_units,
            "failure_reasons": {str(k): v for k, v in result.failure_reasons.items()},
            "weight_plots": weight_records,
            "weights_key": self._weights_key(),
            "startup_seconds": counts.startup_seconds,
            "processing_seconds": counts.processing_seconds,
            "seconds": result.seconds,
            "finished_at": time.time(),
        }
        result.summary = summary
        state = "finished" if not result.failed_units else "finished WITH FAILED UNITS"
        self.log.message(f"{state}: {table.num_rows} filters in the manifest, {result.computed_units} units computed, "
                         f"{result.skipped_units} skipped, {len(result.failed_units)} failed in {result.seconds:.1f}s "
                         f"-> {layout.manifest}")
        return result, summary

    def _weights_key(self) -> str:
        c = self.config
        return hashlib.sha256(json.dumps([self.model_fingerprint, self.layers, c.weights_filters, c.weights_channels,
                                          c.sheet_columns]).encode()).hexdigest()[:16]

    def _weight_plots(self, previous: dict, computed: bool) -> list:
        """Weight plots of the selected layers (and always the first conv layer's colour view);
        reused when the previous summary made them for the same model and parameters."""
        from bulk_explain.workers.filters.filter_weights import write_weight_plots

        storage, c = self.layout.storage, self.config
        records = previous.get("weight_plots")
        if previous.get("weights_key") == self._weights_key() and records and not computed \
                and all(storage.exists(r["uri"]) for r in records if isinstance(r, dict) and "uri" in r):
            return records
        model = self.loaded.model
        conv = self.loaded.conv_layer_names()
        first = conv[0] if conv else None
        layers = ([first] if first and first not in self.layers else []) + list(self.layers)
        order = "BGR" if self.loaded.preprocessing.scaling == "vgg16" else "RGB"
        return write_weight_plots(model, layers, storage, self.layout.weights_root, c.weights_filters,
                                  c.weights_channels, input_order=order, per_row=c.sheet_columns)

    def _contact_sheets(self, complete: List[str], previous: dict, touched: set) -> Dict[str, str]:
        """One sheet per complete layer; rewritten when a unit of the layer was computed, the key
        or the columns changed, or the file is missing."""
        from bulk_explain.workers.filters.filter_vis import contact_sheet, decode_png, encode_png

        storage, layout = self.layout.storage, self.layout
        done = {}
        for layer in complete:
            key = hashlib.sha256(json.dumps([self.key, layer, self.config.sheet_columns]).encode()).hexdigest()[:16]
            done[layer] = key
            before = (previous.get("layers") or {}).get(layer) or {}
            if layer not in touched and before.get("sheet_key") == key and storage.exists(layout.sheet(layer)):
                continue
            n = self.filters[layer]
            with ThreadPoolExecutor(max_workers=8) as pool:
                tiles = list(pool.map(lambda i: decode_png(storage.read_bytes(layout.image(layer, i, self.key))),
                                      range(n)))
            storage.write_bytes(layout.sheet(layer), encode_png(contact_sheet(tiles, per_row=self.config.sheet_columns,
                                                                              margin=5), "RGB"))
        return done


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


__all__ = ["FiltersConfig", "FiltersConfigError", "FiltersJob", "FiltersResult", "ModelError", "run_filters",
           "safe_name", "worker_settings"]
