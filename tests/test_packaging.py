"""The installed import names: one `bulk_explain` namespace mapped onto the repository's top-level
folders (jobs/, workers/, schemas/), with `python -m bulk_explain` and the `bulk-explain` script."""

import glob
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAPPED = {"bulk_explain": "bulk_explain", "bulk_explain.jobs": "jobs", "bulk_explain.workers": "workers",
          "bulk_explain.schemas": "schemas"}


def _package_folders():
    """Every folder with an __init__.py under the mapped roots, as its installed dotted name."""
    names = set()
    for name, folder in MAPPED.items():
        for init in glob.glob(os.path.join(REPO, folder, "**", "__init__.py"), recursive=True):
            rel = os.path.relpath(os.path.dirname(init), os.path.join(REPO, folder))
            names.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    return names


def test_every_package_folder_is_installed():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert setuptools["package-dir"] == MAPPED
    listed = set(setuptools["packages"])
    assert listed == _package_folders(), f"missing: {_package_folders() - listed}; stale: {listed - _package_folders()}"


def test_wheel_installs_one_namespace_and_runs(tmp_path):
    """A non-editable build: every module lands under bulk_explain/, nothing at the top level, and
    the unpacked wheel runs `python -m bulk_explain` from a folder that is not the checkout."""
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info/ into its source
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    for folder in MAPPED.values():
        shutil.copytree(os.path.join(REPO, folder), source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    code = [n for n in names if n.endswith(".py")]
    assert code and all(n.startswith("bulk_explain/") for n in code), [n for n in code if not n.startswith("bulk_explain/")]
    for module in ("jobs/cli.py", "jobs/explain/driver.py", "jobs/filters/__init__.py", "jobs/audit/checks/__init__.py",
                   "workers/explain/writer.py", "workers/filters/filter_vis.py", "workers/backends/jax.py",
                   "schemas/image_manifest.py"):
        assert "bulk_explain/" + module in names
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    probe = subprocess.run([sys.executable, "-c", "import bulk_explain.jobs.cli as c, bulk_explain.workers.explain.writer as w; "
                            "print(c.__file__); print(w.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert all(line.startswith(str(tmp_path / "site")) for line in probe.stdout.split()), probe.stdout
    listed = subprocess.run([sys.executable, "-m", "bulk_explain"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 2 and "run" in listed.stdout and "filters" in listed.stdout and "audit" in listed.stdout


def test_checkout_without_install_imports_its_own_files(tmp_path):
    """Ray's working_dir upload and `python -m bulk_explain` in a checkout: the sibling folders are
    the package's sub-packages, even where another copy is installed."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for folder in ("bulk_explain", "jobs", "workers", "schemas"):
        shutil.copytree(os.path.join(REPO, folder), checkout / folder)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", "import bulk_explain.jobs.cli as c; print(c.__file__)"],
                           cwd=checkout, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == str(checkout / "jobs" / "cli.py")
