"""Ray Jobs: a real local Ray head (`ray start --head`, Jobs API on loopback) runs the job submitted
through `JobSubmissionClient` with the checkout as `working_dir`, as `ray job submit --working-dir .`
does on a cluster.

The head is this test's own: its own ports and `--temp-dir` (so `ray_current_cluster` and the
sessions stay out of /tmp/ray and nothing else on the machine can join it by accident), and it is
stopped by SIGTERM to the `ray start --block` process that started it (`ray stop` would stop every
Ray on the machine). The test checks that nothing of it is left running afterwards.
"""

import json
import os
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

HEAD_START_TIMEOUT = 120
JOB_TIMEOUT = 300

# Files a user's checkout may hold that .rayignore (and only .rayignore: .gitignore lets them through)
# must keep out of the upload.
DECOYS = ["models/cats_and_dogs_small_1.h5", "my model.keras", "data/pets/cats/cat 1.jpg",
          "results/manifest/shard-00000.parquet", "notebooks/overlay.png", "saved_model/saved_model.pb"]

PROBE = '''\
import json, os, jobs, workers
root = os.getcwd()
files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
print("PROBE " + json.dumps({"cwd": root, "jobs": jobs.__file__, "workers": workers.__file__,
                             "files": files, "ray_address": os.environ.get("RAY_ADDRESS")}))
'''


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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


class RayHead:
    """`ray start --head --block` in its own session; `stop()` ends exactly what it started."""

    def __init__(self):
        # Short: Ray puts unix sockets under it (108-byte path limit).
        self.temp_dir = tempfile.mkdtemp(prefix="bxray-", dir="/tmp")
        (self.gcs_port, self.dashboard_port, client_port, agent_http, agent_grpc, metrics,
         runtime_env_agent, node_manager, object_manager) = free_ports(9)
        self.log_path = os.path.join(self.temp_dir, "ray-start.log")
        env = dict(os.environ, RAY_AUTH_MODE="disabled", TF_CPP_MIN_LOG_LEVEL="3",
                   RAY_USAGE_STATS_ENABLED="0")
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "PYTHONPATH"):
            env.pop(name, None)  # the code must come from the uploaded working_dir
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={client_port}",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env_agent}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               "--num-cpus=2", "--num-gpus=0", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=self.temp_dir)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.dashboard_port}"

    def log_tail(self, n=4000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-n:]
        except OSError:
            return ""

    def client(self):
        """A JobSubmissionClient once the Jobs API answers (bounded wait)."""
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + HEAD_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                client = JobSubmissionClient(self.url)
                client.list_jobs()
                return client
            except Exception as exc:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    pytest.fail(f"Ray Jobs API not up after {HEAD_START_TIMEOUT}s ({exc}):\n{self.log_tail()}")
                time.sleep(1)

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


def wait_for(client, sid, timeout):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    status = client.get_job_status(sid)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(sid)
    if not status.is_terminal():
        client.stop_job(sid)
    return status, JobStatus


@pytest.mark.slow
def test_submitted_job_runs_on_the_head_with_the_uploaded_working_dir(tmp_path):
    inputs = str(tmp_path / "in")
    files = make_inputs(inputs)
    out = str(tmp_path / "out")
    checkout = str(tmp_path / "checkout")
    copied = make_checkout(checkout)

    head = RayHead()
    try:
        client = head.client()
        entrypoint = ("python _probe_upload.py && python -m jobs run "
                      f"--input '{inputs}' --output '{out}' --model cats_dogs --weights random "
                      "--input-size 64 --shard-size 2 --batch-size 4 --address auto")
        sid = client.submit_job(entrypoint=entrypoint,
                                runtime_env={"working_dir": checkout,
                                             "env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})
        status, JobStatus = wait_for(client, sid, JOB_TIMEOUT)
        logs = client.get_job_logs(sid)
        assert status == JobStatus.SUCCEEDED, (
            f"job {sid} ended {status}\n--- job logs ---\n{logs[-6000:]}\n--- ray start ---\n{head.log_tail()}")

        from ray.util.state import list_actors

        workers = list_actors(address=head.url, filters=[("class_name", "=", "ExplainWorker")])
    finally:
        leftovers = head.stop()
        head.cleanup()
    assert not leftovers, leftovers  # SIGTERM alone stopped everything it started

    # The driver joined this head (--address auto under the job's RAY_ADDRESS), not an embedded Ray,
    # and the explain actors ran in this cluster.
    assert len(workers) >= 1
    probe = json.loads(next(l for l in logs.splitlines() if l.startswith("PROBE "))[len("PROBE "):])
    assert probe["ray_address"] and probe["ray_address"].endswith(f":{head.gcs_port}")

    # The code ran from the uploaded package, which held the checkout minus what .rayignore excludes.
    assert "runtime_resources" in probe["cwd"] and probe["cwd"] != checkout
    assert probe["jobs"].startswith(probe["cwd"] + os.sep) and probe["workers"].startswith(probe["cwd"] + os.sep)
    uploaded = set(probe["files"])
    assert {"jobs/cli.py", "jobs/driver.py", "workers/storage_s3.py", "pyproject.toml"} <= uploaded
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


def test_repository_rayignore_is_the_documented_one():
    """docs/cluster.md shows the .rayignore users keep (and test_cluster_yaml checks that block
    against Ray's packaging); the file at the repository root must be that block, not a drifted copy."""
    with open(os.path.join(REPO, "docs", "cluster.md"), encoding="utf-8") as f:
        text = f.read()
    block = text.split("<!-- rayignore:begin -->", 1)[1].split("<!-- rayignore:end -->", 1)[0]
    documented = block.strip().removeprefix("```").removesuffix("```").strip().splitlines()
    with open(os.path.join(REPO, ".rayignore"), encoding="utf-8") as f:
        assert f.read().strip().splitlines() == documented
