"""Metrics against scikit-learn and hand-computed cases; losses against their formulas."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, balanced_accuracy_score, log_loss as sklearn_log_loss, roc_auc_score

from tokens.train.losses import AsymmetricLoss, make_loss
from tokens.train.metrics import compute_metrics, log_loss, primary_metric

# ------------------------------------------------------------------ metrics


def test_primary_metric_per_task():
    assert primary_metric("multilabel") == "map"
    assert primary_metric("multiclass") == "acc"


def test_multilabel_hand_computed():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    m = compute_metrics("multilabel", scores, labels)
    # Class 0: hits at ranks 1 and 3 -> AP = (1/1 + 2/3) / 2; 3 of 4 (pos, neg) pairs ordered.
    assert m["per_class_ap"][0] == pytest.approx(5 / 6)
    assert m["per_class_ap"][1] is None  # no positives: left out of the mean
    assert m["map"] == pytest.approx(5 / 6)
    assert m["roc_auc"] == pytest.approx(0.75)


def test_multilabel_matches_sklearn_and_skips_undefined_classes():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 12)) < 0.15).astype(int)
    labels[:, 3] = 0  # no positives: no AP, no AUC
    labels[:, 5] = 1  # no negatives: AP defined (= 1), AUC not
    scores = rng.normal(size=(200, 12)) + 1.5 * labels
    m = compute_metrics("multilabel", scores, labels)

    with_pos = [c for c in range(12) if c != 3]
    both = [c for c in range(12) if c not in (3, 5)]
    assert m["map"] == pytest.approx(
        average_precision_score(labels[:, with_pos], scores[:, with_pos], average="macro")
    )
    assert m["roc_auc"] == pytest.approx(
        roc_auc_score(labels[:, both], scores[:, both], average="macro")
    )
    assert m["per_class_ap"][3] is None and m["per_class_ap"][5] == pytest.approx(1.0)
    ap0 = average_precision_score(labels[:, 0], scores[:, 0])
    assert m["per_class_ap"][0] == pytest.approx(ap0)
    assert all(isinstance(v, float) for v in (m["map"], m["roc_auc"]))


def test_multiclass_hand_computed():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.1, 0.9, 0.0]])
    labels = np.array([0, 1, 1, 1])
    m = compute_metrics("multiclass", scores, labels)
    assert m["acc"] == pytest.approx(3 / 4)
    assert m["balanced_acc"] == pytest.approx((1 + 2 / 3) / 2)  # class 2 absent: not averaged
    assert m["per_class_acc"][:2] == pytest.approx([1.0, 2 / 3])
    assert m["per_class_acc"][2] is None


def test_multiclass_matches_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, size=300)
    scores = rng.normal(size=(300, 7))
    scores[np.arange(300), labels] += 1.0
    m = compute_metrics("multiclass", scores, labels)
    predicted = scores.argmax(1)
    assert m["acc"] == pytest.approx((predicted == labels).mean())
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    for c in range(7):
        assert m["per_class_acc"][c] == pytest.approx((predicted[labels == c] == c).mean())


def test_a_class_predicted_but_absent_from_the_split_is_scored_quietly():
    """Balanced accuracy averages over the classes present (sklearn's definition): predictions of an
    absent class count as errors, without sklearn's warning on every validation of every head."""
    labels = np.array([0, 0, 1, 1])
    scores = np.eye(3)[[0, 2, 1, 1]]  # one prediction of class 2, which the split lacks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics("multiclass", scores, labels)
    assert m["balanced_acc"] == pytest.approx(0.75) and m["per_class_acc"] == [0.5, 1.0, None]


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="unknown task"):
        compute_metrics("regression", np.zeros((2, 2)), np.zeros(2))


# ------------------------------------------------------------------ losses


def _asl_formula(z, y, gamma_neg, gamma_pos, clip):
    """ASL written out element by element in float64."""
    total = 0.0
    for zi, yi in zip(z.ravel().tolist(), y.ravel().tolist()):
        p = 1 / (1 + math.exp(-zi))
        p_m = max(p - clip, 0.0)
        positive = yi * (1 - p) ** gamma_pos * math.log(p)
        negative = (1 - yi) * p_m**gamma_neg * math.log(1 - p_m)
        total -= positive + negative
    return total / z.numel()


@pytest.mark.parametrize("gamma_neg, gamma_pos, clip", [(4, 1, 0.05), (2, 0, 0.2), (0, 0, 0.0)])
def test_asl_matches_its_formula(gamma_neg, gamma_pos, clip):
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(16, 9, generator=g, dtype=torch.float64)
    y = (torch.rand(16, 9, generator=g) < 0.3).long()
    loss = AsymmetricLoss(gamma_neg, gamma_pos, clip)(z, y)
    assert loss.item() == pytest.approx(_asl_formula(z, y, gamma_neg, gamma_pos, clip), rel=1e-5)


def test_asl_without_focusing_or_clipping_is_bce_in_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    z = (4 * torch.randn(32, 7, generator=g)).requires_grad_()
    y = (torch.rand(32, 7, generator=g) < 0.2).float()
    asl = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(z, y)
    bce = F.binary_cross_entropy_with_logits(z, y)
    torch.testing.assert_close(asl, bce)
    torch.testing.assert_close(torch.autograd.grad(asl, z)[0], torch.autograd.grad(bce, z)[0])


def test_asl_defaults_follow_the_paper_and_stay_finite_on_extreme_logits():
    loss = make_loss("multilabel", "asl")
    assert (loss.gamma_neg, loss.gamma_pos, loss.clip) == (4, 1, 0.05)
    z = torch.tensor([[-100.0, 100.0, 0.0]], requires_grad=True)
    value = loss(z, torch.tensor([[1, 0, 1]]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()


def test_make_loss_defaults_and_rejections():
    z = torch.randn(4, 3)
    bce = make_loss("multilabel")
    assert bce(z, torch.tensor([[1, 0, 0]] * 4)).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(z, torch.tensor([[1.0, 0, 0]] * 4)).item()
    )
    ce = make_loss("multiclass")
    labels = torch.tensor([0, 2, 1, 1])
    assert ce(z, labels).item() == pytest.approx(F.cross_entropy(z, labels).item())
    with pytest.raises(ValueError, match="does not fit"):
        make_loss("multiclass", "asl")
    with pytest.raises(ValueError, match="unknown task"):
        make_loss("regression")


@pytest.mark.parametrize("task, labels", [("multilabel", [[1, 0], [0, 1], [1, 1]]), ("multiclass", [0, 1, 1])])
def test_a_diverged_head_gets_undefined_metrics_instead_of_an_error(task, labels):
    scores = np.array([[0.2, np.nan], [0.5, 0.1], [np.inf, 0.3]])
    metrics = compute_metrics(task, scores, np.array(labels))
    primary = primary_metric(task)
    (per_class,) = [v for k, v in metrics.items() if k.startswith("per_class")]
    assert np.isnan(metrics[primary]) and per_class == [None, None]


def test_undefined_says_which_metrics_labels_leave_undefined_and_compute_metrics_agrees():
    from tokens.train.metrics import undefined

    cases = [(np.array([[0, 0], [0, 0]]), ("map and roc_auc", "no item has a label")),
             (np.array([[1, 0], [1, 0]]), ("roc_auc", "no class has both items with it and items without it")),
             (np.array([[1, 0], [0, 0]]), None)]
    for labels, expected in cases:
        assert undefined("multilabel", labels) == expected
        metrics = compute_metrics("multilabel", np.array([[0.2, 0.1], [0.7, 0.4]]), labels)
        undefined_now = {name for name in ("map", "roc_auc") if np.isnan(metrics[name])}
        assert undefined_now == (set(expected[0].split(" and ")) if expected else set())
    assert undefined("multiclass", np.array([0])) is None


def test_log_loss_is_the_cross_entropy_of_the_log_scores():
    """Multi-class: scikit-learn's log loss of the softmax probabilities; multi-label: torch's binary
    cross-entropy of the logits, averaged over items and classes, confident logits (40, -40, 800)
    included, where the probabilities round to 1 or 0 in float64."""
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(scale=3, size=(40, 5)))
    classes = rng.integers(0, 5, 40)
    assert log_loss("multiclass", logits.log_softmax(-1).numpy(), classes) == pytest.approx(
        sklearn_log_loss(classes, logits.softmax(-1).numpy(), labels=range(5)), rel=1e-12)
    logits[0, :3] = torch.tensor([40.0, -40.0, 800.0])
    targets = torch.tensor((rng.random((40, 5)) < 0.4).astype(float))
    targets[0, :3] = torch.tensor([0.0, 1.0, 1.0])
    expected = F.binary_cross_entropy_with_logits(logits, targets).item()
    assert log_loss("multilabel", F.logsigmoid(logits).numpy(), targets.numpy()) == pytest.approx(expected, rel=1e-9)
    assert math.isnan(log_loss("multilabel", np.full((2, 2), np.nan), np.ones((2, 2))))
