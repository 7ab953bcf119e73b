"""Audit of a 1M-row manifest: seconds and peak memory.

    python bench/audit_1m.py                     # 1,000,000 synthetic rows in 100 shard files
    python bench/audit_1m.py --rows 200000 --keep /tmp/m200k

Writes a synthetic explain output (manifest rows of a binary cat/dog model with 14x14 small CAMs,
activation means of 4 layers, planted empty maps, corner maps, swapped labels and error rows; no
images, so no thumbnails) with the tests' generator, then runs `bulk-explain audit` on it twice in
a fresh process each: a first audit (no baseline) and a second one whose baseline is the first
(every row unchanged, so drift compares nothing new). Prints wall seconds per audit, the child's
peak RSS (VmHWM) and the manifest's size on disk. The manifest is never held as Python objects:
one streaming pass reads compact columns, clustering sees at most --cluster-sample maps per class
and the rest are assigned batch by batch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

CHILD = r"""
import sys, time
from bulk_explain.jobs.audit import AuditConfig, run_audit
t = time.perf_counter()
result = run_audit(AuditConfig(output=sys.argv[1], cluster_sample_per_class=int(sys.argv[2])), progress=True)
seconds = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(f"RESULT {seconds:.1f} {int(hwm) * 1024} {result.audit_id}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rows-per-file", type=int, default=10_000)
    parser.add_argument("--cluster-sample", type=int, default=1000)
    parser.add_argument("--keep", default=None, help="write the manifest here and keep it (default: a temp dir)")
    args = parser.parse_args()

    from audit_data import synthetic_manifest

    out = args.keep or tempfile.mkdtemp(prefix="audit1m-")
    try:
        manifest = os.path.join(out, "manifest")
        if not os.path.isdir(manifest):
            t = time.perf_counter()
            synthetic_manifest(out, args.rows, rows_per_file=args.rows_per_file)
            print(f"generated {args.rows:,} rows in {time.perf_counter() - t:.0f} s")
        size = sum(os.path.getsize(os.path.join(manifest, f)) for f in os.listdir(manifest))
        print(f"manifest: {args.rows:,} rows, {len(os.listdir(manifest))} files, {size / 2**20:.0f} MiB")
        env = dict(os.environ, PYTHONPATH=ROOT)
        for name in ("first audit (no baseline)", "second audit (baseline = first)"):
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", CHILD, out, str(args.cluster_sample)], env=env,
                                  capture_output=True, text=True)
            wall = time.perf_counter() - t
            if proc.returncode not in (0, 3):
                sys.exit(f"audit failed ({proc.returncode}): {proc.stderr[-2000:]}")
            for line in proc.stderr.splitlines():
                if line.startswith("[bulk-explain audit]"):
                    print("   ", line)
            seconds, rss, audit_id = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0].split()[1:]
            print(f"{name}: {float(seconds):.1f} s in run_audit ({wall:.1f} s with interpreter start), "
                  f"peak RSS {int(rss) / 2**20:.0f} MiB, audit {audit_id}")
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
