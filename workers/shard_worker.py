"""The worker: holds one model and runs shards through read -> compute -> write.

It is a plain class; the driver wraps it in a Ray actor (`ray.remote(...)(ExplainWorker)`), and
tests may call it in-process.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import numpy as np

from workers.labels import LabelMatcher, resolve_cam_classes  # noqa: F401 (resolve_cam_classes: re-exported)
from workers.tf_runtime import configure_tensorflow


class ExplainWorker:
    """Loads the model once and processes shards.

    Args:
        settings: plain dict built by the driver (see `jobs.driver.worker_settings`).
    """

    def __init__(self, settings: dict):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        configure_tensorflow(settings.get("tf_threads"))
        from workers.explain_step import ExplainStep
        from workers.layout import OutputLayout
        from workers.models import ModelSpec, load_model
        from workers.storage import configure_storage

        self.settings = settings
        configure_storage("s3", endpoint_url=settings.get("s3_endpoint_url"))
        self.loaded = load_model(ModelSpec(**settings["model"]))
        # A model file that differs from the one the driver checked (changed on S3 since, another
        # copy on this node) must not produce rows under the driver's fingerprint: every shard of
        # this worker fails with the reason instead.
        expected, loaded = settings.get("model_fingerprint"), self.loaded.fingerprint()
        self.model_mismatch = None
        if expected and loaded != expected:
            self.model_mismatch = (
                f"worker loaded a different model than the driver checked (fingerprint {loaded[:12]}, "
                f"driver {expected[:12]}): the model file or weights differ between machines or changed")
        self.step = ExplainStep(
            self.loaded,
            batch_size=settings["batch_size"],
            target_layer=settings.get("target_layer"),
            activation_layers=settings.get("activation_layers"),
            method=settings.get("cam_method", "gradcam"),
            cam_score=settings.get("cam_score", "logit"),
            top_k=settings.get("top_k", 5),
        )
        self.layout = OutputLayout(settings["output"])
        self.labels = LabelMatcher(self.loaded.class_names)
        self.read_pool = ThreadPoolExecutor(settings.get("read_threads", 4), thread_name_prefix="read")
        self.write_pool = ThreadPoolExecutor(settings.get("write_threads", 4), thread_name_prefix="write")
        # Two shards may run at once (actor max_concurrency=2) so one's decode overlaps the other's
        # compute; the compiled step itself runs one batch at a time.
        self.compute_lock = threading.Lock()
        from workers.reader import ByteBudget

        # Decoded images held by this actor, over both shards in flight (see workers/reader.py).
        self.byte_budget = ByteBudget(settings.get("max_decoded_bytes") or 2 * 1024**3)
        # Images through compute since start: the driver polls it (`progress`) for progress lines
        # between shard commits.
        self._computed = 0
        self._count_lock = threading.Lock()
        # Warm the compiled step so the first shard's timing is not the trace.
        h, w = self.loaded.preprocessing.size
        self.step(np.zeros((1, h, w, 3), np.uint8))

    def ping(self) -> str:
        return "ok"

    def progress(self) -> int:
        """Images read and computed by this worker so far (error rows included). Cheap: the driver
        calls it every few seconds in the actor's own `progress` concurrency group, so it answers
        while both shard slots are busy."""
        return self._computed

    def describe(self) -> dict:
        return {
            "target_layer": self.step.target_layer,
            "activation_layers": self.step.activation_layers,
            "pid": os.getpid(),
        }

    def process_shard(self, task, result_fingerprint: str = "") -> dict:
        """Runs one shard end to end and commits it. Per-image failures become error rows.

        Returns:
            the commit marker dict (shard, rows, ok, error, seconds, ...).
        """
        from workers.models import ModelError
        from workers.reader import iter_decoded_batches
        from workers.writer import ShardWriter

        if self.model_mismatch:
            raise ModelError(self.model_mismatch)
        t0 = time.perf_counter()
        s = self.settings
        writer = ShardWriter(self.layout, task.shard, self.loaded.class_names, self.step.activation_layers,
                             s.get("overlay_quality", 90))
        grids_left = int(s.get("activation_grids", 0))
        rows: List = []  # futures or rows, in plan order
        in_flight = collections.deque()
        max_in_flight = 2 * self.step.batch_size
        for batch in iter_decoded_batches(task, self.loaded.preprocessing, self.step.batch_size, self.read_pool,
                                          budget=self.byte_budget):
            good = [item for item in batch if item.ok]
            results: Dict[int, dict] = {}
            if good:
                images = np.stack([item.model_input for item in good])
                requested = resolve_cam_classes([item.label for item in good], s.get("cam_class", "pred"),
                                                self.loaded.class_names, self.labels)
                with self.compute_lock:
                    out = self.step(images, requested)
                    grid_maps, take = None, 0
                    if grids_left > 0:
                        take = min(grids_left, len(good))
                        grid_maps = self.step.activation_maps(images[:take])
                        grids_left -= take
                for j, item in enumerate(good):
                    results[id(item)] = {k: v[j] for k, v in out.items()}
                    if j < take:
                        results[id(item)]["_maps"] = [m[j] for m in grid_maps]
            for item in batch:
                if item.ok:
                    r = results[id(item)]
                    fut = self.write_pool.submit(writer.image_row, item, r, r.pop("_maps", None))
                    rows.append(fut)
                    in_flight.append(fut)
                else:
                    rows.append(writer.error_row(item))
            with self._count_lock:
                self._computed += len(batch)
            # Bound memory: original images wait in the write queue until encoded.
            while len(in_flight) > max_in_flight:
                in_flight.popleft().result()
        rows = [r.result() if hasattr(r, "result") else r for r in rows]
        return writer.commit(rows, task.content_hash, time.perf_counter() - t0, result_fingerprint)
