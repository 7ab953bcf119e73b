"""Matching a new listing against the previous plan through hashed keys (`PreviousPlan`).

The driver keeps the previous plan as keys only (no text), so these tests compare every answer with
a reference written here in plain Python (dicts over the real text): the row each input had, what
was added, changed and removed, and the removed URIs in plan order.
"""

import random

import numpy as np
import pyarrow as pa
import pytest

from bulk_explain.jobs.explain.plan import (PreviousPlan, make_plan, match_previous, plan_changes, text_keys,
                                            version_signatures, write_plan)


def _listing(entries):
    """entries: [(uri, version, size)] -> a listing table sorted by URI (what list_inputs returns)."""
    entries = sorted(entries)
    return pa.table({"source_uri": pa.array([e[0] for e in entries], pa.large_string()),
                     "label": pa.array([e[0].split("/")[-2] for e in entries], pa.large_string()),
                     "size": pa.array([e[2] for e in entries], pa.int64()),
                     "version": pa.array([e[1] for e in entries], pa.large_string())})


def _reference(previous_plan: pa.Table, listing: pa.Table):
    rows = {uri: i for i, uri in enumerate(previous_plan.column("source_uri").to_pylist())}
    old = list(zip(previous_plan.column("version").to_pylist(), previous_plan.column("size").to_pylist()))
    index = [rows.get(uri, -1) for uri in listing.column("source_uri").to_pylist()]
    new = list(zip(listing.column("version").to_pylist(), listing.column("size").to_pylist()))
    changed = sum(1 for i, r in enumerate(index) if r >= 0 and old[r] != new[i])
    hit = set(index)
    gone = [uri for uri, r in rows.items() if r not in hit]
    return index, index.count(-1), changed, gone


def test_keys_tell_apart_the_strings_hashes_confuse():
    texts = ["", "a", "b", "ab", "ba", "a\0", "\0a", "é", "e\u0301", "x" * 5000, "x" * 4999 + "y",
             "y" + "x" * 4999, "x" * 8192, "x" * 8193,
             # equal bytes 4096 apart at both ends: cancel in an XOR of per-position tables that wrap
             "q" + "p" * 4095 + "q", "r" + "p" * 4095 + "r"]
    # The Thue-Morse pair: equal under every polynomial hash mod 2**64 with an odd base.
    tm = [0]
    while len(tm) < 2048:
        tm += [1 - b for b in tm]
    texts += ["".join("ab"[b] for b in tm), "".join("ba"[b] for b in tm)]
    keys = text_keys(pa.array(texts, pa.large_string()))
    assert len({tuple(k) for k in keys.tolist()}) == len(texts)
    # The same text has the same key whatever the array's type, chunking and offset.
    small = text_keys(pa.chunked_array([pa.array(texts[:5], pa.string()), pa.array(texts[5:], pa.string())]))
    assert np.array_equal(small, keys)
    assert np.array_equal(text_keys(pa.array(texts, pa.large_string()).slice(3)), keys[3:])
    with pytest.raises(ValueError, match="missing"):
        text_keys(pa.array(["a", None]))


def test_version_signature_changes_with_version_or_size():
    versions = pa.array(["v1", "v1", "v2", "v1"], pa.large_string())
    sizes = pa.array([10, 11, 10, 10], pa.int64())
    sig = version_signatures(versions, sizes)
    assert sig[0] == sig[3] and len({int(s) for s in sig[:3]}) == 3


@pytest.mark.parametrize("from_file", [False, True])
def test_matching_agrees_with_a_plain_python_reference(tmp_path, from_file):
    rng = random.Random(7)
    first = [(f"s3://b/p/c{rng.randrange(40):02d}/img_{i:06d}{'x' * rng.randrange(30)}.jpg", f"{rng.getrandbits(128):032x}",
              rng.randrange(1, 10**6)) for i in range(3000)]
    previous_plan = make_plan(_listing(first), 64)
    # The next listing: 10% removed, 10% changed (version or size), 500 new ones spread over the folders.
    survivors = []
    for uri, version, size in first:
        roll = rng.random()
        if roll < 0.1:
            continue
        if roll < 0.15:
            version = f"{rng.getrandbits(128):032x}"
        elif roll < 0.2:
            size += 1
        survivors.append((uri, version, size))
    added = [(f"s3://b/p/c{rng.randrange(40):02d}/new_{i:05d}.jpg", "v", 1) for i in range(500)]
    listing = _listing(survivors + added)

    if from_file:
        path = str(tmp_path / "plan.parquet")
        write_plan(previous_plan, path)
        previous = PreviousPlan.read(path)
    else:
        previous = PreviousPlan.from_table(previous_plan)
    index, n_added, n_changed, gone = _reference(previous_plan, listing)
    assert previous.num_rows == 3000 and previous.max_shard == max(previous_plan.column("shard").to_pylist())
    assert match_previous(listing, previous).tolist() == index
    changes = plan_changes(previous, listing, limit=25)
    assert (changes.added, changes.changed, changes.removed) == (n_added, n_changed, len(gone))
    assert n_added == 500 and n_changed > 200 and len(gone) > 200  # the reference saw what was planted
    assert changes.removed_uris == gone[:25]
    # Kept inputs keep their shard; the new ones go into new shards after the highest old id. The
    # driver drops the keys once matched: the shard ids are all make_plan needs.
    matched = match_previous(listing, previous)
    previous.drop_keys()
    with pytest.raises(RuntimeError, match="dropped"):
        previous.match(listing)
    plan = make_plan(listing, 64, previous=previous, prev_index=matched)
    old_shard = dict(zip(previous_plan.column("source_uri").to_pylist(), previous_plan.column("shard").to_pylist()))
    for uri, shard in zip(plan.column("source_uri").to_pylist(), plan.column("shard").to_pylist()):
        if uri in old_shard:
            assert shard == old_shard[uri]
        else:
            assert shard > previous.max_shard


def test_unreadable_or_foreign_plan_files_are_no_previous_plan(tmp_path):
    assert PreviousPlan.read(str(tmp_path / "missing.parquet")) is None
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    assert PreviousPlan.read(str(tmp_path / "junk.parquet")) is None
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"source_uri": ["a"]}), str(tmp_path / "other.parquet"))
    assert PreviousPlan.read(str(tmp_path / "other.parquet")) is None
    empty = str(tmp_path / "empty.parquet")
    write_plan(make_plan(_listing([]), 4), empty)
    plan = PreviousPlan.read(empty)
    assert plan.num_rows == 0 and plan.max_shard == -1
    assert match_previous(_listing([("a/b/c.jpg", "v", 1)]), plan).tolist() == [-1]


def test_plan_file_has_row_groups_of_whole_shards(tmp_path):
    import pyarrow.parquet as pq

    listing = _listing([(f"s3://b/p/c/img_{i:07d}.jpg", "v", 1) for i in range(150_000)])
    plan = make_plan(listing, 1000)
    path = str(tmp_path / "plan.parquet")
    write_plan(plan, path)
    f = pq.ParquetFile(path)
    sizes = [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]
    assert sizes == [65_000, 65_000, 20_000]  # whole shards, up to 64k rows
    assert f.read().equals(plan)
    assert PreviousPlan.read(path).match(listing).tolist() == list(range(150_000))
