"""The worker: holds one model and runs shards through read -> compute -> write.

It is a plain class; the driver wraps it in a Ray actor (`ray.remote(...)(ExplainWorker)`), and
tests may call it in-process.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import numpy as np

from bulk_explain.workers.explain.labels import LabelMatcher, resolve_cam_classes  # noqa: F401 (resolve_cam_classes: re-exported)
# Largest batch tried by `batch_size="auto"` on a GPU (VGG16 at 224 px peaks at 128-256; the
# lecture's small convnet at 1024).
MAX_AUTO_BATCH = 1024
CPU_AUTO_BATCH = 32


def host_threads(cpus) -> int:
    """Read (and write) pool size for a worker holding `cpus` CPUs: one thread per core, at least 4.

    OpenCV releases the GIL in imdecode/resize/imencode, so threads scale with cores (measured on a
    16-core node: 16 threads 1,006 img/s, 16 processes 864-945, bench/GPU.md); 4 is the floor
    because reads also wait on storage (S3 GETs).
    """
    if not cpus:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    return max(4, int(cpus))


class ExplainWorker:
    """Loads the model once and processes shards.

    Args:
        settings: plain dict built by the driver (see `bulk_explain.jobs.explain.driver.worker_settings`).
    """

    def __init__(self, settings: dict):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # KERAS_BACKEND before Keras is imported (the driver also sets it in the actor's env).
        from bulk_explain.workers.backends import get_backend, select_backend

        select_backend(settings.get("backend"))
        self.backend = get_backend()
        self.backend.configure(settings.get("tf_threads"))
        from bulk_explain.workers.layout import OutputLayout
        from bulk_explain.workers.models import ModelSpec, load_model, with_precision

        from bulk_explain.workers.storage import configure_storage

        self.settings = settings
        configure_storage("s3", endpoint_url=settings.get("s3_endpoint_url"))
        loaded_model = load_model(ModelSpec(**settings["model"]))
        # A model file that differs from the one the driver checked (changed on S3 since, another
        # copy on this node) must not produce rows under the driver's fingerprint: every shard of
        # this worker fails with the reason instead.
        expected, loaded = settings.get("model_fingerprint"), loaded_model.fingerprint()
        self.model_mismatch = None
        if expected and loaded != expected:
            self.model_mismatch = (
                f"worker loaded a different model than the driver checked (fingerprint {loaded[:12]}, "
                f"driver {expected[:12]}): the model file or weights differ between machines or changed")
        # The driver fingerprints the float32 model: the precision policy applies after the check.
        self.loaded = with_precision(loaded_model, settings.get("precision", "float32"))
        self.layout = OutputLayout(settings["output"])
        self.labels = LabelMatcher(self.loaded.class_names)
        threads = host_threads(settings.get("cpus"))
        self.read_threads = settings.get("read_threads") or threads
        self.write_threads = settings.get("write_threads") or threads
        self.read_pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="read")
        self.write_pool = ThreadPoolExecutor(self.write_threads, thread_name_prefix="write")
        # Two shards may run at once (actor max_concurrency=2) so one's decode overlaps the other's
        # compute; the compiled step itself runs one batch at a time.
        self.compute_lock = threading.Lock()
        from bulk_explain.workers.explain.reader import ByteBudget

        # Decoded images held by this actor, over both shards in flight (see workers/explain/reader.py).
        self.byte_budget = ByteBudget(settings.get("max_decoded_bytes") or 2 * 1024**3)
        # Images through compute since start: the driver polls it (`progress`) for progress lines
        # between shard commits.
        self._computed = 0
        self._count_lock = threading.Lock()
        self.gpu = self.backend.has_gpu()
        if self.gpu:
            # The pools already use every core: OpenCV's own worker threads inside each resize /
            # encode would only contend with them (the host ceiling in bench/GPU.md is measured so).
            import cv2

            cv2.setNumThreads(1)
        batch = settings.get("batch_size", CPU_AUTO_BATCH)
        if batch == "auto" and self.gpu:
            self._largest_batch()
        else:
            self._build_step(CPU_AUTO_BATCH if batch == "auto" else int(batch))
            # Warm the compiled step so the first shard's timing is not the trace.
            self._warm()

    def _build_step(self, batch_size: int) -> None:
        from bulk_explain.workers.explain.explain_step import ExplainStep

        s = self.settings
        self.step = ExplainStep(
            self.loaded,
            batch_size=batch_size,
            target_layer=s.get("target_layer"),
            activation_layers=s.get("activation_layers"),
            method=s.get("cam_method", "gradcam"),
            cam_score=s.get("cam_score", "logit"),
            top_k=s.get("top_k", 5),
            metrics=s.get("metrics") or (),
            metric_steps=s.get("metric_steps", 16),
            scorecam_channels=s.get("scorecam_channels"),
        )

    def _warm(self) -> None:
        h, w = self.loaded.preprocessing.size
        self.step(np.zeros((self.step.batch_size, h, w, 3), np.uint8))

    def _largest_batch(self) -> int:
        """`batch_size="auto"` on a GPU: the largest power of two up to MAX_AUTO_BATCH (and not above
        the shard size) whose compiled step runs, trying from the top and halving on out-of-memory."""
        cap = min(MAX_AUTO_BATCH, int(self.settings.get("shard_size") or MAX_AUTO_BATCH))
        batch = 1 << max(0, cap.bit_length() - 1)
        while True:
            try:
                self._build_step(batch)
                self._warm()
                return batch
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
                if not self.backend.is_oom(exc) or batch == 1:
                    raise
                self.step = None
                batch //= 2

    def _run_step(self, images: np.ndarray, requested: np.ndarray) -> Dict[str, np.ndarray]:
        """The compiled step on any number of images: chunks of the batch size; on out-of-memory
        (a GPU shared with another process) the batch size is halved for the rest of the actor."""
        outs = []
        pos = 0
        while pos < len(images):
            n = min(self.step.batch_size, len(images) - pos)
            try:
                outs.append(self.step(images[pos:pos + n], requested[pos:pos + n]))
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
                if not self.backend.is_oom(exc) or self.step.batch_size == 1:
                    raise
                self._build_step(self.step.batch_size // 2)
                continue
            pos += n
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

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
            "batch_size": self.step.batch_size,
            "read_threads": self.read_threads,
            "write_threads": self.write_threads,
            "device": "gpu" if self.gpu else "cpu",
            "backend": self.backend.name,
            "precision": self.settings.get("precision", "float32"),
            "tensorflow_imported": "tensorflow" in sys.modules,  # False under jax: TF never loaded
        }

    def process_shard(self, task, result_fingerprint: str = "") -> dict:
        """Runs one shard end to end and commits it. Per-image failures become error rows.

        Returns:
            the commit marker dict (shard, rows, ok, error, seconds, ...).
        """
        from bulk_explain.workers.models import ModelError
        from bulk_explain.workers.explain.reader import iter_decoded_batches
        from bulk_explain.workers.explain.writer import ShardWriter

        if self.model_mismatch:
            raise ModelError(self.model_mismatch)
        t0 = time.perf_counter()
        s = self.settings
        writer = ShardWriter(self.layout, task.shard, self.loaded.class_names, self.step.activation_layers,
                             s.get("overlay_quality", 90), overlay_max_side=s.get("overlay_max_side"),
                             methods=self.step.method_names)
        grids_left = int(s.get("activation_grids", 0))
        rows: List = []  # futures or rows, in plan order
        in_flight = collections.deque()
        max_in_flight = 2 * self.step.batch_size
        for batch in iter_decoded_batches(task, self.loaded.preprocessing, self.step.batch_size, self.read_pool,
                                          budget=self.byte_budget, max_side=s.get("overlay_max_side")):
            good = [item for item in batch if item.ok]
            results: Dict[int, dict] = {}
            if good:
                images = np.stack([item.model_input for item in good])
                requested = resolve_cam_classes([item.label for item in good], s.get("cam_class", "pred"),
                                                self.loaded.class_names, self.labels)
                with self.compute_lock:
                    out = self._run_step(images, requested)
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
