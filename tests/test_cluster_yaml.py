"""cluster.yaml is a valid Ray cluster launcher config with the shape the README promises.

Validated twice: against the JSON schema that ships inside the installed ray package
(ray/autoscaler/ray-schema.json), and through the launcher's own prepare_config/validate_config (what
`ray up` runs before it talks to AWS: AWS defaults merged, setup commands merged per node type).
"""

import copy
import json
import os
import re

import jsonschema
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_YAML = os.path.join(REPO, "cluster.yaml")


def _schema():
    import ray

    path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def config():
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def prepared(config):
    """The config as `ray up` sees it after merging defaults (no cloud calls)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    out = prepare_config(copy.deepcopy(config))
    validate_config(out)
    return out


def _worker_types(cfg):
    return {name: t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]}


def test_validates_against_rays_schema(config, prepared):
    jsonschema.validate(config, _schema())
    jsonschema.validate(prepared, _schema())
    assert config["provider"]["type"] == "aws"


def test_head_node_runs_no_work(config, prepared):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert prepared["available_node_types"][config["head_node_type"]]["max_workers"] == 0


def test_gpu_worker_type_autoscales_one_gpu_per_node(config):
    workers = _worker_types(config)
    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu, "no worker node type with a GPU"
    for name, t in gpu.items():
        assert t["resources"]["GPU"] == 1, name
        assert t["min_workers"] == 0 and 1 <= t["max_workers"] <= config["max_workers"], name
        # A GPU instance family (g4dn, g5, g6, g6e, p3, p4d, p5 ...).
        assert re.match(r"^(g\d|p\d)[a-z]*\.", t["node_config"]["InstanceType"]), name
        assert t["resources"].get("CPU", 0) >= 2, f"{name}: decode threads need CPUs beside the GPU"


def test_workers_get_an_instance_profile_for_s3(config):
    for name, t in _worker_types(config).items():
        profile = t["node_config"].get("IamInstanceProfile", {})
        arn = profile.get("Arn", "")
        assert re.match(r"^arn:aws[a-z-]*:iam::\d{12}:instance-profile/.+", arn) or profile.get("Name"), name


def test_setup_installs_the_project_and_gpu_tensorflow(config, prepared):
    (remote, local), = [(r, l) for r, l in config["file_mounts"].items() if r != "~/.ray/auth_token"]
    assert os.path.isfile(os.path.join(REPO, local, "pyproject.toml"))
    for name in ("head_setup_commands", "worker_setup_commands"):
        assert any(remote in c and "pip install" in c for c in prepared[name]), name
    assert any("tensorflow[and-cuda]" in c for c in prepared["worker_setup_commands"])
    # Ray's shipped AWS defaults install a nightly Ray wheel; ours must replace them entirely.
    assert not any("ray-wheels" in c for c in prepared["worker_setup_commands"])
    image = config["docker"]["image"]
    assert re.search(r":\d+\.\d+\.\d+-py3(1[0-9])-gpu$", image), f"pin the Ray version: {image}"


def _set(cfg, path, value):
    node = cfg
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


_DELETE = object()


@pytest.mark.parametrize("path, value", [
    (("available_node_types", "ray.head.default", "resources", "CPU"), "zero"),      # not an int
    (("available_node_types", "ray.worker.gpu", "resources", "GPU"), -1),            # negative
    (("available_node_types", "ray.worker.gpu", "node_config"), _DELETE),             # required
    (("available_node_types", "ray.worker.gpu", "min_worker"), 0),                   # misspelt key
    (("provider",), _DELETE),                                                          # required
    (("docker", "gpus"), "all"),                                                       # unknown key
    (("setup_commands",), "pip install ."),                                            # not a list
])
def test_broken_configs_fail_validation(config, path, value):
    broken = copy.deepcopy(config)
    _set(broken, path, value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _schema())


# -- what `ray job submit --working-dir .` uploads (docs/cluster.md) ---------------------------------

DOCS = os.path.join(REPO, "docs", "cluster.md")
KEEP = ["pyproject.toml", "cluster.yaml", "bulk_explain/__init__.py", "jobs/cli.py", "workers/storage_s3.py", "schemas/image_manifest.py"]
DROP = ["models/cats_and_dogs_small_1.h5", "my model.keras", "out/manifest/shard-00000.parquet",
        "data/pets/cats/cat 1.jpg", "sample_photos/coffee.png", "demo_out/overlays/00000/x.jpg",
        ".git/config", ".venv/lib/site.py", "bulk_explain.egg-info/PKG-INFO"]


def _docs_rayignore() -> str:
    with open(DOCS) as f:
        text = f.read()
    block = text.split("<!-- rayignore:begin -->", 1)[1].split("<!-- rayignore:end -->", 1)[0]
    return block.strip().removeprefix("```").removesuffix("```").strip() + "\n"


def _docs_runtime_env_excludes():
    with open(DOCS) as f:
        text = f.read()
    match = re.search(r"--runtime-env-json '(\{.*?\})'", text)
    return json.loads(match.group(1))["excludes"]


def _uploaded(tmp_path, rayignore=None, excludes=()):
    """The files Ray's own working_dir packaging puts in the zip for a checkout like ours."""
    from zipfile import ZipFile

    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    tree = tmp_path / "checkout"
    for rel in KEEP + DROP:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(b"x" * 100)
    (tree / ".gitignore").write_text(open(os.path.join(REPO, ".gitignore")).read()
                                     if os.path.exists(os.path.join(REPO, ".gitignore")) else "")
    if rayignore is not None:
        (tree / ".rayignore").write_text(rayignore)
    target = tmp_path / "package.zip"
    create_package(str(tree), target, include_gitignore=True,
                   excludes=ray_constants.get_runtime_env_default_excludes() + list(excludes))
    return {n for n in ZipFile(target).namelist() if not n.endswith("/")}


def test_documented_rayignore_keeps_models_and_outputs_out_of_the_upload(tmp_path):
    names = _uploaded(tmp_path, rayignore=_docs_rayignore())
    assert set(KEEP) <= names
    assert not names & set(DROP), sorted(names & set(DROP))


def test_documented_runtime_env_excludes_do_the_same(tmp_path):
    names = _uploaded(tmp_path, excludes=_docs_runtime_env_excludes())
    assert set(KEEP) <= names
    assert not names & set(DROP), sorted(names & set(DROP))


def test_without_excludes_models_would_be_uploaded(tmp_path):
    """The check above can fail: with no .rayignore the model and the data go up with the code."""
    names = _uploaded(tmp_path)
    assert {"models/cats_and_dogs_small_1.h5", "data/pets/cats/cat 1.jpg"} <= names


# -- Ray token authentication (docs/cluster.md) -------------------------------------------------------

def test_nodes_run_with_token_auth_from_the_mounted_token(config, prepared):
    # The token made by `ray get-auth-token --generate` (Ray's default path) is shipped to every node
    # at Ray's default path, where `ray start` and every job driver read it.
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "~/.ray/auth_token" in prepared["file_mounts"]
    # RAY_AUTH_MODE=token in the container's environment and before each `ray start`: without it a
    # client (the job driver joining with --address auto included) sends no token.
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    for name in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[name] if "ray start" in c]
        assert starts and all(re.search(r"export RAY_AUTH_MODE=token;.*ray start", c) for c in starts), name
    # and no command disables it
    commands = [c for key, value in prepared.items() if key.endswith("commands") for c in value]
    assert not any("RAY_AUTH_MODE=disabled" in c for c in commands)
    assert not any("RAY_AUTH_TOKEN=" in c for c in commands)  # the secret itself never sits in the YAML


@pytest.mark.parametrize("path, value", [
    (("docker", "run_options"), "--env RAY_AUTH_MODE=token"),          # a list, not a string
])
def test_broken_auth_settings_fail_validation(config, path, value):
    broken = copy.deepcopy(config)
    _set(broken, path, value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _schema())
