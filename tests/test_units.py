"""The driver side of the commit protocol (`jobs/units.py`) on a local layout, without Ray: what
`repair` deletes before any worker starts."""

import os
from types import SimpleNamespace

from bulk_explain.jobs import units as unit_files
from bulk_explain.workers.layout import OutputLayout


def _touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_repair_deletes_temp_files_in_commit_folders_and_in_image_folders_of_units_to_do(tmp_path):
    out = str(tmp_path / "out")
    layout = OutputLayout(out)
    temp = "_tmp-" + "ef" * 16 + "-{}.tmp"
    doomed = [_touch(os.path.join(out, "manifest", temp.format("shard-00001.parquet"))),
              _touch(os.path.join(out, "_commits", temp.format("shard-00001.json"))),
              _touch(os.path.join(out, "_staging", temp.format("shard-00002.parquet"))),
              _touch(os.path.join(out, "overlays", "00001", temp.format("00000-0123456789abcdef.jpg"))),
              _touch(os.path.join(out, "heatmaps", "00001", temp.format("00001-0123456789abcdef.png")))]
    kept = [_touch(os.path.join(out, "overlays", "00001", "00000-0123456789abcdef.jpg")),  # rewritten by the worker
            # a committed unit's folder is not listed (one listing per unit to do, not per unit)
            _touch(os.path.join(out, "overlays", "00000", temp.format("00002-0123456789abcdef.jpg")))]
    planned = [SimpleNamespace(shard=s, content_hash=f"h{s}") for s in (0, 1)]
    files = unit_files.existing_files(layout)
    assert sorted(files.temps) == sorted(doomed[:3])
    units = unit_files.SortedUnits(found={}, committed={0: {}}, todo=[planned[1]])
    assert unit_files.repair(layout, files, [0, 1], units) == {"removed": 0, "rolled_forward": 0}
    assert [p for p in doomed if os.path.exists(p)] == []
    assert [p for p in kept if os.path.exists(p)] == kept


def test_temp_files_are_looked_for_in_image_folders_only_where_writes_leave_them(tmp_path):
    """An S3 upload is all or nothing: the end-of-run clean-up lists no image folder there
    (thousands of LISTs for nothing), but still deletes a temp name found in the commit folders."""
    from bulk_explain.workers.storage import LocalStorage, Storage

    assert LocalStorage.leaves_temp_files and not Storage.leaves_temp_files
    out = str(tmp_path / "out")
    layout = OutputLayout(out)
    listed = []

    class ObjectStoreLike(LocalStorage):
        leaves_temp_files = False

        def list_names(self, prefix_uri):
            listed.append(prefix_uri)
            return super().list_names(prefix_uri)

    layout.storage = ObjectStoreLike()
    stray = _touch(os.path.join(out, "_staging", "_tmp-" + "ab" * 16 + "-shard-00003.parquet.tmp"))
    image_temp = _touch(os.path.join(out, "overlays", "00003", "_tmp-" + "ab" * 16 + "-x.jpg.tmp"))
    assert unit_files.delete_temp_files(layout, [3]) == 1
    assert not os.path.exists(stray) and os.path.exists(image_temp)
    assert not any("overlays" in uri for uri in listed)
    layout.storage = LocalStorage()
    assert unit_files.delete_temp_files(layout, [3]) == 1 and not os.path.exists(image_temp)
