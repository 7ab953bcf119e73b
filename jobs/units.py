"""The driver side of the commit protocol, shared by every job kind that commits units of work
(ARCHITECTURE.md, "Output protocol"). A kind plans its units — anything with an int `shard` id and a
`content_hash` of what the unit computes from — and this module sorts them by what DST holds,
reading only markers and part footers, then makes DST's state match the plan before any worker
starts:

    files = existing_files(layout)
    units = sort_units(layout, planned, files, fingerprint, overwrite)   # reads, writes nothing
    repair(layout, files, planned_ids, units)                            # deletes / publishes

Afterwards every published part belongs to a unit committed for this plan, so a reader never sees
a row twice or a stale row, whatever crashed before.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from bulk_explain.jobs.runtime import read_json
from bulk_explain.workers.commit import marker_agrees, read_part_commit
from bulk_explain.workers.storage import is_temp_name


@dataclasses.dataclass
class UnitFiles:
    """What a previous run left under a layout, by unit id."""

    parts: Dict[int, str] = dataclasses.field(default_factory=dict)  # published
    markers: Dict[int, str] = dataclasses.field(default_factory=dict)  # _commits/
    staged: Dict[int, str] = dataclasses.field(default_factory=dict)  # _staging/
    temps: List[str] = dataclasses.field(default_factory=list)  # crashed atomic writes

    def shards(self):
        return set(self.parts) | set(self.markers) | set(self.staged)

    def uris_of(self, shard: int) -> List[str]:
        # Published part first: if deleting stops half-way, the unit is at worst invisible.
        return [d[shard] for d in (self.parts, self.markers, self.staged) if shard in d]


def existing_files(layout) -> UnitFiles:
    """Lists the layout's parts, markers, staged parts and temp files (three listings)."""
    files = UnitFiles()
    for folder, kind in ((layout.manifest_dir, files.parts), (layout.commits_dir, files.markers),
                         (layout.staging_dir, files.staged)):
        for uri in layout.storage.list_names(folder):
            shard = layout.shard_of(uri)
            if is_temp_name(uri):
                files.temps.append(uri)
            elif shard is not None:
                kind[shard] = uri
    return files


def delete_temp_files(layout, shards: Iterable[int], files: Optional[UnitFiles] = None) -> int:
    """Deletes the temp files crashed or killed writes left in the commit folders and in the image
    folders of `shards` (the units a run computes: a worker killed mid-write leaves one there, and
    nothing else would ever list that folder again). Image folders are listed only on storages
    whose writes can leave temp files (local), not on S3, where an upload is all or nothing.

    Args:
        shards: unit ids whose `layout.shard_image_dirs` to search.
        files: `existing_files(layout)` when already listed (their `temps`), else listed here.

    Returns:
        How many temp files were deleted.
    """
    storage = layout.storage
    temps = list((files or existing_files(layout)).temps)
    if storage.leaves_temp_files:
        for shard in shards:
            for folder in layout.shard_image_dirs(shard):
                temps.extend(uri for uri in storage.list_names(folder) if is_temp_name(uri))
    for uri in temps:
        storage.delete(uri)
    return len(temps)


def read_markers(storage, layout, shards: List[int]) -> Dict[int, dict]:
    """Reads commit markers concurrently (thousands of small GETs on S3). A missing marker is
    absent from the result; an unreadable one raises (`bulk_explain.jobs.runtime.read_json`)."""
    if not shards:
        return {}
    with ThreadPoolExecutor(min(16, len(shards))) as pool:
        found = pool.map(lambda s: read_json(storage, layout.commit_marker(s)), shards)
        return {s: m for s, m in zip(shards, found) if m}


def read_part_commits(storage, layout, shards: List[int]) -> Dict[int, Optional[dict]]:
    """Reads the commit identity in the footer of each unit's published part, concurrently."""
    if not shards:
        return {}
    with ThreadPoolExecutor(min(16, len(shards))) as pool:
        found = pool.map(lambda s: read_part_commit(storage, layout.manifest_part(s)), shards)
        return dict(zip(shards, found))


@dataclasses.dataclass
class SortedUnits:
    """Where each planned unit stands.

    Attributes:
        found: markers read, by unit id (also those of other configurations).
        committed: marker and published part agree: skipped this run.
        roll_forward: committed, but the run died before publishing: published from `_staging/`.
        todo: to compute.
        withdrawn: out of this run's scope (`in_scope`) and not committed: hidden until a full run.
        mismatched: units whose published part is not the one their marker committed (redone).
    """

    found: Dict[int, dict]
    committed: Dict[int, dict] = dataclasses.field(default_factory=dict)
    roll_forward: list = dataclasses.field(default_factory=list)
    todo: list = dataclasses.field(default_factory=list)
    withdrawn: list = dataclasses.field(default_factory=list)
    mismatched: int = 0


def sort_units(layout, units: Sequence, files: UnitFiles, fingerprint: str, overwrite: bool = False,
               in_scope: Optional[set] = None) -> SortedUnits:
    """Sorts `units` into committed, roll-forward and to-do by reading markers and footers only.

    Args:
        layout: the kind's `CommitLayout`.
        units: planned units (`.shard`, `.content_hash`).
        files: `existing_files(layout)`.
        fingerprint: the result fingerprint markers must name to count.
        overwrite: recompute everything (no marker is read).
        in_scope: unit ids this run may compute (None: all); others are kept only if committed.
    """
    storage = layout.storage
    found = {} if overwrite else read_markers(storage, layout, [u.shard for u in units if u.shard in files.markers])
    matching = {u.shard for u in units if u.shard in found and found[u.shard].get("result_fingerprint") == fingerprint
                and found[u.shard].get("content_hash") == u.content_hash}
    parts = read_part_commits(storage, layout, sorted(s for s in matching if s in files.parts))
    out = SortedUnits(found=found)
    for unit in units:
        marker = found.get(unit.shard)
        published = unit.shard in matching and unit.shard in files.parts and marker_agrees(marker, parts.get(unit.shard))
        if in_scope is not None and unit.shard not in in_scope:
            if published:
                out.committed[unit.shard] = marker  # committed earlier: counted, kept
            else:
                out.withdrawn.append(unit)  # its old part would be stale: hidden until a full run
        elif unit.shard not in matching:
            out.todo.append(unit)
        elif published:
            out.committed[unit.shard] = marker
        elif unit.shard in files.staged:
            out.roll_forward.append(unit)  # committed, then the run died before publishing
        else:
            out.mismatched += unit.shard in files.parts  # a part that is not the committed one
            out.todo.append(unit)
    return out


def staged_agrees(storage, uri: str, unit, marker: dict) -> bool:
    """The default roll-forward check: the staged part's footer names the marker's attempt, unit
    and content hash."""
    return marker_agrees(marker, read_part_commit(storage, uri))


def repair(layout, files: UnitFiles, planned_ids: Iterable[int], units: SortedUnits,
           staged_ok: Callable[[object, str, object, dict], bool] = staged_agrees) -> Dict[str, int]:
    """Makes the layout's state match the plan before any worker starts.

    - temp files of crashed writes are deleted (commit folders, and image folders of units to do);
    - units no longer in the plan lose their part, marker, staged part and unit folders
      (`layout.shard_image_dirs`);
    - committed-but-unpublished units are published from `_staging/` if `staged_ok` (else redone);
    - every unit to (re)do or withdrawn loses its published part first, then marker and staged part.

    Args:
        staged_ok: `(storage, staged_uri, unit, marker) -> bool`; a kind may check more than the
            footer (the explain kind re-hashes the rows' inputs).

    Returns:
        {"removed": units gone from the plan, "rolled_forward": units published from staging}.
        `units.todo` gains the units whose roll-forward was refused; `units.committed` the others.
    """
    storage = layout.storage
    planned_ids = set(planned_ids)
    delete_temp_files(layout, [u.shard for u in units.todo], files)
    gone = sorted(s for s in files.shards() if s not in planned_ids)
    for shard in gone:
        for uri in files.uris_of(shard):
            storage.delete(uri)
        for folder in layout.shard_image_dirs(shard):
            for uri in list(storage.list_names(folder)):
                storage.delete(uri)
    rolled = 0
    for unit in units.roll_forward:
        staged = files.staged[unit.shard]
        marker = units.found[unit.shard]
        if staged_ok(storage, staged, unit, marker):
            storage.write_bytes(layout.manifest_part(unit.shard), storage.read_bytes(staged))
            storage.delete(staged)
            units.committed[unit.shard] = marker
            rolled += 1
        else:
            units.todo.append(unit)
    units.roll_forward = []
    units.todo.sort(key=lambda u: u.shard)
    for unit in list(units.todo) + list(units.withdrawn):
        for uri in files.uris_of(unit.shard):
            storage.delete(uri)
    return {"removed": len(gone), "rolled_forward": rolled}
