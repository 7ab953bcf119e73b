"""The scheduling recipes of docs/scheduling.md, each checked as far as something installable can.

- cron (docs/recipes/nightly.sh): run with a stand-in `ray` that records its arguments, which Ray's
  own `ray job submit` command-line parser and ours then accept; and for real in the nightly story
  below, against a local head with token auth on.
- Kubernetes CronJob (docs/recipes/k8s-cronjob.yaml): validated against Kubernetes' own JSON schema
  (strict: unknown fields rejected) from the `kubernetes-validate` package; its command parsed as
  above.
- KubeRay RayCronJob (docs/recipes/raycronjob.yaml): no package ships KubeRay's CRD schema, so the
  fields we rely on are checked against the RayCronJob/RayJob Go types (KubeRay at commit feeaf72,
  v1.6+: spec = jobTemplate, schedule, timeZone, suspend; no concurrency policy), and its pod
  templates against Kubernetes' PodTemplate schema.
- Airflow (docs/recipes/airflow_bulk_explain.py): Airflow and the Google provider are not installed
  (hundreds of MB); the DAG file is executed with stand-ins for both whose operator has the
  signature of RaySubmitJobOperator in apache-airflow-providers-google 22.8 (checked against its
  source), so an unknown or missing argument fails here as it would there.

The nightly story (slow): run 1 over N images; images added, changed and deleted; run 2 submitted
while a stub holder keeps the output's lease -> the job exits 4; once the holder stops renewing and
the lease expires, run 2 takes it over and processes only the changed shards; the same submission id
twice -> Ray refuses the second.
"""

import ast
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types

import numpy as np
import pyarrow.dataset as ds
import pytest
import yaml

from conftest import REPO, photo_like, write_image

RECIPES = os.path.join(REPO, "docs", "recipes")
K8S_VERSION = "1.30.0"


def _load(name):
    with open(os.path.join(RECIPES, name)) as f:
        return yaml.safe_load(f)


def _cluster_ray_version():
    with open(os.path.join(REPO, "cluster.yaml")) as f:
        image = yaml.safe_load(f)["docker"]["image"]
    return re.search(r":(\d+\.\d+\.\d+)-", image).group(1)


def check_submit_command(argv):
    """`ray job submit ARGS -- ENTRYPOINT` as Ray's CLI parses it; the entrypoint as ours does.

    Returns:
        (Ray's parsed options, our validated ExplainConfig).
    """
    from ray.dashboard.modules.job.cli import job_cli_group

    assert argv[:3] == ["ray", "job", "submit"], argv
    params = job_cli_group.commands["submit"].make_context("submit", list(argv[3:])).params
    return params, check_entrypoint(list(params["entrypoint"]))


def check_entrypoint(argv):
    """A `bulk-explain run ...` / `python -m bulk_explain run ...` command line, validated by our CLI."""
    from bulk_explain.jobs.cli import build_parser, explain_config_from_args

    if argv[:3] == ["python", "-m", "bulk_explain"]:
        argv = argv[3:]
    else:
        assert argv[0] == "bulk-explain", argv
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    assert args.command == "run"
    return explain_config_from_args(args).validated()


# ----------------------------------------------------------------------------- cron

def test_cron_recipe_submits_a_dated_authenticated_job(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "argv.json"
    (fake_bin / "ray").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': ['ray'] + sys.argv[1:], 'mode': os.environ.get('RAY_AUTH_MODE')}}, "
        f"open({str(record)!r}, 'w'))\n")
    (fake_bin / "ray").chmod(0o755)
    data = tmp_path / "data"
    data.mkdir()
    env = dict(os.environ, PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", INPUT=str(data),
               OUTPUT=str(tmp_path / "audit"))
    env.pop("RAY_AUTH_MODE", None)
    env.pop("SUBMISSION_ID", None)
    done = subprocess.run(["bash", os.path.join(RECIPES, "nightly.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.load(open(record))
    assert seen["mode"] == "token"  # the script turns the client's token mode on itself
    params, config = check_submit_command(seen["argv"])
    assert params["submission_id"] == f"bulk-explain-{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
    assert params["working_dir"] == "." and params["address"] == "http://127.0.0.1:8265"
    assert config.address == "auto" and config.model.kind == "vgg16" and config.output == str(tmp_path / "audit")

    # Without INPUT/OUTPUT it says what is missing and submits nothing.
    record.unlink()
    env.pop("INPUT")
    done = subprocess.run(["bash", os.path.join(RECIPES, "nightly.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "INPUT" in done.stderr and not record.exists()


# ----------------------------------------------------------------------------- Kubernetes CronJob

def _cronjob_submit_argv(doc, day="2026-11-26"):
    container, = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/bash", "-c"]
    script, = container["args"]
    assert "$(date -u +%F)" in script  # the date-derived submission id
    argv = shlex.split(script.replace("$(date -u +%F)", day))
    assert argv[0] == "exec"
    return container, argv[1:]


def test_k8s_cronjob_recipe_is_a_valid_cronjob_that_forbids_overlap():
    import kubernetes_validate

    doc = _load("k8s-cronjob.yaml")
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert doc["kind"] == "CronJob" and doc["spec"]["concurrencyPolicy"] == "Forbid"
    container, argv = _cronjob_submit_argv(doc)
    params, config = check_submit_command(argv)
    assert params["submission_id"] == "bulk-explain-2026-11-26" and params["address"].endswith(":8265")
    assert config.address == "auto" and config.output.rstrip("/") == "s3://audits/pets"
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
    assert container["image"].endswith(f":{_cluster_ray_version()}-py311")  # client == cluster version


@pytest.mark.parametrize("path, value", [
    (("spec", "startingDeadlineSeconds"), "an hour"),               # not an integer
    (("spec", "concurencyPolicy"), "Forbid"),                      # misspelt: strict schema
    (("spec", "jobTemplate", "spec", "template", "spec", "restartPolicy"), 3),
])
def test_k8s_schema_check_rejects_broken_cronjobs(path, value):
    import kubernetes_validate

    doc = _load("k8s-cronjob.yaml")
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# ----------------------------------------------------------------------------- KubeRay RayCronJob

# From ray-operator/apis/ray/v1/raycronjob_types.go and rayjob_types.go (KubeRay feeaf72).
RAYCRONJOB_SPEC_FIELDS = {"jobTemplate", "schedule", "timeZone", "suspend"}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "preRunningDeadlineSeconds",
    "shutdownAfterJobFinishes", "suspend"}
AUTH_MODES = {"disabled", "token"}


def test_raycronjob_recipe_fields():
    import kubernetes_validate

    doc = _load("raycronjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCronJob")
    spec = doc["spec"]
    assert set(spec) <= RAYCRONJOB_SPEC_FIELDS, set(spec) - RAYCRONJOB_SPEC_FIELDS
    assert len(spec["schedule"].split()) == 5
    job = spec["jobTemplate"]
    assert set(job) <= RAYJOB_SPEC_FIELDS, set(job) - RAYJOB_SPEC_FIELDS
    config = check_entrypoint(shlex.split(job["entrypoint"]))
    assert config.address == "auto" and config.output.rstrip("/") == "s3://audits/pets"
    assert job["shutdownAfterJobFinishes"] is True
    cluster = job["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token" and set(cluster["authOptions"]["mode"].split()) <= AUTH_MODES
    assert cluster["rayVersion"] == _cluster_ray_version()
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, K8S_VERSION, strict=True)
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for g in cluster["workerGroupSpecs"]]
    assert gpus == ["1"]
    # The image the recipe names is built by the Dockerfile beside it, on the cluster's Ray version.
    with open(os.path.join(RECIPES, "Dockerfile")) as f:
        base = re.search(r"^FROM (\S+)", f.read(), re.M).group(1)
    assert base == f"rayproject/ray:{_cluster_ray_version()}-py311-gpu"


def test_raycronjob_field_check_catches_a_concurrency_policy():
    """RayCronJob has no concurrencyPolicy (that is what the lease is for): the check refuses one."""
    doc = _load("raycronjob.yaml")
    doc["spec"]["concurrencyPolicy"] = "Forbid"
    assert not set(doc["spec"]) <= RAYCRONJOB_SPEC_FIELDS


# ----------------------------------------------------------------------------- Airflow

# RaySubmitJobOperator.__init__ in apache-airflow-providers-google 22.8 (airflow/providers/google/
# cloud/operators/ray.py) plus its base class's, and the BaseOperator arguments the recipe uses.
RAY_SUBMIT_ARGS = {"cluster_address", "entrypoint", "get_job_logs", "wait_for_job_done", "runtime_env",
                   "metadata", "submission_id", "entrypoint_num_cpus", "entrypoint_num_gpus",
                   "entrypoint_memory", "entrypoint_resources", "submit_job_timeout", "gcp_conn_id",
                   "impersonation_chain"}
RAY_SUBMIT_REQUIRED = {"cluster_address", "entrypoint"}
BASE_OPERATOR_ARGS = {"task_id", "retries", "retry_delay", "owner", "execution_timeout", "pool", "queue",
                      "email", "email_on_failure", "doc_md"}


def _run_dag_file(path):
    """Executes the DAG file with stand-in `airflow` modules; returns (dag kwargs, operator kwargs)."""
    seen = {"dags": [], "operators": []}

    class DAG:
        def __init__(self, **kwargs):
            seen["dags"].append(kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class RaySubmitJobOperator:
        def __init__(self, **kwargs):
            unknown = set(kwargs) - RAY_SUBMIT_ARGS - BASE_OPERATOR_ARGS
            missing = RAY_SUBMIT_REQUIRED - set(kwargs)
            if unknown or missing or "task_id" not in kwargs:
                raise TypeError(f"RaySubmitJobOperator: unknown {unknown}, missing {missing}")
            seen["operators"].append(kwargs)

    modules = {name: types.ModuleType(name) for name in (
        "airflow", "airflow.sdk", "airflow.providers", "airflow.providers.google",
        "airflow.providers.google.cloud", "airflow.providers.google.cloud.operators",
        "airflow.providers.google.cloud.operators.ray")}
    modules["airflow.sdk"].DAG = DAG
    modules["airflow.providers.google.cloud.operators.ray"].RaySubmitJobOperator = RaySubmitJobOperator
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        with open(path) as f:
            code = compile(f.read(), path, "exec")
        exec(code, {"__name__": "bulk_explain_dag"})
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return seen["dags"], seen["operators"]


def test_airflow_recipe_builds_one_nightly_submission():
    path = os.path.join(RECIPES, "airflow_bulk_explain.py")
    imports = {n.module for n in ast.walk(ast.parse(open(path).read())) if isinstance(n, ast.ImportFrom)}
    assert "airflow.providers.google.cloud.operators.ray" in imports
    (dag,), (op,) = _run_dag_file(path)
    assert dag["max_active_runs"] == 1 and dag["catchup"] is False and len(dag["schedule"].split()) == 5
    assert op["submission_id"] == "bulk-explain-{{ ds }}"  # Airflow renders the logical date
    assert op["wait_for_job_done"] is True and op["cluster_address"].startswith("http")
    config = check_entrypoint(shlex.split(op["entrypoint"]))
    assert config.address == "auto"


def test_airflow_check_catches_a_wrong_argument(tmp_path):
    broken = tmp_path / "dag.py"
    broken.write_text(open(os.path.join(RECIPES, "airflow_bulk_explain.py")).read()
                      .replace("cluster_address=", "address="))
    with pytest.raises(TypeError, match="unknown"):
        _run_dag_file(str(broken))


# ----------------------------------------------------------------------------- the nightly story

def _images(root, names, seed):
    rng = np.random.default_rng(seed)
    return [write_image(os.path.join(root, n), photo_like(rng, 36, 44)) for n in names]


def _rows(out):
    return ds.dataset(os.path.join(out, "manifest")).to_table().column("source_uri").to_pylist()


@pytest.mark.slow
def test_nightly_story_on_a_head_with_token_auth(tmp_path):
    from test_ray_jobs import RayHead, client_env, generate_token, make_checkout

    from bulk_explain.workers.lease import LeaseOptions, OutputLease

    data, out = str(tmp_path / "data"), str(tmp_path / "audit")
    inputs = _images(data, [f"{c}/{i}.jpg" for i in range(3) for c in ("cats", "dogs")], seed=1)
    checkout = str(tmp_path / "checkout")
    make_checkout(checkout)
    home = tmp_path / "home"
    home.mkdir()
    token_path, _ = generate_token(tmp_path / "token-home")
    head = RayHead(token_path, home)

    def nightly(submission_id=None, **extra):
        env = client_env(home, token_path, INPUT=data, OUTPUT=out, RAY_API_SERVER_ADDRESS=head.url,
                         BULK_EXPLAIN_ARGS="--model cats_dogs --weights random --input-size 64 "
                                           "--shard-size 2 --batch-size 2 --quiet", **extra)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # this Python's `ray`
        env.pop("RAY_AUTH_MODE")  # the script sets it
        if submission_id:
            env["SUBMISSION_ID"] = submission_id
        done = subprocess.run(["bash", os.path.join(RECIPES, "nightly.sh")], env=env, cwd=checkout,
                              capture_output=True, text=True, timeout=600)
        return done.returncode, done.stdout + done.stderr

    try:
        head.wait_started()
        # Night 1: everything.
        rc, log = nightly("night-1")
        assert rc == 0, log[-5000:]
        assert sorted(_rows(out)) == sorted(inputs)
        first = json.load(open(os.path.join(out, "summary.json")))
        assert first["processed_shards"] == 3

        # During the day: two images added, one changed (shard 0), one deleted (shard 2).
        inputs += _images(data, ["cats/new-a.jpg", "dogs/new-b.jpg"], seed=2)
        _images(data, ["cats/0.jpg"], seed=3)
        os.remove(os.path.join(data, "dogs", "2.jpg"))
        inputs.remove(os.path.join(data, "dogs", "2.jpg"))

        # Night 2 starts while another run (a stub) holds the output: the job exits 4.
        stub = OutputLease(out, LeaseOptions(duration_seconds=3), job="stub", log=lambda m: None).acquire()
        rc, log = nightly("night-2")
        assert rc != 0 and "output is busy" in log and stub.holder_id[:12] in log, log[-5000:]
        assert "exit code 4" in log
        assert json.load(open(os.path.join(out, "summary.json"))) == first  # nothing written

        # The stub stops renewing (as if killed); night 2 again: it waits for the expiry on the
        # store's clock, takes the lease over and redoes only the changed shards.
        stub._stop.set()
        stub._thread.join()
        rc, log = nightly("night-2-retry", WAIT_FOR_LEASE="120")
        assert rc == 0, log[-5000:]
        assert "took over the lease" in log and stub.holder_id[:12] in log
        second = json.load(open(os.path.join(out, "summary.json")))
        assert second["added_images"] == 2 and second["changed_images"] == 1 and second["removed_images"] == 1
        assert second["skipped_shards"] == 1 and second["processed_shards"] == 3  # shards 0, 2 and the new 3
        rows = _rows(out)
        assert sorted(rows) == sorted(inputs) and len(rows) == len(set(rows))
        assert not os.path.exists(os.path.join(out, "_lease.json"))

        # The same submission id twice (today's default one): Ray refuses the second.
        rc, log = nightly()
        assert rc == 0, log[-5000:]
        rc, log = nightly()
        assert rc != 0 and re.search(r"already exists|already been submitted", log, re.I), log[-3000:]
    finally:
        leftovers = head.stop()
        head.cleanup()
    assert not leftovers, leftovers
