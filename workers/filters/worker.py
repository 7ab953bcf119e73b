"""The filters kind's Ray actor: holds one model and turns units (layer, filter range) into filter
images, a manifest part and a commit (`bulk_explain.workers.commit`, the same protocol as the
explain kind's shards).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bulk_explain.workers.commit import commit_unit
from bulk_explain.workers.filters.layout import FiltersLayout
from bulk_explain.workers.models import ModelError, ModelSpec, load_feature_model

GPU_MAX_BATCH = 64
CPU_MAX_BATCH = 64
# On a GPU each compiled call is enqueued asynchronously, so calling a one-step function 30 times
# costs next to nothing over one 30-step call, while tracing the unrolled 30-step graph costs
# seconds of host time per layer (measured here: 2-8 s per VGG16 layer): 13 layers of it would eat
# the < 60 s budget for all VGG16 filters. Not measured on a GPU yet.
GPU_STEPS_PER_CALL = 1


class FilterWorker:
    """Holds one model and processes units; a Ray actor in the pool, or used in-process.

    Args:
        settings: plain dict from `bulk_explain.jobs.filters.driver.worker_settings`.
        loaded: an already loaded model (in-process use); else loaded from settings["model"].

    Raises:
        ModelError: the model built here is not the driver's (fingerprints differ).
    """

    def __init__(self, settings: dict, loaded=None):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # KERAS_BACKEND before Keras is imported (the driver also sets it in the actor's env).
        from bulk_explain.workers.backends import get_backend, select_backend
        from bulk_explain.workers.storage import configure_storage

        select_backend(settings.get("backend"))
        self.backend = get_backend()
        self.backend.configure(settings.get("tf_threads"))
        configure_storage("s3", endpoint_url=settings.get("s3_endpoint_url"))
        self.settings = settings
        if loaded is None:
            loaded, _ = load_feature_model(ModelSpec(**settings["model"]), settings["size"])
            fingerprint = loaded.fingerprint()
            if fingerprint != settings["model_fingerprint"]:
                raise ModelError(
                    f"worker built a different model than the driver (fingerprint {fingerprint[:12]} vs "
                    f"{settings['model_fingerprint'][:12]}): the model file or weights differ between machines")
        self.loaded = loaded
        self.model = loaded.model
        self.size = int(settings["size"])
        self.gpu = self.backend.has_gpu()
        self.layout = FiltersLayout(settings["output"])
        self.storage = self.layout.storage
        self._ascents = {}
        self._compute = threading.Lock()  # one ascent at a time per worker; I/O overlaps it
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="filters-write")

    def ping(self) -> dict:
        return {"pid": os.getpid(), "gpu": self.gpu}

    def describe(self) -> dict:
        return {"device": "gpu" if self.gpu else "cpu", "batch_size": self.settings.get("batch_size"),
                "backend": self.backend.name, "tensorflow_imported": "tensorflow" in sys.modules}

    def ascent(self, layer: str):
        from bulk_explain.workers.filters.filter_vis import FilterAscent

        if layer not in self._ascents:
            s = self.settings
            self._ascents[layer] = FilterAscent(self.model, layer, self.size, steps=s["steps"],
                                                learning_rate=s["learning_rate"])
        return self._ascents[layer]

    def process(self, unit, result_fingerprint: str) -> dict:
        """Computes one unit (`bulk_explain.jobs.filters.plan.FilterUnit`), writes its images,
        commits its part; returns the commit marker.

        Raises:
            CommitConflict: another run redid the unit meanwhile (the unit is retried).
        """
        import pyarrow as pa

        from bulk_explain.schemas.filter_manifest import FILTER_MANIFEST_SCHEMA
        from bulk_explain.workers.filters.filter_vis import deprocess_image, encode_png, start_noise

        s = self.settings
        key = s["settings_key"]
        t0 = time.perf_counter()
        layer, filters = unit.layer, list(range(unit.start, unit.stop))
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

        def write(k: int) -> str:
            uri = self.layout.image(layer, filters[k], key)
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
                "model_fingerprint": [s["model_fingerprint"]] * n,
                "settings_key": [key] * n,
            },
            schema=FILTER_MANIFEST_SCHEMA,
        )
        return commit_unit(self.layout, unit.shard, table, unit.content_hash, result_fingerprint, {
            "layer": layer,
            "start": unit.start,
            "stop": unit.stop,
            "settings_key": key,
            "batch_sizes": sorted(set(result.batch_sizes)),
            "calls": len(result.batch_sizes),
            "steps_per_call": steps_per_call,
            "measured_seconds_per_filter": {f"B={b},k={k}": t for (b, k), t in sorted(timings.items())},
            "compute_seconds": result.seconds,
            "seconds": time.perf_counter() - t0,
            "device": "gpu" if self.gpu else "cpu",
        })


def _gpu_steps_per_call(steps: int) -> int:
    return GPU_STEPS_PER_CALL if steps % GPU_STEPS_PER_CALL == 0 else 1
