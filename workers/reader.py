"""The read stage: fetch + decode + resize in a thread pool that runs ahead of compute."""

from __future__ import annotations

import collections
import dataclasses
from concurrent.futures import Executor
from typing import Iterator, List, Optional, Tuple

import numpy as np

# image_io first: it sets OpenCV's pixel cap before cv2 is loaded.
from workers.image_io import (MAX_FILE_BYTES, ImageDecodeError, decode_bgr, display_size, image_id,
                              reduced_decode_factor)

import cv2  # noqa: E402  (after image_io on purpose)
from workers.preprocessing import Preprocessing
from workers.storage import storage_for


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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_one(position, uri, label, size, version, preprocessing: Preprocessing,
             max_side: Optional[int] = None) -> DecodedImage:
    """Never raises: any failure becomes `DecodedImage.error` (one line).

    With `max_side` (outputs at most that long) a JPEG is decoded at 1/2, 1/4 or 1/8 size when
    that still covers the model input and `max_side`; `original_size` then keeps the real size.
    """
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
                         lookahead_batches: int = 2, max_side: Optional[int] = None) -> Iterator[List[DecodedImage]]:
    """Yields the shard's images in order, `batch_size` at a time, decoding up to
    `lookahead_batches` batches ahead so decode overlaps compute. Memory stays bounded by the window."""
    n = len(task.uris)
    window = batch_size * (lookahead_batches + 1)
    pending = collections.deque()
    next_index = 0

    def fill():
        nonlocal next_index
        while next_index < n and len(pending) < window:
            i = next_index
            pending.append(pool.submit(read_one, i, task.uris[i], task.labels[i], task.sizes[i],
                                       task.versions[i], preprocessing, max_side))
            next_index += 1

    fill()
    while pending:
        batch = []
        while pending and len(batch) < batch_size:
            batch.append(pending.popleft().result())
            fill()
        yield batch
