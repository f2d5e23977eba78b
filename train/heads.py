"""Probe heads over cached patch-token maps: one registry, one door (`build_head`).

Every head maps tokens (B, N, D), a validity mask (B, N) (True = valid) and an optional class
token (B, D) to logits (B, C); `cgp` takes every cached layer, tokens (B, L, N, D) and class
tokens (B, L, D). Each head's docstring gives its math. Tokens may be stored as float16/bfloat16;
heads compute in float32 (float64 stays float64, which the tests use).

Padding tokens are zeroed on entry and excluded from every mean, softmax and max, so their
stored values can never change a logit. Class attributes tell the training loop what to feed:
`uses_cls` (the head reads the class token when there is one), `cls_only` (then it reads nothing
else) and `multi_layer` (tokens carry a layer axis).
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

HEADS: dict[str, type[nn.Module]] = {}


def register(name):
    """Add a head class to `HEADS` under `name`."""

    def add(cls):
        cls.name = name
        HEADS[name] = cls
        return cls

    return add


def build_head(name: str, dim: int, num_classes: int, **options) -> nn.Module:
    """The one door: `build_head("ep", dim=768, num_classes=527, num_queries=32)`."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of: {', '.join(HEADS)}")
    return HEADS[name](dim, num_classes, **options)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters, the size that probing papers report."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------- shared pieces


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


_shared: dict | None = None  # step -> (its last inputs, result), inside `shared_steps` only


@contextlib.contextmanager
def shared_steps():
    """Inside this block, heads given the very same tensors share the steps that have no parameters
    (the float32 copy with padding zeroed, the masked mean of it) instead of each computing its
    own: a sweep's heads all read one batch, and on the CPU these steps cost more than a linear
    head. The results are the same tensors the heads would have made. Only the last inputs of each
    step are kept, so call heads of one layer one after another."""
    global _shared
    _shared = {}
    try:
        yield
    finally:
        _shared = None


def _once(step, *inputs):
    """`step(*inputs)`, or its result for these same tensors inside `shared_steps`."""
    if _shared is None or any(t is not None and t.requires_grad for t in inputs):
        return step(*inputs)
    kept = _shared.get(step)
    if kept is None or any(a is not b for a, b in zip(kept[0], inputs)):
        kept = _shared[step] = (inputs, step(*inputs))  # the inputs held, so no other tensor takes their id
    return kept[1]


def _prepare(tokens, mask):
    """Tokens in the compute dtype with padding zeroed, and a mask (all valid when none given)."""
    return _once(_zero_padding, tokens, mask)


def _zero_padding(tokens, mask):
    x = tokens.to(_compute_dtype(tokens))
    if mask is None:
        return x, torch.ones(x.shape[0], x.shape[-2], dtype=torch.bool, device=x.device)
    mask = mask.to(device=x.device, dtype=torch.bool)
    valid = mask[:, None, :, None] if x.dim() == 4 else mask[..., None]
    return x.masked_fill(~valid, 0), mask


def _masked_mean(x, mask):
    """Mean over valid tokens; an all-padding row gives zeros."""
    return _once(_mean_of_valid, x, mask)


def _mean_of_valid(x, mask):
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(-2) / m.sum(-2).clamp(min=1)


def _masked_softmax(scores, mask):
    """Softmax over the last axis in which padding gets exactly zero weight.

    Filling with the dtype's minimum rather than -inf keeps an all-padding row finite (uniform
    before the final multiply, all zeros after it) instead of NaN.
    """
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(-1) * mask


def _check_counts(head: str, **options):
    """Options that size or divide tensors, refused here by name rather than as a
    ZeroDivisionError or a negative dimension from deep inside torch."""
    for option, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{head}: {option} must be a positive integer, got {value!r}")


def _dropout(head: str, p) -> nn.Dropout:
    """nn.Dropout, refusing a rate that is not a number from 0 to 1 with the option's name."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"{head}: dropout must be a number from 0 to 1, got {p!r}")
    return nn.Dropout(p)


def _bn_linear(width, num_classes, dropout: nn.Dropout):
    """The MAE / EP linear-probing block: non-affine BatchNorm, then the classifier."""
    return nn.Sequential(
        nn.BatchNorm1d(width, affine=False, eps=1e-6),
        dropout,
        nn.Linear(width, num_classes),
    )


class Head(nn.Module):
    """A head is `features` (pooling) followed by `classifier`."""

    uses_cls = False
    cls_only = False
    multi_layer = False

    def forward(self, tokens, mask=None, cls=None):
        return self.classifier(self.features(tokens, mask, cls))


class _ClsHead(Head):
    """A head on the class token that falls back to the masked token mean without one.

    `fell_back_to_mean` is None before the first forward, then says which was used, so the
    result record can state it.
    """

    uses_cls = True
    cls_only = True
    fell_back_to_mean = None

    def features(self, tokens, mask=None, cls=None):
        self.fell_back_to_mean = cls is None
        if cls is None:
            return _masked_mean(*_prepare(tokens, mask))
        return cls.to(_compute_dtype(cls))


# ---------------------------------------------------------------- global pooling


@register("linear")
class LinearHead(_ClsHead):
    """Linear probe on the class token."""

    def __init__(self, dim, num_classes, dropout=0.0):
        super().__init__()
        self.classifier = _bn_linear(dim, num_classes, _dropout(self.name, dropout))


@register("mean")
class MeanHead(Head):
    """Linear probe on the masked mean of the tokens."""

    def __init__(self, dim, num_classes, dropout=0.0):
        super().__init__()
        self.classifier = _bn_linear(dim, num_classes, _dropout(self.name, dropout))

    def features(self, tokens, mask=None, cls=None):
        return _masked_mean(*_prepare(tokens, mask))


@register("mlp")
class MLPHead(_ClsHead):
    """Class token -> Linear(D, D) -> GELU -> Linear(D, C)."""

    def __init__(self, dim, num_classes, dropout=0.0):
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), _dropout(self.name, dropout), nn.Linear(dim, num_classes)
        )


# ---------------------------------------------------------------- attentive pooling


@register("mhca")
class MHCAHead(Head):
    """One learned query attends over LN(X) with key and value projections, H heads: by default the
    most heads up to 12 (a ViT-B's) that divide the width (8 for CREPE's 64 or 512 dims)."""

    def __init__(self, dim, num_classes, num_heads=None, dropout=0.0):
        super().__init__()
        if num_heads is None:
            num_heads = next(h for h in range(12, 0, -1) if dim % h == 0)
        _check_counts(self.name, num_heads=num_heads)
        if dim % num_heads:
            raise ValueError(f"mhca: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.classifier = _bn_linear(dim, num_classes, _dropout(self.name, dropout))

    def features(self, tokens, mask=None, cls=None):
        x, mask = _prepare(tokens, mask)
        B, N, D = x.shape
        H = self.num_heads
        h = self.norm(x)
        k = self.key(h).view(B, N, H, D // H)
        v = self.value(h).view(B, N, H, D // H)
        scores = torch.einsum("bnhe,he->bhn", k, self.query.view(H, D // H)) / math.sqrt(D // H)
        attn = _masked_softmax(scores, mask[:, None, :])
        return torch.einsum("bhn,bnhe->bhe", attn, v).reshape(B, D)


@register("ep")
class EPHead(Head):
    """Efficient Probing (EP_M): M queries attend over raw tokens; query j feeds its own slice
    of a bias-free value projection; the slices are concatenated (D_o = D / d_out).

    Computed pool-then-project (P = A X, then each P_j times its slice of W_V): the same numbers
    as the public code's project-every-token-then-attend, at a fraction of the multiply-adds.
    """

    def __init__(self, dim, num_classes, num_queries=32, d_out=1, dropout=0.0):
        super().__init__()
        _check_counts(self.name, num_queries=num_queries, d_out=d_out)
        if dim % d_out or (dim // d_out) % num_queries:
            raise ValueError(
                f"ep: D_o = dim / d_out = {dim}/{d_out} must be an integer divisible by "
                f"num_queries = {num_queries}"
            )
        self.width = dim // d_out
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.value = nn.Linear(dim, self.width, bias=False)
        self.classifier = _bn_linear(self.width, num_classes, _dropout(self.name, dropout))

    def features(self, tokens, mask=None, cls=None):
        x, mask = _prepare(tokens, mask)
        B, N, D = x.shape
        M = self.queries.shape[1]
        scores = torch.einsum("md,bnd->bmn", self.queries[0], x) / math.sqrt(D)
        pooled = _masked_softmax(scores, mask[:, None, :]) @ x  # (B, M, D)
        slices = self.value.weight.view(M, self.width // M, D)
        return torch.einsum("bmd,mkd->bmk", pooled, slices).reshape(B, self.width)


@register("simpool")
class SimPoolHead(Head):
    """SimPool without projections: the mean of LN(X) attends over LN(X), values LN(X)."""

    def __init__(self, dim, num_classes, dropout=0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.classifier = _bn_linear(dim, num_classes, _dropout(self.name, dropout))

    def features(self, tokens, mask=None, cls=None):
        x, mask = _prepare(tokens, mask)
        h = self.norm(x)
        query = _masked_mean(h, mask)
        scores = torch.einsum("bd,bnd->bn", query, h) / math.sqrt(h.shape[-1])
        return torch.einsum("bn,bnd->bd", _masked_softmax(scores, mask), h)


@register("abmilp")
class ABMILPHead(Head):
    """Attention MIL pooling: a tanh MLP (D -> D -> 1, as in the EP code) scores each token,
    softmax over valid tokens, weighted sum of the raw tokens."""

    def __init__(self, dim, num_classes, dropout=0.0):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1))
        self.classifier = _bn_linear(dim, num_classes, _dropout(self.name, dropout))

    def features(self, tokens, mask=None, cls=None):
        x, mask = _prepare(tokens, mask)
        attn = _masked_softmax(self.score(x).squeeze(-1), mask)
        return torch.einsum("bn,bnd->bd", attn, x)


# ---------------------------------------------------------------- prototype pooling


def _blocks(batch, prototypes, per_pair, budget):
    """(item slice, prototype slice) blocks whose items x prototypes x per_pair <= budget."""
    pc = min(prototypes, max(1, budget // per_pair))
    bc = min(batch, max(1, budget // (per_pair * pc)))
    for b in range(0, batch, bc):
        for p in range(0, prototypes, pc):
            yield slice(b, b + bc), slice(p, p + pc)


class TokenExtremes(torch.autograd.Function):
    """Max and min over valid tokens of x_n . p_k for every (item, prototype), in bounded memory.

    The (B, N, P) similarity map is never held whole: the forward walks it in blocks of at
    most `budget` elements and keeps only the arg-max and arg-min token of each (item,
    prototype); the gradient of a max (min) flows only to that token and that prototype, so the
    backward gathers and scatters those rows, again block by block. An item without any valid
    token gets features 0 and no gradient.

    apply(x (B, N, D), p (P, D), mask (B, N) bool, budget int) -> (max (B, P), min (B, P))
    """

    @staticmethod
    def forward(ctx, x, p, mask, budget):
        B, N, D = x.shape
        P = p.shape[0]
        hi, lo = x.new_empty(B, P), x.new_empty(B, P)
        arg_hi = torch.empty(B, P, dtype=torch.long, device=x.device)
        arg_lo = torch.empty_like(arg_hi)
        for bs, ps in _blocks(B, P, N, budget):
            sim = x[bs] @ p[ps].T  # (b, N, p): the only map-sized buffer
            padding = ~mask[bs, :, None]
            hi[bs, ps], arg_hi[bs, ps] = sim.masked_fill_(padding, -math.inf).max(1)
            lo[bs, ps], arg_lo[bs, ps] = sim.masked_fill_(padding, math.inf).min(1)
        empty = ~mask.any(1)
        hi.masked_fill_(empty[:, None], 0)
        lo.masked_fill_(empty[:, None], 0)
        ctx.save_for_backward(x, p, arg_hi, arg_lo, empty)
        ctx.budget = budget
        ctx.set_materialize_grads(False)
        return hi, lo

    @staticmethod
    def backward(ctx, grad_hi, grad_lo):
        x, p, arg_hi, arg_lo, empty = ctx.saved_tensors
        B, N, D = x.shape
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_p = torch.zeros_like(p) if ctx.needs_input_grad[1] else None
        for grad, arg in ((grad_hi, arg_hi), (grad_lo, arg_lo)):
            if grad is None:
                continue
            grad = grad.masked_fill(empty[:, None], 0)
            for bs, ps in _blocks(B, p.shape[0], D, ctx.budget):
                index = arg[bs, ps, None].expand(-1, -1, D)  # (b, p, D)
                g = grad[bs, ps, None]
                if grad_p is not None:
                    grad_p[ps] += (g * x[bs].gather(1, index)).sum(0)
                if grad_x is not None:
                    grad_x[bs].scatter_add_(1, index, g * p[ps])
        return grad_x, grad_p, None, None


def _sign_ste(w):
    """sign(w) with sign(0) = +1 in the forward; identity gradient in the backward."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype) + (w - w.detach())


def _bank_size(head, num_classes, prototypes_per_class, num_prototypes):
    if num_prototypes is not None and prototypes_per_class is not None:
        raise ValueError(f"{head}: give prototypes_per_class (J) or num_prototypes (P), not both")
    if num_prototypes is not None:
        _check_counts(head, num_prototypes=num_prototypes)
        return num_prototypes
    if prototypes_per_class is None:
        prototypes_per_class = 10 if num_classes > 300 else 20
    _check_counts(head, prototypes_per_class=prototypes_per_class)
    return num_classes * prototypes_per_class


@register("protofloat")
class ProtoFloatHead(Head):
    """A bank of P = C*J prototypes (not tied to classes); each takes its max cosine similarity
    over valid tokens; optional dropout; Linear(P, C)."""

    binarize = False
    chunk_elements = 2**24  # largest block of the similarity map held at once (64 MiB float32)

    def __init__(
        self, dim, num_classes, prototypes_per_class=None, num_prototypes=None, dropout=0.0
    ):
        super().__init__()
        bank = _bank_size(self.name, num_classes, prototypes_per_class, num_prototypes)
        self.prototypes = nn.Parameter(torch.randn(bank, dim) * 0.02)
        self.classifier = nn.Sequential(_dropout(self.name, dropout), nn.Linear(bank, num_classes))

    def features(self, tokens, mask=None, cls=None):
        x, mask = _prepare(tokens, mask)
        p = _sign_ste(self.prototypes) if self.binarize else self.prototypes
        hi, _ = TokenExtremes.apply(
            F.normalize(x, dim=-1), F.normalize(p, dim=-1), mask, self.chunk_elements
        )
        return hi


@register("protobin")
class ProtoBinHead(ProtoFloatHead):
    """`protofloat` with sign-binarized prototypes (straight-through gradient)."""

    binarize = True


@register("cgp")
class CGPHead(Head):
    """Convex gated probing over all cached layers.

    Each layer's tokens are L2-normalised and mixed with softmax(w) over layers (w starts
    equal). For each of K normalised prototypes: min and max over valid tokens of its
    similarity to the mixed tokens, and its similarity to the mixed class token -> 3K features
    (ordered min, cls, max per prototype) -> Linear(3K, C). As in the authors' code the mixture
    is not renormalised. Without class tokens the masked mean of the mixed tokens stands in
    for the class token (`fell_back_to_mean`).
    """

    uses_cls = True
    multi_layer = True
    chunk_elements = ProtoFloatHead.chunk_elements
    fell_back_to_mean = None

    def __init__(self, dim, num_classes, num_prototypes=10_000, num_layers=12, dropout=0.0):
        super().__init__()
        _check_counts(self.name, num_prototypes=num_prototypes, num_layers=num_layers)
        self.layer_logits = nn.Parameter(torch.ones(num_layers))
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim) * 0.02)
        self.classifier = nn.Sequential(
            _dropout(self.name, dropout), nn.Linear(3 * num_prototypes, num_classes)
        )

    def features(self, tokens, mask=None, cls=None):
        x, mask = _prepare(tokens, mask)
        B, L, N, D = x.shape
        if L != self.layer_logits.numel():
            raise ValueError(f"cgp was built for {self.layer_logits.numel()} layers, got {L}")
        weights = self.layer_logits.softmax(0)
        x = torch.einsum("l,blnd->bnd", weights, F.normalize(x, dim=-1))
        p = F.normalize(self.prototypes, dim=-1)
        hi, lo = TokenExtremes.apply(x, p, mask, self.chunk_elements)
        self.fell_back_to_mean = cls is None
        if cls is None:
            summary = _masked_mean(x, mask)
        else:
            cls = F.normalize(cls.to(x.dtype), dim=-1)
            summary = torch.einsum("l,bld->bd", weights, cls)
        return torch.stack([lo, summary @ p.T, hi], -1).reshape(B, -1)
