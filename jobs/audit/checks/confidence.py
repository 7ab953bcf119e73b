"""low_confidence (the model is unsure) and errors (images it could not read)."""

from __future__ import annotations

import collections
import re

import numpy as np

from bulk_explain.jobs.audit.checks import AuditContext, Check, Finding, register_check


@register_check
class LowConfidence(Check):
    name = "low_confidence"
    title = "Low confidence"
    default_threshold = 0.10
    description = "Share of readable images whose top class probability is under the audit's low-confidence threshold."

    def run(self, ctx: AuditContext) -> Finding:
        data, below = ctx.data, ctx.config.low_confidence_below
        ok = data.ok & np.isfinite(data.pred_score)
        if not ok.any():
            return Finding(None, "skipped: no readable images")
        unsure = ok & (data.pred_score < below)
        value, rows, scores = self.flag(unsure, ok, data.pred_score)  # least sure first
        per_class = self.count_by_class(data.pred[unsure], data.class_names, top=20)
        return Finding(
            value, f"{len(rows)} of {int(ok.sum())} images ({value:.1%}) have a top probability under {below:g}",
            rows=rows, scores=scores, score_name="top probability",
            data={"threshold": below, "by_predicted_class": per_class},
        )


def error_reason(message: str) -> str:
    """The kind of an error row's message, without its numbers and names: "cannot decode image:
    truncated or corrupt data (532 bytes)" -> "cannot decode image: truncated or corrupt data"."""
    text = (message or "unknown error").split(":", 2)
    head = ":".join(text[:2]) if len(text) > 1 and len(text[0]) < 40 else text[0]
    head = re.sub(r"\(.*?\)", "", head)
    head = re.sub(r"[0-9][0-9,x =.]*", "N", head)
    return re.sub(r"\s+", " ", head).strip()


@register_check
class Errors(Check):
    name = "errors"
    title = "Error rows"
    default_threshold = 0.01
    description = "Share of images that became error rows (undecodable, empty, too large, ...), with counts per reason."

    def run(self, ctx: AuditContext) -> Finding:
        data = ctx.data
        n = len(data)
        if not n:
            return Finding(None, "skipped: the manifest is empty")
        bad = np.flatnonzero(~data.ok)
        messages = data.errors.take(bad).to_pylist() if len(bad) else []
        reasons = collections.Counter(error_reason(m) for m in messages)
        value = len(bad) / n
        top = "; ".join(f"{count} {reason}" for reason, count in reasons.most_common(3))
        return Finding(
            value, f"{len(bad)} of {n} images ({value:.1%}) are error rows" + (f": {top}" if top else ""),
            rows=bad, scores=np.ones(len(bad), np.float32), score_name="error",
            data={"by_reason": dict(reasons.most_common(50))},
        )
