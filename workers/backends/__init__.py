"""Backend seam: the few things that differ between Keras backends, one small module per backend.

The compute code (`workers/explain/explain_step.py`, `workers/explain/cam_methods.py`, `workers/filters/filter_vis.py`) is
written once with `keras.ops`. What `keras.ops` cannot express is here, behind `Backend`:

* `value_and_grad`: the gradient of a scalar computed from a model's outputs with respect to one of
  the model's inputs (TensorFlow: `GradientTape`; JAX: `stateless_call` + `jax.value_and_grad`);
* `compile`: one compiled function per fixed input shape (TensorFlow: `tf.function`; JAX: `jax.jit`
  with the model's variables passed as arguments, not baked in as constants);
* process set-up (thread pools, GPU memory), out-of-memory detection, device kind, versions.

Keras chooses its backend once per process, from `KERAS_BACKEND`, when `keras` is first imported:
`select_backend` sets it before that import and refuses a process whose Keras already runs another
backend. A new backend is one module that calls `register_backend`.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

BACKEND_ENV = "KERAS_BACKEND"
DEFAULT_BACKEND = "tensorflow"
# name -> module that registers it (imported lazily: importing the JAX module must not import TF)
_MODULES = {"tensorflow": "bulk_explain.workers.backends.tensorflow", "jax": "bulk_explain.workers.backends.jax"}
_REGISTRY: Dict[str, type] = {}
_INSTANCES: Dict[str, "Backend"] = {}


class BackendError(ValueError):
    """The requested backend cannot run in this process (one line for the user)."""


class Backend:
    """What the compute code needs from a Keras backend. Subclasses implement every method."""

    name = ""

    def configure(self, threads: Optional[int]) -> None:
        """Process set-up before the first op: compute thread pools sized to `threads` CPUs (None:
        leave the library's default), GPU memory growth."""
        raise NotImplementedError

    def compile(self, fn: Callable, models: Sequence, jit_compile: Optional[bool] = None) -> Callable:
        """Returns `fn` compiled for fixed shapes; the result takes and returns NumPy arrays, and
        its `raw` attribute is the same function returning backend tensors (for chained calls).

        Args:
            fn: a function of array arguments returning a dict (or tuple) of tensors, written with
                `keras.ops` and `value_and_grad`.
            models: the Keras models `fn` calls (their variables become arguments of the compiled
                function where the backend needs that, so weights are not compiled in as constants).
            jit_compile: TensorFlow only: XLA-compile the graph (None: the backend's measured default).
        """
        raise NotImplementedError

    def value_and_grad(self, model, inputs: List, wrt: int, head: Callable):
        """Runs `model(inputs)` and differentiates `head(outputs)`'s first value w.r.t. `inputs[wrt]`.

        Args:
            model: a Keras model (run with training=False).
            inputs: its inputs (a list, even for one input).
            wrt: index of the input to differentiate with respect to.
            head: outputs -> (scalar, aux); aux is any structure of tensors returned as is.

        Returns:
            (outputs, aux, gradient) where gradient has `inputs[wrt]`'s shape.
        """
        raise NotImplementedError

    def is_oom(self, exc: BaseException) -> bool:
        """True if `exc` is the backend's device out-of-memory error."""
        raise NotImplementedError

    def has_gpu(self) -> bool:
        raise NotImplementedError

    def versions(self) -> Dict[str, str]:
        """Library versions recorded in job.json."""
        raise NotImplementedError


def register_backend(cls):
    """Class decorator: registers a `Backend` subclass under `cls.name`."""
    _REGISTRY[cls.name] = cls
    return cls


def backend_names() -> List[str]:
    return sorted(_MODULES)


def select_backend(name: Optional[str]) -> str:
    """Makes `name` this process' Keras backend. Call before `keras` is imported.

    Sets KERAS_BACKEND (the variable Keras reads at import). If Keras is already imported with a
    different backend the process cannot switch: that is an error, not a silent fallback.

    Returns:
        the backend name in effect.

    Raises:
        BackendError: unknown name, or Keras already loaded with another backend.
    """
    name = name or os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND
    if name not in _MODULES:
        raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(backend_names())}")
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        loaded = keras.backend.backend()
        if loaded != name:
            raise BackendError(f"Keras is already loaded with the {loaded} backend in this process; "
                               f"set {BACKEND_ENV}={name} before importing keras to use {name}")
    os.environ[BACKEND_ENV] = name
    if name != "tensorflow":
        _keep_tensorflow_out()
    return name


def _keep_tensorflow_out() -> None:
    """Tells Keras that TensorFlow is absent, so a non-TF process never imports it.

    Keras probes `tensorflow` lazily even under JAX (serializing any layer config checks for
    `tf.TensorShape`; `set_random_seed` seeds TF's generator): on a machine with TF installed
    that loads TF's 1 GB of libraries and its thread pools into a JAX worker.
    """
    try:
        from keras.src.utils import module_utils
    except ImportError:  # a Keras without this module: nothing probes TF lazily there
        return
    lazy = getattr(module_utils, "tensorflow", None)
    if lazy is not None and getattr(lazy, "module", None) is None and hasattr(lazy, "_available"):
        lazy._available = False


def get_backend(name: Optional[str] = None) -> Backend:
    """The `Backend` for `name` (default: the backend Keras runs in this process).

    Raises:
        BackendError: unknown name, or not the backend Keras runs here.
    """
    import sys

    if "keras" not in sys.modules:
        # Keras imports its backend's framework: TensorFlow's C++ start-up lines must not reach stderr.
        from bulk_explain.workers.tf_runtime import import_backend_quietly

        import_backend_quietly(name)
    import keras

    active = keras.backend.backend()
    name = name or active
    if name != active:
        raise BackendError(f"backend {name!r} requested but Keras runs {active!r} in this process "
                           f"(set {BACKEND_ENV}={name} before importing keras)")
    if name not in _INSTANCES:
        if name not in _MODULES:
            raise BackendError(f"Keras backend {name!r} is not supported; expected one of {', '.join(backend_names())}")
        importlib.import_module(_MODULES[name])
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]
