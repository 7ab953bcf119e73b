"""Peak memory of the explain driver planning N inputs when nothing is to be done.

For each N, a setup process writes a finished output for N synthetic inputs (plan.parquet, one
commit marker and one manifest part per shard whose footer names the marker's attempt; no images),
then a fresh process runs exactly what the driver runs before it would start Ray — list, compare
with the previous plan, plan, hash shards, read markers and part footers, repair, write the plan —
and reports its peak RSS (getrusage) next to its RSS after imports. The listing comes from a
synthetic storage backend (`bench://`, S3-like keys and ETags), so no file or object exists. It is
measured twice on the same output: listed in key order (as S3 lists; the listing needs no sort) and
with the class folders interleaved (several inputs, or a backend that lists out of order; the
driver sorts the listing).

    python bench/driver_memory.py 1000000 10000000

Not included: the model check (`inspect_model`: TensorFlow and the model, ~750 MB with VGG16,
independent of N) and Ray. Target (issue 8): <= 2 GB at 10M inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ROOT = "bench://bench-bucket/datasets/photos-2026"


def _register(n: int, order: str = "sorted") -> None:
    from bulk_explain.workers.storage import FileEntry, Storage, register_storage

    class SyntheticStorage(Storage):
        """N S3-like objects: 1000 class folders, 32-hex ETags. `sorted`: listed in key order, as
        S3 and the local walk list; `unsorted`: class folders interleaved, so the driver
        has to sort the listing."""

        scheme = "bench"

        def list_files(self, root, extensions=None):
            if order == "sorted":
                numbers = (i for c in range(min(n, 1000)) for i in range(c, n, 1000))
            else:
                numbers = iter(range(n))
            for i in numbers:
                yield FileEntry(uri=f"{ROOT}/class_{i % 1000:04d}/img_{i:010d}.jpg", size=100_000 + i % 5000,
                                version=f"{(i * 2654435761) % (1 << 128):032x}")

    register_storage("bench", SyntheticStorage)


def _config(out: str):
    from bulk_explain.jobs.explain.config import ExplainConfig
    from bulk_explain.workers.models import ModelSpec

    return ExplainConfig(inputs=(ROOT,), output=out, model=ModelSpec(kind="vgg16", weights="random")).validated()


def setup(n: int, out: str) -> None:
    """Writes a finished output for n inputs: plan, markers, parts (footer metadata only)."""
    import io

    import pyarrow.parquet as pq

    from bulk_explain.jobs.explain.plan import list_inputs, make_plan, plan_shards, write_plan
    from bulk_explain.schemas.image_manifest import IMAGE_MANIFEST_SCHEMA
    from bulk_explain.workers import commit
    from bulk_explain.workers.layout import OutputLayout

    _register(n)
    config = _config(out)
    layout = OutputLayout(out)
    plan = make_plan(list_inputs(config.inputs), config.shard_size)
    write_plan(plan, layout.plan)
    fingerprint = config.result_fingerprint()
    os.makedirs(layout.manifest_dir)
    os.makedirs(layout.commits_dir)
    empty = IMAGE_MANIFEST_SCHEMA.empty_table()
    for i, shard in enumerate(plan_shards(plan)):
        attempt = f"{i:032x}"
        meta = {**IMAGE_MANIFEST_SCHEMA.metadata, commit.PART_SHARD: str(shard.shard),
                commit.PART_CONTENT_HASH: shard.content_hash, commit.PART_ATTEMPT: attempt,
                commit.PART_FINGERPRINT: fingerprint}
        buf = io.BytesIO()
        pq.write_table(empty.replace_schema_metadata(meta), buf)
        with open(layout.manifest_part(shard.shard), "wb") as f:
            f.write(buf.getvalue())
        marker = {"shard": shard.shard, "rows": len(shard), "ok": len(shard), "error": 0,
                  "content_hash": shard.content_hash, "attempt_id": attempt, "result_fingerprint": fingerprint}
        with open(layout.commit_marker(shard.shard), "w") as f:
            json.dump(marker, f)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(n: int, out: str, order: str) -> dict:
    """What the driver does before Ray when nothing is to be done; returns RSS numbers (MiB)."""
    import bulk_explain  # noqa: F401  (first, as in the CLI: it sets Arrow's allocator options)
    import pyarrow  # noqa: F401  (imports counted in the baseline)

    from bulk_explain.jobs import units
    from bulk_explain.jobs.explain import driver
    from bulk_explain.jobs.explain.plan import write_plan
    from bulk_explain.workers.layout import OutputLayout

    _register(n, order)
    config = _config(out)
    layout = OutputLayout(out)
    base = _rss_mb()
    t0 = time.perf_counter()
    planned = driver.plan_inputs(config, layout)  # the runner's steps, without Ray (nothing to do)
    files = units.existing_files(layout)
    sorted_units = units.sort_units(layout, planned.shards, files, config.result_fingerprint())
    units.repair(layout, files, (t.shard for t in planned.shards), sorted_units)
    write_plan(planned.plan, layout.plan)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert not sorted_units.todo and len(sorted_units.committed) == len(planned.shards), "expected nothing to do"
    return {"inputs": n, "shards": len(planned.shards), "baseline_mib": round(base, 1),
            "peak_mib": round(peak, 1), "peak_minus_baseline_mib": round(peak - base, 1),
            "plan_arrow_mib": round(planned.plan.nbytes / 2**20, 1), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[1_000_000])
    parser.add_argument("--workdir", default=None, help="where the synthetic outputs go (default: a temp dir)")
    parser.add_argument("--_role", choices=["setup", "measure"], help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    parser.add_argument("--_order", choices=["sorted", "unsorted"], default="sorted", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._role == "setup":
        setup(args.sizes[0], args._out)
        return
    if args._role == "measure":
        print(json.dumps(measure(args.sizes[0], args._out, args._order)))
        return
    work = tempfile.mkdtemp(prefix="driver-memory-", dir=args.workdir)
    try:
        for n in args.sizes:
            out = os.path.join(work, f"out-{n}")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, str(n), "--_role", "setup", "--_out", out], check=True)
            setup_s = time.perf_counter() - t0
            for order in ("sorted", "unsorted"):
                proc = subprocess.run([sys.executable, __file__, str(n), "--_role", "measure", "--_out", out,
                                       "--_order", order], check=True, capture_output=True, text=True)
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{row['inputs']:>11,} inputs, {row['shards']:>6,} shards, listing {order:>8}: driver peak RSS "
                      f"{row['peak_mib']:,.0f} MiB ({row['peak_minus_baseline_mib']:,.0f} MiB above "
                      f"{row['baseline_mib']:,.0f} MiB after imports); plan as Arrow {row['plan_arrow_mib']:,.0f} MiB; "
                      f"planning {row['seconds']:.0f} s (setup {setup_s:.0f} s)", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
