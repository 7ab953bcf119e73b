"""Resume and incremental re-runs (issue 5): add, change, touch and delete images between runs of
the same job; only the shards holding them are redone, rows are replaced (never duplicated), removed
images are reported, and an insertion in the middle of the sorted order does not shift later shards."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from conftest import photo_like, write_image

from bulk_explain.jobs.explain.plan import iter_shards, make_plan, plan_changes


def _manifest(out):
    table = ds.dataset(os.path.join(out, "manifest")).to_table()
    uris = table.column("source_uri").to_pylist()
    assert len(uris) == len(set(uris)), "a row appears twice"
    return {r["source_uri"]: r for r in table.to_pylist()}


def _files(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def _config(root, out, **kw):
    from bulk_explain.jobs import ExplainConfig, ModelSpec

    return ExplainConfig(inputs=(root,), output=out, batch_size=4, shard_size=4,
                         model=ModelSpec(kind="cats_dogs", weights="random", input_size=64), **kw)


def _check_outputs_match_rows(out, rows):
    """Every overlay/heatmap on disk belongs to a row and vice versa (stale outputs are deleted)."""
    on_disk = set(_files(os.path.join(out, "overlays"))) | set(_files(os.path.join(out, "heatmaps")))
    referenced = {u for r in rows.values() for u in (r["gradcam_overlay_uri"], r["gradcam_heatmap_uri"]) if u}
    assert on_disk == referenced


def test_add_change_touch_delete_between_runs(ray_local, tmp_path, capsys):
    from bulk_explain.jobs import run_explain

    rng = np.random.default_rng(5)
    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    paths = [write_image(os.path.join(root, "cats" if i < 8 else "dogs", f"img{i:02d}.jpg"), photo_like(rng, 40, 50))
             for i in range(16)]

    first = run_explain(_config(root, out), progress=False)
    assert first.exit_code == 0 and first.shards == 4 and first.processed_shards == 4 and first.added_images == 16
    rows1 = _manifest(out)
    assert sorted(rows1) == paths

    # 1. nothing changed: nothing is redone (no image decoded, no shard run), and the run says so
    again = run_explain(_config(root, out), progress=True)
    assert (again.processed_shards, again.skipped_shards, again.images_processed) == (0, 4, 0)
    assert "4 shards already committed" in capsys.readouterr().err
    assert _manifest(out) == rows1

    # 2. one image changed (new content), one touched (same bytes, new mtime), one deleted,
    #    two added: one sorting into the middle of shard 0, one at the very end
    plan1 = pq.read_table(os.path.join(out, "plan.parquet"))
    shard_of = dict(zip(plan1.column("source_uri").to_pylist(), plan1.column("shard").to_pylist()))
    changed, touched, deleted = paths[5], paths[9], paths[14]
    assert [shard_of[p] for p in (changed, touched, deleted)] == [1, 2, 3]
    write_image(changed, photo_like(rng, 30, 70))
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    os.remove(deleted)
    middle = write_image(os.path.join(root, "cats", "img01b.jpg"), photo_like(rng, 33, 33))
    last = write_image(os.path.join(root, "zebras", "z.jpg"), photo_like(rng, 33, 33))

    third = run_explain(_config(root, out), progress=False)
    assert third.exit_code == 0
    assert (third.added_images, third.changed_images, third.removed_images) == (2, 2, 1)
    assert third.removed_image_uris == [deleted]
    # shard 0 (untouched, though an image was inserted among its names) is skipped;
    # 1 (changed), 2 (touched), 3 (deleted) and the new shard 4 are redone
    assert (third.skipped_shards, third.processed_shards, third.shards) == (1, 4, 5)
    rows3 = _manifest(out)
    assert sorted(rows3) == sorted(set(paths) - {deleted} | {middle, last})
    assert rows3[changed]["image_id"] != rows1[changed]["image_id"]
    assert (rows3[changed]["width"], rows3[changed]["height"]) == (70, 30)
    assert rows3[touched]["image_id"] == rows1[touched]["image_id"]
    assert rows3[touched]["source_version"] != rows1[touched]["source_version"]
    assert rows3[middle]["shard"] == rows3[last]["shard"] == 4
    for p in paths[:4]:  # shard 0's rows are the very same rows
        assert rows3[p] == rows1[p]
    plan3 = pq.read_table(os.path.join(out, "plan.parquet"))
    assert dict(zip(plan3.column("source_uri").to_pylist(), plan3.column("shard").to_pylist())) == \
        {u: r["shard"] for u, r in rows3.items()}
    _check_outputs_match_rows(out, rows3)
    assert len(os.listdir(os.path.join(out, "manifest"))) == 5
    assert not os.path.exists(os.path.join(out, "_staging")) or not os.listdir(os.path.join(out, "_staging"))

    # 3. a lone insertion at the front of the sorted order: one new shard, everything else skipped
    front = write_image(os.path.join(root, "aardvarks", "a.jpg"), photo_like(rng, 20, 20))
    fourth = run_explain(_config(root, out), progress=False)
    assert (fourth.processed_shards, fourth.skipped_shards, fourth.added_images) == (1, 5, 1)
    rows4 = _manifest(out)
    assert rows4[front]["shard"] == 5 and len(rows4) == len(rows3) + 1

    # 4. --overwrite recomputes everything with a fresh sorted cut, leaving no stale part behind
    fifth = run_explain(_config(root, out, overwrite=True), progress=False)
    assert (fifth.processed_shards, fifth.skipped_shards) == (5, 0)
    rows5 = _manifest(out)
    assert sorted(rows5) == sorted(rows4)
    ordered = sorted(rows5)
    assert [rows5[u]["shard"] for u in ordered] == [i // 4 for i in range(len(ordered))]
    assert sorted(os.listdir(os.path.join(out, "manifest"))) == [f"shard-{i:05d}.parquet" for i in range(5)]
    assert sorted(os.listdir(os.path.join(out, "_commits"))) == [f"shard-{i:05d}.json" for i in range(5)]
    _check_outputs_match_rows(out, rows5)


def test_everything_removed_leaves_an_empty_manifest(ray_local, tmp_path):
    from bulk_explain.jobs import run_explain

    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    img = write_image(os.path.join(root, "a", "x.jpg"), photo_like(np.random.default_rng(1), 30, 30))
    assert run_explain(_config(root, out), progress=False).ok == 1
    os.remove(img)
    result = run_explain(_config(root, out, allow_removals=True), progress=False)
    assert result.exit_code == 0 and result.removed_images == 1 and result.removed_shards == 1
    assert result.shards == 0 and os.listdir(os.path.join(out, "manifest")) == []
    assert _files(os.path.join(out, "overlays")) == []


# ----------------------------------------------------------------------------- plan level

def _listing(names, versions=None):
    names = sorted(names)
    return pa.table({
        "source_uri": pa.array(names, pa.string()),
        "label": pa.array([None] * len(names), pa.string()),
        "size": pa.array([10] * len(names), pa.int64()),
        "version": pa.array([(versions or {}).get(n, "v1") for n in names], pa.string()),
    })


def test_stable_assignment_keeps_shards_under_insertion_and_removal():
    first = make_plan(_listing("abcdefghij"), 3)
    assert first.column("shard").to_pylist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    before = {t.shard: t.content_hash for t in iter_shards(first)}
    # insert "bb" (sorts inside shard 0) and "z"; remove "e" (shard 1)
    listing = _listing(list("abcdfghij") + ["bb", "z"])
    second = make_plan(listing, 3, previous=first)
    tasks = {t.shard: t for t in iter_shards(second)}
    assert tasks[0].uris == ["a", "b", "c"] and tasks[0].content_hash == before[0]
    assert tasks[1].uris == ["d", "f"] and tasks[1].content_hash != before[1]
    assert tasks[2].content_hash == before[2] and tasks[3].content_hash == before[3]
    assert tasks[4].uris == ["bb", "z"]
    assert second.column("position").to_pylist() == [0, 1, 2, 0, 1, 0, 1, 2, 0, 0, 1]
    changes = plan_changes(first, listing)
    assert (changes.added, changes.changed, changes.removed, changes.removed_uris) == (2, 0, 1, ["e"])
    # a shard whose inputs are all gone disappears; new ids never reuse the previous plan's
    third = make_plan(_listing(list("abcdf") + ["bb", "z", "new"]), 3, previous=second)
    assert sorted({t.shard for t in iter_shards(third)}) == [0, 1, 4, 5]
    assert plan_changes(second, _listing("abc", {"a": "v2"})).changed == 1
