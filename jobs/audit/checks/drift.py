"""drift: the images added or changed since the baseline audit against the baseline's population.

The statistical test per column is chosen as Evidently's default does (computed here with scipy,
not by depending on Evidently): reference of at most 1000 rows -> two-sample Kolmogorov-Smirnov for
numeric columns and chi-square for categorical ones, drift when p <= 0.05; larger references ->
normed Wasserstein distance (divided by the reference's standard deviation) for numeric and
Jensen-Shannon distance for categorical, drift when the distance >= 0.1. The dataset drifts when at
least half of the columns do. Columns: predicted class (categorical), confidence (the predicted
class's probability) and each summarized layer's activation mean (numeric).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from bulk_explain.jobs.audit.checks import AuditContext, Check, Finding, register_check

SMALL_REFERENCE = 1000
P_VALUE = 0.05
DISTANCE = 0.1
DATASET_SHARE = 0.5
MIN_CURRENT = 5  # fewer new images than this: nothing to test


def drift_features(data, rows: np.ndarray) -> Dict[str, Tuple[str, np.ndarray]]:
    """{column: (kind, values)} of the given manifest rows."""
    out = {"predicted_class": ("categorical", data.pred[rows].astype(np.int64)),
           "confidence": ("numeric", data.pred_score[rows].astype(np.float64))}
    for j, layer in enumerate(data.act_layers):
        out[f"activation_mean:{layer}"] = ("numeric", data.act_means[rows, j].astype(np.float64))
    return out


def column_drift(kind: str, reference: np.ndarray, current: np.ndarray) -> dict:
    """One column's test, statistic and verdict, as Evidently's defaults choose them."""
    from scipy import stats
    from scipy.spatial import distance

    if kind == "numeric":
        reference, current = reference[np.isfinite(reference)], current[np.isfinite(current)]
    if not len(reference) or not len(current):
        return {"test": "none", "statistic": None, "drifted": False}
    small = len(reference) <= SMALL_REFERENCE
    if kind == "numeric" and small:
        p = float(stats.ks_2samp(reference, current).pvalue)
        return {"test": "K-S p_value", "statistic": p, "drifted": p <= P_VALUE}
    if kind == "numeric":
        norm = max(float(np.std(reference)), 0.001)
        d = float(stats.wasserstein_distance(reference, current) / norm)
        return {"test": "Wasserstein distance (normed)", "statistic": d, "drifted": d >= DISTANCE}
    ref_keys, ref_n = np.unique(reference, return_counts=True)
    cur_keys, cur_n = np.unique(current, return_counts=True)
    keys = np.union1d(ref_keys, cur_keys)
    ref_counts, cur_counts = np.zeros(len(keys)), np.zeros(len(keys))
    ref_counts[np.searchsorted(keys, ref_keys)] = ref_n
    cur_counts[np.searchsorted(keys, cur_keys)] = cur_n
    if small:
        expected = ref_counts * (len(current) / len(reference))
        if np.any((expected == 0) & (cur_counts > 0)):
            return {"test": "chi-square p_value", "statistic": 0.0, "drifted": True}  # a class the reference never had
        keep = expected > 0
        if keep.sum() < 2:
            return {"test": "chi-square p_value", "statistic": 1.0, "drifted": False}
        p = float(stats.chisquare(cur_counts[keep], expected[keep]).pvalue)
        return {"test": "chi-square p_value", "statistic": p, "drifted": p <= P_VALUE}
    # Evidently replaces empty bins by a tiny share before the distance.
    ref_p = np.where(ref_counts == 0, 1e-4, ref_counts / ref_counts.sum())
    cur_p = np.where(cur_counts == 0, 1e-4, cur_counts / cur_counts.sum())
    d = float(distance.jensenshannon(ref_p, cur_p))
    return {"test": "Jensen-Shannon distance", "statistic": d, "drifted": d >= DISTANCE}


@register_check
class Drift(Check):
    name = "drift"
    title = "Drift since the baseline audit"
    default_threshold = DATASET_SHARE - 1e-9  # warn when the dataset drifts (>= half of the columns)
    description = ("Share of columns (predicted class, confidence, each layer's activation mean) whose "
                   "distribution in the images added or changed since the baseline audit differs from the "
                   "baseline's population; the dataset drifts at >= 50 %.")

    def run(self, ctx: AuditContext) -> Finding:
        base, data = ctx.baseline, ctx.data
        if base is None:
            return Finding(None, "skipped: no baseline audit (this audit's population is the next one's reference)")
        seen = np.isin(data.keys, base.keys)
        new = np.flatnonzero(data.ok & ~seen)
        added = int((~seen).sum())
        if len(new) < MIN_CURRENT:
            return Finding(0.0 if len(new) == 0 else None,
                           f"{len(new)} readable images added or changed since audit {base.audit_id}: "
                           f"{'nothing to compare' if len(new) == 0 else 'too few to test'}",
                           data={"baseline": base.audit_id, "current_rows": len(new), "new_or_changed": added})
        current = drift_features(data, new)
        columns = {}
        for name, (kind, values) in current.items():
            if name not in base.features:
                continue
            columns[name] = dict(kind=kind, **column_drift(kind, base.features[name], values))
        if not columns:
            return Finding(None, "skipped: the baseline shares no column with this manifest")
        drifted = [c for c, r in columns.items() if r["drifted"]]
        value = len(drifted) / len(columns)
        verdict = "the dataset drifted" if value >= DATASET_SHARE else "no dataset drift"
        return Finding(
            value, f"{len(drifted)} of {len(columns)} columns drifted ({verdict}) in {len(new)} images added or "
                   f"changed since audit {base.audit_id} vs its {base.rows} images"
                   + (f": {', '.join(drifted[:4])}{' ...' if len(drifted) > 4 else ''}" if drifted else ""),
            data={"baseline": base.audit_id, "reference_rows": int(base.rows), "current_rows": int(len(new)),
                  "columns": columns},
        )
