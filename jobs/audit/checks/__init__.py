"""Audit checks: one small class per check behind a registry, like the CAM methods.

A check reads the `AuditContext` (the manifest as numpy columns, the baseline, the config) and
returns a `Finding`: its value (a share in [0, 1] where one fits), the images it flags ranked worst
first, and what the report shows. Status and gates are applied by the driver, the same for all.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import numpy as np


@dataclasses.dataclass
class Finding:
    """What one check found.

    Attributes:
        value: the measured value (None when there was nothing to measure; such a check passes).
        details: one line for people (findings.parquet and the report).
        rows: flagged manifest row numbers, worst first; scores: one per row (meaning per check).
        score_name: what `scores` measure, for the report.
        data: JSON-able numbers for summary.json and the report's tables.
        note: a caveat the report prints under the check.
        extra: report-only objects (arrays, per-cluster images); never serialized.
    """

    value: Optional[float]
    details: str
    rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    score_name: str = "score"
    data: Dict[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class AuditContext:
    """Inputs of every check.

    Attributes:
        data: `bulk_explain.jobs.audit.data.ManifestData` of the audited output.
        reader: the `ManifestReader` (for the small CAMs, read on demand).
        config: the validated `AuditConfig`.
        baseline: the baseline audit's population (`bulk_explain.jobs.audit.driver.Baseline`) or None.
        results: findings of the checks that ran before (registry order).
    """

    data: Any
    reader: Any
    config: Any
    baseline: Any = None
    results: Dict[str, Finding] = dataclasses.field(default_factory=dict)


class Check:
    """Base class. Subclasses set `name`, `default_threshold` (the value above which the check
    warns when no gate is given) and `title`, and implement `run`."""

    name = ""
    title = ""
    default_threshold = 0.0
    description = ""

    def run(self, ctx: AuditContext) -> Finding:
        raise NotImplementedError

    def flag(self, flagged: np.ndarray, population: np.ndarray, scores: Optional[np.ndarray] = None,
             worst_first: Optional[Callable] = np.argsort) -> Tuple[float, np.ndarray, np.ndarray]:
        """The flagged share of the measured images and the flagged rows, worst first.

        Args:
            flagged: the images the check flags (a subset of `population`): a boolean mask over
                the manifest rows, or their row numbers (ties keep this order where `worst_first`
                is stable).
            population: boolean mask over the manifest rows: the images the check measured (at
                least one).
            scores: one score per manifest row (only the flagged rows' are read); None scores every
                flagged row 1.
            worst_first: returns the order of the flagged rows' scores, worst first (default:
                ascending); None keeps the rows in manifest order.

        Returns:
            `(value, rows, scores)`: the share of `population` that is flagged, the flagged row
            numbers (int64) and their scores (float32), worst first.
        """
        flagged = np.asarray(flagged)
        rows = np.flatnonzero(flagged) if flagged.dtype == bool else flagged.astype(np.int64)
        scores = np.ones(len(rows), np.float32) if scores is None else np.asarray(scores)[rows]
        value = float(len(rows) / np.count_nonzero(population))
        return (value,) + ranked(rows, scores, worst_first or (lambda s: np.arange(len(s))))

    def count_by_class(self, codes: np.ndarray, names: Sequence[str], top: Optional[int] = None) -> Dict[str, int]:
        """Images per class, most frequent first.

        Args:
            codes: one class index per image (into `names`); negative codes (no class) are not
                counted.
            names: the class names, by index.
            top: keep only the `top` most frequent classes (None: all).

        Returns:
            `{class name: images}` for the classes with at least one image, most frequent first,
            ties in class order.
        """
        codes = np.asarray(codes)
        counts = np.bincount(codes[codes >= 0], minlength=len(names))
        return {names[c]: int(counts[c]) for c in np.argsort(-counts, kind="stable")[:top] if counts[c]}


_CHECKS: Dict[str, Type[Check]] = {}


def register_check(cls: Type[Check]) -> Type[Check]:
    """Class decorator: makes the check run in every audit (order: ORDER, then registration)."""
    _CHECKS[cls.name] = cls
    return cls


def _load() -> None:
    # Importing the modules registers their checks.
    from bulk_explain.jobs.audit.checks import (  # noqa: F401
        labels, confidence, balance, drift, cam, strategy, empty)


# Report and findings order (the audit contract's order); checks registered elsewhere come after.
ORDER = ("label_issues", "low_confidence", "errors", "class_balance", "drift", "cam_border",
         "strategy_clusters", "empty_maps")


def check_names() -> List[str]:
    _load()
    return sorted(_CHECKS, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


def all_checks() -> List[Check]:
    return [_CHECKS[name]() for name in check_names()]


def ranked(rows: np.ndarray, scores: np.ndarray, worst_first: Callable = np.argsort) -> tuple:
    """Rows and scores sorted worst first (`worst_first` returns the order of the scores)."""
    rows, scores = np.asarray(rows, np.int64), np.asarray(scores, np.float32)
    order = worst_first(scores) if len(scores) else np.zeros(0, np.int64)
    return rows[order], scores[order]
