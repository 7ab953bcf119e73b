"""Where the filters kind writes under DST (one place, shared by its driver and its worker).

    DST/filters/job.json, summary.json, manifest.parquet      (manifest: assembled from committed parts)
    DST/filters/<layer>/<layer>_<index>-<key12>.png           one per filter and settings key
    DST/filters/sheets/<layer>.png                             contact sheet per complete layer
    DST/filters/_parts/, _commits/, _staging/                  the commit protocol (`CommitLayout`)
    DST/weights/<layer>_channels.png, <layer>_color.png, <layer>/filter_<i>.png

Filter images carry the settings key (hash of the model fingerprint and the ascent settings): a
run with other settings writes other names, so the images a visible manifest points to are never
overwritten; the next run deletes those no manifest references any more (`stale_images`).
"""

from __future__ import annotations

import re
from typing import Iterator

from bulk_explain.workers.layout import CommitLayout
from bulk_explain.workers.storage import is_temp_name, storage_for

_RESERVED = ("_parts", "_commits", "_staging", "sheets")
_IMAGE = re.compile(r"^[A-Za-z0-9._-]+_\d{4,}(-[0-9a-f]{12})?\.png$")


def safe_name(name: str) -> str:
    """A layer name as a file name part: letters, digits and `._-` kept, anything else `_`."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


class FiltersLayout(CommitLayout):
    """Args:
        output: DST (local folder or s3:// prefix); the kind's files live under DST/filters.
    """

    parts_folder = "_parts"

    def __init__(self, output: str):
        storage = storage_for(output)
        super().__init__(storage.join(output, "filters"))
        self.weights_root = storage.join(output, "weights")

    @property
    def manifest(self) -> str:
        return self._join("manifest.parquet")

    def image(self, layer: str, index: int, key: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{12,}", key or ""):
            raise ValueError(f"settings key must be a hex digest, received {key!r}")
        return self._join(safe_name(layer), f"{safe_name(layer)}_{index:04d}-{key[:12]}.png")

    def sheet(self, layer: str) -> str:
        return self._join("sheets", f"{safe_name(layer)}.png")

    def filter_images(self, temp_files: bool = False) -> Iterator[str]:
        """Every filter image under DST/filters (any layer, any settings key).

        Args:
            temp_files: also the temp files (`is_temp_name`) a worker killed mid-write left in the
                layer folders (the commit folders' own are `jobs/units.py`'s).
        """
        for uri in self.storage.list_names(self.output):
            rel = uri[len(self.output):].lstrip("/")
            parts = rel.split("/")
            if len(parts) == 2 and parts[0] not in _RESERVED and (
                    _IMAGE.match(parts[1]) or (temp_files and is_temp_name(parts[1]))):
                yield uri
