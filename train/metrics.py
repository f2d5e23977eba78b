"""Evaluation metrics, computed by scikit-learn so that the numbers match the literature's.

Results are plain Python floats and lists (JSON-ready); a per-class value that is undefined
(a class without positives, or absent from a multi-class split) is None.
"""

import warnings

import numpy as np

# scikit-learn is imported where a metric is computed: importing it (with scipy) costs about a
# second, which every `tokens extract` process and every array task would otherwise pay.

# Per task: (the metric model selection maximises, a second summary, the per-class values).
METRICS = {"multilabel": ("map", "roc_auc", "per_class_ap"), "multiclass": ("acc", "balanced_acc", "per_class_acc")}


def primary_metric(task: str) -> str:
    """The metric that model selection maximises: "map" (multi-label) or "acc" (multi-class)."""
    return METRICS[task][0]


def compute_metrics(task: str, scores, labels) -> dict:
    """Metrics of scores (N, C) against labels.

    multilabel: labels (N, C) in {0, 1} -> map (macro AP over classes with a positive),
        roc_auc (macro over classes with both positives and negatives), per_class_ap.
    multiclass: labels (N,) class indices -> acc (top-1), balanced_acc (mean recall over the
        classes present), per_class_acc (recall per class).
    Scores with NaN or Inf (a head that diverged) give NaN metrics, which never win model selection.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if task not in METRICS:
        raise ValueError(f"unknown task {task!r}; use 'multilabel' or 'multiclass'")
    if not np.isfinite(scores).all():  # a diverged head: undefined, not a dead sweep
        values = (float("nan"), float("nan"), [None] * scores.shape[1])
    else:
        values = (_multilabel if task == "multilabel" else _multiclass)(scores, labels)
    return dict(zip(METRICS[task], values))


def log_loss(task: str, scores, labels) -> float:
    """Mean negative log-likelihood of the labels under log-probability scores: log-softmax
    (multi-class), or log-sigmoid per class (multi-label, averaged over items and classes as binary
    cross-entropy is). It breaks ties between epochs of equal validation metric (a small
    validation split saturates at an mAP of 1.0), in favour of the more confidently right. NaN
    for scores with NaN or Inf (a head that diverged)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if not np.isfinite(scores).all():
        return float("nan")
    if task == "multiclass":
        return float(-scores[np.arange(len(labels)), labels.astype(int)].mean())
    # log(1 - p) from log p: -expm1 keeps its precision where p is near 1; a p of exactly 1 (a
    # logit past about 745) is taken as 1 - 1e-300 rather than giving an infinite loss.
    log_not = np.log(np.maximum(-np.expm1(scores), 1e-300))
    return float(-np.where(labels.astype(bool), scores, log_not).mean())


def undefined(task: str, labels) -> tuple[str, str] | None:
    """The metrics these labels leave undefined (NaN for every head), and why; None when none is.
    Said before training, rather than left as an unexplained NaN in the leaderboard."""
    if task != "multilabel":  # accuracy and balanced accuracy are defined on any items
        return None
    positives = np.asarray(labels).astype(bool).sum(0)
    if not positives.any():
        return "map and roc_auc", "no item has a label"
    if not ((positives > 0) & (positives < len(labels))).any():
        return "roc_auc", "no class has both items with it and items without it"
    return None


def _multilabel(scores, labels):
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels = labels.astype(bool)
    positives = labels.sum(0)
    has_pos = positives > 0
    both = has_pos & (positives < len(labels))
    aps = iter(_per_column(average_precision_score, labels[:, has_pos], scores[:, has_pos]))
    per_class = [float(next(aps)) if has_pos[c] else None for c in range(labels.shape[1])]
    aucs = _per_column(roc_auc_score, labels[:, both], scores[:, both])
    defined = [ap for ap in per_class if ap is not None]
    return float(np.mean(defined)) if defined else float("nan"), float(np.mean(aucs)) if aucs else float("nan"), per_class


def _per_column(metric, labels, scores) -> list:
    """`metric` of every column from one multi-label call (`average=None`) rather than a call
    per column, whose input checks took longer than the metric itself (half the time of a
    multi-label `compute_metrics`). A column's value is the one a call on it alone gives, to the bit."""
    if labels.shape[1] < 2:  # a single column is not read as multi-label
        return [metric(labels[:, c], scores[:, c]) for c in range(labels.shape[1])]
    # contiguous copies: a column selection comes Fortran-ordered, and scikit-learn reads each column 4x slower from it
    return list(metric(np.ascontiguousarray(labels), np.ascontiguousarray(scores), average=None))


def _multiclass(scores, labels):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score

    num_classes = scores.shape[1]
    predicted = scores.argmax(1)
    recall = recall_score(
        labels, predicted, labels=np.arange(num_classes), average=None, zero_division=np.nan
    )
    with warnings.catch_warnings():  # as documented: balanced accuracy averages over the classes present
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(labels, predicted))
    return float(accuracy_score(labels, predicted)), balanced, [None if np.isnan(r) else float(r) for r in recall]
