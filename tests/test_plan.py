"""Plan stage and worker sizing."""

import os

import numpy as np
import pyarrow.parquet as pq

from conftest import photo_like, write_image
from bulk_explain.jobs.explain.plan import iter_shards, label_of, list_inputs, make_plan, write_plan


def test_plan_workers_sizes_actors_to_the_cluster():
    from bulk_explain.jobs.distribute import plan_workers

    cpu_node = {"nodes": 1, "cpus": 2, "gpus": 0, "min_node_cpus": 2}
    assert plan_workers(None, cpu_node) == {"count": 1, "num_gpus": 0, "num_cpus": 2, "tf_threads": 2}
    # two actors on two cores: each gets one core and one TF thread (no oversubscription)
    assert plan_workers(2, cpu_node)["tf_threads"] == 1
    gpu_cluster = {"nodes": 4, "cpus": 64, "gpus": 4, "min_node_cpus": 16}
    shape = plan_workers(None, gpu_cluster)
    assert shape["count"] == 4 and shape["num_gpus"] == 1
    # autoscaling cluster with no GPU node up yet: explicit GPUs per worker still reserved
    empty = {"nodes": 0, "cpus": 0, "gpus": 0, "min_node_cpus": 0}
    assert plan_workers(3, empty, gpus_per_worker=1)["num_gpus"] == 1



def _tree(root):
    rng = np.random.default_rng(0)
    for d, names in {"b": ["2.jpg", "1.png"], "a": ["z.jpg"], "a/deep": ["k.bmp"]}.items():
        for n in names:
            write_image(os.path.join(root, d, n), photo_like(rng, 12, 12))
    write_image(os.path.join(root, "root.jpg"), photo_like(rng, 12, 12))
    write_image(os.path.join(root, ".cache", "hidden.jpg"), photo_like(rng, 12, 12))
    with open(os.path.join(root, "a", "readme.txt"), "w") as f:
        f.write("x")
    os.symlink(root, os.path.join(root, "a", "loop"))  # a symlink cycle must not hang the listing


def test_listing_is_sorted_deduplicated_and_labelled(tmp_path):
    root = str(tmp_path / "in")
    _tree(root)
    # overlapping inputs (a folder and its subfolder) list each file once
    listing = list_inputs([root, os.path.join(root, "b")])
    uris = listing.column("source_uri").to_pylist()
    assert uris == sorted(set(uris)) and len(uris) == 5
    assert not any(".cache" in u or u.endswith(".txt") or "/loop/" in u for u in uris)
    labels = dict(zip(uris, listing.column("label").to_pylist()))
    assert labels[os.path.join(root, "b", "1.png")] == "b"
    assert labels[os.path.join(root, "a", "deep", "k.bmp")] == "deep"
    assert labels[os.path.join(root, "root.jpg")] is None
    assert label_of("s3://bucket/pets/cats/x.jpg", "s3://bucket/pets") == "cats"
    assert label_of("s3://bucket/pets/x.jpg", "s3://bucket/pets/") is None


def test_shards_are_deterministic_and_hash_their_content(tmp_path):
    root = str(tmp_path / "in")
    _tree(root)
    plan = make_plan(list_inputs([root]), shard_size=2)
    again = make_plan(list_inputs([root]), shard_size=2)
    assert plan.equals(again)
    tasks = list(iter_shards(plan, 2))
    assert [t.shard for t in tasks] == [0, 1, 2] and [len(t) for t in tasks] == [2, 2, 1]
    assert plan.column("shard").to_pylist() == [0, 0, 1, 1, 2]
    before = [t.content_hash for t in tasks]
    # touching one file changes only its shard's hash
    target = tasks[1].uris[0]
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = [t.content_hash for t in iter_shards(make_plan(list_inputs([root]), 2), 2)]
    assert [a != b for a, b in zip(before, after)] == [False, True, False]
    write_plan(plan, str(tmp_path / "plan.parquet"), 2)
    f = pq.ParquetFile(str(tmp_path / "plan.parquet"))
    assert f.num_row_groups == 1 and f.read().equals(plan)


def test_local_listing_is_already_in_uri_order(tmp_path):
    """The local walk yields URIs in string order (folders and files interleaved as their full paths
    sort), so a large local listing needs no second copy for sorting; hidden entries, symlink cycles
    and dangling links are left out as before."""
    from bulk_explain.workers.storage import LocalStorage

    names = ["a/x.jpg", "a-b/y.jpg", "a b/q.jpg", "a/c/d.png", "ab.jpg", "a.jpg", "a!.jpg", "aa.jpg", "Z/1.jpg",
             "é/2.jpg", "e/3.jpg", "a/c-d/4.jpg", "a/c.jpg", ".hidden/h.jpg", "a/.h.jpg", "notes.txt"]
    for name in names:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    os.symlink(str(tmp_path), str(tmp_path / "e" / "loop"))
    os.symlink(str(tmp_path / "missing.jpg"), str(tmp_path / "e" / "dangling.jpg"))
    uris = [e.uri for e in LocalStorage().list_files(str(tmp_path))]
    assert uris == sorted(uris)
    assert sorted(os.path.relpath(u, str(tmp_path)) for u in uris) == sorted(
        n for n in names if not n.startswith(".") and "/." not in n and n.endswith((".jpg", ".png")))
