"""Audio front-ends: the exact features each encoder family was trained on, and the token validity mask.

A pretrained encoder only gives its published quality on the features it was trained with; small
differences (window type, waveform scale, padding before or after normalising) shift every token.
The settings below are the ones in each family's training code (see specs/backbones.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torchaudio.compliance.kaldi as kaldi

FRAME_LENGTH = 400  # kaldi fbank: 25 ms frames ...
FRAME_SHIFT = 160  # ... every 10 ms at 16 kHz, snip_edges: 10 s give 998 frames


def fbank_frames(num_samples: int) -> int:
    """Number of kaldi fbank frames (snip_edges) for a clip of num_samples samples."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


@dataclass(frozen=True)
class Fbank:
    """Kaldi log-mel filterbank of one encoder family, normalised as (x - mean) / (2 * std)."""

    mean: float
    std: float
    num_mel_bins: int = 128
    window_type: str = "hanning"
    htk_compat: bool = True
    waveform_scale: float = 1.0  # BEATs was trained on int16-scaled audio: x 2**15
    remove_mean: bool = True  # subtract the clip's mean sample first ("DC removed", AudioMAE/EAT)
    pad_waveform: bool = False  # True: zero-pad the audio to the window (BEATs); False: pad the fbank frames
    target_frames: int | None = 1024  # pad (before normalising) or crop to this many frames
    frame_multiple: int = 1  # crop to a multiple of the patch height (BEATs: 16)
    sample_rate: int = 16000

    def __call__(self, waveform: torch.Tensor, window_samples: int) -> tuple[torch.Tensor, int]:
        """One clip of at most window_samples -> (features (frames, mel), number of frames holding audio)."""
        num_samples = waveform.numel()
        if self.remove_mean and num_samples:
            waveform = waveform - waveform.mean()
        if self.pad_waveform:
            waveform = torch.nn.functional.pad(waveform, (0, window_samples - num_samples))
        frames = self._fbank(waveform * self.waveform_scale)
        if self.pad_waveform:  # frames whose first 10 ms hold audio
            valid = min(math.ceil(num_samples / FRAME_SHIFT), len(frames))
        else:
            valid = len(frames)
        if self.target_frames is not None:
            frames = torch.nn.functional.pad(frames, (0, 0, 0, max(0, self.target_frames - len(frames))))
            frames = frames[: self.target_frames]
        else:
            frames = frames[: len(frames) // self.frame_multiple * self.frame_multiple]
        return (frames - self.mean) / (2 * self.std), min(valid, len(frames))

    def _fbank(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.numel() < FRAME_LENGTH:  # kaldi refuses clips shorter than one frame
            return waveform.new_zeros(0, self.num_mel_bins)
        return kaldi.fbank(
            waveform[None],
            num_mel_bins=self.num_mel_bins,
            sample_frequency=self.sample_rate,
            frame_length=25.0,
            frame_shift=10.0,
            window_type=self.window_type,
            htk_compat=self.htk_compat,
            use_energy=False,
            dither=0.0,
        )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# AudioMAE's dataset.py: AudioSet statistics, 1024 frames, zero-padded before normalising.
AUDIOMAE_FBANK = Fbank(mean=-4.2677393, std=4.5689974)
# EAT/SSLAM's feature_extract.py: the same recipe with rounded statistics.
EAT_FBANK = Fbank(mean=-4.268, std=4.569)
# BEATs.preprocess: int16 scale, kaldi's default povey window, no padding of its own (the batch is
# zero-padded as audio), and the 16x16 patch conv drops frames past a multiple of 16.
BEATS_FBANK = Fbank(
    mean=15.41663,
    std=6.55582,
    window_type="povey",
    htk_compat=False,
    waveform_scale=2.0**15,
    remove_mean=False,
    pad_waveform=True,
    target_frames=None,
    frame_multiple=16,
)


@dataclass(frozen=True)
class CrepeFrames:
    """CREPE's input as torchcrepe.preprocess makes it: 1024-sample frames every `hop` samples, centred
    on their time step (the clip is zero-padded by 512 on both sides), each mean-removed and scaled to
    unit standard deviation."""

    hop: int = 160
    frame_length: int = 1024
    sample_rate: int = 16000

    def __call__(self, waveform: torch.Tensor, window_samples: int) -> tuple[torch.Tensor, int]:
        """One clip of at most window_samples -> (frames (1 + window // hop, 1024), number of frames in the clip)."""
        num_samples = waveform.numel()
        half = self.frame_length // 2
        padded = torch.nn.functional.pad(waveform, (half, window_samples - num_samples + half))
        frames = padded.unfold(0, self.frame_length, self.hop)
        frames = frames - frames.mean(dim=1, keepdim=True)
        frames = frames / frames.std(dim=1, keepdim=True).clamp_min(1e-10)
        # torchcrepe gives a clip 1 + len // hop frames: those whose centre lies in the clip
        valid = min(1 + num_samples // self.hop, len(frames)) if num_samples else 0
        return frames, valid

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def time_patch_mask(valid_frames: int, grid: tuple[int, int], stride: int) -> torch.Tensor:
    """Token validity (T*F,) bool, time-major: a token is valid when its time patch covers at least one
    frame that holds audio. Those frames come first, so that is when the patch starts (t * stride) among them."""
    time_steps, freq = grid
    valid = torch.arange(time_steps) * stride < valid_frames
    return valid.repeat_interleave(freq)
