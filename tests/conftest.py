import atexit
import os
import secrets
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "RAY_AUTH_MODE" not in os.environ:
    # Ray's token authentication on, as on a real cluster (Ray >= 2.59 turns it on for a new local
    # Ray anyway), with the suite's own token: never ~/.ray/auth_token.
    _token_dir = tempfile.mkdtemp(prefix="bx-ray-token-")
    atexit.register(shutil.rmtree, _token_dir, True)
    with open(os.open(os.path.join(_token_dir, "auth_token"), os.O_WRONLY | os.O_CREAT, 0o600), "w") as _f:
        _f.write(secrets.token_hex(32))
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=os.path.join(_token_dir, "auth_token"))
    os.environ.pop("RAY_AUTH_TOKEN", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import numpy as np
import pytest
import cv2

pytest_plugins = ["s3_server"]  # moto S3 server on loopback + fault-injecting proxy fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photo_like(rng, h, w):
    """A smooth, photo-like RGB image (gradients + blobs): JPEG-friendly, not white noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = 128 + 60 * np.sin(xx / rng.uniform(5, 40) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(5, 40))
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, max(6, min(h, w) / 3))
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(1234)


def write_image(path, rgb, **params):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ok = cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), *([list(params.values())] if params else []))
    assert ok, path
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the in-process API tests (the CLI tests start their own)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}})
    yield ray
    ray.shutdown()
