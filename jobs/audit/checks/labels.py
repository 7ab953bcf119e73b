"""label_issues: images whose folder label is probably wrong, found with cleanlab's
`find_label_issues` (ranked by self-confidence: the model's probability of the given label) from
the labels and the model's probabilities.

Which images count is cleanlab's `filter_by` (`AuditConfig.label_filter`). The default,
"predicted_neq_given", flags every labelled image whose predicted class differs from its label,
ranked by self-confidence. Confident learning's own estimate ("prune_by_noise_rate", cleanlab's
default) is more conservative: an image counts only when its probability of another class exceeds
that class's mean self-confidence, so with an accurate model and a clean class it misses many
wrong labels (measured on the tests' planted swaps: 5 of 8 found, against 8 of 8 with the default,
both at precision 1.0). Choose "prune_by_noise_rate" when the model's own errors would swamp the
review queue.
"""

from __future__ import annotations

import numpy as np

from bulk_explain.jobs.audit.checks import AuditContext, Check, Finding, register_check
from bulk_explain.jobs.audit.data import label_classes

# Above this many labelled rows cleanlab's batched variant bounds memory (its documented regime).
BATCHED_ABOVE = 1_000_000


def label_space_probabilities(data, classes: np.ndarray) -> np.ndarray:
    """[n, len(classes)] probabilities of the given model classes per row, renormalized over them.

    The manifest keeps the top-k classes per image. With k >= the number of classes (every binary
    model) that is the full distribution. Otherwise the mass outside the top k, 1 - sum(top-k), is
    spread evenly over the classes not in the top k (the least informative completion); then only
    the columns of classes that occur as labels are kept and each row is renormalized over them,
    since confident learning compares a label only with the other labels.
    """
    c = max(data.num_classes, 1)
    idx, score = data.topk_index, np.nan_to_num(data.topk_score, nan=0.0)
    in_topk = (idx >= 0)
    rest = np.clip(1.0 - (score * in_topk).sum(axis=1), 0.0, 1.0)
    others = np.maximum(c - in_topk.sum(axis=1), 1)
    out = np.repeat((rest / others)[:, None], len(classes), axis=1).astype(np.float32)
    col_of = {int(cls): j for j, cls in enumerate(classes)}
    for slot in range(idx.shape[1]):
        for cls, j in col_of.items():
            hit = idx[:, slot] == cls
            out[hit, j] = score[hit, slot]
    total = out.sum(axis=1, keepdims=True)
    return np.divide(out, total, out=np.full_like(out, 1.0 / max(len(classes), 1)), where=total > 0)


@register_check
class LabelIssues(Check):
    name = "label_issues"
    title = "Label issues"
    default_threshold = 0.02
    description = ("Share of labelled images whose folder label is probably wrong (cleanlab "
                   "find_label_issues, ranked by self-confidence: the model's probability of the given label).")

    def run(self, ctx: AuditContext) -> Finding:
        data = ctx.data
        label_class = label_classes(data.label_names, data.class_names)
        per_row = np.where(data.label_codes >= 0, label_class[np.maximum(data.label_codes, 0)] if len(label_class)
                           else -1, -1)
        usable = data.ok & (per_row >= 0)
        classes = np.unique(per_row[usable])
        note = ("Scores are only trustworthy on images the model was not trained on: on its training "
                "images a model has memorized the labels, right or wrong.")
        if usable.sum() < 2 or len(classes) < 2:
            return Finding(None, f"skipped: {int(usable.sum())} images have a folder label that names a model "
                           f"class, in {len(classes)} classes (confident learning needs two)", note=note)
        rows = np.flatnonzero(usable)
        probs = label_space_probabilities(data, classes)
        labels = np.searchsorted(classes, per_row)  # meaningful on usable rows only
        issues = _find_label_issues(labels[rows], probs[rows], ctx.config.label_filter)
        self_conf = probs[np.arange(len(probs)), labels]
        value, flagged, scores = self.flag(rows[issues], usable, self_conf)  # least confident in its label first
        names = [data.class_names[c] for c in classes]
        return Finding(
            value,
            f"{len(issues)} of {len(rows)} labelled images ({value:.1%}) probably carry a wrong label "
            f"(classes: {', '.join(names)})",
            rows=flagged, scores=scores, score_name="self-confidence",
            data={"labelled": int(len(rows)), "flagged": int(len(issues)), "classes": names,
                  "method": f"cleanlab find_label_issues, filter_by={ctx.config.label_filter}, "
                            "ranked by self_confidence"},
            note=note,
        )


def _find_label_issues(labels: np.ndarray, probs: np.ndarray, filter_by: str) -> np.ndarray:
    """Indices of label issues, ranked by self-confidence (cleanlab)."""
    if filter_by == "predicted_neq_given" and len(labels) > BATCHED_ABOVE:
        # cleanlab's own rule, in bounded memory: its ranking needs only the self-confidences.
        issues = np.flatnonzero(np.argmax(probs, axis=1) != labels)
        self_conf = probs[issues, labels[issues]]
        return issues[np.argsort(self_conf, kind="stable")]
    if len(labels) > BATCHED_ABOVE:
        from cleanlab.experimental.label_issues_batched import find_label_issues_batched

        mask = find_label_issues_batched(labels=labels, pred_probs=probs, return_mask=True, n_jobs=1,
                                         verbose=False)
        return np.flatnonzero(mask)
    from cleanlab.filter import find_label_issues

    return np.asarray(find_label_issues(labels=labels, pred_probs=probs, filter_by=filter_by,
                                        return_indices_ranked_by="self_confidence", n_jobs=1), np.int64)
