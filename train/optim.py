"""The probes' optimizers and learning-rate schedules.

AdamW with a linear warm-up and cosine decay is the protobin authors' recipe and the default.
SGD with momentum and LARS are there for the other protocols in use: LARS is how MAE trains its
linear probes (the protocol the EP paper follows on ImageNet), with large learning rates (MAE:
0.1 × batch size / 256).
"""

from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ("adamw", "sgd", "lars")
SCHEDULES = ("cosine", "constant")
MOMENTUM = 0.9  # SGD's and LARS's, as in MAE's linear probing
TRUST = 0.001  # LARS's trust coefficient, as in MAE
LARS_LR_PER_256 = 0.1  # MAE's base rate for LARS: 0.1 per 256 items of batch


def default_lr(optimizer: str, batch_size: int) -> float | None:
    """The rate a head gets when the sweep names none: the heads' own AdamW defaults (None here)
    are a thousand times too small for LARS, which takes MAE's rule instead."""
    return LARS_LR_PER_256 * batch_size / 256 if optimizer == "lars" else None


def lr_required(optimizer: str) -> bool:
    """SGD has no default rate of its own: the sweep must name one for every head."""
    return optimizer == "sgd"


def split_parameters(head: nn.Module) -> tuple[list, list, list]:
    """(weights, prototypes, vectors). Weight decay applies to the weights only, as the protobin
    authors' recipe has it: not to biases, norms and other 1-D parameters (cgp's layer mixture
    among them), nor to prototypes, which decay would pull toward zero rather than regularise."""
    weights, prototypes, vectors = [], [], []
    for name, parameter in head.named_parameters():
        if parameter.ndim <= 1:
            vectors.append(parameter)
        else:
            (prototypes if name.split(".")[-1] == "prototypes" else weights).append(parameter)
    return weights, prototypes, vectors


def make_optimizer(name: str, head: nn.Module, lr: float, wd: float) -> torch.optim.Optimizer:
    weights, prototypes, vectors = split_parameters(head)
    if name == "lars":  # every matrix is scaled, as in MAE; the prototypes without decay
        return LARS([{"params": weights, "weight_decay": wd, "adapt": True}, {"params": prototypes, "weight_decay": 0.0, "adapt": True},
                     {"params": vectors, "weight_decay": 0.0, "adapt": False}], lr=lr)
    groups = [{"params": weights, "weight_decay": wd}, {"params": prototypes + vectors, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM)
    raise ValueError(f"optimizer {name!r}: use {', '.join(OPTIMIZERS)}")


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update of each matrix (groups with adapt=True) is first scaled by
    TRUST · ‖w‖ / ‖g + wd · w‖ (You et al., 2017, as MAE's linear probing runs it), so that every
    layer moves by about the same fraction of its norm. 1-D parameters (biases, norms) take plain
    momentum steps without decay."""

    def __init__(self, params, lr: float, momentum: float = MOMENTUM, trust: float = TRUST):
        super().__init__(params, {"lr": lr, "weight_decay": 0.0, "momentum": momentum, "trust": trust, "adapt": True})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                update = parameter.grad
                if group["adapt"]:
                    update = update.add(parameter, alpha=group["weight_decay"])
                    weight_norm, update_norm = torch.linalg.vector_norm(parameter), torch.linalg.vector_norm(update)
                    ratio = torch.where((weight_norm > 0) & (update_norm > 0), group["trust"] * weight_norm / update_norm, 1.0)
                    update = update * ratio
                state = self.state[parameter]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(parameter)
                state["momentum"].mul_(group["momentum"]).add_(update)
                parameter.add_(state["momentum"], alpha=-group["lr"])


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """The learning rate's factor at `step` of `total`: a linear warm-up over `warmup` steps, then
    a cosine decay to zero, or the full rate to the end."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
