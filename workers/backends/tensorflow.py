"""The TensorFlow backend: `GradientTape` for gradients, `tf.function` for the compiled step."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from bulk_explain.workers.backends import Backend, register_backend
from bulk_explain.workers.tf_runtime import import_tensorflow_quietly

# XLA (`jit_compile=True`) for the explain step and the filter ascent. Measured on the project's
# 2-core CPU (bench/throughput.py --compare-xla, the cats/dogs net at 150 px, batch 32, one run on a
# shared machine; README "Performance"): 16.9 img/s without XLA, 8.5 img/s with it. So XLA stays off
# on CPUs (TF's own executor with oneDNN kernels wins there) and is on for GPUs, where it fuses the
# CAM's and the statistics' elementwise work into few kernels (not measured here: no GPU was lent).
JIT_COMPILE_CPU = False
JIT_COMPILE_GPU = True


@register_backend
class TensorFlowBackend(Backend):
    name = "tensorflow"

    def __init__(self):
        self.tf = import_tensorflow_quietly()

    def configure(self, threads: Optional[int]) -> None:
        from bulk_explain.workers.tf_runtime import configure_tensorflow

        configure_tensorflow(threads)

    def compile(self, fn: Callable, models: Sequence, jit_compile: Optional[bool] = None) -> Callable:
        tf = self.tf
        if jit_compile is None:
            jit_compile = JIT_COMPILE_GPU if self.has_gpu() else JIT_COMPILE_CPU
        # Variables are captured by reference: tf.function reads them at run time, never as constants.
        compiled = tf.function(fn, autograph=False, jit_compile=bool(jit_compile))

        def call(*args):
            return tf.nest.map_structure(lambda t: t.numpy(), compiled(*args))

        call.raw = compiled  # backend tensors out: chained calls keep their data on the device
        return call

    def value_and_grad(self, model, inputs: List, wrt: int, head: Callable):
        tf = self.tf
        inputs = [tf.convert_to_tensor(x) for x in inputs]
        with tf.GradientTape() as tape:
            tape.watch(inputs[wrt])
            outputs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
            value, aux = head(outputs)
        return outputs, aux, tape.gradient(value, inputs[wrt])

    def is_oom(self, exc: BaseException) -> bool:
        tf = self.tf
        if isinstance(exc, tf.errors.ResourceExhaustedError):
            return True
        return isinstance(exc, tf.errors.InternalError) and "out of memory" in str(exc).lower()

    def has_gpu(self) -> bool:
        return bool(self.tf.config.list_physical_devices("GPU"))

    def versions(self) -> Dict[str, str]:
        return {"tensorflow": self.tf.__version__}
