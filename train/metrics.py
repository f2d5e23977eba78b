"""Evaluation metrics, computed by scikit-learn so that the numbers match the literature's.

Results are plain Python floats and lists (JSON-ready); a per-class value that is undefined
(a class without positives, or absent from a multi-class split) is None.
"""

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    recall_score,
    roc_auc_score,
)

PRIMARY = {"multilabel": "map", "multiclass": "acc"}


def primary_metric(task: str) -> str:
    """The metric that model selection maximises: "map" (multi-label) or "acc" (multi-class)."""
    return PRIMARY[task]


def compute_metrics(task: str, scores, labels) -> dict:
    """Metrics of scores (N, C) against labels.

    multilabel: labels (N, C) in {0, 1} -> map (macro AP over classes with a positive),
        roc_auc (macro over classes with both positives and negatives), per_class_ap.
    multiclass: labels (N,) class indices -> acc (top-1), balanced_acc (mean recall over the
        classes present), per_class_acc (recall per class).
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if task == "multilabel":
        return _multilabel(scores, labels)
    if task == "multiclass":
        return _multiclass(scores, labels)
    raise ValueError(f"unknown task {task!r}; use 'multilabel' or 'multiclass'")


def _multilabel(scores, labels):
    labels = labels.astype(bool)
    positives = labels.sum(0)
    has_pos = positives > 0
    both = has_pos & (positives < len(labels))
    per_class = [
        float(average_precision_score(labels[:, c], scores[:, c])) if has_pos[c] else None
        for c in range(labels.shape[1])
    ]
    aucs = [roc_auc_score(labels[:, c], scores[:, c]) for c in np.flatnonzero(both)]
    defined = [ap for ap in per_class if ap is not None]
    return {
        "map": float(np.mean(defined)) if defined else float("nan"),
        "roc_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "per_class_ap": per_class,
    }


def _multiclass(scores, labels):
    num_classes = scores.shape[1]
    predicted = scores.argmax(1)
    recall = recall_score(
        labels, predicted, labels=np.arange(num_classes), average=None, zero_division=np.nan
    )
    return {
        "acc": float(accuracy_score(labels, predicted)),
        "balanced_acc": float(balanced_accuracy_score(labels, predicted)),
        "per_class_acc": [None if np.isnan(r) else float(r) for r in recall],
    }
