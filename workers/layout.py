"""Where every output lives under DST. One place, so the driver (resume, cleanup) and the writer
(outputs, commits) can never disagree. Names derive from shard ids, positions and image ids,
never from source file names, so no input name can steer a write outside DST."""

from __future__ import annotations

import re

from bulk_explain.workers.storage import storage_for

_PART = re.compile(r"^shard-(\d{5,})\.(parquet|json)$")
_IMAGE_ID = re.compile(r"^[0-9a-f]{16,64}$")


def _check_ids(shard: int, position: int = 0, image_id: str = "0" * 16) -> None:
    """Output names are built only from these, so they must be what they claim: non-negative
    integers and a hex digest (never a source name, which could hold "/" or "..")."""
    for what, value in (("shard", shard), ("position", position)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{what} must be a non-negative int, received {value!r}")
    if not isinstance(image_id, str) or not _IMAGE_ID.match(image_id):
        raise ValueError(f"image id must be a lowercase hex digest, received {image_id!r}")


def _method_suffix(method: str) -> str:
    """`-gradcampp` for "gradcam++": registry names mapped to [a-z0-9] so no name can add a path
    separator or collide with the first method's file."""
    if not method:
        return ""
    safe = re.sub(r"[^a-z0-9]", "", method.lower().replace("+", "p"))
    if not safe:
        raise ValueError(f"CAM method name must contain letters or digits, received {method!r}")
    return "-" + safe


class CommitLayout:
    """The files of the commit protocol under `root` (`bulk_explain.workers.commit`), the same for
    every job kind: parts in `parts_folder/`, markers in `_commits/`, staged parts in `_staging/`,
    named `shard-NNNNN.*` by unit id; plus the kind's `job.json` and `summary.json`.

    Args:
        root: the kind's output folder or s3:// prefix.
    """

    parts_folder = "manifest"

    def __init__(self, root: str):
        self.output = root.rstrip("/") if "://" in root else root
        self.storage = storage_for(root)

    def _join(self, *parts: str) -> str:
        return self.storage.join(self.output, *parts)

    @property
    def job_json(self) -> str:
        return self._join("job.json")

    @property
    def summary_json(self) -> str:
        return self._join("summary.json")

    @property
    def manifest_dir(self) -> str:
        """Where published parts live (explain: the visible `manifest/`)."""
        return self._join(self.parts_folder)

    @property
    def commits_dir(self) -> str:
        return self._join("_commits")

    @property
    def staging_dir(self) -> str:
        return self._join("_staging")

    def manifest_part(self, shard: int) -> str:
        """The published part: present only for committed units (see ARCHITECTURE.md, Output protocol)."""
        _check_ids(shard)
        return self._join(self.parts_folder, f"shard-{shard:05d}.parquet")

    def staged_part(self, shard: int) -> str:
        """Where a worker writes the part before it commits; no reader looks there."""
        _check_ids(shard)
        return self._join("_staging", f"shard-{shard:05d}.parquet")

    def commit_marker(self, shard: int) -> str:
        _check_ids(shard)
        return self._join("_commits", f"shard-{shard:05d}.json")

    def shard_image_dirs(self, shard: int):
        """Folders holding only this unit's files, emptied when the unit leaves the plan."""
        return []

    @staticmethod
    def shard_of(name: str):
        """Unit id of a part or commit marker file name, or None."""
        m = _PART.match(name.rsplit("/", 1)[-1])
        return int(m.group(1)) if m else None


class OutputLayout(CommitLayout):
    """The explain kind's output: the commit protocol's files at DST's top, `plan.parquet`, and the
    per-image outputs in per-shard folders."""

    @property
    def plan(self) -> str:
        return self._join("plan.parquet")

    def shard_image_dirs(self, shard: int):
        """Folders holding the shard's per-image outputs (overlays, heatmaps, channel grids)."""
        _check_ids(shard)
        return [self._join(kind, f"{shard:05d}") for kind in ("overlays", "heatmaps", "grids")]

    def _stem(self, shard: int, position: int, image_id: str) -> str:
        _check_ids(shard, position, image_id)
        return f"{shard:05d}/{position:05d}-{image_id[:16]}"

    def overlay(self, shard: int, position: int, image_id: str, method: str = "") -> str:
        """`method`: "" for the run's first CAM method (today's names); others get a suffix."""
        stem = self._stem(shard, position, image_id) + _method_suffix(method)
        return self._join("overlays", *(stem + ".jpg").split("/"))

    def heatmap(self, shard: int, position: int, image_id: str, method: str = "") -> str:
        stem = self._stem(shard, position, image_id) + _method_suffix(method)
        return self._join("heatmaps", *(stem + ".png").split("/"))

    def activation_grid(self, shard: int, position: int, image_id: str, layer_index: int, layer: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", layer)
        return self._join("grids", *self._stem(shard, position, image_id).split("/"), f"{layer_index:02d}-{safe}.png")
