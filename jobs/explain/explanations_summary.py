"""What job.json and summary.json say about the run's CAM methods and faithfulness metrics.

`describe_explanations` records every definition (methods, baselines, steps, score) in job.json;
`summarize_explanations` reads the committed manifest parts at the end of a run and gives, per
method, the mean and 95 % interval of each metric, overall and per explained class. Per class
matters: a featureless (blurred) image is often classified as one class with high confidence, and
for that class deletion and insertion barely move whatever the map, which an overall mean would
average away.
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from typing import Dict, List, Optional

import numpy as np

from bulk_explain.workers.explain.cam_methods import cam_method, parse_methods
from bulk_explain.workers.explain.faithfulness import ROAD_FRACTIONS, FaithfulnessEvaluator, mean_interval
from bulk_explain.workers.layout import OutputLayout
from bulk_explain.workers.storage import is_temp_name

# Per-class detail for at most this many classes (the most frequent explained classes), so an
# ImageNet-sized label set does not turn summary.json into megabytes.
MAX_CLASSES = 50

# Higher = more faithful for each summarized quantity.
FAITHFUL_WHEN_HIGHER = {
    "deletion_auc": False,
    "insertion_auc": True,
    "insertion_minus_deletion": True,
    "road_morf_mean": False,
    "road_lerf_mean": True,
    "road_lerf_minus_morf": True,
}


def describe_explanations(config) -> dict:
    """The definitions job.json records for the run's methods and metrics."""
    names = parse_methods(config.cam_method)
    evaluator = FaithfulnessEvaluator(config.metrics, config.metric_steps) if config.metrics else None
    return {
        "methods": [cam_method(n, max_channels=config.scorecam_channels).describe() for n in names],
        "first_method_columns": "gradcam_index, gradcam_overlay_uri, gradcam_heatmap_uri, cam_peak_x, cam_peak_y",
        "files": "the first method keeps heatmaps/S/P-ID.png and overlays/S/P-ID.jpg; each further "
                 "method adds -<method> (gradcam++ -> gradcampp) before the extension",
        "metrics": evaluator.describe() if evaluator else None,
    }


def _read_rows(layout: OutputLayout) -> List[dict]:
    import pyarrow.parquet as pq

    storage = layout.storage
    rows: List[dict] = []
    for uri in sorted(storage.list_names(layout.manifest_dir)):
        if is_temp_name(uri) or not uri.endswith(".parquet"):
            continue
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)),
                              columns=["status", "gradcam_index", "pred_index", "pred_label", "explanations"])
        rows.extend(table.to_pylist())
    return rows


def _quantities(entry: dict) -> Dict[str, Optional[float]]:
    d, i = entry.get("deletion_auc"), entry.get("insertion_auc")
    morf, lerf = entry.get("road_morf"), entry.get("road_lerf")
    q = {"deletion_auc": d, "insertion_auc": i,
         "insertion_minus_deletion": i - d if d is not None and i is not None else None}
    if morf and lerf:
        q.update(road_morf_mean=float(np.mean(morf)), road_lerf_mean=float(np.mean(lerf)),
                 road_lerf_minus_morf=float(np.mean(lerf) - np.mean(morf)))
    return {k: v for k, v in q.items() if v is not None}


def _summarize(entries_by_method: Dict[str, List[dict]]) -> Dict[str, dict]:
    out = {}
    for method, entries in entries_by_method.items():
        values = defaultdict(list)
        morf, lerf = [], []
        for e in entries:
            for k, v in _quantities(e).items():
                values[k].append(v)
            if e.get("road_morf") and e.get("road_lerf"):
                morf.append(e["road_morf"])
                lerf.append(e["road_lerf"])
        stats = {k: mean_interval(v) for k, v in values.items()}
        if morf:
            stats["road_morf_by_fraction"] = [float(v) for v in np.mean(morf, axis=0)]
            stats["road_lerf_by_fraction"] = [float(v) for v in np.mean(lerf, axis=0)]
        out[method] = stats
    return out


def _most_faithful(by_method: Dict[str, dict]) -> Dict[str, str]:
    best = {}
    for key, higher in FAITHFUL_WHEN_HIGHER.items():
        means = {m: s[key]["mean"] for m, s in by_method.items() if s.get(key, {}).get("mean") is not None}
        if len(means) > 1:
            best[key] = (max if higher else min)(means, key=means.get)
    return best


def summarize_explanations(layout: OutputLayout, config) -> Optional[dict]:
    """Per-method (and per explained class) mean and 95 % interval of every metric over the
    committed ok rows; None when the run computed no metrics.

    The interval is the normal approximation mean +- 1.96 s / sqrt(n).
    """
    if not config.metrics:
        return None
    rows = [r for r in _read_rows(layout) if r["status"] == "ok" and r.get("explanations")]
    names: Dict[int, str] = {}
    for r in rows:
        if r.get("pred_index") is not None:
            names.setdefault(int(r["pred_index"]), r.get("pred_label"))
    overall: Dict[str, List[dict]] = defaultdict(list)
    per_class: Dict[str, Dict[str, List[dict]]] = defaultdict(lambda: defaultdict(list))
    counts = Counter()
    for r in rows:
        cls = int(r["gradcam_index"])
        key = names.get(cls) or f"class {cls}"
        counts[key] += 1
        for e in r["explanations"]:
            overall[e["method"]].append(e)
            per_class[key][e["method"]].append(e)
    by_method = _summarize(overall)
    kept = [c for c, _ in counts.most_common(MAX_CLASSES)]
    return {
        "methods": parse_methods(config.cam_method),
        "metrics": list(config.metrics),
        "images": len(rows),
        "interval": "95 %, normal approximation: mean +- 1.96 s / sqrt(n)",
        "road_fractions": list(ROAD_FRACTIONS),
        "by_method": by_method,
        "most_faithful": _most_faithful(by_method),
        "by_class": {c: {"images": counts[c], "by_method": _summarize(per_class[c]),
                         "most_faithful": _most_faithful(_summarize(per_class[c]))} for c in kept},
        "classes_left_out": max(0, len(counts) - len(kept)),
        "note": "by_class is by the explained class (gradcam_index): when a blurred image is itself "
                "read as one class, deletion and insertion of that class barely move for any map",
    }
