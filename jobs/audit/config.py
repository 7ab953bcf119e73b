"""The audit's configuration: one frozen dataclass, gates parsed from `CHECK<=X` / `CHECK>=X`."""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Tuple

from bulk_explain.jobs.validation import ConfigError

_GATE = re.compile(r"^\s*([a-z_]+)\s*(<=|>=)\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")

# Defaults with the reason for each; every one can be changed on AuditConfig.
LOW_CONFIDENCE_BELOW = 0.6  # max class probability under this = "unsure" (binary: within 0.4..0.6)
BORDER = 0.10  # a CAM peak within 10 % of an edge lies "in the border"
CLUSTER_SAMPLE_PER_CLASS = 1000  # spectral clustering is O(n^2) memory, O(n^3) time in the sample
MAX_CLUSTERS = 8  # the eigengap is searched among k = 2..MAX_CLUSTERS (k = 1 when no gap stands out)
MIN_CLUSTER_IMAGES = 20  # classes with fewer non-empty maps are not clustered
# The most frequent predicted classes that are clustered (each costs ~1 s and a report section;
# an ImageNet model predicts hundreds of classes).
MAX_CLUSTER_CLASSES = 20
THUMBNAILS_PER_CHECK = 12  # worst-ranked images shown per check (and per cluster: 8)
THUMBNAIL_SIDE = 128  # px, longest side of a report thumbnail
# cleanlab find_label_issues(filter_by=...): why the default is not cleanlab's, see checks/labels.py
LABEL_FILTER = "predicted_neq_given"
LABEL_FILTERS = ("predicted_neq_given", "prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                 "low_self_confidence", "low_normalized_margin")


@dataclasses.dataclass(frozen=True)
class Gate:
    """`check <= limit` (op "<=") or `check >= limit` (op ">=")."""

    check: str
    op: str
    limit: float

    def passes(self, value: Optional[float]) -> bool:
        if value is None:  # the check had nothing to measure (e.g. drift without a baseline)
            return True
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def __str__(self) -> str:
        return f"{self.check}{self.op}{self.limit:g}"


def parse_gate(text: str) -> Gate:
    """Parses `CHECK<=X` or `CHECK>=X`.

    Raises:
        ConfigError: not of that form, or an unknown check name.
    """
    from bulk_explain.jobs.audit.checks import check_names

    m = _GATE.match(str(text))
    if not m:
        raise ConfigError(f"--gate must look like CHECK<=X or CHECK>=X (e.g. label_issues<=0.02), received {text!r}")
    name, op, limit = m.group(1), m.group(2), float(m.group(3))
    if name not in check_names():
        raise ConfigError(f"--gate names unknown check {name!r}; expected one of {', '.join(check_names())}")
    return Gate(name, op, limit)


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """What an audit reads and how strict it is.

    Attributes:
        output: the explain job's output (local folder or s3:// prefix); the audit is written under
            `output/audits/<UTC time>/`.
        baseline: "previous" (the latest finished audit in `output/audits/`), an audit id (its
            folder name) or "none" (no drift check).
        gates: `Gate`s (or their `CHECK<=X` strings); a failed gate makes the exit code 3.
        low_confidence_below: max class probability under which an image counts as unsure.
        border: width of the border, as a fraction of the side, for the cam_border check.
        cluster_sample_per_class: most images per predicted class that spectral clustering sees;
            the rest are assigned to the nearest cluster centre.
        max_clusters: largest k the eigengap may choose.
        max_cluster_classes: how many predicted classes (the most frequent) are clustered.
        thumbnails_per_check: worst-ranked images with a thumbnail in the report per check.
        thumbnail_side: thumbnail size in px (longest side).
        label_filter: cleanlab's `filter_by` for label issues (see jobs/audit/checks/labels.py).
        s3_endpoint_url: S3-compatible endpoint (MinIO, Ceph, moto); credentials never go here.
        audit_id: the folder name; default the UTC time at start (tests may fix it).
    """

    output: str
    baseline: str = "previous"
    gates: Tuple[Gate, ...] = ()
    low_confidence_below: float = LOW_CONFIDENCE_BELOW
    border: float = BORDER
    cluster_sample_per_class: int = CLUSTER_SAMPLE_PER_CLASS
    max_clusters: int = MAX_CLUSTERS
    max_cluster_classes: int = MAX_CLUSTER_CLASSES
    thumbnails_per_check: int = THUMBNAILS_PER_CHECK
    thumbnail_side: int = THUMBNAIL_SIDE
    label_filter: str = LABEL_FILTER
    s3_endpoint_url: Optional[str] = None
    audit_id: Optional[str] = None

    def validated(self) -> "AuditConfig":
        """Returns a normalized copy (absolute output path, parsed gates).

        Raises:
            ConfigError: with a one-line reason.
        """
        import os

        from bulk_explain.workers.storage import StorageError, normalize_uri

        if self.s3_endpoint_url:
            os.environ["BULK_EXPLAIN_S3_ENDPOINT_URL"] = self.s3_endpoint_url
        try:
            output = normalize_uri(self.output)
        except StorageError as exc:
            raise ConfigError(str(exc)) from None
        gates = tuple(g if isinstance(g, Gate) else parse_gate(g) for g in self.gates)
        if not (0.0 < self.low_confidence_below <= 1.0):
            raise ConfigError(f"low confidence threshold must be within (0, 1], received {self.low_confidence_below}")
        if not (0.0 < self.border < 0.5):
            raise ConfigError(f"border must be within (0, 0.5), received {self.border}")
        for name, value, low in (("cluster sample per class", self.cluster_sample_per_class, MIN_CLUSTER_IMAGES),
                                 ("max clusters", self.max_clusters, 1),
                                 ("max cluster classes", self.max_cluster_classes, 1),
                                 ("thumbnails per check", self.thumbnails_per_check, 0),
                                 ("thumbnail side", self.thumbnail_side, 16)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, received {value!r}")
        if self.label_filter not in LABEL_FILTERS:
            raise ConfigError(f"label filter must be one of {', '.join(LABEL_FILTERS)}, received {self.label_filter!r}")
        if self.audit_id is not None and not re.match(r"^[0-9A-Za-z.-]+$", self.audit_id):
            raise ConfigError(f"audit id may hold only letters, digits, '.' and '-', received {self.audit_id!r}")
        if not re.match(r"^[0-9A-Za-z.-]+$", self.baseline):
            raise ConfigError(f"--baseline must be previous, none or an audit id, received {self.baseline!r}")
        return dataclasses.replace(self, output=output, gates=gates)
