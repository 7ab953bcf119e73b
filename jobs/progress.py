"""Progress on stderr: shards done, images/s and ETA, one line per committed shard."""

from __future__ import annotations

import sys
import time


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total_shards: int, skipped: int, images_todo: int, enabled: bool = True, stream=None):
        self.total = total_shards
        self.done = skipped
        self.images_todo = images_todo
        self.images_done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()

    def message(self, text: str) -> None:
        if self.enabled:
            print(f"[bulk-explain] {text}", file=self.stream, flush=True)

    def shard_done(self, images: int, marker: dict) -> None:
        self.done += 1
        self.images_done += images
        elapsed = time.perf_counter() - self.start
        rate = self.images_done / elapsed if elapsed > 0 else 0.0
        eta = (self.images_todo - self.images_done) / rate if rate > 0 else 0.0
        errors = f", {marker['error']} error rows" if marker.get("error") else ""
        self.message(
            f"shards {self.done}/{self.total} | images {self.images_done}/{self.images_todo} "
            f"| {rate:.1f} img/s | ETA {_hms(eta)} (shard {marker['shard']}: {marker['rows']} rows{errors})"
        )

    def finish(self, result) -> None:
        state = "finished" if result.exit_code == 0 else "finished WITH FAILURES"
        self.message(
            f"{state}: {result.ok} ok, {result.errors} error rows, {result.shards} shards "
            f"({result.skipped_shards} skipped, {len(result.failed_shards)} failed) in {result.seconds:.1f}s "
            f"({result.images_per_second:.2f} img/s) -> {result.output}"
        )
