"""The worker side of the commit protocol, shared by every job kind that writes units of work
(ARCHITECTURE.md, "Output protocol"): a unit's Parquet part is staged outside the visible folder,
the commit marker is written (the commit point), then the same bytes are published.

Every commit is one attempt with its own id (a uuid): the part's Parquet footer carries the unit
(`shard`) id, its content hash, the attempt id and the result fingerprint, and the marker names the
same attempt. A marker and a part that disagree (two runs interleaved on one output, a part copied
from elsewhere) are not a commit; the driver redoes such a unit (`read_part_commit`,
`marker_agrees`, used by `bulk_explain.jobs.units`).
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from bulk_explain.workers.faults import fault_point

# Keys of a part's Parquet key-value metadata that tie it to its commit marker.
PART_SHARD = "bulk_explain.shard"
PART_CONTENT_HASH = "bulk_explain.content_hash"
PART_ATTEMPT = "bulk_explain.attempt_id"
PART_FINGERPRINT = "bulk_explain.result_fingerprint"
_FOOTER_READ = 64 * 1024


class CommitConflict(RuntimeError):
    """Another attempt replaced or withdrew this attempt's commit marker before it was published
    (two runs on one output); the unit is retried instead of publishing a part that disagrees."""


def read_part_commit(storage, uri: str) -> Optional[dict]:
    """The commit identity a part carries in its footer: {"shard", "content_hash", "attempt_id",
    "result_fingerprint"}, or None when the file is missing, not Parquet or has none.

    Reads only the footer (one ranged read of the last 64 KiB, a second one for a larger footer),
    never the data pages.
    """
    try:
        tail = storage.read_tail(uri, _FOOTER_READ)
        if len(tail) < 12 or tail[-4:] != b"PAR1":
            return None
        size = int.from_bytes(tail[-8:-4], "little") + 8
        if size > len(tail):
            tail = storage.read_tail(uri, size)
            if len(tail) < size:
                return None
        # The footer alone parses as a file that starts with the magic bytes.
        meta = pq.read_metadata(io.BytesIO(b"PAR1" + tail[-size:])).metadata or {}
    except (OSError, pa.ArrowException, ValueError):
        return None
    keys = {"shard": PART_SHARD, "content_hash": PART_CONTENT_HASH, "attempt_id": PART_ATTEMPT,
            "result_fingerprint": PART_FINGERPRINT}
    info = {name: meta.get(key.encode(), b"").decode() or None for name, key in keys.items()}
    return info if info["attempt_id"] else None


def marker_agrees(marker: Optional[dict], part: Optional[dict]) -> bool:
    """True when `part` (from `read_part_commit`) is the part `marker` committed."""
    return bool(marker and part and marker.get("attempt_id") and part["attempt_id"] == marker["attempt_id"]
                and part["content_hash"] == marker.get("content_hash")
                and part["shard"] == str(marker.get("shard")))


def commit_unit(layout, shard: int, table: pa.Table, content_hash: str, result_fingerprint: str,
                marker_fields: dict) -> dict:
    """Commits one unit: part staged → marker (the commit point) → part published.

    Args:
        layout: a `bulk_explain.workers.layout.CommitLayout` (where parts, markers and staged parts live).
        shard: the unit's id.
        table: the unit's manifest rows; its schema's metadata is kept and the commit identity added.
        content_hash: what the unit's inputs hash to (the driver compares it with its plan).
        result_fingerprint: the settings the rows were computed with.
        marker_fields: kind-specific counts and timings for the marker (rows, ok, ...).

    Returns:
        The marker written.

    Raises:
        CommitConflict: the marker was replaced or withdrawn by another run before publishing.
    """
    storage = layout.storage
    attempt_id = uuid.uuid4().hex
    table = table.replace_schema_metadata({
        **(table.schema.metadata or {}), PART_SHARD: str(shard), PART_CONTENT_HASH: content_hash,
        PART_ATTEMPT: attempt_id, PART_FINGERPRINT: result_fingerprint})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    staged = layout.staged_part(shard)
    fault_point("before_stage", shard)
    storage.write_bytes(staged, data)
    fault_point("after_stage", shard)
    marker = {
        "shard": shard,
        "rows": table.num_rows,
        **marker_fields,
        "content_hash": content_hash,
        "attempt_id": attempt_id,
        "result_fingerprint": result_fingerprint,
        "committed_at": time.time(),
        "worker_pid": os.getpid(),
        "worker_rss_bytes": rss_bytes(),
    }
    storage.write_bytes(layout.commit_marker(shard), json.dumps(marker).encode())
    fault_point("after_marker", shard)
    # Publish only while the marker is still ours: a run that redid this unit meanwhile owns it
    # now (narrows the window; the driver's marker/part check is what guarantees).
    check_marker(layout, shard, attempt_id)
    storage.write_bytes(layout.manifest_part(shard), data)
    storage.delete(staged)
    fault_point("after_publish", shard)
    check_marker(layout, shard, attempt_id)
    return marker


def check_marker(layout, shard: int, attempt_id: str) -> None:
    """Raises CommitConflict unless the unit's marker still names `attempt_id`."""
    try:
        current = json.loads(layout.storage.read_bytes(layout.commit_marker(shard)))
    except (OSError, ValueError):
        current = None
    if not isinstance(current, dict) or current.get("attempt_id") != attempt_id:
        raise CommitConflict(f"shard {shard} was redone by another run while this one committed "
                             "it (two jobs on one output?); retrying")


def rss_bytes() -> int:
    """This process's resident memory (the marker records it: a worker's footprint per unit)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
