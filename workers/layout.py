"""Where every output lives under DST. One place, so the driver (resume, cleanup) and the writer
(outputs, commits) can never disagree. Names derive from shard ids, positions and image ids,
never from source file names, so no input name can steer a write outside DST."""

from __future__ import annotations

import re

from workers.storage import storage_for

_PART = re.compile(r"^shard-(\d{5,})\.(parquet|json)$")


class OutputLayout:
    def __init__(self, output: str):
        self.output = output.rstrip("/") if "://" in output else output
        self.storage = storage_for(output)

    def _join(self, *parts: str) -> str:
        return self.storage.join(self.output, *parts)

    @property
    def job_json(self) -> str:
        return self._join("job.json")

    @property
    def summary_json(self) -> str:
        return self._join("summary.json")

    @property
    def plan(self) -> str:
        return self._join("plan.parquet")

    @property
    def manifest_dir(self) -> str:
        return self._join("manifest")

    @property
    def commits_dir(self) -> str:
        return self._join("_commits")

    def manifest_part(self, shard: int) -> str:
        return self._join("manifest", f"shard-{shard:05d}.parquet")

    def commit_marker(self, shard: int) -> str:
        return self._join("_commits", f"shard-{shard:05d}.json")

    def _stem(self, shard: int, position: int, image_id: str) -> str:
        return f"{shard:05d}/{position:05d}-{image_id[:16]}"

    def overlay(self, shard: int, position: int, image_id: str) -> str:
        return self._join("overlays", *(self._stem(shard, position, image_id) + ".jpg").split("/"))

    def heatmap(self, shard: int, position: int, image_id: str) -> str:
        return self._join("heatmaps", *(self._stem(shard, position, image_id) + ".png").split("/"))

    def activation_grid(self, shard: int, position: int, image_id: str, layer_index: int, layer: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", layer)
        return self._join("grids", *self._stem(shard, position, image_id).split("/"), f"{layer_index:02d}-{safe}.png")

    @staticmethod
    def shard_of(name: str):
        """Shard id of a manifest part or commit marker file name, or None."""
        m = _PART.match(name.rsplit("/", 1)[-1])
        return int(m.group(1)) if m else None
