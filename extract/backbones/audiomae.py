"""AudioMAE (Huang et al., 2022): a pre-norm ViT with a class token on 1024 x 128 kaldi fbank,
16 x 16 patches -> a 64 x 8 grid for 10 s."""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoints import expect, expect_depth, load_checkpoint, load_weights, unwrap_ddp
from ..frontends import AUDIOMAE_FBANK, FbankFeatures, time_patch_mask
from .base import DECODING_WORKERS, Backbone, need_checkpoint, register
from .vit import Block, PatchEmbed

PATCH = 16


class AudioMAE(Backbone):
    modality = "audio"
    sample_rate = 16000
    window_seconds = 10.0
    num_prefix = 1
    frontend = AUDIOMAE_FBANK
    enough_workers = DECODING_WORKERS

    def __init__(self, dim: int = 768, depth: int = 12, num_heads: int = 12, *, has_norm: bool = True,
                 final_norm: bool = False, name: str = "audiomae"):
        super().__init__()
        self.name, self.dim, self.depth, self.final_norm = name, dim, depth, final_norm
        self.grid = (self.frontend.target_frames // PATCH, self.frontend.num_mel_bins // PATCH)
        self.fbank = FbankFeatures(self.frontend)
        self.patch_embed = PatchEmbed(dim, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_tokens, dim))  # fixed sin-cos, from the checkpoint
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        if has_norm:  # fine-tuned checkpoints replace it by fc_norm after pooling
            self.norm = nn.LayerNorm(dim, eps=1e-6)

    def preprocess(self, item):
        clip, valid = self.frontend.prepare(self._clip(item), self.window_samples)
        return clip, time_patch_mask(valid, self.grid, stride=PATCH)

    def block_outputs(self, inputs, mask):
        x = self.patch_embed(self.fbank(inputs)[:, None]) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
            yield x


@register(
    "audiomae",
    help="AudioMAE ViT-B/16 on 128-mel fbank; "
         "checkpoint: torch.load dict {'model': timm ViT keys} (decoder keys ignored)",
    modality="audio", dim=768, depth=12, grid=(64, 8), num_prefix=1, window_seconds=10.0,
)
def build(name, checkpoint, *, allow_pickle=False, dim=768, depth=12, num_heads=12, final_norm=False):
    path = need_checkpoint(name, checkpoint)
    state, sha256 = load_checkpoint(path, allow_pickle=allow_pickle)
    state = unwrap_ddp(state.get("model", state))
    expect_depth(path, state, depth)
    if "patch_embed.proj.weight" in state:
        expect(path, "'patch_embed.proj.weight'", "embedding size", dim, state["patch_embed.proj.weight"].shape[0], "dim", heads=True)
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        model = AudioMAE(dim, depth, num_heads, has_norm="norm.weight" in state, final_norm=final_norm, name=name)
    if "pos_embed" in state:
        expect(path, "'pos_embed'", "tokens (class + T*F)", 1 + model.num_tokens, state["pos_embed"].shape[1])
    load_weights(model, state, path)
    model._finish(sha256, num_heads=num_heads, patch=PATCH, frontend=model.frontend.as_dict())
    return model
