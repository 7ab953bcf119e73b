"""The read stage: fetch + decode + resize in a thread pool that runs ahead of compute.

Memory: a worker holds the decoded, full-size images of the batches read ahead, being computed
and waiting to be written. Counting images is not enough (256 24-MP photos are 18 GiB), so with a
per-actor `ByteBudget` each image takes its decoded size before decoding (from the header) and
gives it back when its pixels are freed; reads ahead wait while the budget is spent.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import threading
import weakref
from concurrent.futures import Executor
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

# image_io first: it sets OpenCV's pixel cap before cv2 is loaded.
from bulk_explain.workers.image_io import (MAX_FILE_BYTES, ImageDecodeError, decode_bgr, display_size, header_size,
                              image_id, reduced_decode_factor)

import cv2  # noqa: E402  (after image_io on purpose)
from bulk_explain.workers.preprocessing import Preprocessing
from bulk_explain.workers.storage import storage_for


@dataclasses.dataclass
class DecodedImage:
    """One input after the read stage. `error` set means it becomes an error row."""

    position: int
    uri: str
    label: Optional[str]
    size: int
    version: str
    image_id: Optional[str] = None
    bgr: Optional[np.ndarray] = None  # original size, display orientation, OpenCV channel order
    model_input: Optional[np.ndarray] = None  # RGB, resized to the model input size
    error: Optional[str] = None
    # (width, height) of the original in display orientation when `bgr` was decoded reduced
    original_size: Optional[Tuple[int, int]] = None

    @property
    def ok(self) -> bool:
        return self.error is None


class ByteBudget:
    """Bytes of decoded images one worker holds at once, shared by the shards it runs.

    Reads ahead wait while the budget is spent; the images of the batch the compute step is
    waiting for never wait (`_Admission.needed`), so the bound is the budget plus, at worst, one
    batch per shard in flight (batch size x largest image), and progress never stops.

    Args:
        limit: bytes (`ExplainConfig.max_decoded_bytes`, 2 GiB by default).
    """

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.used = 0
        self.peak = 0
        self.cond = threading.Condition()

    def acquire(self, nbytes: int, urgent: Callable[[], bool] = lambda: False) -> None:
        """Takes `nbytes`, waiting while they do not fit unless `urgent()` or nothing is held."""
        with self.cond:
            rounds = 0
            while self.used and self.used + nbytes > self.limit and not urgent():
                if not self.cond.wait(timeout=1.0):
                    rounds += 1
                    if rounds % 5 == 0:
                        gc.collect()  # pixels kept alive only by a reference cycle
            self.used += nbytes
            self.peak = max(self.peak, self.used)

    def release(self, nbytes: int) -> None:
        with self.cond:
            self.used -= nbytes
            self.cond.notify_all()

    def hold_until_freed(self, array: np.ndarray, nbytes: int) -> None:
        """Gives `nbytes` back when `array` (and every view of it) is garbage."""
        weakref.finalize(array, self.release, nbytes)


class _Admission:
    """One shard's reads take budget in plan order, so a later image never holds the bytes that
    the image the consumer waits for needs; `needed` is the end of the batch being assembled."""

    def __init__(self, budget: ByteBudget):
        self.budget = budget
        self.turn = 0
        self.needed = 0
        self.cond = threading.Condition()

    def need_until(self, position: int) -> None:
        self.needed = position
        with self.budget.cond:
            self.budget.cond.notify_all()

    def admit(self, position: int, nbytes: int) -> None:
        with self.cond:
            while self.turn != position:
                self.cond.wait()
        try:
            if nbytes:
                self.budget.acquire(nbytes, urgent=lambda: position < self.needed)
        finally:
            with self.cond:
                self.turn = position + 1
                self.cond.notify_all()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_one(position, uri, label, size, version, preprocessing: Preprocessing,
             admission: Optional[_Admission] = None, max_side: Optional[int] = None) -> DecodedImage:
    """Never raises: any failure becomes `DecodedImage.error` (one line).

    With `admission`, the image takes its decoded size from the worker's byte budget (in plan
    order) before decoding and returns it when its pixels are freed.

    With `max_side` (outputs at most that long) a JPEG is decoded at 1/2, 1/4 or 1/8 size when
    that still covers the model input and `max_side`; `original_size` then keeps the real size.
    """
    taken = 0
    admitted = admission is None
    try:
        def admit(data: Optional[bytes]) -> None:
            nonlocal taken, admitted
            size_wh = header_size(data) if data else None
            taken = size_wh[0] * size_wh[1] * 3 if size_wh else 0
            admitted = True
            admission.admit(position, taken)

        item = _read_one(position, uri, label, size, version, preprocessing, None if admission is None else admit,
                         max_side)
    finally:
        if not admitted:
            admission.admit(position, 0)  # a failed read still passes its turn on
    if admission is not None:
        budget = admission.budget
        if item.bgr is not None:
            actual = item.bgr.nbytes + (item.model_input.nbytes if item.model_input is not None else 0)
            if actual > taken:  # header unknown or smaller than decoded: count it, never wait here
                budget.acquire(actual - taken, urgent=lambda: True)
            elif taken > actual:
                budget.release(taken - actual)
            budget.hold_until_freed(item.bgr, actual)
        elif taken:
            budget.release(taken)
    return item


def _read_one(position, uri, label, size, version, preprocessing: Preprocessing, admit=None,
              max_side: Optional[int] = None) -> DecodedImage:
    item = DecodedImage(position, uri, label, size, version)
    if size is not None and size > MAX_FILE_BYTES:
        item.error = f"file is {size:,} bytes, over the {MAX_FILE_BYTES:,} byte cap; not read"
        return item
    try:
        data = storage_for(uri).read_bytes(uri)
    except FileNotFoundError:
        item.error = "file disappeared between listing and reading"
        return item
    except IsADirectoryError:
        item.error = "not a file (a folder now has this name)"
        return item
    except PermissionError as exc:
        item.error = f"cannot read: permission denied ({type(exc).__name__})"
        return item
    except Exception as exc:
        item.error = f"cannot read: {_one_line(exc)}"
        return item
    if len(data) > MAX_FILE_BYTES:
        item.error = f"file is {len(data):,} bytes, over the {MAX_FILE_BYTES:,} byte cap"
        return item
    if admit is not None:
        admit(data)
    item.image_id = image_id(data)
    try:
        factor = reduced_decode_factor(data, max(preprocessing.size), max_side)
        item.bgr = decode_bgr(data, factor)
        if factor > 1:
            item.original_size = display_size(data)
        # Resize first, then swap channels on the small image: the full-size image stays BGR for
        # the overlay, so no full-size colour conversion happens at all.
        item.model_input = cv2.cvtColor(preprocessing.resize(item.bgr), cv2.COLOR_BGR2RGB)
    except ImageDecodeError as exc:
        item.error = str(exc)
    except Exception as exc:
        item.error = f"cannot decode: {_one_line(exc)}"
    return item


def iter_decoded_batches(task, preprocessing: Preprocessing, batch_size: int, pool: Executor,
                         lookahead_batches: int = 2, budget: Optional[ByteBudget] = None,
                         max_side: Optional[int] = None) -> Iterator[List[DecodedImage]]:
    """Yields the shard's images in order, `batch_size` at a time, decoding up to
    `lookahead_batches` batches ahead so decode overlaps compute. Memory stays bounded by the window
    and, with `budget`, by the decoded bytes the worker holds."""
    n = len(task.uris)
    admission = _Admission(budget) if budget is not None else None
    window = batch_size * (lookahead_batches + 1)
    pending = collections.deque()
    next_index = 0

    def fill():
        nonlocal next_index
        while next_index < n and len(pending) < window:
            i = next_index
            pending.append(pool.submit(read_one, i, task.uris[i], task.labels[i], task.sizes[i],
                                       task.versions[i], preprocessing, admission, max_side))
            next_index += 1

    fill()
    done = 0
    while pending:
        if admission is not None:
            admission.need_until(min(n, done + batch_size))
        batch = []
        while pending and len(batch) < batch_size:
            batch.append(pending.popleft().result())
            fill()
        done += len(batch)
        yield batch
