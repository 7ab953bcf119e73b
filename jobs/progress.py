"""Progress on stderr: what was found and what is to do before Ray starts, then images done,
images/s and ETA, per committed shard and, between commits, from the workers' per-batch counters
(at most every `interval` seconds), so that a small run does not sit silent until its only shard
commits.

The rate and ETA are measured from the first finished batch, so Ray's start-up, the model load and
the first trace do not count as processing time.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress lines prefixed `[bulk-explain]`; thread-safe (the driver's poller prints too).

    Args:
        total_shards: shards in the plan.
        skipped: shards already committed (counted as done).
        images_todo: images this run processes.
        enabled: print at all.
        stream: where to print (stderr).
        interval: least seconds between two batch-progress lines.
        items, unit: what the kind computes and commits ("images" in "shards", "filters" in "units").
    """

    def __init__(self, total_shards: int, skipped: int, images_todo: int, enabled: bool = True, stream=None,
                 interval: float = 5.0, items: str = "images", unit: str = "shard"):
        self.items, self.unit = items, unit
        self.rate_unit = "img/s" if items == "images" else f"{items}/s"
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interval = interval
        self._lock = threading.Lock()
        self.reset(total_shards, skipped, images_todo)

    def reset(self, total_shards: int, skipped: int, images_todo: int) -> None:
        """Sets the totals once the plan is known (the object exists earlier for messages)."""
        self.total = total_shards
        self.done = skipped
        self.images_todo = images_todo
        self.images_done = 0  # in committed shards
        self.images_seen = 0  # best estimate: committed or computed, whichever is more
        self.start = time.perf_counter()
        self._base: Optional[tuple] = None  # (time, images) of the first finished batch
        self._last_line = 0.0

    def message(self, text: str) -> None:
        if self.enabled:
            with self._lock:
                print(f"[bulk-explain] {text}", file=self.stream, flush=True)

    # ------------------------------------------------------------------ rate

    def _observe(self, images: int, now: float) -> None:
        self.images_seen = max(self.images_seen, min(images, self.images_todo))
        if self._base is None and self.images_seen > 0:
            self._base = (now, self.images_seen)

    def rate(self, now: Optional[float] = None) -> Optional[float]:
        """Images/s since the first finished batch, or None before there are two observations."""
        now = time.perf_counter() if now is None else now
        if self._base is None:
            return None
        t, n = self._base
        if self.images_seen <= n or now <= t:
            return None
        return (self.images_seen - n) / (now - t)

    def _status(self, now: float) -> str:
        rate = self.rate(now)
        head = f"{self.items} {self.images_seen}/{self.images_todo}"
        if rate:
            return f"{head} | {rate:.1f} {self.rate_unit} | ETA {_hms((self.images_todo - self.images_seen) / rate)}"
        return head if self.images_seen >= self.images_todo else f"{head} | ETA after the next batch"

    # ------------------------------------------------------------------ events

    def batches_done(self, images_computed: int) -> None:
        """Workers' per-batch counters (images computed this run, all workers); prints at most
        every `interval` seconds and only when the count moved."""
        now = time.perf_counter()
        before = self.images_seen
        self._observe(max(images_computed, self.images_done), now)
        if self.images_seen > before and now - self._last_line >= self.interval:
            self._last_line = now
            self.message(f"{self.unit}s {self.done}/{self.total} | {self._status(now)}")

    def shard_done(self, images: int, marker: dict) -> None:
        now = time.perf_counter()
        self.done += 1
        self.images_done += images
        self._observe(self.images_done, now)
        self._last_line = now
        errors = f", {marker['error']} error rows" if marker.get("error") else ""
        self.message(
            f"{self.unit}s {self.done}/{self.total} | {self._status(now)} "
            f"({self.unit} {marker['shard']}: {marker['rows']} rows{errors})"
        )

    def finish(self, result) -> None:
        state = "finished" if result.exit_code == 0 else "finished WITH FAILURES"
        reasons = []
        if result.failed_shards:
            reasons.append(f"{len(result.failed_shards)} shards failed after retries")
        if getattr(result, "error_rate_exceeded", False):
            rows = result.ok + result.errors
            reasons.append(f"error rows {result.errors}/{rows} = {result.errors / max(rows, 1):.1%} "
                           f"> --max-error-rate {getattr(result, 'max_error_rate', 1.0):g}")
        why = f" ({'; '.join(reasons)})" if reasons else ""
        self.message(
            f"{state}{why}: {result.ok} ok, {result.errors} error rows, {result.shards} shards "
            f"({result.skipped_shards} skipped, {len(result.failed_shards)} failed) in {result.seconds:.1f}s "
            f"({result.images_per_second:.2f} img/s) -> {result.output}"
        )
