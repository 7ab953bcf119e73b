"""The JAX backend: `stateless_call` + `jax.value_and_grad` for gradients, `jax.jit` for the step.

Nothing here imports TensorFlow. The compiled function receives the models' variable values as
arguments (a `keras.StatelessScope` maps each variable to its traced value inside the trace), so
VGG16's 138 M weights are device buffers passed by reference, not constants folded into the XLA
program (which would make every compile slow and hold a second copy of the weights).
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

from bulk_explain.workers.backends import Backend, register_backend

# JAX's persistent compilation cache: a second process (or run) with the same shapes loads the
# compiled program instead of compiling it (VGG16's filter ascent: seconds per layer).
CACHE_ENV = "BULK_EXPLAIN_JAX_CACHE"
DEFAULT_CACHE_DIR = os.path.expanduser("~/.cache/bulk-explain/jax")


@register_backend
class JaxBackend(Backend):
    name = "jax"

    def __init__(self):
        import jax

        self.jax = jax

    def configure(self, threads: Optional[int]) -> None:
        # XLA:CPU sizes its pool from the CPUs the process may use (Ray's affinity); on a GPU the
        # client preallocates device memory, which suits one actor per GPU.
        cache = os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)
        if cache:
            try:
                self.jax.config.update("jax_compilation_cache_dir", cache)
                self.jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
            except Exception:  # an older jax without these options: compile every time
                pass

    def compile(self, fn: Callable, models: Sequence, jit_compile: Optional[bool] = None) -> Callable:
        import keras
        import numpy as np

        jax = self.jax
        variables = []
        seen = set()
        for model in models:
            for v in model.variables:
                if id(v) not in seen:
                    seen.add(id(v))
                    variables.append(v)

        def pure(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*args)

        jitted = jax.jit(pure)

        def raw(*args):
            return jitted([v.value for v in variables], *args)

        def call(*args):
            return jax.tree_util.tree_map(np.asarray, raw(*args))

        call.raw = raw  # backend arrays out: chained calls keep their data on the device
        return call

    def value_and_grad(self, model, inputs: List, wrt: int, head: Callable):
        jax = self.jax
        # Inside `compile`'s StatelessScope, `v.value` is the traced value of each variable.
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss(x):
            args = list(inputs)
            args[wrt] = x
            outputs, _ = model.stateless_call(trainable, non_trainable,
                                              args if len(args) > 1 else args[0], training=False)
            value, aux = head(outputs)
            return value, (outputs, aux)

        (_, (outputs, aux)), grad = jax.value_and_grad(loss, has_aux=True)(inputs[wrt])
        return outputs, aux, grad

    def is_oom(self, exc: BaseException) -> bool:
        text = str(exc)
        return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text

    def has_gpu(self) -> bool:
        try:
            return any(d.platform in ("gpu", "cuda", "rocm") for d in self.jax.devices())
        except RuntimeError:
            return False

    def versions(self) -> Dict[str, str]:
        import jaxlib

        return {"jax": self.jax.__version__, "jaxlib": jaxlib.__version__,
                "jax_devices": ", ".join(sorted({d.device_kind for d in self.jax.devices()}))}
