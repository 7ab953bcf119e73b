"""The plan stage: list every input once, sort, cut into shards with fixed ids, write `DST/plan.parquet`.

The listing is accumulated in Arrow arrays, not Python objects, so a prefix of millions of keys
costs tens of bytes per key in the driver; text columns are `large_string` (64-bit offsets), so a
listing whose URI text passes 2 GiB still sorts. Shards become Python objects only when they are to
be done (`PlannedShard`, a reference into the plan that is materialized when sent to a worker).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bulk_explain.schemas.image_manifest import PLAN_SCHEMA
from bulk_explain.workers.faults import fault_point
from bulk_explain.workers.storage import FileEntry, storage_for

_CHUNK = 65_536
_TEXT = pa.large_string()
_COLUMNS = (("source_uri", _TEXT), ("label", _TEXT), ("size", pa.int64()), ("version", _TEXT))
# Rows hashed per vectorized step in `plan_shards` (bounds the temporary joined text).
_HASH_ROWS = 1 << 18


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


def _empty_listing() -> pa.Table:
    return pa.table({name: pa.array([], t) for name, t in _COLUMNS})


def list_inputs(inputs: Sequence[str], verify_content: bool = False) -> pa.Table:
    """Lists every image under `inputs`, de-duplicated and sorted by URI.

    Args:
        inputs: folders or prefixes (normalized URIs).
        verify_content: replace each version by `Storage.content_version` (local: a SHA-256 of the
            bytes, read in a thread pool; S3: the ETag as listed).

    Returns:
        table (source_uri, label, size, version), text columns `large_string`.

    Raises:
        StorageError: a root or a folder under it cannot be listed.
    """
    import numpy as np

    chunks = {name: [] for name, _ in _COLUMNS}
    pool = ThreadPoolExecutor(8) if verify_content else None

    def flush(entries: List[FileEntry], root: str, storage) -> None:
        versions = ([e.version for e in entries] if pool is None else
                    list(pool.map(storage.content_version, entries)))
        chunks["source_uri"].append(pa.array([e.uri for e in entries], _TEXT))
        chunks["label"].append(pa.array([label_of(e.uri, root) for e in entries], _TEXT))
        chunks["size"].append(pa.array([e.size for e in entries], pa.int64()))
        chunks["version"].append(pa.array(versions, _TEXT))

    try:
        for root in inputs:
            storage = storage_for(root)
            chunk: List[FileEntry] = []
            for entry in storage.list_files(root):
                fault_point("listing")
                chunk.append(entry)
                if len(chunk) >= _CHUNK:
                    flush(chunk, root, storage)
                    chunk = []
            if chunk:
                flush(chunk, root, storage)
    finally:
        if pool is not None:
            pool.shutdown()
    if not chunks["source_uri"]:
        return _empty_listing()
    uris = pa.chunked_array(chunks.pop("source_uri"), _TEXT)
    order = pc.sort_indices(uris)
    if np.array_equal(order.to_numpy(), np.arange(len(order))):
        order = None  # listed in URI order already (S3 lists keys sorted): no copy at all
    # Column by column, each unsorted column freed (and its pages given back) once its sorted
    # copy exists: the peak is the listing plus one column, not two listings.
    columns = {}
    for name, t in _COLUMNS:
        column = uris if name == "source_uri" else pa.chunked_array(chunks.pop(name), t)
        uris = None
        columns[name] = column if order is None else column.take(order)
        del column
        pa.default_memory_pool().release_unused()
    del order
    table = pa.table(columns)
    # Overlapping inputs (a folder and its subfolder) list a file twice: keep the first.
    uris = table.column("source_uri")
    if len(uris) > 1:
        keep = pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1))
        if not pc.all(keep).as_py():
            mask = pa.concat_arrays([pa.array([True]), keep.combine_chunks()])
            table = table.filter(mask)
    return table


def _large(table: pa.Table) -> pa.Table:
    """`table` with its text columns as large_string (a no-op for tables built here)."""
    fields = [pa.field(f.name, _TEXT) if pa.types.is_string(f.type) else f for f in table.schema]
    schema = pa.schema(fields)
    return table if schema.equals(table.schema) else table.cast(schema)


def match_previous(listing: pa.Table, previous: pa.Table):
    """For each listed input, its row in `previous` (numpy int64), -1 for a new input.

    The listing is sorted by URI; the previous plan is put in URI order by an index (8 bytes a
    row) and both are matched range by range, `_HASH_ROWS` listed URIs at a time, so the hash
    table never covers more than one range (a hash table over 10M URIs would cost gigabytes).
    """
    import numpy as np

    listing, previous = _large(listing), _large(previous)
    uris = listing.column("source_uri")
    prev_uris = previous.column("source_uri")
    result = np.full(listing.num_rows, -1, np.int64)
    if not listing.num_rows or not previous.num_rows:
        return result
    prev_order = pc.sort_indices(prev_uris).to_numpy()
    n_prev = len(prev_order)

    def first_above(text: str, lo: int) -> int:
        # binary search in the previous URIs (URI order): the first one > text
        hi = n_prev
        while lo < hi:
            mid = (lo + hi) // 2
            if prev_uris[int(prev_order[mid])].as_py() <= text:
                lo = mid + 1
            else:
                hi = mid
        return lo

    p_lo = 0
    for start in range(0, listing.num_rows, _HASH_ROWS):
        part = uris.slice(start, _HASH_ROWS)
        p_hi = first_above(part[len(part) - 1].as_py(), p_lo)
        if p_hi > p_lo:
            rows = prev_order[p_lo:p_hi]
            local = pc.index_in(part, value_set=prev_uris.take(pa.array(rows)).combine_chunks())
            local = pc.fill_null(local, -1).to_numpy()
            found = local >= 0
            result[start:start + len(part)][found] = rows[local[found]]
        p_lo = p_hi
    return result


def make_plan(listing: pa.Table, shard_size: int, previous: Optional[pa.Table] = None,
              prev_index=None) -> pa.Table:
    """Assigns every listed input a (shard, position).

    Without `previous`: row i of the sorted listing goes to shard i // shard_size.

    With `previous` (the plan of the last run in the same output): an input that was already
    planned keeps its shard, so adding, changing or removing images only touches the shards that
    hold them; new inputs are cut, in URI order, into new shards numbered after the previous plan's
    highest id. Positions are renumbered 0..k-1 inside each shard in URI order. Shards whose inputs
    all disappeared are gone from the plan (ids are then not contiguous).

    Args:
        prev_index: `match_previous(listing, previous)` when the caller has it already.

    Returns:
        PLAN_SCHEMA table sorted by (shard, position).
    """
    import numpy as np

    listing = _large(listing)
    previous = _large(previous) if previous is not None else None
    n = listing.num_rows
    if previous is None or previous.num_rows == 0 or n == 0:
        idx = np.arange(n, dtype=np.int64)
        shard = (idx // shard_size).astype(np.int32)
        order = None
    else:
        if prev_index is None:
            prev_index = match_previous(listing, previous)
        kept = prev_index >= 0
        shard = np.empty(n, np.int32)
        prev_shards = previous.column("shard").to_numpy()
        shard[kept] = prev_shards[prev_index[kept]]
        first_new = int(prev_shards.max()) + 1
        shard[~kept] = first_new + (np.arange(int((~kept).sum())) // shard_size)
        del kept, prev_shards
        # Stable sort: the listing is in URI order, so each shard stays in URI order.
        order = np.argsort(shard, kind="stable")
        if np.array_equal(order, np.arange(n)):
            order = None  # already grouped (the common re-run): the listing's columns are the plan's
        else:
            shard = shard[order]
    if n:
        starts = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]])
        counts = np.diff(np.r_[starts, n])
        position = (np.arange(n) - np.repeat(starts, counts)).astype(np.int32)
    else:
        position = np.zeros(0, np.int32)
    columns = {"shard": pa.array(shard, pa.int32()), "position": pa.array(position, pa.int32())}
    take = None if order is None else pa.array(order)
    for name in ("source_uri", "label", "size", "version"):
        column = listing.column(name)
        columns[name] = column if take is None else column.take(take)
    return pa.table(columns, schema=PLAN_SCHEMA)


@dataclasses.dataclass
class PlanChanges:
    """What changed between the previous plan and the new listing."""

    added: int = 0
    changed: int = 0
    removed: int = 0
    removed_uris: List[str] = dataclasses.field(default_factory=list)  # the first `limit`


def plan_changes(previous: Optional[pa.Table], listing: pa.Table, limit: int = 1000,
                 prev_index=None) -> PlanChanges:
    """Counts inputs added, changed (size or version differs) and removed since `previous`.

    Args:
        prev_index: `match_previous(listing, previous)` when the caller has it already.
    """
    import numpy as np

    if previous is None:
        return PlanChanges(added=listing.num_rows)
    listing, previous = _large(listing), _large(previous)
    if prev_index is None:
        prev_index = match_previous(listing, previous) if listing.num_rows else np.zeros(0, np.int64)
    kept = prev_index >= 0
    added = int(listing.num_rows - kept.sum())
    changed = 0
    # In slices: the temporaries (previous versions taken into listing order) stay small.
    for start in range(0, listing.num_rows, _HASH_ROWS):
        idx = prev_index[start:start + _HASH_ROWS]
        taken = pa.array(idx, mask=idx < 0)
        part = listing.slice(start, len(idx))
        differs = pc.or_(
            pc.not_equal(part.column("version"), previous.column("version").take(taken)),
            pc.not_equal(part.column("size"), previous.column("size").take(taken)),
        )
        changed += pc.sum(differs).as_py() or 0
    hit = np.zeros(previous.num_rows, bool)
    hit[prev_index[kept]] = True
    gone = np.flatnonzero(~hit)
    removed_uris = previous.column("source_uri").take(pa.array(gone[:limit])).to_pylist()
    return PlanChanges(added=added, changed=int(changed), removed=len(gone), removed_uris=removed_uris)


def read_plan(uri: str, columns: Optional[Sequence[str]] = None) -> Optional[pa.Table]:
    """The plan written by an earlier run, or None when there is none (or it is unreadable).

    Args:
        columns: read only these PLAN_SCHEMA columns (the driver skips `label` and `position`).
    """
    storage = storage_for(uri)
    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, OSError):
        return None
    try:
        names = list(columns or PLAN_SCHEMA.names)
        if not set(PLAN_SCHEMA.names) <= set(pq.read_schema(io.BytesIO(data)).names):
            return None
        table = pq.read_table(io.BytesIO(data), columns=names)
        del data
        # One chunk per column (the file has one row group per shard): takes and matches on a
        # column of thousands of chunks would concatenate it again on every call.
        columns = []
        for name in names:
            columns.append(table.column(name).cast(PLAN_SCHEMA.field(name).type).combine_chunks())
            table = table.drop_columns([name])
            pa.default_memory_pool().release_unused()
        return pa.table(columns, schema=pa.schema([PLAN_SCHEMA.field(n) for n in names], metadata=PLAN_SCHEMA.metadata))
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


class PlannedShard:
    """A shard of the plan by reference: id, row range and content hash, no per-input objects.

    It stands in for a `ShardTask` in the driver (`len`, `shard`, `content_hash`, `task()`); when
    Ray serializes it for a worker it becomes the `ShardTask` (see `__reduce__`), so per-input
    Python objects exist only for shards being sent, one at a time.
    """

    __slots__ = ("plan", "shard", "start", "length", "content_hash")

    def __init__(self, plan: pa.Table, shard: int, start: int, length: int, content_hash: str):
        self.plan, self.shard, self.start, self.length = plan, shard, start, length
        self.content_hash = content_hash

    def task(self) -> ShardTask:
        part = self.plan.slice(self.start, self.length)
        return ShardTask(
            shard=self.shard,
            uris=part.column("source_uri").to_pylist(),
            labels=part.column("label").to_pylist(),
            sizes=part.column("size").to_pylist(),
            versions=part.column("version").to_pylist(),
        )

    @property
    def uris(self) -> List[str]:
        return self.task().uris

    def __reduce__(self):
        t = self.task()
        return ShardTask, (t.shard, t.uris, t.labels, t.sizes, t.versions)

    def __len__(self):
        return self.length

    def __repr__(self):
        return f"shard {self.shard} ({self.length} images)"


def plan_shards(plan: pa.Table) -> List[PlannedShard]:
    """Every shard of the plan as a `PlannedShard`, content hashes computed in Arrow.

    The hash is the one `ShardTask.content_hash` computes (sha256 over "uri\\0version\\n" per
    input, first 32 hex digits), from the joined text of up to `_HASH_ROWS` rows at a time.
    """
    import numpy as np

    ranges = _shard_ranges(plan)
    shard_col = plan.column("shard").to_numpy()
    out: List[PlannedShard] = []
    i = 0
    while i < len(ranges):
        j, first = i, ranges[i][0]
        while j < len(ranges) and (j == i or ranges[j][0] + ranges[j][1] - first <= _HASH_ROWS):
            j += 1
        end = ranges[j - 1][0] + ranges[j - 1][1]
        part = plan.slice(first, end - first)
        empty, newline, nul = (pa.scalar(v, _TEXT) for v in ("", "\n", "\0"))
        versions_nl = pc.binary_join_element_wise(part.column("version").cast(_TEXT), empty, newline)
        joined = pc.binary_join_element_wise(part.column("source_uri").cast(_TEXT), versions_nl, nul)
        del versions_nl
        joined = joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined
        if joined.null_count:
            raise ValueError("the plan holds an input without URI or version")
        _, offsets_buf, data_buf = joined.buffers()
        offsets = np.frombuffer(offsets_buf, np.int64)[joined.offset:joined.offset + len(joined) + 1]
        data = memoryview(data_buf)
        for start, length in ranges[i:j]:
            lo, hi = offsets[start - first], offsets[start - first + length]
            out.append(PlannedShard(plan, int(shard_col[start]), start, length,
                                    hashlib.sha256(data[lo:hi]).hexdigest()[:32]))
        del joined, data, data_buf, offsets_buf
        i = j
    return out
