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
from typing import Iterable, Iterator, List, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.image_manifest import PLAN_SCHEMA
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


def make_plan(listing: pa.Table, shard_size: int) -> pa.Table:
    """Adds shard and position columns: row i goes to shard i // shard_size."""
    n = listing.num_rows
    import numpy as np

    idx = np.arange(n, dtype=np.int64)
    return pa.table(
        {
            "shard": pa.array((idx // shard_size).astype(np.int32)),
            "position": pa.array((idx % shard_size).astype(np.int32)),
            "source_uri": listing.column("source_uri"),
            "label": listing.column("label"),
            "size": listing.column("size"),
            "version": listing.column("version"),
        },
        schema=PLAN_SCHEMA,
    )


def write_plan(plan: pa.Table, uri: str, shard_size: int) -> None:
    buf = io.BytesIO()
    # One row group per shard: a worker could read its own shard without the rest.
    pq.write_table(plan, buf, row_group_size=max(1, shard_size))
    storage_for(uri).write_bytes(uri, buf.getvalue())


def iter_shards(plan: pa.Table, shard_size: int) -> Iterator[ShardTask]:
    n = plan.num_rows
    for start in range(0, n, shard_size):
        part = plan.slice(start, shard_size)
        yield ShardTask(
            shard=start // shard_size,
            uris=part.column("source_uri").to_pylist(),
            labels=part.column("label").to_pylist(),
            sizes=part.column("size").to_pylist(),
            versions=part.column("version").to_pylist(),
        )
