"""BEATs (Chen et al., 2022): post-norm transformer with DeepNorm residual scaling, a convolutional
positional embedding and a gated, bucketed relative position bias, on 16 x 16 patches of a
kaldi fbank (62 x 8 for 10 s). No class token, no final norm.

The layout follows microsoft/unilm beats/BEATs.py and backbone.py so that their checkpoints
({'cfg': dict, 'model': state dict}) load with only the weight-normalised conv folded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import (CheckpointError, count_indexed, expect, load_checkpoint, load_weights, unwrap_ddp, wrapped,
                           wrapping_prefixes)
from ..frontends import BEATS_FBANK, FbankFeatures, time_patch_mask
from .base import DECODING_WORKERS, Backbone, need_checkpoint, register

# BEATsConfig's defaults; a checkpoint's 'cfg' overrides them.
DEFAULTS = dict(
    input_patch_size=16, embed_dim=512, conv_bias=False, encoder_layers=12, encoder_embed_dim=768,
    encoder_ffn_embed_dim=3072, encoder_attention_heads=12, activation_fn="gelu", layer_norm_first=False,
    deep_norm=False, conv_pos=128, conv_pos_groups=16, relative_position_embedding=False, num_buckets=320,
    max_distance=1280, gru_rel_pos=False,
)
# What the released BEATs checkpoints (iter1-iter3+) use.
RELEASED = dict(DEFAULTS, deep_norm=True, relative_position_embedding=True, max_distance=800, gru_rel_pos=True)
ARCHITECTURE = tuple(DEFAULTS)  # the cfg entries that change the tokens


def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional bucketing: exact buckets for small offsets, log-spaced up to max_distance."""
    num_buckets //= 2
    buckets = (relative > 0).long() * num_buckets
    distance = relative.abs()
    exact = num_buckets // 2
    log_bucket = exact + (
        torch.log(distance.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    ).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, log_bucket)


def positional_conv(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """The grouped positional conv: on a GPU through the FFT, where cuDNN's grouped kernels take ~10x
    longer for BEATs' 128 taps (26 vs 2.4 ms for 64 clips on an H200; 60% of the forward pass).
    On a CPU the direct conv is the faster one."""
    return conv1d_fft(x, conv) if x.is_cuda else conv(x)


def conv1d_fft(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """conv(x) for a grouped nn.Conv1d with padding taps // 2, as a float32 FFT convolution."""
    batch, _, length = x.shape
    out_channels, per_group, taps = conv.weight.shape
    pad, groups = taps // 2, conv.groups
    size = length + 2 * pad + taps - 1  # the full linear convolution: no wrap-around
    signal = torch.fft.rfft(F.pad(x.float(), (pad, pad)).view(batch, groups, per_group, -1), n=size)
    kernel = conv.weight.float().flip(-1).view(groups, out_channels // groups, per_group, taps)
    y = torch.fft.irfft(torch.einsum("bgif,goif->bgof", signal, torch.fft.rfft(kernel, n=size)), n=size)
    y = y[..., taps - 1 : length + 2 * pad]  # where the kernel lies inside the padded input, as in conv(x)
    return (y.reshape(batch, out_channels, -1) + conv.bias.float()[:, None]).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention plus the relative position bias, gated per query when gru_rel_pos."""

    def __init__(self, dim: int, num_heads: int, gated: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        if gated:
            self.grep_linear = nn.Linear(dim // num_heads, 8)
            self.grep_a = nn.Parameter(torch.ones(1, num_heads, 1, 1))
        self.gated = gated

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, key_padding: torch.Tensor | None) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = (proj(x).view(batch, length, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if bias is not None:
            bias = bias.to(q.dtype)  # the (batch, heads, L, L) tensors below are the memory traffic
        if bias is not None and self.gated:  # the gate reads each head's query (before scaling)
            gates = self.grep_linear(q).view(batch, self.num_heads, length, 2, 4).sum(-1)
            gate_a, gate_b = torch.sigmoid(gates).chunk(2, dim=-1)
            bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
        if key_padding is not None:
            hide = q.new_zeros(batch, 1, 1, length).masked_fill(key_padding[:, None, None, :], float("-inf"))
            bias = hide if bias is None else bias + hide
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out_proj(x.transpose(1, 2).reshape(batch, length, dim))


class Layer(nn.Module):
    """Post-norm block; DeepNorm multiplies the skip path by alpha = (2 * depth) ** 0.25."""

    def __init__(self, dim: int, ffn: int, num_heads: int, gated: bool, alpha: float):
        super().__init__()
        self.alpha = alpha
        self.self_attn = SelfAttention(dim, num_heads, gated)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x, bias, key_padding):
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, bias, key_padding))
        return self.final_layer_norm(x * self.alpha + self.fc2(F.gelu(self.fc1(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        dim = cfg["encoder_embed_dim"]
        # the checkpoint's weight-normalised conv (weight_g, weight_v) is folded into a plain weight at load
        kernel = cfg["conv_pos"]
        self.pos_conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=cfg["conv_pos_groups"])
        self.layer_norm = nn.LayerNorm(dim)
        if cfg["relative_position_embedding"]:  # one table shared by all layers
            self.relative_attention_bias = nn.Embedding(cfg["num_buckets"], cfg["encoder_attention_heads"])
        alpha = (2 * cfg["encoder_layers"]) ** 0.25 if cfg["deep_norm"] else 1.0
        self.layers = nn.ModuleList(
            Layer(dim, cfg["encoder_ffn_embed_dim"], cfg["encoder_attention_heads"], cfg["gru_rel_pos"], alpha)
            for _ in range(cfg["encoder_layers"])
        )
        self.cfg = cfg

    def position_bias(self, length: int) -> torch.Tensor | None:
        if not self.cfg["relative_position_embedding"]:
            return None
        positions = torch.arange(length, device=self.relative_attention_bias.weight.device)
        offsets = positions[None, :] - positions[:, None]  # key - query
        buckets = relative_position_bucket(offsets, self.cfg["num_buckets"], self.cfg["max_distance"])
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, heads, length, length)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None):
        if key_padding is not None:
            x = x.masked_fill(key_padding[..., None], 0.0)
        conv = positional_conv(x.transpose(1, 2), self.pos_conv)
        if self.cfg["conv_pos"] % 2 == 0:
            conv = conv[..., :-1]  # "same" length for an even kernel
        x = self.layer_norm(x + F.gelu(conv).transpose(1, 2))
        bias = self.position_bias(x.shape[1])
        for layer in self.layers:
            x = layer(x, bias, key_padding)
            yield x


class BEATs(Backbone):
    modality = "audio"
    sample_rate = 16000
    window_seconds = 10.0
    frontend = BEATS_FBANK
    enough_workers = DECODING_WORKERS

    def __init__(self, cfg: dict = RELEASED, *, name: str = "beats"):
        super().__init__()
        self.name, self.dim, self.depth = name, cfg["encoder_embed_dim"], cfg["encoder_layers"]
        self.patch = cfg["input_patch_size"]
        self.grid = (self.frontend.output_frames(self.window_samples) // self.patch, self.frontend.num_mel_bins // self.patch)
        self.fbank = FbankFeatures(self.frontend)
        self.patch_embedding = nn.Conv2d(1, cfg["embed_dim"], self.patch, stride=self.patch, bias=cfg["conv_bias"])
        self.layer_norm = nn.LayerNorm(cfg["embed_dim"])
        same = cfg["embed_dim"] == self.dim
        self.post_extract_proj = nn.Identity() if same else nn.Linear(cfg["embed_dim"], self.dim)
        self.encoder = Encoder(cfg)

    def preprocess(self, item):
        clip, valid = self.frontend.prepare(self._clip(item), self.window_samples)
        return clip, time_patch_mask(valid, self.grid, stride=self.patch)

    def block_outputs(self, inputs, mask):
        x = self.patch_embedding(self.fbank(inputs)[:, None]).flatten(2).transpose(1, 2)  # time-major (T, F) patches
        x = self.post_extract_proj(self.layer_norm(x))
        key_padding = None
        if mask is not None:  # an item with no audio at all attends to everything rather than to nothing
            key_padding = ~mask.bool() & mask.bool().any(dim=1, keepdim=True)
        yield from self.encoder(x, key_padding)


def our_keys(state: dict) -> dict:
    """Fold the weight norm of the positional conv (w = g * v / |v|, norm over all but the kernel axis)
    and keep one copy of the shared relative position table."""
    state = dict(state)
    new_style = "encoder.pos_conv.0.parametrizations.weight.original0"
    if new_style in state:  # torch's parametrize.weight_norm
        state["encoder.pos_conv.0.weight_g"] = state.pop(new_style)
        state["encoder.pos_conv.0.weight_v"] = state.pop("encoder.pos_conv.0.parametrizations.weight.original1")
    if "encoder.pos_conv.0.weight_v" in state:
        g, v = state.pop("encoder.pos_conv.0.weight_g"), state.pop("encoder.pos_conv.0.weight_v")
        state["encoder.pos_conv.weight"] = v * (g / v.norm(dim=(0, 1), keepdim=True))
        state["encoder.pos_conv.bias"] = state.pop("encoder.pos_conv.0.bias")
    table = "encoder.layers.0.self_attn.relative_attention_bias.weight"
    if table in state:
        state["encoder.relative_attention_bias.weight"] = state[table]
    return state


@register(
    "beats",
    help="BEATs iter3/iter3+ (post-norm, DeepNorm, relative position bias) on 128-mel fbank; "
         "checkpoint: torch.load dict {'cfg': dict, 'model': state dict}",
    modality="audio", dim=768, depth=12, grid=(62, 8), num_prefix=0, window_seconds=10.0,
)
def build(name, checkpoint, *, allow_pickle=False, dim=768, depth=12, final_norm=False):
    path = need_checkpoint(name, checkpoint)
    saved, sha256 = load_checkpoint(path, allow_pickle=allow_pickle)
    if not isinstance(saved, dict) or "cfg" not in saved or "model" not in saved:
        raise CheckpointError(f"{path}: a BEATs checkpoint is a dict with 'cfg' and 'model'")
    cfg = {**DEFAULTS, **{k: v for k, v in saved["cfg"].items() if k in DEFAULTS}}
    unsupported = {k: cfg[k] for k, ours in (("layer_norm_first", False), ("activation_fn", "gelu")) if cfg[k] != ours}
    if unsupported:
        raise CheckpointError(f"{path}: BEATs with cfg {unsupported} is not supported (released models use neither)")
    expect(path, "cfg['encoder_embed_dim']", "embedding size", dim, cfg["encoder_embed_dim"], "dim")
    expect(path, "cfg['encoder_layers']", "depth", depth, cfg["encoder_layers"], "depth")
    expect(path, "cfg['input_patch_size']", "patch size", 16, cfg["input_patch_size"])
    state = our_keys(unwrap_ddp(saved["model"]))
    if not count_indexed(state, "encoder.layers.") and (prefixes := wrapping_prefixes(saved["model"], "encoder.layers.")):
        raise wrapped(path, prefixes)
    expect(path, "'encoder.layers.N.*'", "depth", depth, count_indexed(state, "encoder.layers."))
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        model = BEATs(cfg, name=name)
    load_weights(model, state, path)
    model.final_norm = final_norm
    model._finish(sha256, beats_cfg={k: cfg[k] for k in ARCHITECTURE}, frontend=model.frontend.as_dict())
    return model
