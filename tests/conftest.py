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


def _short_tempdir(prefix):
    # Ray puts unix sockets under its temp dir (107-byte path limit): keep it short, not tmp_path.
    import tempfile

    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


@pytest.fixture(scope="session", autouse=True)
def _session_ray_tmpdir():
    """Every Ray of this session (CLI subprocesses started by module fixtures included) lives
    under its own temp dir, never the machine-wide /tmp/ray that other sessions share."""
    import shutil

    mp = pytest.MonkeyPatch()
    path = _short_tempdir("rs-")
    mp.setenv("RAY_TMPDIR", path)
    yield path
    mp.undo()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """Per test: its own Ray temp dir, the environment restored afterwards (whatever the test or
    the code under test wrote into os.environ), and no storage backend cached across tests."""
    import shutil

    from bulk_explain.workers.storage import reset_storage_cache

    saved = dict(os.environ)
    path = _short_tempdir("rt-")
    monkeypatch.setenv("RAY_TMPDIR", path)
    reset_storage_cache()
    yield path
    reset_storage_cache()
    monkeypatch.undo()
    for name in set(os.environ) - set(saved) - {"PYTEST_CURRENT_TEST"}:
        del os.environ[name]
    for name, value in saved.items():
        if name != "PYTEST_CURRENT_TEST" and os.environ.get(name) != value:
            os.environ[name] = value
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ray_local(_isolated):
    """An embedded Ray for one in-process API test, under the test's own temp dir (the CLI tests
    start their own): an actor leaked by one test cannot starve the next test's pool."""
    import ray

    assert not ray.is_initialized(), "a previous test left Ray running"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, _temp_dir=_isolated,
             runtime_env={"env_vars": {"PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_init_calls(monkeypatch):
    """Records every ray.init call made by the code under test (and still performs it), so a test
    can assert that Ray was never started, not only that it is not running afterwards."""
    import ray

    calls = []
    real = ray.init

    def recording_init(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(ray, "init", recording_init)
    return calls


def pytest_terminal_summary(terminalreporter, config):
    """The random order's seed also under `-q` (the README's command), where pytest-randomly's
    header line is not shown: a failure that depends on the order can then be repeated."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"random test order: repeat it with -p randomly --randomly-seed={seed}")
