"""The plan stage: list every input once, sort, cut into shards with fixed ids, write `DST/plan.parquet`.

The listing is accumulated in Arrow arrays, not Python objects, so a prefix of millions of keys
costs tens of bytes per key in the driver; text columns are `large_string` (64-bit offsets), so a
listing whose URI text passes 2 GiB still sorts. Shards become Python objects only when they are to
be done (`PlannedShard`, a reference into the plan that is materialized when sent to a worker).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bulk_explain.schemas.image_manifest import PLAN_SCHEMA
from bulk_explain.workers.faults import fault_point
from bulk_explain.workers.storage import FileEntry, storage_for

_CHUNK = 65_536
_TEXT = pa.large_string()
# Labels are few distinct folder names: dictionary-encoded in the listing (4 bytes an input, not
# ~18: 140 MB at 10M inputs), decoded to the plan's large_string by `make_plan`.
_LABEL = pa.dictionary(pa.int32(), _TEXT)
_COLUMNS = (("source_uri", _TEXT), ("label", _LABEL), ("size", pa.int64()), ("version", _TEXT))
# Rows hashed per vectorized step in `plan_shards` (bounds the temporary joined text).
_HASH_ROWS = 1 << 18


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def release_memory() -> None:
    """Hands freed pages back to the OS after the big temporaries of planning: Arrow's pool
    (mimalloc and jemalloc keep them otherwise) and glibc's heap (which keeps freed chunks under
    its dynamic mmap threshold: ~600 MB of a 10M-input plan's Python and numpy temporaries). Freed
    pages that stay count towards the driver's peak when the next stage allocates elsewhere."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
        table (source_uri, label, size, version), text columns `large_string`, label dictionary-encoded.

    Raises:
        StorageError: a root or a folder under it cannot be listed.
    """

    chunks = {name: [] for name, _ in _COLUMNS}
    pool = ThreadPoolExecutor(8) if verify_content else None

    def flush(entries: List[FileEntry], root: str, storage) -> None:
        versions = ([e.version for e in entries] if pool is None else
                    list(pool.map(storage.content_version, entries)))
        chunks["source_uri"].append(pa.array([e.uri for e in entries], _TEXT))
        chunks["label"].append(pa.array([label_of(e.uri, root) for e in entries], _TEXT).dictionary_encode())
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
    # copy exists: the peak is the listing plus one column, not two listings. The chunks are
    # combined first: a take on the chunked column concatenates them internally, a third copy.
    columns = {}
    for name, t in _COLUMNS:
        column = uris if name == "source_uri" else pa.chunked_array(chunks.pop(name), t)
        uris = None
        if order is not None:
            column = column.combine_chunks()
            release_memory()
            column = column.take(order)
        columns[name] = column
        del column
        release_memory()
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


# ------------------------------------------------------------ matching against the previous plan
#
# The previous plan is compacted to keys before the listing is matched against it, so the driver
# never holds the previous plan's text next to the listing's (at 10M inputs each is ~1.3 GB of
# Arrow). A URI's key is its 128-bit BLAKE2b digest: a collision (about n**2 / 2**129, 1e-25 at 10M
# inputs) would only give a new input an old shard id or miscount a change, never a wrong result,
# since every shard's content hash is computed from the real text.

_KEY_ROWS = 1 << 16  # strings turned into Python objects per step


def _column_slices(column, rows: int):
    for start in range(0, len(column), rows):
        yield start, column.slice(start, rows)


def _text_slices(column):
    for start, part in _column_slices(column, _KEY_ROWS):
        if part.null_count:
            raise ValueError("a plan or listing holds a missing URI or version")
        yield start, part.to_pylist()


def text_keys(column) -> np.ndarray:
    """The 128-bit BLAKE2b digest of every string of `column` (an Arrow string array or chunked
    array) as uint64 (n, 2)."""
    digest = hashlib.blake2b
    out = np.empty((len(column), 2), np.uint64)
    for start, texts in _text_slices(column):
        joined = b"".join(digest(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in texts)
        out[start:start + len(texts)] = np.frombuffer(joined, np.uint64).reshape(-1, 2)
    return out


def version_signatures(versions, sizes) -> np.ndarray:
    """One uint64 per input (a 64-bit BLAKE2b digest of version and size) that changes when its
    version text or size changes."""
    digest = hashlib.blake2b
    sizes = sizes.to_numpy() if isinstance(sizes, (pa.ChunkedArray, pa.Array)) else np.asarray(sizes)
    out = np.empty(len(versions), np.uint64)
    for start, texts in _text_slices(versions):
        joined = b"".join(digest(f"{t}\0{n}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
                          for t, n in zip(texts, sizes[start:start + len(texts)].tolist()))
        out[start:start + len(texts)] = np.frombuffer(joined, np.uint64)
    return out


class PreviousPlan:
    """The previous run's plan as the matching needs it: 32 bytes per input and no text.

    Attributes:
        num_rows: inputs in the previous plan.
        shard: int32 shard id per previous row (plan order).
        signature: `version_signatures` per previous row.
        max_shard: the highest shard id (-1 for an empty plan).
    """

    def __init__(self, keys: np.ndarray, shard: np.ndarray, signature: np.ndarray, source):
        order = np.argsort(keys[:, 0], kind="stable")
        self._order = order.astype(np.int32 if len(order) < 2**31 else np.int64)
        del order
        self._key0 = keys[self._order, 0]
        self._key1 = keys[self._order, 1]
        self.shard = shard
        self.signature = signature
        self.num_rows = len(shard)
        self.max_shard = int(shard.max()) if len(shard) else -1
        self._source = source  # a pa.Table, or the plan's URI (re-read for the removed URIs)

    def drop_keys(self) -> None:
        """Frees the keys and signatures once the listing is matched (`make_plan` needs only
        `shard` and `max_shard`): 28 of the 32 bytes per input."""
        self._key0 = self._key1 = self._order = self.signature = None

    @classmethod
    def from_table(cls, table: pa.Table) -> "PreviousPlan":
        return cls(text_keys(table.column("source_uri")), table.column("shard").to_numpy().astype(np.int32),
                   version_signatures(table.column("version"), table.column("size")), table)

    @classmethod
    def read(cls, uri: str) -> Optional["PreviousPlan"]:
        """The plan at `uri` read batch by batch into keys, or None (missing, unreadable, old)."""
        storage = storage_for(uri)
        try:
            data = storage.read_bytes(uri)
        except (FileNotFoundError, OSError):
            return None
        try:
            source = pq.ParquetFile(pa.BufferReader(data))
            if not set(PLAN_SCHEMA.names) <= set(source.schema_arrow.names):
                return None
            n = source.metadata.num_rows
            keys = np.empty((n, 2), np.uint64)
            shard = np.empty(n, np.int32)
            signature = np.empty(n, np.uint64)
            done = 0
            # Small batches, one thread: larger ones make pyarrow decode many row groups ahead
            # (+190 MB at 1M inputs against +50 MB).
            for batch in source.iter_batches(batch_size=_KEY_ROWS, columns=["shard", "source_uri", "size", "version"],
                                             use_threads=False):
                k = batch.num_rows
                keys[done:done + k] = text_keys(batch.column("source_uri"))
                shard[done:done + k] = batch.column("shard").to_numpy()
                signature[done:done + k] = version_signatures(batch.column("version"), batch.column("size"))
                done += k
            if done != n:
                return None
        except (pa.ArrowException, ValueError, OSError):
            return None
        return cls(keys, shard, signature, uri)

    def match(self, listing: pa.Table) -> np.ndarray:
        """For each listed input, its row in the previous plan (numpy int64), -1 for a new input."""
        if self._key0 is None:
            raise RuntimeError("this previous plan's keys were dropped (drop_keys): match before dropping them")
        result = np.full(listing.num_rows, -1, np.int64)
        if not self.num_rows or not listing.num_rows:
            return result
        for start, chunk in _column_slices(listing.column("source_uri"), _HASH_ROWS):
            keys = text_keys(chunk)
            at = np.minimum(np.searchsorted(self._key0, keys[:, 0]), self.num_rows - 1)
            hit = (self._key0[at] == keys[:, 0]) & (self._key1[at] == keys[:, 1])
            part = result[start:start + len(chunk)]
            part[hit] = self._order[at[hit]]
        return result

    def uris(self, rows: np.ndarray) -> List[str]:
        """The URIs of previous rows `rows` (ascending), read again from the plan."""
        if not len(rows):
            return []
        if isinstance(self._source, pa.Table):
            return self._source.column("source_uri").take(pa.array(rows)).to_pylist()
        source = pq.ParquetFile(pa.BufferReader(storage_for(self._source).read_bytes(self._source)))
        found, start, want = {}, 0, set(int(r) for r in rows)
        for batch in source.iter_batches(batch_size=_KEY_ROWS, columns=["source_uri"], use_threads=False):
            hits = rows[(rows >= start) & (rows < start + batch.num_rows)]
            if len(hits):
                texts = batch.column("source_uri").take(pa.array(hits - start)).to_pylist()
                found.update(zip(hits.tolist(), texts))
            start += batch.num_rows
            if len(found) == len(want):
                break
        return [found[int(r)] for r in rows if int(r) in found]


def _previous(previous) -> Optional[PreviousPlan]:
    if previous is None or isinstance(previous, PreviousPlan):
        return previous
    return PreviousPlan.from_table(_large(previous))


def match_previous(listing: pa.Table, previous) -> np.ndarray:
    """For each listed input, its row in `previous` (a `PreviousPlan` or a plan table), -1 for a
    new input (numpy int64)."""
    return _previous(previous).match(listing)


def make_plan(listing: pa.Table, shard_size: int, previous=None, prev_index=None) -> pa.Table:
    """Assigns every listed input a (shard, position).

    Without `previous`: row i of the sorted listing goes to shard i // shard_size.

    With `previous` (the plan of the last run in the same output): an input that was already
    planned keeps its shard, so adding, changing or removing images only touches the shards that
    hold them; new inputs are cut, in URI order, into new shards numbered after the previous plan's
    highest id. Positions are renumbered 0..k-1 inside each shard in URI order. Shards whose inputs
    all disappeared are gone from the plan (ids are then not contiguous).

    Args:
        previous: a `PreviousPlan` or a PLAN_SCHEMA table, or None.
        prev_index: `match_previous(listing, previous)` when the caller has it already.

    Returns:
        PLAN_SCHEMA table sorted by (shard, position).
    """
    listing = _large(listing)
    previous = _previous(previous)
    n = listing.num_rows
    if previous is None or previous.num_rows == 0 or n == 0:
        idx = np.arange(n, dtype=np.int64)
        shard = (idx // shard_size).astype(np.int32)
        order = None
    else:
        if prev_index is None:
            prev_index = previous.match(listing)
        kept = prev_index >= 0
        shard = np.empty(n, np.int32)
        shard[kept] = previous.shard[prev_index[kept]]
        first_new = previous.max_shard + 1
        shard[~kept] = first_new + (np.arange(int((~kept).sum())) // shard_size)
        del kept
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
        column = column if take is None else column.take(take)
        if name == "label" and pa.types.is_dictionary(column.type):
            column = column.cast(_TEXT)
        columns[name] = column
    return pa.table(columns, schema=PLAN_SCHEMA)


@dataclasses.dataclass
class PlanChanges:
    """What changed between the previous plan and the new listing."""

    added: int = 0
    changed: int = 0
    removed: int = 0
    removed_uris: List[str] = dataclasses.field(default_factory=list)  # the first `limit`


def plan_changes(previous, listing: pa.Table, limit: int = 1000, prev_index=None) -> PlanChanges:
    """Counts inputs added, changed (size or version differs) and removed since `previous`.

    Args:
        previous: a `PreviousPlan` or a PLAN_SCHEMA table, or None.
        prev_index: `match_previous(listing, previous)` when the caller has it already.
    """
    if previous is None:
        return PlanChanges(added=listing.num_rows)
    listing, previous = _large(listing), _previous(previous)
    if prev_index is None:
        prev_index = previous.match(listing)
    kept = prev_index >= 0
    added = int(listing.num_rows - kept.sum())
    changed = 0
    # In slices: the signatures of one slice of the listing at a time.
    for start in range(0, listing.num_rows, _HASH_ROWS):
        idx = prev_index[start:start + _HASH_ROWS]
        part = listing.slice(start, len(idx))
        mine = version_signatures(part.column("version"), part.column("size"))
        found = idx >= 0
        changed += int(np.count_nonzero(mine[found] != previous.signature[idx[found]]))
    hit = np.zeros(previous.num_rows, bool)
    hit[prev_index[kept]] = True
    gone = np.flatnonzero(~hit)
    return PlanChanges(added=added, changed=changed, removed=len(gone), removed_uris=previous.uris(gone[:limit]))


_PLAN_ROW_GROUP_ROWS = 1 << 16


def write_plan(plan: pa.Table, uri: str, shard_size: Optional[int] = None) -> None:
    """Writes the plan in row groups of whole shards (up to 64k rows, or one larger shard).

    Not one row group per shard: the writer keeps every row group's metadata until it closes
    (+450 MB at 10M inputs in 39k shards, against +90 MB grouped). Nothing reads one shard's rows
    from the file. Written through a file, not a buffer (the plan of 10M inputs is 350 MB of Parquet).
    """
    with storage_for(uri).open_write(uri) as sink, pq.ParquetWriter(sink, plan.schema) as writer:
        if plan.num_rows == 0:
            writer.write_table(plan)
        group_start, group_rows = 0, 0
        for start, length in _shard_ranges(plan):
            if group_rows and group_rows + length > _PLAN_ROW_GROUP_ROWS:
                writer.write_table(plan.slice(group_start, group_rows), row_group_size=group_rows)
                group_start, group_rows = start, 0
            group_rows += length
        if group_rows:
            writer.write_table(plan.slice(group_start, group_rows), row_group_size=group_rows)


def _shard_ranges(plan: pa.Table):

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
