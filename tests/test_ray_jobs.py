"""Ray Jobs with Ray's token authentication on: a real local Ray head (`ray start --head`, Jobs
API on loopback) runs the job submitted with the checkout as `working_dir`, as
`ray job submit --working-dir .` does on a cluster.

The token is made in the test by the documented command (`ray get-auth-token --generate`, with HOME
pointing at a temp folder so the user's ~/.ray is never read or written) and handed to the head and
to the clients through RAY_AUTH_TOKEN_PATH and RAY_AUTH_MODE=token, the way docs/cluster.md says. A
client without the token, or with a wrong one, is refused by the Jobs API, and our driver joining the
head's GCS without it stops with a one-line error naming the fix.

The head is this test's own: ports chosen by the OS when each server binds (`--port=0`,
`--dashboard-port=0`, ...; only the Ray Client server refuses 0 and gets a free port picked just
before), read back from `ray start`'s output; its own `--temp-dir` (so `ray_current_cluster` and the
sessions stay out of /tmp/ray); stopped by SIGTERM to the `ray start --block` process that started it
(`ray stop` would stop every Ray on the machine). The test checks nothing of it is left running.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
import pyarrow.dataset as ds
import pytest

from conftest import REPO, photo_like, write_image

HEAD_START_TIMEOUT = 180
JOB_TIMEOUT = 300

# Files a user's checkout may hold that .rayignore (and only .rayignore: .gitignore lets them through)
# must keep out of the upload.
DECOYS = ["models/cats_and_dogs_small_1.h5", "my model.keras", "data/pets/cats/cat 1.jpg",
          "results/manifest/shard-00000.parquet", "notebooks/overlay.png", "saved_model/saved_model.pb"]

PROBE = '''\
import json, os
import bulk_explain.jobs.cli as jobs, bulk_explain.workers.storage as workers
root = os.getcwd()
files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
print("PROBE " + json.dumps({"cwd": root, "jobs": jobs.__file__, "workers": workers.__file__,
                             "files": files, "ray_address": os.environ.get("RAY_ADDRESS"),
                             "auth_mode": os.environ.get("RAY_AUTH_MODE")}))
'''

# The client side, as a user runs it: a fresh Python whose environment carries the auth settings
# before Ray is imported. Submits, waits, prints the outcome as JSON on its last line.
CLIENT = '''\
import json, sys, time
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors

url, request = sys.argv[1], json.loads(sys.argv[2])
client = JobSubmissionClient(url)
sid = client.submit_job(**request["submit"])
deadline = time.monotonic() + request["timeout"]
status = client.get_job_status(sid)
while not status.is_terminal() and time.monotonic() < deadline:
    time.sleep(1)
    status = client.get_job_status(sid)
if not status.is_terminal():
    client.stop_job(sid)
actors = [a.class_name for a in list_actors(address=url, filters=[("class_name", "=", "ExplainWorker")])]
print(json.dumps({"id": sid, "status": str(status.value), "logs": client.get_job_logs(sid), "actors": actors}))
'''


def generate_token(folder):
    """`ray get-auth-token --generate` with HOME = `folder`: the token lands in
    folder/.ray/auth_token, never in the user's home. Returns (token path, token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(folder)
    done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    path = os.path.join(str(folder), ".ray", "auth_token")
    token = open(path).read().strip()
    assert done.stdout.strip() == token and len(token) >= 32
    return path, token


def client_env(home, token_path=None, **extra):
    """A client's environment: auth from `token_path` (RAY_AUTH_MODE=token) or none at all; HOME is
    a temp folder so that no ~/.ray/auth_token of the user's can stand in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_AUTH") and k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(HOME=str(home), TF_CPP_MIN_LOG_LEVEL="3", RAY_USAGE_STATS_ENABLED="0", **extra)
    if token_path:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    return env


def processes_of(temp_dir):
    """Pids of live processes whose command line names our temp dir: the head's gcs, raylet,
    dashboard, agents and workers (Linux /proc)."""
    found = []
    needle = temp_dir.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != b"Z":
            found.append(int(entry))
    return found


def _free_port():
    # Only for the Ray Client server, whose option refuses 0 (Ray checks 1024..65535): a port picked
    # here can be taken by someone else before Ray binds it; every other port is bound by the OS.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class RayHead:
    """`ray start --head --block` with token auth on, in its own session; `stop()` ends exactly
    what it started.

    Args:
        token_path: the cluster's token file (RAY_AUTH_TOKEN_PATH of the head and its jobs).
        home: HOME of the head and its jobs (a temp folder: no user files take part).
    """

    def __init__(self, token_path, home, num_cpus=2):
        # Short: Ray puts unix sockets under it (108-byte path limit).
        self.temp_dir = tempfile.mkdtemp(prefix="bxray-", dir="/tmp")
        self.log_path = os.path.join(self.temp_dir, "ray-start.log")
        env = client_env(home, token_path, RAY_DEDUP_LOGS="0")
        env.pop("PYTHONPATH", None)  # the code must come from the uploaded working_dir
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--port=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--dashboard-port=0",
               "--dashboard-agent-listen-port=0", f"--ray-client-server-port={_free_port()}",
               f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=self.temp_dir)
        self.url = self.gcs_address = None

    def log_tail(self, n=4000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_started(self):
        """Waits (bounded) until `ray start` printed the addresses the OS gave it; returns self."""
        deadline = time.monotonic() + HEAD_START_TIMEOUT
        while self.url is None:
            if self.proc.poll() is not None:
                pytest.fail(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up in {HEAD_START_TIMEOUT}s:\n{self.log_tail()}")
            text = _ANSI.sub("", self.log_tail(1 << 20))
            gcs = re.search(r"ray start --address='([^']+)'", text)
            api = re.search(r"RAY_API_SERVER_ADDRESS='(http://[^']+)'", text)
            if gcs and api:
                self.gcs_address, self.url = gcs.group(1), api.group(1)
            else:
                time.sleep(0.5)
        return self

    @property
    def gcs_port(self):
        return int(self.gcs_address.rsplit(":", 1)[1])

    def stop(self):
        """SIGTERM to `ray start --block`: its handler stops the gcs, raylet, dashboard and agents it
        started (workers go with their raylet). Anything of ours left after that is killed by pid."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while processes_of(self.temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftovers = processes_of(self.temp_dir)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self._log.close()
        return leftovers

    def cleanup(self):
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def run_client(head, env, request, timeout=JOB_TIMEOUT + 120):
    """Runs CLIENT against the head's Jobs API; returns its JSON outcome."""
    done = subprocess.run([sys.executable, "-c", CLIENT, head.url, json.dumps(request)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{done.stderr[-4000:]}\n--- ray start ---\n{head.log_tail()}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def jobs_api_status(head, headers):
    """The HTTP status of GET /api/jobs/ with `headers` (urllib: no Ray client involved)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(head.url + "/api/jobs/", headers=headers),
                                    timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def make_checkout(dest):
    """The project as a user's checkout: every file git would commit (tracked or new), plus decoys."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    copied = []
    for rel in filter(None, listed):
        src = os.path.join(REPO, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
            copied.append(rel)
    assert ".rayignore" in copied and "jobs/cli.py" in copied
    for rel in DECOYS:
        os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(dest, rel), "wb") as f:
            f.write(os.urandom(4096))
    with open(os.path.join(dest, "_probe_upload.py"), "w") as f:
        f.write(PROBE)
    return copied


def make_inputs(root):
    rng = np.random.default_rng(5)
    sizes = {"cats/cat 1.jpg": (60, 45), "cats/cat 2.png": (33, 50), "dogs/dog 1.jpg": (52, 52),
             "dogs/dög ü.webp": (40, 30), "top.jpg": (48, 64)}
    files = {}
    for rel, (w, h) in sizes.items():
        files[write_image(os.path.join(root, rel), photo_like(rng, h, w))] = (w, h)
    corrupt = os.path.join(root, "dogs", "broken.jpg")
    with open(corrupt, "wb") as f:
        f.write(b"\xff\xd8\xff not a jpeg")
    files[corrupt] = None
    return files


@pytest.mark.slow
def test_submitted_job_runs_on_a_head_with_token_auth(tmp_path):
    inputs = str(tmp_path / "in")
    files = make_inputs(inputs)
    out = str(tmp_path / "out")
    checkout = str(tmp_path / "checkout")
    copied = make_checkout(checkout)
    home = tmp_path / "home"
    home.mkdir()
    token_path, token = generate_token(tmp_path / "token-home")
    stranger = tmp_path / "stranger"
    stranger.mkdir()

    head = RayHead(token_path, home)
    try:
        head.wait_started()
        # Refused without the token (401) and with a wrong one (403); the token opens it.
        assert jobs_api_status(head, {}) == 401
        assert jobs_api_status(head, {"Authorization": "Bearer " + "0" * len(token)}) == 403
        assert jobs_api_status(head, {"Authorization": f"Bearer {token}"}) == 200
        # Ray's own client without the token: refused, with Ray's message.
        refused = subprocess.run([sys.executable, "-c", "import sys\nfrom ray.job_submission import "
                                  "JobSubmissionClient\nJobSubmissionClient(sys.argv[1]).list_jobs()", head.url],
                                 env=client_env(stranger), capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "AuthenticationError" in refused.stderr, refused.stderr[-2000:]
        # Our driver joining the GCS without the token: one line saying what to set.
        joined = subprocess.run([sys.executable, "-m", "bulk_explain", "run", "--input", inputs, "--output",
                                 str(tmp_path / "nope"), "--model", "cats_dogs", "--weights", "random",
                                 "--input-size", "64", "--address", head.gcs_address],
                                env=client_env(stranger, PYTHONPATH=REPO), capture_output=True, text=True,
                                timeout=300)
        assert joined.returncode == 2, joined.stderr[-3000:]
        # (Ray's C++ client logs its retries above; ours is the last line, and no traceback.)
        last = joined.stderr.strip().splitlines()[-1]
        assert last.startswith("bulk-explain: error: could not join the Ray cluster") and "RAY_AUTH_MODE=token" in last
        assert "Traceback" not in joined.stderr

        entrypoint = ("python _probe_upload.py && python -m bulk_explain run "
                      f"--input '{inputs}' --output '{out}' --model cats_dogs --weights random "
                      "--input-size 64 --shard-size 2 --batch-size 4 --address auto")
        outcome = run_client(head, client_env(home, token_path), {
            "timeout": JOB_TIMEOUT,
            "submit": {"entrypoint": entrypoint,
                       "runtime_env": {"working_dir": checkout, "env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}}}})
    finally:
        leftovers = head.stop()
        head.cleanup()
    assert not leftovers, leftovers  # SIGTERM alone stopped everything it started
    logs = outcome["logs"]
    assert outcome["status"] == "SUCCEEDED", f"job ended {outcome['status']}\n--- job logs ---\n{logs[-6000:]}"

    # The driver joined this head (--address auto under the job's RAY_ADDRESS, with the head's auth
    # mode), not an embedded Ray, and the explain actors ran in this cluster.
    assert outcome["actors"] and set(outcome["actors"]) == {"ExplainWorker"}
    probe = json.loads(next(l for l in logs.splitlines() if l.startswith("PROBE "))[len("PROBE "):])
    assert probe["ray_address"] and probe["ray_address"].endswith(f":{head.gcs_port}")
    assert probe["auth_mode"] == "token"

    # The code ran from the uploaded package, which held the checkout minus what .rayignore excludes.
    assert "runtime_resources" in probe["cwd"] and probe["cwd"] != checkout
    assert probe["jobs"].startswith(probe["cwd"] + os.sep) and probe["workers"].startswith(probe["cwd"] + os.sep)
    uploaded = set(probe["files"])
    assert {"bulk_explain/__init__.py", "jobs/cli.py", "jobs/explain/driver.py", "workers/storage_s3.py",
            "pyproject.toml"} <= uploaded
    assert not uploaded & set(DECOYS), sorted(uploaded & set(DECOYS))
    assert {c for c in copied if c.endswith(".py")} <= uploaded  # and no code went missing

    assert "finished: 5 ok, 1 error rows, 3 shards" in logs
    dataset = ds.dataset(os.path.join(out, "manifest"))
    assert len(dataset.files) == 3
    rows = {r["source_uri"]: r for r in dataset.to_table().to_pylist()}
    assert sorted(rows) == sorted(files) and dataset.count_rows() == len(files)  # every input once
    for path, size in files.items():
        row = rows[path]
        if size is None:
            assert row["status"] == "error" and row["error"]
            continue
        assert row["status"] == "ok", row["error"]
        assert (row["width"], row["height"]) == size
        assert cv2.imread(row["gradcam_overlay_uri"]).shape == (size[1], size[0], 3)
    assert rows[os.path.join(inputs, "dogs", "dög ü.webp")]["label"] == "dogs"
    assert rows[os.path.join(inputs, "top.jpg")]["label"] is None
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["ok"] == 5 and summary["errors"] == 1 and summary["processed_shards"] == 3
    assert not os.path.exists(os.path.join(home, ".ray", "auth_token"))  # the token stayed where we put it


def test_repository_rayignore_is_the_documented_one():
    """docs/cluster.md shows the .rayignore users keep (and test_cluster_yaml checks that block
    against Ray's packaging); the file at the repository root must be that block, not a drifted copy."""
    with open(os.path.join(REPO, "docs", "cluster.md"), encoding="utf-8") as f:
        text = f.read()
    block = text.split("<!-- rayignore:begin -->", 1)[1].split("<!-- rayignore:end -->", 1)[0]
    documented = block.strip().removeprefix("```").removesuffix("```").strip().splitlines()
    with open(os.path.join(REPO, ".rayignore"), encoding="utf-8") as f:
        assert f.read().strip().splitlines() == documented
