"""The plan stage: list every input once, sort, cut into shards with fixed ids, write `DST/plan.parquet`.

The listing is accumulated in Arrow arrays, not Python objects, so a prefix of millions of keys
costs tens of bytes per key in the driver.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import posixpath
from typing import Iterator, List, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.image_manifest import PLAN_SCHEMA
from workers.faults import fault_point
from workers.storage import FileEntry, storage_for

_CHUNK = 65_536


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One unit of work: a shard id and its entries (uri, label, size, version)."""

    shard: int
    uris: List[str]
    labels: List[Optional[str]]
    sizes: List[int]
    versions: List[str]

    @property
    def content_hash(self) -> str:
        """Changes when any input of the shard is added, removed or modified."""
        h = hashlib.sha256()
        for uri, version in zip(self.uris, self.versions):
            h.update(uri.encode("utf-8", "surrogateescape"))
            h.update(b"\0")
            h.update(version.encode())
            h.update(b"\n")
        return h.hexdigest()[:32]

    def __len__(self):
        return len(self.uris)

    def __repr__(self):
        return f"shard {self.shard} ({len(self.uris)} images)"


def label_of(uri: str, root: str) -> Optional[str]:
    """Parent folder name of `uri`, or None when the file sits directly in the input root."""
    paths = posixpath if "://" in uri else os.path
    parent = paths.dirname(uri)
    if parent.rstrip("/") == root.rstrip("/"):
        return None
    return paths.basename(parent)


def _entries_to_batch(entries: Sequence[FileEntry], root: str) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [
            pa.array([e.uri for e in entries], pa.string()),
            pa.array([label_of(e.uri, root) for e in entries], pa.string()),
            pa.array([e.size for e in entries], pa.int64()),
            pa.array([e.version for e in entries], pa.string()),
        ],
        names=["source_uri", "label", "size", "version"],
    )


def list_inputs(inputs: Sequence[str]) -> pa.Table:
    """Lists every image under `inputs`, de-duplicated and sorted by URI."""
    batches: List[pa.RecordBatch] = []
    for root in inputs:
        chunk: List[FileEntry] = []
        for entry in storage_for(root).list_files(root):
            fault_point("listing")
            chunk.append(entry)
            if len(chunk) >= _CHUNK:
                batches.append(_entries_to_batch(chunk, root))
                chunk = []
        if chunk:
            batches.append(_entries_to_batch(chunk, root))
    if not batches:
        return pa.table(
            {"source_uri": pa.array([], pa.string()), "label": pa.array([], pa.string()),
             "size": pa.array([], pa.int64()), "version": pa.array([], pa.string())}
        )
    table = pa.Table.from_batches(batches)
    table = table.take(pc.sort_indices(table, sort_keys=[("source_uri", "ascending")]))
    # Overlapping inputs (a folder and its subfolder) list a file twice: keep the first.
    uris = table.column("source_uri")
    if len(uris) > 1:
        keep = pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1))
        mask = pa.concat_arrays([pa.array([True]), keep.combine_chunks()])
        table = table.filter(mask)
    return table


def make_plan(listing: pa.Table, shard_size: int, previous: Optional[pa.Table] = None) -> pa.Table:
    """Assigns every listed input a (shard, position).

    Without `previous`: row i of the sorted listing goes to shard i // shard_size.

    With `previous` (the plan of the last run in the same output): an input that was already
    planned keeps its shard, so adding, changing or removing images only touches the shards that
    hold them; new inputs are cut, in URI order, into new shards numbered after the previous plan's
    highest id. Positions are renumbered 0..k-1 inside each shard in URI order. Shards whose inputs
    all disappeared are gone from the plan (ids are then not contiguous).

    Returns:
        PLAN_SCHEMA table sorted by (shard, position).
    """
    import numpy as np

    n = listing.num_rows
    uris = listing.column("source_uri")
    if previous is None or previous.num_rows == 0 or n == 0:
        idx = np.arange(n, dtype=np.int64)
        shard = (idx // shard_size).astype(np.int32)
        order = None
    else:
        prev_index = pc.index_in(uris, value_set=previous.column("source_uri").combine_chunks())
        kept = pc.is_valid(prev_index).to_numpy(zero_copy_only=False)
        shard = np.empty(n, np.int32)
        prev_shards = previous.column("shard").to_numpy()
        shard[kept] = prev_shards[prev_index.to_numpy(zero_copy_only=False)[kept].astype(np.int64)]
        first_new = int(prev_shards.max()) + 1
        shard[~kept] = first_new + (np.arange(int((~kept).sum())) // shard_size)
        # Stable sort: the listing is in URI order, so each shard stays in URI order.
        order = np.argsort(shard, kind="stable")
        shard = shard[order]
    if n:
        starts = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]])
        counts = np.diff(np.r_[starts, n])
        position = (np.arange(n) - np.repeat(starts, counts)).astype(np.int32)
    else:
        position = np.zeros(0, np.int32)
    table = listing if order is None else listing.take(pa.array(order))
    return pa.table(
        {
            "shard": pa.array(shard, pa.int32()),
            "position": pa.array(position, pa.int32()),
            "source_uri": table.column("source_uri"),
            "label": table.column("label"),
            "size": table.column("size"),
            "version": table.column("version"),
        },
        schema=PLAN_SCHEMA,
    )


@dataclasses.dataclass
class PlanChanges:
    """What changed between the previous plan and the new listing."""

    added: int = 0
    changed: int = 0
    removed: int = 0
    removed_uris: List[str] = dataclasses.field(default_factory=list)  # the first `limit`


def plan_changes(previous: Optional[pa.Table], listing: pa.Table, limit: int = 1000) -> PlanChanges:
    """Counts inputs added, changed (size or version differs) and removed since `previous`."""
    if previous is None:
        return PlanChanges(added=listing.num_rows)
    uris = listing.column("source_uri")
    prev_uris = previous.column("source_uri").combine_chunks()
    prev_index = pc.index_in(uris, value_set=prev_uris)
    kept = pc.is_valid(prev_index)
    added = listing.num_rows - pc.sum(kept).as_py() if listing.num_rows else 0
    changed = 0
    if listing.num_rows:
        both = listing.filter(kept)
        idx = prev_index.filter(kept)
        differs = pc.or_(
            pc.not_equal(both.column("version"), pc.take(previous.column("version"), idx)),
            pc.not_equal(both.column("size"), pc.take(previous.column("size"), idx)),
        )
        changed = pc.sum(differs).as_py() or 0
    gone = pc.invert(pc.is_in(prev_uris, value_set=uris.combine_chunks() if listing.num_rows else pa.array([], pa.string())))
    removed_uris = prev_uris.filter(gone)
    return PlanChanges(added=int(added), changed=int(changed), removed=len(removed_uris),
                       removed_uris=removed_uris.slice(0, limit).to_pylist())


def read_plan(uri: str) -> Optional[pa.Table]:
    """The plan written by an earlier run, or None when there is none (or it is unreadable)."""
    storage = storage_for(uri)
    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, OSError):
        return None
    try:
        table = pq.read_table(io.BytesIO(data))
        if not set(PLAN_SCHEMA.names) <= set(table.column_names):
            return None
        return table.select(PLAN_SCHEMA.names).cast(PLAN_SCHEMA)
    except (pa.ArrowException, ValueError):
        return None


def write_plan(plan: pa.Table, uri: str, shard_size: Optional[int] = None) -> None:
    """Writes the plan with one row group per shard: a worker could read its own shard alone."""
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, plan.schema) as writer:
        if plan.num_rows == 0:
            writer.write_table(plan)
        for start, length in _shard_ranges(plan):
            writer.write_table(plan.slice(start, length), row_group_size=max(1, length))
    storage_for(uri).write_bytes(uri, buf.getvalue())


def _shard_ranges(plan: pa.Table):
    import numpy as np

    shard = plan.column("shard").to_numpy()
    n = len(shard)
    if n == 0:
        return []
    starts = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]])
    ends = np.r_[starts[1:], n]
    return [(int(s), int(e - s)) for s, e in zip(starts, ends)]


def iter_shards(plan: pa.Table, shard_size: Optional[int] = None) -> Iterator[ShardTask]:
    """One task per shard of the plan (rows must be grouped by shard, as `make_plan` returns them).
    `shard_size` is accepted for compatibility and unused: shards may be uneven."""
    shard_col = plan.column("shard")
    for start, length in _shard_ranges(plan):
        part = plan.slice(start, length)
        yield ShardTask(
            shard=int(shard_col[start].as_py()),
            uris=part.column("source_uri").to_pylist(),
            labels=part.column("label").to_pylist(),
            sizes=part.column("size").to_pylist(),
            versions=part.column("version").to_pylist(),
        )
