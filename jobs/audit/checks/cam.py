"""cam_border: where the model looks, from the manifest's CAM peaks and small CAMs."""

from __future__ import annotations

import numpy as np

from bulk_explain.jobs.audit.checks import AuditContext, Check, Finding, register_check
from bulk_explain.jobs.audit.data import CENTRE


def in_border(x: np.ndarray, y: np.ndarray, border: float) -> np.ndarray:
    return (x < border) | (x > 1 - border) | (y < border) | (y > 1 - border)


@register_check
class CamBorder(Check):
    name = "cam_border"
    title = "Where the model looks"
    default_threshold = 0.20
    description = ("Share of images with a non-empty CAM whose peak lies in the outer border (10 % of each side "
                   "by default); the report adds the CAM mass outside the central region.")

    def run(self, ctx: AuditContext) -> Finding:
        data, b = ctx.data, ctx.config.border
        usable = data.ok & ~data.cam_empty & np.isfinite(data.peak_x) & np.isfinite(data.peak_y)
        if not usable.any():
            return Finding(None, "skipped: no image has a CAM peak")
        hit = usable & in_border(data.peak_x, data.peak_y, b)
        outer = np.where(np.isfinite(data.outer), data.outer, 1.0)
        value, rows, scores = self.flag(hit, usable, outer, lambda s: np.argsort(-s, kind="stable"))
        finite = data.outer[usable & np.isfinite(data.outer)]
        median = float(np.median(finite)) if len(finite) else None
        lo, hi = CENTRE
        text = (f"{int(hit.sum())} of {int(usable.sum())} images ({value:.1%}) have their CAM peak in the outer "
                f"{b:.0%} border")
        if median is not None:
            text += f"; median CAM mass outside the central region ({lo:g}..{hi:g} of each side): {median:.0%}"
        return Finding(value, text, rows=rows, scores=scores, score_name="mass outside centre",
                       data={"border": b, "median_outer_mass": median, "central_region": [lo, hi]})
