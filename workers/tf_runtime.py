"""Process set-up shared by the driver and the workers: the Keras backend, TensorFlow's quiet import
and thread pools."""

from __future__ import annotations

import os
import sys
from typing import Optional


def import_tensorflow_quietly():
    """Imports TensorFlow with its C++ start-up chatter (absl pre-init INFO lines, which
    TF_CPP_MIN_LOG_LEVEL no longer silences) kept off stderr, so a one-line error stays one line.
    Python exceptions from the import still propagate normally."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        import tensorflow

        return tensorflow
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tensorflow


def configure_tensorflow(threads: Optional[int]) -> None:
    """Sizes TF's thread pools to this worker's share of the cores and turns on GPU memory growth.

    Ray sets OMP_NUM_THREADS from num_cpus, but TensorFlow's own pools ignore it and take every
    core, so two CPU workers on two cores would oversubscribe. Must run before TF executes any op.
    """
    tf = import_tensorflow_quietly()
    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, int(threads))))
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        pass  # already initialized in this process (tests calling in-process): keep its settings


def import_backend_quietly(backend: Optional[str] = None) -> str:
    """Selects the Keras backend for this process (KERAS_BACKEND, before Keras is imported) and
    imports what it needs: TensorFlow quietly for `tensorflow`; nothing of TensorFlow for `jax`.

    Returns:
        the backend name in effect.

    Raises:
        workers.backends.BackendError: unknown backend, or Keras already loaded with another.
    """
    from workers.backends import select_backend

    name = select_backend(backend)
    if name == "tensorflow":
        import_tensorflow_quietly()
    return name
