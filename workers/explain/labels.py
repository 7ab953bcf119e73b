"""Folder labels -> model classes: the one place that decides which class a folder name means.

The driver uses it to warn about (or, with `--strict-labels`, refuse) folders that match no class
before any worker starts; the worker uses it for `--cam-class label` and for the manifest's
`label_index` and `correct` columns. Both must agree, so neither has its own copy.

Matching is case-insensitive and ignores spaces, dashes and underscores (`Golden Retriever/`,
`golden-retriever/` and `golden_retriever/` all mean ImageNet's `golden_retriever`); a trailing
`s` or `es` is dropped when the folder name itself is no class (`cats/` -> `cat`,
`boxes/` -> `box`).
"""

from __future__ import annotations

import collections
import re
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

_SEPARATORS = re.compile(r"[\s_\-]+")


def _key(name: str) -> str:
    return _SEPARATORS.sub("_", name.strip().lower()).strip("_")


class LabelMatcher:
    """Maps folder labels to class indices of one model.

    Args:
        class_names: the model's class names, index -> name.
    """

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        self._lookup: Dict[str, int] = {}
        for i, name in enumerate(self.class_names):
            self._lookup.setdefault(_key(str(name)), i)  # first wins (ImageNet repeats a few names)
        self._cache: Dict[str, Optional[int]] = {}

    def index(self, label: Optional[str]) -> Optional[int]:
        """The class index a folder label names, or None (no label, or no class matches)."""
        if label is None:
            return None
        if label not in self._cache:
            key = _key(label)
            found = self._lookup.get(key)
            for suffix in ("s", "es"):
                if found is None and key.endswith(suffix) and len(key) > len(suffix):
                    found = self._lookup.get(key[: -len(suffix)])
            self._cache[label] = found
        return self._cache[label]

    def unmatched(self, label_counts: Iterable) -> Dict[str, int]:
        """`{label: images}` for the labels that match no class, from (label, count) pairs."""
        out: Dict[str, int] = collections.OrderedDict()
        for label, count in label_counts:
            if label is not None and self.index(label) is None:
                out[label] = out.get(label, 0) + int(count)
        return out


def resolve_cam_classes(labels: List[Optional[str]], cam_class, class_names: Sequence[str],
                        matcher: Optional[LabelMatcher] = None) -> np.ndarray:
    """Per image class to explain: -1 = the predicted class; a fixed index; or the folder label's
    class (-1 where the label matches no class: the driver has warned about those folders)."""
    n = len(labels)
    if cam_class == "pred":
        return np.full(n, -1, np.int32)
    if isinstance(cam_class, int):
        return np.full(n, cam_class, np.int32)
    matcher = matcher or LabelMatcher(class_names)
    return np.array([-1 if (i := matcher.index(label)) is None else i for label in labels], np.int32)


def describe_unmatched(unmatched: Dict[str, int], limit: int = 5) -> str:
    """`birds/ (12 images), fish/ (3 images)` for the first `limit` folders, biggest first."""
    items = sorted(unmatched.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{label}/ ({n} image{'s' if n != 1 else ''})" for label, n in items[:limit])
    if len(items) > limit:
        text += f" and {len(items) - limit} more folders"
    return text
