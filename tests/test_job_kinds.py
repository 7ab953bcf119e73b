"""Every job kind goes through the one runner (`bulk_explain.jobs.runner`): the same protocol tests,
parametrized over the kinds, not a copy per kind. Each kind is run through its CLI in a subprocess
(its own embedded Ray, its own session), with the test-only fault points forwarded to its workers.

- a worker that pauses after a unit's marker, then the whole machine is gone (SIGKILL of the
  driver's session): the next run (`--break-lease`: the dead driver's lease) publishes that unit
  from `_staging/` (roll forward) and, with a worker killed mid-unit, retries that unit;
- SIGTERM while units run: exit 143, nothing left running, committed units kept and skipped later;
- credentials in the S3 endpoint never reach either kind's job.json nor Ray's logs.
"""

import glob
import json
import os
import signal

import pyarrow.parquet as pq
import pytest

from test_reliability import kill_session, make_inputs, wait_flag
from test_signals import finish, session_left, start

SECRET = "kinds-pw-51c7"
ENDPOINT = f"http://minio:{SECRET}/x@127.0.0.1:9"  # unused (local outputs); must never be written


class Kind:
    """How to run one kind small, and where its protocol files and rows are."""

    def __init__(self, name, tmp_path):
        self.name = name
        self.out = str(tmp_path / "out")
        if name == "explain":
            make_inputs(str(tmp_path / "in"), 6)
            self.args = ["run", "--input", str(tmp_path / "in"), "--output", self.out, "--model", "cats_dogs",
                         "--weights", "random", "--input-size", "64", "--shard-size", "1", "--batch-size", "2",
                         "--workers", "1"]
            self.root, self.units, self.rows = self.out, 6, 6
        else:
            self.args = ["filters", "--output", self.out, "--model", "cats_dogs", "--weights", "random",
                         "--input-size", "64", "--size", "64", "--layers", "conv2d", "--filters-per-unit", "4",
                         "--steps", "2", "--workers", "1", "--batch-size", "4"]
            self.root, self.units, self.rows = os.path.join(self.out, "filters"), 8, 32
        self.args += ["--s3-endpoint-url", ENDPOINT]

    def image_folder(self, unit):
        """A folder the kind's worker writes a unit's images to."""
        if self.name == "explain":
            return os.path.join(self.out, "overlays", f"{unit:05d}")
        return os.path.join(self.root, "conv2d")

    def markers(self):
        return sorted(glob.glob(os.path.join(self.root, "_commits", "shard-*.json")))

    def staged(self):
        return sorted(glob.glob(os.path.join(self.root, "_staging", "shard-*.parquet")))

    def summary(self):
        with open(os.path.join(self.root, "summary.json")) as f:
            return json.load(f)

    def counted(self, what):
        """A summary count by the runner's name: skipped / rolled_forward."""
        names = {"explain": {"skipped": "skipped_shards", "rolled_forward": "rolled_forward_shards"},
                 "filters": {"skipped": "skipped_units", "rolled_forward": "rolled_forward_units"}}
        return self.summary()[names[self.name][what]]

    def visible_rows(self):
        """What a reader of the kind's manifest sees, as keys that must be unique."""
        if self.name == "explain":
            parts = glob.glob(os.path.join(self.out, "manifest", "*.parquet"))
            return [u for p in parts for u in pq.read_table(p).column("source_uri").to_pylist()]
        table = pq.read_table(os.path.join(self.root, "manifest.parquet"))
        return list(zip(table.column("layer").to_pylist(), table.column("filter_index").to_pylist()))

    def assert_no_secret(self):
        with open(os.path.join(self.root, "job.json")) as f:
            text = f.read()
        assert SECRET not in text
        assert json.loads(text)["config"]["s3_endpoint_url"] == "http://***@127.0.0.1:9"


@pytest.fixture(params=["explain", "filters"])
def kind(request, tmp_path):
    return Kind(request.param, tmp_path)


@pytest.mark.slow
def test_machine_lost_after_a_marker_then_resume_rolls_forward_and_retries_a_killed_worker(kind, tmp_path):
    flag = str(tmp_path / "flag")
    proc = start(kind.args, "after_marker:0", flag, action="pause")
    worker_pid, unit = wait_flag(flag, proc)
    # The machine is gone: the worker first (its other slot would otherwise go on committing units
    # while the driver dies: small units take milliseconds), then the driver and the rest of Ray.
    os.kill(worker_pid, signal.SIGKILL)
    assert worker_pid != proc.pid and unit == 0  # the fault point is forwarded to this kind's worker
    kill_session(proc)
    assert os.path.join(kind.root, "_commits", "shard-00000.json") in kind.markers()
    assert os.path.join(kind.root, "_staging", "shard-00000.parquet") in kind.staged()  # committed, unpublished

    # The next run: a worker dies mid-unit (after staging the part of a unit not committed yet)
    # once; the unit is retried.
    todo = [i for i in range(kind.units) if os.path.join(kind.root, "_commits", f"shard-{i:05d}.json") not in kind.markers()]
    assert todo, "every unit committed before the machine was lost"
    crash = str(tmp_path / "crash")
    proc = start(kind.args + ["--break-lease"], f"after_stage:{todo[-1]}", crash, action="kill")
    rc, err = finish(proc, timeout=300)
    assert rc == 0, err[-3000:]
    assert os.path.exists(crash), "the worker was never killed"
    assert "retrying" in err, err[-3000:]
    assert kind.counted("rolled_forward") == 1
    assert not kind.staged()
    rows = kind.visible_rows()
    assert len(rows) == kind.rows and len(set(rows)) == kind.rows  # complete, exactly once
    assert len(kind.markers()) == kind.units
    kind.assert_no_secret()


def test_temp_files_of_attempts_killed_during_the_run_are_deleted_at_its_end(kind, tmp_path):
    """A worker killed mid-write (its node left) leaves `_tmp-*` files in `_staging/` and beside
    the unit's images while the run goes on: the run deletes them once its workers have stopped,
    not only the next run. Planted while the worker holds after staging unit 1."""
    flag = str(tmp_path / "flag")
    proc = start(kind.args, "after_stage:1", flag, action="hold")
    try:
        wait_flag(flag, proc)
        temps = [os.path.join(kind.root, "_staging", f"_tmp-{'cd' * 16}-shard-00001.parquet.tmp"),
                 os.path.join(kind.root, "_commits", f"_tmp-{'cd' * 16}-shard-00000.json.tmp"),
                 os.path.join(kind.image_folder(1), f"_tmp-{'cd' * 16}-half-an-image.png.tmp")]
        for path in temps:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(b"a killed attempt's half write")
        open(flag + ".go", "w").close()
        rc, err = finish(proc, timeout=300)
    finally:
        kill_session(proc)
    assert rc == 0, err[-3000:]
    assert [p for p in temps if os.path.exists(p)] == []
    rows = kind.visible_rows()
    assert len(rows) == kind.rows and len(set(rows)) == kind.rows


@pytest.mark.slow
def test_sigterm_stops_workers_and_ray_keeps_committed_units(kind, tmp_path):
    import shutil
    import tempfile

    flag = str(tmp_path / "flag")
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths are limited
    try:
        proc = start(kind.args, "after_marker:1", flag, action="pause", RAY_TMPDIR=ray_tmp)
        wait_flag(flag, proc)
        os.kill(proc.pid, signal.SIGTERM)
        rc, err = finish(proc)
        assert rc == 143, err[-3000:]
        assert "interrupted (SIGTERM)" in err
        assert session_left(proc) == []  # workers and the embedded Ray are gone
        # The endpoint's password reaches neither job.json nor Ray's logs (Ray logs runtime_env).
        kind.assert_no_secret()
        logs = [p for p in glob.glob(os.path.join(ray_tmp, "**", "*"), recursive=True) if os.path.isfile(p)]
        assert logs, "Ray wrote no logs under RAY_TMPDIR"
        for path in logs:
            with open(path, "rb") as f:
                assert SECRET.encode() not in f.read(), path
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    committed = kind.markers()
    assert committed

    rc, err = finish(start(kind.args), timeout=300)
    assert rc == 0, err[-3000:]
    # every marker left is a commit: published, or staged (the paused unit: rolled forward)
    assert kind.counted("skipped") == len(committed) and kind.counted("rolled_forward") >= 1
    rows = kind.visible_rows()
    assert len(rows) == kind.rows and len(set(rows)) == kind.rows


@pytest.mark.parametrize("name", ["explain", "filters"])
def test_a_bool_is_not_an_integer_for_any_kind(tmp_path, name):
    from bulk_explain.jobs.explain.config import ExplainConfig
    from bulk_explain.jobs.filters.config import FiltersConfig
    from bulk_explain.jobs.validation import ConfigError
    from bulk_explain.workers.models import ModelSpec

    (tmp_path / "in").mkdir()
    model = ModelSpec(kind="cats_dogs", weights="random")
    make = {"explain": lambda **kw: ExplainConfig(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "o"),
                                                  model=model, **kw),
            "filters": lambda **kw: FiltersConfig(output=str(tmp_path / "o"), model=model, **kw)}[name]
    field = {"explain": "max_shard_retries", "filters": "max_unit_retries"}[name]
    make(workers=2).validated()
    for values in ({"workers": True}, {field: True}):
        with pytest.raises(ConfigError, match="must be an integer >= .*received True"):
            make(**values).validated()


# ---------------------------------------------------------------- a third kind, in a few lines
# What the runner asks of a kind: a config, a plan, a worker and a finish. Nothing else is written
# for it: lease, refusal, commit protocol, repair, pool, retries and signals come from the runner.

import dataclasses  # noqa: E402
from typing import Optional  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from bulk_explain.jobs.runner import Plan, UnitJob, run_job  # noqa: E402
from bulk_explain.jobs.validation import ConfigError, require_int  # noqa: E402
from bulk_explain.workers.commit import commit_unit  # noqa: E402
from bulk_explain.workers.layout import CommitLayout  # noqa: E402


@dataclasses.dataclass(frozen=True)
class SquaresConfig:
    output: str
    numbers: int = 10
    per_unit: int = 4
    overwrite: bool = False
    address: Optional[str] = None
    workers: Optional[int] = 1

    def validated(self):
        require_int("numbers", self.numbers, 1, ConfigError)
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    def result_fingerprint(self):
        return f"squares-1-{self.numbers}"


@dataclasses.dataclass(frozen=True)
class Chunk:
    shard: int
    start: int
    stop: int
    content_hash: str

    def __len__(self):
        return self.stop - self.start


class SquaresWorker:
    def __init__(self, settings):
        self.layout = CommitLayout(settings["output"])

    def ping(self):
        return os.getpid()

    def process_shard(self, chunk, fingerprint):
        xs = np.arange(chunk.start, chunk.stop, dtype=np.int64)
        return commit_unit(self.layout, chunk.shard, pa.table({"x": xs, "square": xs * xs}), chunk.content_hash,
                           fingerprint, {})


class SquaresJob(UnitJob):
    name = "squares"
    item_noun = "numbers"

    def prepare(self):
        self.layout = CommitLayout(self.config.output)

    def refusal(self, previous):
        return ConfigError("other numbers in this output")

    def max_retries(self):
        return 1

    def plan(self):
        c = self.config
        starts = range(0, c.numbers, c.per_unit)
        return Plan(units=[Chunk(i, s, min(s + c.per_unit, c.numbers), f"{s}:{min(s + c.per_unit, c.numbers)}")
                           for i, s in enumerate(starts)])

    def worker(self, shape):
        return SquaresWorker, {"output": self.config.output}, {}, {}

    def finish(self, counts):
        parts = [pq.read_table(self.layout.manifest_part(s)) for s in sorted(counts.markers)]
        total = int(pa.concat_tables(parts).column("square").to_numpy().sum())
        return total, {"total": total, "skipped": counts.skipped, "rolled_forward": counts.rolled_forward}


def test_a_third_kind_is_a_config_a_plan_a_worker_and_a_finish(ray_local, tmp_path):
    import sys

    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's classes, by value
    out = str(tmp_path / "squares")

    def run(**kw):
        total = run_job(SquaresJob(SquaresConfig(out, **kw), progress=False))
        with open(os.path.join(out, "summary.json")) as f:
            return total, json.load(f)

    assert run() == (285, {"total": 285, "skipped": 0, "rolled_forward": 0})
    with open(os.path.join(out, "job.json")) as f:
        assert json.load(f)["kind"] == "squares"
    assert sorted(os.listdir(os.path.join(out, "manifest"))) == [f"shard-0000{i}.parquet" for i in range(3)]
    assert run() == (285, {"total": 285, "skipped": 3, "rolled_forward": 0})  # committed: nothing to do
    layout = CommitLayout(out)
    os.replace(layout.manifest_part(1), layout.staged_part(1))  # died after unit 1's marker
    assert run() == (285, {"total": 285, "skipped": 3, "rolled_forward": 1})
    with pytest.raises(ConfigError, match="other numbers"):  # the runner's refusal, the kind's words
        run(numbers=12)
    assert run(numbers=12, overwrite=True)[0] == sum(x * x for x in range(12))
