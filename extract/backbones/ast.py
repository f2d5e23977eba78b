"""AST (Gong et al., 2021) through Hugging Face transformers' ASTModel and ASTFeatureExtractor.

16 x 16 patches with stride 10 overlap: 1024 frames x 128 mel give 101 x 12 tokens after the class and
distillation tokens. transformers flattens the patches frequency-major; they are reordered time-major.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..checkpoints import CheckpointError, expect, pickle_refused, sha256_file
from ..frontends import fbank_frames, time_patch_mask
from .base import Backbone, need_checkpoint, register


def ast_grid(config) -> tuple[int, int]:
    """(T, F) of ASTModel's patch grid, from its config."""
    return (
        (config.max_length - config.patch_size) // config.time_stride + 1,
        (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1,
    )


def ast_window_seconds(config) -> float:
    """Seconds of audio whose fbank fits in `max_length` frames of 10 ms, at most AudioSet's 10 s clips.

    The feature extractor keeps only the first max_length frames: a longer window would drop audio
    without a word (a Speech Commands AST has max_length 128, 1.28 s). AudioSet's 1024 frames take a
    10 s clip (998 frames) zero-padded, as AST was trained.
    """
    return min(10.0, config.max_length / 100)


class AST(Backbone):
    modality = "audio"
    sample_rate = 16000
    num_prefix = 2  # class and distillation tokens

    def __init__(self, model, features, *, final_norm: bool = False, name: str = "ast"):
        super().__init__()
        config = model.config
        self.name, self.model, self.features, self.final_norm = name, model, features, final_norm
        self.dim, self.depth = config.hidden_size, config.num_hidden_layers
        self.grid = ast_grid(config)
        self.window_seconds = ast_window_seconds(config)
        self.time_stride = config.time_stride
        self.norm = model.layernorm

    def preprocess(self, item):
        clip = self._clip(item)
        features = self.features(clip.numpy(), sampling_rate=self.sample_rate, return_tensors="pt")["input_values"][0]
        return features, time_patch_mask(fbank_frames(clip.numel()), self.grid, stride=self.time_stride)

    def block_outputs(self, inputs, mask):
        hidden = self.model(inputs, output_hidden_states=True).hidden_states[1:]  # [0] is the embedding
        time_steps, freq = self.grid
        for x in hidden:
            patches = x[:, 2:].unflatten(1, (freq, time_steps)).transpose(1, 2).flatten(1, 2)
            yield torch.cat([x[:, :2], patches], dim=1)


@register(
    "ast",
    help="AST via transformers (grid and window from the checkpoint's max_length: AudioSet's 1024 frames, 10 s, shown); "
         "checkpoint: a local folder saved with save_pretrained (config.json + weights)",
    modality="audio", dim=768, depth=12, grid=(101, 12), num_prefix=2, window_seconds=10.0,
)
def build(name, checkpoint, *, allow_pickle=False, dim=768, depth=12, final_norm=False):
    try:
        from transformers import ASTFeatureExtractor, ASTModel
    except ImportError as error:
        raise ValueError(f"{name} needs transformers: pip install 'tokencache[models]' ({error})") from None

    path = Path(need_checkpoint(name, checkpoint))
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: {name} needs a local folder saved with save_pretrained (config.json + weights)")
    try:  # transformers loads a pytorch_model.bin with torch.load(weights_only=True) unless told otherwise
        model = ASTModel.from_pretrained(path, local_files_only=True, weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        pickled = sorted(path.glob("*.bin"))
        raise pickle_refused(pickled[0] if len(pickled) == 1 else path, err) from None
    config = model.config
    expect(path, "config.json hidden_size", "embedding size", dim, config.hidden_size, "dim")
    expect(path, "config.json num_hidden_layers", "depth", depth, config.num_hidden_layers, "depth")
    if (path / "preprocessor_config.json").is_file():
        features = ASTFeatureExtractor.from_pretrained(path, local_files_only=True)
    else:
        features = ASTFeatureExtractor(num_mel_bins=config.num_mel_bins, max_length=config.max_length)
    expect(path, "the feature extractor's sampling_rate", "sample rate", 16000, features.sampling_rate)
    expect(path, "the feature extractor's num_mel_bins", "mel bins", config.num_mel_bins, features.num_mel_bins)
    expect(path, "the feature extractor's max_length", "frames", config.max_length, features.max_length)
    backbone = AST(model, features, final_norm=final_norm, name=name)
    settings = ("sampling_rate", "num_mel_bins", "max_length", "do_normalize", "mean", "std")
    frontend = {k: getattr(features, k) for k in settings}
    backbone._finish(sha256_file(path), patch=config.patch_size, time_stride=config.time_stride,
                     frequency_stride=config.frequency_stride, frontend=frontend)
    return backbone
