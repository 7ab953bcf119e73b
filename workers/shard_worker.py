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

from workers.tf_runtime import configure_tensorflow


def resolve_cam_classes(labels, cam_class, class_names) -> np.ndarray:
    """Per image class to explain: -1 = predicted; a fixed index; or the folder label's class."""
    n = len(labels)
    if cam_class == "pred":
        return np.full(n, -1, np.int32)
    if isinstance(cam_class, int):
        return np.full(n, cam_class, np.int32)
    lookup = {name.lower(): i for i, name in enumerate(class_names)}
    out = np.full(n, -1, np.int32)
    for i, label in enumerate(labels):
        if label is None:
            continue
        key = label.lower()
        # cats/ and dogs/ folders name the classes cat and dog
        out[i] = lookup.get(key, lookup.get(key[:-1], -1) if key.endswith("s") else -1)
    return out


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

        self.settings = settings
        self.loaded = load_model(ModelSpec(**settings["model"]))
        self.step = ExplainStep(
            self.loaded,
            batch_size=settings["batch_size"],
            target_layer=settings.get("target_layer"),
            activation_layers=settings.get("activation_layers"),
            method=settings.get("cam_method", "gradcam"),
            cam_score=settings.get("cam_score", "logit"),
            top_k=settings.get("top_k", 5),
            metrics=settings.get("metrics") or (),
            metric_steps=settings.get("metric_steps", 16),
            scorecam_channels=settings.get("scorecam_channels"),
        )
        self.layout = OutputLayout(settings["output"])
        self.read_pool = ThreadPoolExecutor(settings.get("read_threads", 4), thread_name_prefix="read")
        self.write_pool = ThreadPoolExecutor(settings.get("write_threads", 4), thread_name_prefix="write")
        # Two shards may run at once (actor max_concurrency=2) so one's decode overlaps the other's
        # compute; the compiled step itself runs one batch at a time.
        self.compute_lock = threading.Lock()
        # Warm the compiled step so the first shard's timing is not the trace.
        h, w = self.loaded.preprocessing.size
        self.step(np.zeros((1, h, w, 3), np.uint8))

    def ping(self) -> str:
        return "ok"

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
        from workers.reader import iter_decoded_batches
        from workers.writer import ShardWriter

        t0 = time.perf_counter()
        s = self.settings
        writer = ShardWriter(self.layout, task.shard, self.loaded.class_names, self.step.activation_layers,
                             s.get("overlay_quality", 90), methods=self.step.method_names)
        grids_left = int(s.get("activation_grids", 0))
        rows: List = []  # futures or rows, in plan order
        in_flight = collections.deque()
        max_in_flight = 2 * self.step.batch_size
        for batch in iter_decoded_batches(task, self.loaded.preprocessing, self.step.batch_size, self.read_pool):
            good = [item for item in batch if item.ok]
            results: Dict[int, dict] = {}
            if good:
                images = np.stack([item.model_input for item in good])
                requested = resolve_cam_classes([item.label for item in good], s.get("cam_class", "pred"),
                                                self.loaded.class_names)
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
            # Bound memory: original images wait in the write queue until encoded.
            while len(in_flight) > max_in_flight:
                in_flight.popleft().result()
        rows = [r.result() if hasattr(r, "result") else r for r in rows]
        return writer.commit(rows, task.content_hash, time.perf_counter() - t0, result_fingerprint)
