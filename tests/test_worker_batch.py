"""`--batch-size auto` on a GPU (largest power of two that fits, halved on out-of-memory), the
host pools sized from the worker's CPUs, and a GPU actor holding its share of the node's cores."""

import types

import numpy as np
import pytest


class _Step:
    """Stands in for ExplainStep: runs out of memory above `fits` images per call."""

    def __init__(self, batch_size, fits, calls):
        self.batch_size, self.fits, self.calls = batch_size, fits, calls

    def __call__(self, images, requested):
        self.calls.append(len(images))
        if self.batch_size > self.fits:
            raise MemoryError("RESOURCE_EXHAUSTED: out of memory allocating")
        return {"pred_index": np.asarray(requested) + 1, "cam": np.zeros((len(images), 2, 2))}


def _worker(fits, shard_size=256):
    from bulk_explain.workers.explain.shard_worker import ExplainWorker

    worker = ExplainWorker.__new__(ExplainWorker)  # the logic under test, without a model
    worker.settings = {"shard_size": shard_size}
    worker.backend = types.SimpleNamespace(is_oom=lambda exc: isinstance(exc, MemoryError))
    worker.built, worker.calls = [], []

    def build(batch):
        worker.built.append(batch)
        worker.step = _Step(batch, fits, worker.calls)

    worker._build_step = build
    worker._warm = lambda: worker.step(np.zeros((worker.step.batch_size, 1)), np.zeros(worker.step.batch_size))
    return worker


def test_auto_batch_is_the_largest_power_of_two_that_fits():
    worker = _worker(fits=48, shard_size=200)
    assert worker._largest_batch() == 32
    assert worker.built == [128, 64, 32]  # from the largest power of two <= the shard size, halving
    assert _worker(fits=10_000, shard_size=5000)._largest_batch() == 1024  # capped


def test_other_errors_are_not_taken_for_out_of_memory():
    worker = _worker(fits=48)
    worker._warm = lambda: (_ for _ in ()).throw(ValueError("bad layer"))
    with pytest.raises(ValueError, match="bad layer"):
        worker._largest_batch()


def test_out_of_memory_while_running_halves_and_keeps_every_row():
    worker = _worker(fits=8)
    worker.step = _Step(32, 8, worker.calls)  # fitted at start-up, then the GPU got busier
    out = worker._run_step(np.zeros((20, 1)), np.arange(20))
    np.testing.assert_array_equal(out["pred_index"], np.arange(20) + 1)  # all rows, in order
    assert worker.step.batch_size == 8 and worker.built == [16, 8]


def test_backends_recognize_their_out_of_memory_errors():
    from bulk_explain.workers.backends import get_backend

    tf_backend = get_backend("tensorflow")
    import tensorflow as tf

    assert tf_backend.is_oom(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"))
    assert not tf_backend.is_oom(ValueError("shape mismatch"))
    from bulk_explain.workers.backends import jax as jax_backend

    fake = object.__new__(jax_backend.JaxBackend)
    assert fake.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB"))
    assert not fake.is_oom(RuntimeError("INVALID_ARGUMENT: shapes"))


def test_host_threads_and_gpu_actor_cores():
    from bulk_explain.jobs.distribute import plan_workers
    from bulk_explain.workers.explain.shard_worker import host_threads

    assert host_threads(16) == 16 and host_threads(2) == 4 and host_threads(None) >= 4
    shape = plan_workers(None, {"nodes": 4, "cpus": 64, "gpus": 4, "min_node_cpus": 16})
    assert shape["num_gpus"] == 1 and shape["num_cpus"] == 16  # decode/encode need the node's cores
