"""EAT and SSLAM: data2vec 2.0-style audio encoders (fairseq `data2vec_multi`, IMAGE modality on fbank).

Patch conv -> fixed sin-cos positions -> class ("extra") token in front -> LayerNorm on the input ->
post-norm blocks. Post-norm blocks end in a LayerNorm, so there is no final norm.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoints import CheckpointError, expect, expect_depth, load_checkpoint, load_weights, unwrap_ddp
from ..frontends import EAT_FBANK, FbankFeatures, time_patch_mask
from .base import DECODING_WORKERS, Backbone, need_checkpoint, register
from .vit import Block, PatchEmbed

PATCH = 16
ENCODER = "modality_encoders.IMAGE."
# fairseq key (after ENCODER) -> ours; the blocks keep their names
RENAMES = {
    "local_encoder.proj.weight": "local_encoder.proj.weight",
    "local_encoder.proj.bias": "local_encoder.proj.bias",
    "extra_tokens": "extra_tokens",
    "fixed_positional_encoder.positions": "positions",
    "context_encoder.norm.weight": "input_norm.weight",
    "context_encoder.norm.bias": "input_norm.bias",
}


class EAT(Backbone):
    modality = "audio"
    sample_rate = 16000
    window_seconds = 10.0
    num_prefix = 1  # the class token, fairseq's one "extra token"
    frontend = EAT_FBANK
    enough_workers = DECODING_WORKERS

    def __init__(self, dim: int = 768, depth: int = 12, num_heads: int = 12, *, name: str = "eat"):
        super().__init__()
        self.name, self.dim, self.depth = name, dim, depth
        self.grid = (self.frontend.target_frames // PATCH, self.frontend.num_mel_bins // PATCH)
        self.fbank = FbankFeatures(self.frontend)
        self.local_encoder = PatchEmbed(dim, PATCH)
        self.extra_tokens = nn.Parameter(torch.zeros(1, self.num_prefix, dim))
        self.positions = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        self.input_norm = nn.LayerNorm(dim, eps=1e-6)
        self.blocks = nn.ModuleList(Block(dim, num_heads, post_norm=True) for _ in range(depth))

    def preprocess(self, item):
        clip, valid = self.frontend.prepare(self._clip(item), self.window_samples)
        return clip, time_patch_mask(valid, self.grid, stride=PATCH)

    def block_outputs(self, inputs, mask):
        x = self.local_encoder(self.fbank(inputs)[:, None]) + self.positions
        x = torch.cat([self.extra_tokens.expand(len(x), -1, -1), x], dim=1)
        x = self.input_norm(x)
        for block in self.blocks:
            x = block(x)
            yield x


def our_keys(state: dict, path, num_tokens: int) -> dict:
    """fairseq data2vec_multi keys -> EAT's; the positions table (made for up to 2 min) is cut to one window."""
    if not any(key.startswith(ENCODER) for key in state) and any(key.startswith("model." + ENCODER) for key in state):
        state = {key.removeprefix("model."): value for key, value in state.items()}  # fine-tuned: the encoder is .model
    ours = {RENAMES[key[len(ENCODER):]]: value for key, value in state.items()
            if key.startswith(ENCODER) and key[len(ENCODER):] in RENAMES}
    ours.update((key, value) for key, value in state.items() if key.startswith("blocks."))
    if "positions" in ours:
        available = ours["positions"].shape[1]
        if available < num_tokens:
            raise CheckpointError(f"{path}: '{ENCODER}fixed_positional_encoder.positions' has {available} "
                                  f"positions, one window needs {num_tokens}")
        ours["positions"] = ours["positions"][:, :num_tokens]
    return ours


def build(name, checkpoint, *, allow_pickle=False, dim=768, depth=12, num_heads=12, final_norm=False):
    path = need_checkpoint(name, checkpoint)
    state, sha256 = load_checkpoint(path, allow_pickle=allow_pickle)
    raw = unwrap_ddp(state.get("model", state))
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        model = EAT(dim, depth, num_heads, name=name)
    state = our_keys(raw, path, model.num_tokens)
    expect_depth(path, state, depth, raw=raw)
    if "local_encoder.proj.weight" in state:
        expect(path, f"'{ENCODER}local_encoder.proj.weight'", "embedding size", dim,
               state["local_encoder.proj.weight"].shape[0], "dim", heads=True)
    if "extra_tokens" in state:
        expect(path, f"'{ENCODER}extra_tokens'", "class tokens", EAT.num_prefix, state["extra_tokens"].shape[1])
    load_weights(model, state, path)
    model.final_norm = final_norm
    model._finish(sha256, num_heads=num_heads, patch=PATCH, frontend=model.frontend.as_dict())
    return model


FACTS = dict(modality="audio", dim=768, depth=12, grid=(64, 8), num_prefix=1, window_seconds=10.0)
FORMAT = ("checkpoint: fairseq data2vec_multi dict {'model': {'modality_encoders.IMAGE.*', 'blocks.N.*'}} "
          "(fairseq files pickle their config: needs --allow-pickle)")
register("eat", help=f"EAT-base, data2vec 2.0 post-norm ViT on 128-mel fbank; {FORMAT}", **FACTS)(build)
register("sslam", help=f"SSLAM, EAT's architecture trained on audio mixtures; {FORMAT}", **FACTS)(build)
