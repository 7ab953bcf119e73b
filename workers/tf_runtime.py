"""Process set-up shared by the driver and the workers: the Keras backend, TensorFlow's quiet import
and thread pools."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Optional

# "1" brings back what quiet_console hides (TF/CUDA/absl chatter, Python warnings, Ray's INFO
# lines); set by `bulk-explain --verbose`, forwarded by the driver to every worker.
VERBOSE_ENV = "BULK_EXPLAIN_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0")


def tf_log_level() -> str:
    """TF_CPP_MIN_LOG_LEVEL for this process and the workers: 3 also hides C++ ERROR lines such
    as `E0000 ... failed call to cuInit` on machines without a GPU (2 does not); real failures
    still arrive as Python exceptions."""
    return "0" if verbose() else "3"


def quiet_console(global_warnings: bool = False) -> None:
    """Keeps start-up chatter off stderr unless BULK_EXPLAIN_VERBOSE=1: TF's C++ log lines (the
    level is read when TensorFlow loads, so call this before importing it), absl's Python logger,
    Ray's colour codes when stderr is not a terminal, and, with `global_warnings` (the CLI and the
    workers, which own their process), every Python warning (Keras' `Do not pass an input_shape`...).
    """
    if verbose():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", tf_log_level())
    try:
        if not sys.stderr.isatty():
            # Ray wraps worker-log prefixes in ANSI colours unless RAY_COLOR_PREFIX=0.
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    except (AttributeError, ValueError):
        pass
    # Ray's embedded-cluster notice about token authentication is a WARNING record; ray.init resets
    # the "ray" logger's level, so the level is set on the notice's own logger.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    if global_warnings:
        warnings.simplefilter("ignore")


@contextlib.contextmanager
def quiet_warnings():
    """Python warnings off for a block (the driver's model check in a process it does not own)."""
    if verbose():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def import_tensorflow_quietly():
    """Imports TensorFlow with its C++ start-up chatter (absl pre-init INFO lines, which
    TF_CPP_MIN_LOG_LEVEL no longer silences) kept off stderr, so a one-line error stays one line.
    Python exceptions from the import still propagate normally."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", tf_log_level())
    if verbose():
        import tensorflow

        return tensorflow
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
        import keras  # noqa: F401 (loads TF's remaining plugins, which print their own start-up lines)
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
    quiet_console(global_warnings=True)  # a worker process is ours: warnings off unless verbose
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
        bulk_explain.workers.backends.BackendError: unknown backend, or Keras already loaded with another.
    """
    from bulk_explain.workers.backends import select_backend

    name = select_backend(backend)
    if name == "tensorflow":
        import_tensorflow_quietly()
    return name
