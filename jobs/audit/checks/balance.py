"""class_balance: label and predicted-class distributions and their confusion."""

from __future__ import annotations

import numpy as np

from bulk_explain.jobs.audit.checks import AuditContext, Check, Finding, register_check
from bulk_explain.jobs.audit.data import label_classes

MAX_CLASSES_SHOWN = 30  # the confusion table keeps the most frequent labels/predictions


@register_check
class ClassBalance(Check):
    name = "class_balance"
    title = "Class balance"
    default_threshold = 0.10
    description = ("Total variation distance between the folder-label distribution and the predicted-class "
                   "distribution over labelled images (0: the model predicts classes in the labels' proportions).")

    def run(self, ctx: AuditContext) -> Finding:
        data = ctx.data
        ok = data.ok & (data.pred >= 0)
        pred_names = np.asarray(data.class_names, object)
        predicted = self.count_by_class(data.pred[ok], data.class_names, MAX_CLASSES_SHOWN)
        label_class = label_classes(data.label_names, data.class_names)
        labelled = ok & (data.label_codes >= 0)
        if not labelled.any() or not len(label_class):
            return Finding(None, "skipped: no labelled images (labels are parent folder names)",
                           data={"predicted": predicted})
        per_row = label_class[data.label_codes[labelled]]
        labels = self.count_by_class(data.label_codes[labelled], data.label_names, MAX_CLASSES_SHOWN)
        matched = per_row >= 0
        # Distributions compared in class space over images whose label names a class.
        lab = np.bincount(per_row[matched], minlength=data.num_classes).astype(float)
        pre = np.bincount(data.pred[labelled][matched], minlength=data.num_classes).astype(float)
        if not matched.any():
            return Finding(None, "skipped: no folder label names a model class", data={"labels": labels,
                                                                                      "predicted": predicted})
        tvd = float(0.5 * np.abs(lab / lab.sum() - pre / pre.sum()).sum())
        # Confusion of label (rows) vs prediction (columns), most frequent first.
        top_labels = list(labels)
        top_preds = list(predicted)
        index_of = {name: i for i, name in enumerate(top_preds)}
        confusion = np.zeros((len(top_labels), len(top_preds)), np.int64)
        lab_pos = {name: i for i, name in enumerate(top_labels)}
        lab_names = np.asarray(data.label_names, object)[data.label_codes[labelled]]
        for ln, pn in zip(lab_names, pred_names[data.pred[labelled]]):
            if ln in lab_pos and pn in index_of:
                confusion[lab_pos[ln], index_of[pn]] += 1
        agree = float((per_row[matched] == data.pred[labelled][matched]).mean())
        return Finding(
            tvd, f"label vs predicted distribution differ by {tvd:.1%} (total variation); the prediction "
                 f"agrees with the label on {agree:.1%} of {int(matched.sum())} labelled images",
            data={"labels": labels, "predicted": predicted, "agreement": agree,
                  "confusion": {"labels": top_labels, "predicted": top_preds, "counts": confusion.tolist()}},
        )
