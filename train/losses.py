"""Training losses: cross-entropy (multi-class), BCE and asymmetric loss (multi-label).

`make_loss(task, name)` is the one door; every loss maps (logits (B, C), targets) to a scalar
mean over elements, so learning rates carry over between BCE and ASL.
"""

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_LOSS = {"multilabel": "bce", "multiclass": "ce"}
LOSSES = {"multilabel": ("bce", "asl"), "multiclass": ("ce",)}


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al., ICCV 2021) for multi-label targets in {0, 1}.

    With p = sigmoid(z) and the shifted negative probability p_m = max(p - clip, 0):
        loss = -[ y (1 - p)^gamma_pos log(p) + (1 - y) p_m^gamma_neg log(1 - p_m) ]
    averaged over elements. As in the ASL and protobin authors' code, the focusing weights are
    treated as constants in the backward pass. gamma = 0 and clip = 0 give BCE exactly.
    """

    def __init__(self, gamma_neg=4.0, gamma_pos=1.0, clip=0.05):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def forward(self, logits, targets):
        z = logits.float()
        y = targets.to(z.dtype)
        p = torch.sigmoid(z)
        log_pos = F.logsigmoid(z)
        if self.clip > 0:
            p_neg = (p - self.clip).clamp(min=0)
            log_neg = torch.log1p(-p_neg)  # 1 - p_neg >= clip: always finite
        else:
            p_neg, log_neg = p, F.logsigmoid(-z)
        with torch.no_grad():
            w_pos = (1 - p).pow(self.gamma_pos)
            w_neg = p_neg.pow(self.gamma_neg)
        return -(y * w_pos * log_pos + (1 - y) * w_neg * log_neg).mean()


class BinaryCrossEntropy(nn.BCEWithLogitsLoss):
    """BCE on logits that accepts integer or boolean multi-hot targets."""

    def forward(self, logits, targets):
        return super().forward(logits.float(), targets.float())


def make_loss(task: str, name: str | None = None) -> nn.Module:
    """Loss for "multilabel" ("bce" default, "asl") or "multiclass" ("ce", class indices)."""
    if task not in LOSSES:
        raise ValueError(f"unknown task {task!r}; use 'multilabel' or 'multiclass'")
    name = name or DEFAULT_LOSS[task]
    if name not in LOSSES[task]:
        raise ValueError(f"loss {name!r} does not fit a {task} task; choose one of {LOSSES[task]}")
    if name == "asl":
        return AsymmetricLoss()
    if name == "bce":
        return BinaryCrossEntropy()
    return nn.CrossEntropyLoss()
