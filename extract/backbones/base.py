"""The common interface of all backbones and the registry they enter themselves in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch


# Workers enough for audio whose front-end runs on the device: one decodes a 10 s wav clip in about
# 1 ms, so 8 decode several times what a GPU encodes. On the two-GPU H200 host (32 cores), one-layer
# extractions of 32 768 clips, interleaved, streamed 2 850 and 2 847 clips/s with 8 workers against
# 2 262 and 2 240 with 31 (and 2 433 and 2 273 with 31 workers prefetching a batch each, not 4).
DECODING_WORKERS = 8


class Backbone(torch.nn.Module):
    """A frozen encoder seen as a map from one input item to a (T, F) grid of D-dim tokens per layer.

    Subclasses set the attributes below, implement `preprocess` (CPU, DataLoader workers) and
    `block_outputs` (the full token sequence after each layer); `forward` picks the requested layers,
    applies the final norm when asked and splits prefix tokens from patch tokens. Front-end work
    that is the same for every item and heavy (an fbank, framing) belongs at the start of
    `block_outputs`, a batch at a time on the device; `preprocess` keeps what depends on the item
    alone (its length, its mean) and is cheap.
    """

    name: str
    modality: str  # "audio" | "image"
    sample_rate: int | None = None
    window_seconds: float | None = None
    dim: int
    depth: int
    num_prefix: int = 0  # class/distillation/register tokens in front of the patch tokens
    grid: tuple[int, int]  # (T, F) of one full window; tokens are flattened time-major
    config: dict  # JSON-able; everything that changes the tokens, the checkpoint's SHA-256 included
    checkpoint_sha256: str | None = None
    final_norm: bool = False
    norm: torch.nn.Module | None  # the final norm, for encoders that have one
    final_norm_params: dict | None = None  # see _finish
    # DataLoader workers that keep ahead of the GPU when `preprocess` only decodes (audio whose
    # front-end runs on the device); None: one per usable core but one.
    enough_workers: int | None = None

    def __init__(self):
        super().__init__()
        self.norm = None  # an instance attribute: assigning a module later registers it

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def window_samples(self) -> int | None:
        """Samples in one window; longer recordings must be cut into windows of this length first."""
        if self.window_seconds is None:
            return None
        return round(self.window_seconds * self.sample_rate)

    def preprocess(self, item) -> tuple[torch.Tensor, torch.Tensor]:
        """One item (1-D waveform at sample_rate, at most one window; or a PIL image) ->
        (model input for that item, of one shape for every item; token validity mask (T*F,) bool)."""
        raise NotImplementedError

    def block_outputs(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> Iterator[torch.Tensor]:
        """Yield the token sequence (B, num_prefix + T*F, D) after each layer, in order."""
        raise NotImplementedError

    def forward(
        self, inputs: torch.Tensor, layers: list[int], mask: torch.Tensor | None = None
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """Batched model inputs -> {layer: (patch tokens (B, T*F, D), prefix tokens (B, num_prefix, D) or None)}.

        layers are block indices 0..depth-1, negative ones counted from the end (-1 = last); the
        result is keyed by the indices as given. Outputs are block outputs, after the final norm
        only if final_norm. mask is the stacked validity from preprocess: encoders trained with a
        padding mask (BEATs) use it, the others were trained on padded inputs and ignore it.
        """
        wanted = [self._layer_index(layer) for layer in layers]
        found = {}
        for index, tokens in enumerate(self.block_outputs(inputs, mask)):
            if index in wanted:
                found[index] = self.norm(tokens) if self.final_norm else tokens
            if len(found) == len(set(wanted)):
                break  # later blocks are not needed
        return {layer: self._split(found[index]) for layer, index in zip(layers, wanted)}

    def _split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.num_prefix:
            return tokens, None
        return tokens[:, self.num_prefix :], tokens[:, : self.num_prefix]

    def _layer_index(self, layer: int) -> int:
        index = layer + self.depth if layer < 0 else layer
        if not 0 <= index < self.depth:
            raise IndexError(f"{self.name} has layers 0..{self.depth - 1} (or -1..-{self.depth}); got {layer}")
        return index

    def _clip(self, item) -> torch.Tensor:
        """An audio item as a 1-D float32 tensor, checked to fit in one window."""
        clip = torch.as_tensor(np.asarray(item, dtype=np.float32))
        if clip.ndim != 1:
            raise ValueError(f"{self.name} takes 1-D mono audio; got shape {tuple(clip.shape)}")
        if clip.numel() > self.window_samples:
            raise ValueError(
                f"{self.name} takes at most one {self.window_seconds} s window ({self.window_samples} samples "
                f"at {self.sample_rate} Hz); got {clip.numel()}: cut longer recordings into windows first"
            )
        return clip

    @property
    def class_token(self) -> bool:
        """Whether the first prefix token is a class token, which heads on the class token read."""
        return self.num_prefix > 0

    def _finish(self, checkpoint_sha256: str | None, **details) -> None:
        """Record the checkpoint hash and the JSON-able config once the model is built and loaded."""
        if self.final_norm and self.norm is None:
            raise ValueError(f"{self.name} has no final norm in this architecture or checkpoint; leave out --final-norm (final_norm=False)")
        self.checkpoint_sha256 = checkpoint_sha256
        self.final_norm_params = None if self.final_norm else layer_norm_params(self.norm)
        self.config = {
            "name": self.name,
            "modality": self.modality,
            "sample_rate": self.sample_rate,
            "window_seconds": self.window_seconds,
            "dim": self.dim,
            "depth": self.depth,
            "num_prefix": self.num_prefix,
            "grid": list(self.grid),
            "final_norm": self.final_norm,
            "checkpoint_sha256": checkpoint_sha256,
            **details,
        }


def layer_norm_params(norm: torch.nn.Module | None) -> dict | None:
    """A final LayerNorm's parameters, which a store of raw block outputs records so that `tokens
    probe --final-norm` can give the normed tokens from it too; None for encoders
    without a final norm and norms of other kinds. Read once the weights are loaded, before the model
    goes to the device. Each float32 value is written in its shortest exact form (half the JSON of a
    float64's)."""
    if not isinstance(norm, torch.nn.LayerNorm):
        return None

    def values(param):
        return None if param is None else [float(str(v)) for v in param.detach().float().cpu().numpy()]

    return {"kind": "layer_norm", "eps": float(norm.eps), "weight": values(norm.weight), "bias": values(norm.bias)}


def need_checkpoint(name: str, checkpoint) -> str:
    """The checkpoint path, or a clear error: weights are never downloaded."""
    if checkpoint is None:
        raise ValueError(f"{name} needs a checkpoint (--checkpoint PATH); weights are never downloaded")
    return checkpoint


@dataclass(frozen=True)
class Entry:
    """One registry entry: the documented configuration next to the function that builds it."""

    name: str
    build: Callable[..., Backbone]  # build(name, checkpoint, allow_pickle=..., **options)
    help: str
    config: dict = field(default_factory=dict)  # modality, dim, depth, grid, window_seconds, checkpoint format


BACKBONES: dict[str, Entry] = {}


def register(name: str, help: str, **config) -> Callable:
    """Decorator: enter a builder in BACKBONES under name, with the configuration it documents."""

    def enter(build: Callable[..., Backbone]) -> Callable[..., Backbone]:
        BACKBONES[name] = Entry(name, build, help, config)
        return build

    return enter
