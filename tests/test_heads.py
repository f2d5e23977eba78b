"""Probe heads: shapes, padding, agreement with reference formulations, sizes, and learning."""

import contextlib
import math
import re

import pytest
import torch
import torch.nn.functional as F

from tokens.train import heads
from tokens.train.heads import HEADS, build_head, count_parameters

SMALL = {  # options that make every head fit a small dim of 48
    "mhca": {"num_heads": 4},
    "ep": {"num_queries": 8},
    "protofloat": {"prototypes_per_class": 3},
    "protobin": {"prototypes_per_class": 3},
    "cgp": {"num_prototypes": 16, "num_layers": 3},
}


def _inputs(name, B=6, N=10, D=48, L=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if HEADS[name].multi_layer:
        return torch.randn(B, L, N, D, generator=g).to(dtype), torch.randn(B, L, D, generator=g)
    return torch.randn(B, N, D, generator=g).to(dtype), torch.randn(B, D, generator=g)


def _small(name, D=48, C=5):
    torch.manual_seed(0)
    return build_head(name, dim=D, num_classes=C, **SMALL.get(name, {}))


def test_registry_lists_every_head_and_rejects_unknown_names():
    assert set(HEADS) == {
        "linear", "mean", "mlp", "mhca", "ep", "simpool", "abmilp", "protofloat", "protobin", "cgp"
    }
    with pytest.raises(ValueError, match="unknown head"):
        build_head("nope", dim=8, num_classes=2)


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_gives_float32_logits_from_half_precision_tokens(name):
    head = _small(name)
    assert isinstance(head.uses_cls, bool) and isinstance(head.multi_layer, bool)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        tokens, cls = _inputs(name, dtype=dtype)
        logits = head(tokens, cls=cls.to(dtype) if head.uses_cls else None)
        assert logits.shape == (6, 5) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(HEADS))
def test_padding_tokens_never_change_the_output(name):
    head = _small(name).eval()
    tokens, cls = _inputs(name)
    cls = cls if head.uses_cls else None
    mask = torch.rand(6, 10, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[0] = True  # a row without padding
    mask[1] = False
    mask[1, 7] = True  # a row with one valid token
    mask[2] = False  # a row that is all padding
    padding = ~mask[:, None, :, None] if head.multi_layer else ~mask[..., None]
    garbage = tokens.masked_fill(padding, 0) + 1e4 * torch.randn(tokens.shape) * padding
    with torch.no_grad():
        out = head(tokens, mask, cls)
        assert torch.equal(out, head(garbage, mask, cls))
        assert torch.isfinite(out).all()
        assert torch.equal(head(tokens, None, cls), head(tokens, torch.ones_like(mask), cls))


def test_heads_of_one_batch_share_the_steps_without_parameters_and_get_the_same_numbers(monkeypatch):
    """Inside `shared_steps` the padding is zeroed once for every head reading the same tokens, and
    the masked mean taken once for the mean heads; logits and gradients stay those of heads on their own."""
    tokens, cls = _inputs("mean", dtype=torch.float16)
    mask = torch.rand(6, 10, generator=torch.Generator().manual_seed(1)) > 0.3
    names = ["mean", "linear", "ep", "protobin", "simpool", "mean"]  # linear without cls falls back to the mean

    def run(shared):
        torch.manual_seed(0)
        built = [_small(name) for name in names]
        with heads.shared_steps() if shared else contextlib.nullcontext():
            outputs = [head(tokens, mask, None) for head in built]
            for out in outputs:
                out.square().sum().backward()
        return outputs, [p.grad for head in built for p in head.parameters() if p.grad is not None]

    alone, alone_grads = run(shared=False)
    calls = {"_zero_padding": 0, "_mean_of_valid": 0}
    for step in calls:
        def counted(*inputs, step=step, original=getattr(heads, step)):
            calls[step] += 1
            return original(*inputs)
        monkeypatch.setattr(heads, step, counted)
    together, together_grads = run(shared=True)
    # One mean for mean, linear and the last mean; simpool's mean of LN(X) needs grad, so it is its own.
    assert calls == {"_zero_padding": 1, "_mean_of_valid": 2}
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
    assert len(alone_grads) == len(together_grads) and all(torch.equal(a, b) for a, b in zip(alone_grads, together_grads))
    # Other tensors, or the same steps outside the block, are computed anew.
    with heads.shared_steps():
        heads._prepare(tokens, mask)
        heads._prepare(tokens.clone(), mask)
    heads._prepare(tokens, mask)
    assert calls["_zero_padding"] == 4


def test_linear_and_mlp_fall_back_to_the_masked_mean_without_a_class_token():
    tokens, cls = _inputs("linear")
    mask = torch.ones(6, 10, dtype=torch.bool)
    mask[:, 6:] = False
    for name in ("linear", "mlp"):
        head = _small(name).eval()
        assert head.fell_back_to_mean is None
        head(tokens, cls=cls)
        assert head.fell_back_to_mean is False
        with torch.no_grad():
            out = head(tokens, mask)
            assert head.fell_back_to_mean is True
            torch.testing.assert_close(out, head.classifier(tokens[:, :6].mean(1)))


# ------------------------------------------------------------------ EP vs the public code


def _public_ep(x, queries, value_weight):
    """EP as the public code (poolings/ep.py) computes it: project every token with W_V, split
    the projected channels into M groups, and let query j's softmax over tokens (raw tokens as
    keys, scale 1/sqrt(D)) average group j; concatenate the groups."""
    B, N, D = x.shape
    M = queries.shape[1]
    v = (x @ value_weight.T).reshape(B, N, M, -1).permute(0, 2, 1, 3)  # (B, M, N, D_o/M)
    attn = ((queries.expand(B, -1, -1) * D**-0.5) @ x.transpose(1, 2)).softmax(-1)  # (B, M, N)
    return (attn.unsqueeze(2) @ v).reshape(B, -1)


@pytest.mark.parametrize("num_queries, d_out", [(32, 1), (8, 2), (4, 4)])
def test_ep_matches_the_public_formulation_in_float64(num_queries, d_out):
    D = 64
    head = build_head("ep", dim=D, num_classes=3, num_queries=num_queries, d_out=d_out).double()
    queries = torch.randn(1, num_queries, D, dtype=torch.float64)
    value_weight = torch.randn(D // d_out, D, dtype=torch.float64) / D**0.5
    with torch.no_grad():
        head.queries.copy_(queries)
        head.value.weight.copy_(value_weight)
    x = torch.randn(5, 20, D, dtype=torch.float64)
    expected = _public_ep(x, queries, value_weight)
    torch.testing.assert_close(head.features(x), expected, rtol=1e-12, atol=1e-12)

    # The public code has no mask: with one, each item must equal EP over its valid tokens.
    mask = torch.ones(5, 20, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, ::2] = False
    pooled = head.features(x, mask)
    for b in range(5):
        expected = _public_ep(x[b : b + 1, mask[b]], queries, value_weight)[0]
        torch.testing.assert_close(pooled[b], expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------- prototype heads vs a naive map


def _naive_prototype_logits(head, x, mask, cls=None):
    """Full (B, N, P) similarity map and a plain max/min, written from the spec."""
    w = head.prototypes
    if isinstance(head, heads.CGPHead):
        a = head.layer_logits.softmax(0)
        x = (a[:, None, None] * F.normalize(x, dim=-1)).sum(1)
        p = F.normalize(w, dim=-1)
        sim = x @ p.T
        hi = sim.masked_fill(~mask[..., None], -math.inf).max(1).values
        lo = sim.masked_fill(~mask[..., None], math.inf).min(1).values
        if cls is None:
            summary = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        else:
            summary = (a[:, None] * F.normalize(cls, dim=-1)).sum(1)
        feats = torch.stack([lo, summary @ p.T, hi], -1).flatten(1)
    else:
        if head.binarize:
            w = torch.where(w >= 0, 1.0, -1.0).double() + (w - w.detach())
        sim = F.normalize(x, dim=-1) @ F.normalize(w, dim=-1).T
        feats = sim.masked_fill(~mask[..., None], -math.inf).max(1).values
    return head.classifier(feats)


def _grads(head, x, logits, target):
    loss = (logits * target).sum()
    params = [head.prototypes, head.classifier[-1].weight, head.classifier[-1].bias]
    if isinstance(head, heads.CGPHead):
        params.append(head.layer_logits)
    return torch.autograd.grad(loss, params + [x])


@pytest.mark.parametrize(
    "name, use_cls",
    [("protobin", False), ("protofloat", False), ("cgp", True), ("cgp", False)],
)
@pytest.mark.parametrize("chunk_elements", [7, 100, 2**24])
def test_prototype_heads_match_the_naive_map_with_gradients(name, use_cls, chunk_elements):
    torch.manual_seed(0)
    if name == "cgp":
        options = {"num_prototypes": 13, "num_layers": 3}
    else:
        options = {"prototypes_per_class": 3}
    head = build_head(name, dim=16, num_classes=4, **options).double()
    head.chunk_elements = chunk_elements
    shape = (5, 3, 11, 16) if name == "cgp" else (5, 11, 16)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    cls = torch.randn(5, 3, 16, dtype=torch.float64) if use_cls else None
    mask = torch.rand(5, 11) > 0.3
    mask[:, 0] = True
    with torch.no_grad():  # make the layer weights and prototypes unequal and a few signs 0
        head.prototypes[0, :3] = 0.0
        if name == "cgp":
            head.layer_logits.copy_(torch.randn(3))
    target = torch.randn(5, 4, dtype=torch.float64)

    ours = head(x, mask, cls)
    naive = _naive_prototype_logits(head, x, mask, cls)
    torch.testing.assert_close(ours, naive, rtol=1e-12, atol=1e-12)
    for g_ours, g_naive in zip(_grads(head, x, ours, target), _grads(head, x, naive, target)):
        torch.testing.assert_close(g_ours, g_naive, rtol=1e-10, atol=1e-12)


def test_sign_is_plus_one_at_zero_and_passes_gradients_straight_through():
    w = torch.tensor([-2.0, -0.0, 0.0, 0.5], requires_grad=True)
    b = heads._sign_ste(w)
    assert b.tolist() == [-1.0, 1.0, 1.0, 1.0]
    b.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert w.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_prototype_bank_size_follows_the_spec():
    assert build_head("protobin", dim=8, num_classes=10).prototypes.shape == (200, 8)
    assert build_head("protobin", dim=8, num_classes=301).prototypes.shape == (3010, 8)
    fixed = build_head("protobin", dim=8, num_classes=10, num_prototypes=7)
    assert fixed.prototypes.shape == (7, 8)
    with pytest.raises(ValueError):
        build_head("protobin", dim=8, num_classes=10, num_prototypes=7, prototypes_per_class=2)


def test_mhca_default_heads_divide_the_width():
    """12 heads (a ViT-B's) failed on the default backbone's 64 dims; the default is the most heads up
    to 12 that divide the width."""
    assert [build_head("mhca", dim=d, num_classes=3).num_heads for d in (768, 64, 512, 1280, 7)] == [12, 8, 8, 10, 7]
    assert build_head("mhca", dim=64, num_classes=3, num_heads=4).num_heads == 4


@pytest.mark.parametrize("name,options,message", [
    ("ep", {"num_queries": 0}, "num_queries must be a positive integer, got 0"),
    ("ep", {"num_queries": "abc"}, "num_queries must be a positive integer, got 'abc'"),
    ("ep", {"d_out": -1}, "d_out must be a positive integer, got -1"),
    ("mhca", {"num_heads": 0}, "num_heads must be a positive integer, got 0"),
    ("protobin", {"prototypes_per_class": 0}, "prototypes_per_class must be a positive integer, got 0"),
    ("protofloat", {"num_prototypes": -3}, "num_prototypes must be a positive integer, got -3"),
    ("cgp", {"num_layers": 0}, "num_layers must be a positive integer, got 0"),
    ("cgp", {"num_prototypes": 2.5}, "num_prototypes must be a positive integer, got 2.5"),
    ("ep", {"num_queries": True}, "num_queries must be a positive integer, got True"),
    ("linear", {"dropout": "abc"}, "dropout must be a number from 0 to 1, got 'abc'"),
    ("protobin", {"dropout": 1.5}, "dropout must be a number from 0 to 1, got 1.5"),
])
def test_bad_option_values_are_refused_by_name(name, options, message):
    """Not a ZeroDivisionError, a negative dimension or a TypeError from inside torch."""
    with pytest.raises(ValueError, match=re.escape(f"{name}: {message}")):
        build_head(name, dim=48, num_classes=5, **options)


# ------------------------------------------------------------------ parameter counts


def test_parameter_counts_follow_the_spec_formulas():
    D, C = 768, 10
    expected = {
        "linear": D * C + C,
        "mean": D * C + C,
        "mlp": D * D + D + D * C + C,
        "mhca": D + 2 * D + 2 * (D * D + D) + D * C + C,  # query, LayerNorm, W_K, W_V, classifier
        "ep": 32 * D + D * D + D * C + C,
        "simpool": 2 * D + D * C + C,
        "abmilp": D * D + D + D + 1 + D * C + C,
        "protofloat": 200 * D + 200 * C + C,
        "protobin": 200 * D + 200 * C + C,
        "cgp": 12 + 10_000 * D + 3 * 10_000 * C + C,
    }
    counts = {name: count_parameters(build_head(name, dim=D, num_classes=C)) for name in HEADS}
    assert counts == expected
    assert counts["protobin"] == 155_610
    assert 1.15e6 < counts["mhca"] < 1.25e6
    ep = build_head("ep", dim=D, num_classes=C, num_queries=16, d_out=4)
    assert count_parameters(ep) == 16 * D + (D // 4) * D + (D // 4) * C + C


# ------------------------------------------------------------------ learning


def _task(n, seed, hard, D=32, N=64, C=4):
    """Tokens = noise + a per-item offset that swamps the token mean. Hard: the class code sits
    in 2 of the 64 tokens (strongly); easy: every token carries it."""
    codes = torch.randn(C, D, generator=torch.Generator().manual_seed(0)).sign() / D**0.5
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(C, (n,), generator=g)
    x = torch.randn(n, N, D, generator=g) + torch.randn(n, 1, D, generator=g)
    if hard:
        where = torch.rand(n, N, generator=g).argsort(1)[:, :2]
        x[torch.arange(n)[:, None], where] += 8.0 * codes[y][:, None]
    else:
        x += 3.0 * codes[y][:, None]
    return x, y


def _accuracy(name, hard, steps=150, **options):
    (xtr, ytr), (xte, yte) = _task(512, 1, hard), _task(512, 2, hard)
    if HEADS[name].multi_layer:  # two "layers": the map and a noisier copy of it
        noisy = torch.Generator().manual_seed(3)
        xtr = torch.stack([xtr, xtr + torch.randn(xtr.shape, generator=noisy)], 1)
        xte = torch.stack([xte, xte + torch.randn(xte.shape, generator=noisy)], 1)
    torch.manual_seed(0)
    head = build_head(name, dim=32, num_classes=4, **options)
    lr = 2e-2 if name.startswith("proto") or name == "cgp" else 3e-3
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(len(xtr), (64,), generator=g)
        cls = xtr[i].mean(-2) if head.uses_cls else None
        loss = F.cross_entropy(head(xtr[i], cls=cls), ytr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        cls = xte.mean(-2) if head.uses_cls else None
        return (head(xte, cls=cls).argmax(1) == yte).float().mean().item()


@pytest.fixture
def one_thread():
    """Tiny models run faster, and steadier on a shared machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TRAIN_OPTIONS = {**SMALL, "ep": {"num_queries": 4}, "cgp": {"num_prototypes": 32, "num_layers": 2}}


def test_token_level_heads_find_rare_events_that_global_pooling_misses(one_thread):
    acc = {name: _accuracy(name, hard=True, **TRAIN_OPTIONS.get(name, {}))
           for name in ("linear", "mean", "ep", "protobin")}
    assert max(acc["linear"], acc["mean"]) < 0.45, acc  # chance is 0.25
    assert min(acc["ep"], acc["protobin"]) > 0.85, acc


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_learns_an_easy_task(name, one_thread):
    assert _accuracy(name, hard=False, steps=100, **TRAIN_OPTIONS.get(name, {})) > 0.7
