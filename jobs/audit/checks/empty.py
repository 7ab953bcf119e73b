"""empty_maps: images whose CAM is all zeros (the ReLU removed every channel); their manifest peaks
are null. They are excluded from clustering, so they are never mistaken for "looks at a corner"."""

from __future__ import annotations

from bulk_explain.jobs.audit.checks import AuditContext, Check, Finding, register_check

LOCALIZING_METHODS = {"gradcam": "layercam or gradcam++", "gradcam++": "layercam", "layercam": "gradcam++"}


@register_check
class EmptyMaps(Check):
    name = "empty_maps"
    title = "Empty explanations"
    default_threshold = 0.01
    description = "Share of readable images whose CAM is all zeros: the method explains nothing for them."

    def run(self, ctx: AuditContext) -> Finding:
        data = ctx.data
        if not data.has.get("cam_empty"):
            return Finding(None, "skipped: the manifest predates the cam_empty column (re-run with --overwrite)")
        ok = data.ok
        if not ok.any():
            return Finding(None, "skipped: no readable images")
        empty = ok & data.cam_empty
        value, rows, scores = self.flag(empty, ok, data.pred_score, worst_first=None)
        method = str((data.job.get("config") or {}).get("cam_method") or "gradcam")
        suggestion = LOCALIZING_METHODS.get(method, "layercam")
        per_class = self.count_by_class(data.pred[empty], data.class_names)
        text = f"{len(rows)} of {int(ok.sum())} images ({value:.1%}) have an all-zero {method} map"
        if len(rows):
            text += f"; to see where the model looks, re-run with --cam-method {suggestion} (they localize)"
        return Finding(value, text, rows=rows, scores=scores, score_name="top probability",
                       data={"cam_method": method, "suggestion": suggestion, "by_predicted_class": per_class})
