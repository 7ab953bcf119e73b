"""bench/gpu.py runs where the GPU box is bare: no TensorFlow and no Ray importable (simulated by a
sitecustomize that makes both imports fail), in its tiny CPU mode."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

BLOCK = "import sys\nsys.modules['ray'] = None\nsys.modules['tensorflow'] = None\n"


@pytest.mark.slow
def test_gpu_bench_tiny_runs_without_tensorflow_and_ray(tmp_path):
    pytest.importorskip("jax")
    (tmp_path / "sitecustomize.py").write_text(BLOCK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]), HOME=str(tmp_path))
    env.pop("KERAS_BACKEND", None)
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0  # the block works: Ray cannot be imported in the bench's processes
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu.py"), "--tiny"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [l for l in proc.stdout.splitlines() if l.startswith("| ")]
    parts = [l.split("|")[1].strip() for l in table[1:]]
    assert parts == ["compute float32", "compute mixed_bfloat16", "host ceiling default", "host ceiling 256 px",
                     "end to end default", "end to end 256 px", "filters cold ascent", "filters cold end to end",
                     "filters warm ascent", "filters warm end to end"]
    for line in table[1:]:
        assert float(line.split("|")[2].replace(",", "")) > 0, line
