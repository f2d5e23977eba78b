"""Audio front-ends: the exact features each encoder family was trained on, and the token validity mask.

A pretrained encoder only gives its published quality on the features it was trained with; small
differences (window type, waveform scale, padding before or after normalising) shift every token.
The settings below are the ones in each family's training code (see specs/backbones.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torchaudio.compliance.kaldi as kaldi

FRAME_LENGTH = 400  # kaldi fbank: 25 ms frames ...
FRAME_SHIFT = 160  # ... every 10 ms at 16 kHz, snip_edges: 10 s give 998 frames


PREEMPHASIS = 0.97
FFT_SIZE = 512  # the frame length rounded up to a power of two


@functools.cache
def _window(window_type: str) -> torch.Tensor:
    """Kaldi's frame windows: a symmetric Hann window, or Povey's (Hann to the power 0.85)."""
    hann = torch.hann_window(FRAME_LENGTH, periodic=False)
    return {"hanning": hann, "povey": hann.pow(0.85)}[window_type]


@functools.cache
def _mel_banks(num_mel_bins: int, sample_rate: int) -> torch.Tensor:
    """(FFT_SIZE // 2 + 1, num_mel_bins): kaldi's triangular mel filters from 20 Hz to Nyquist."""
    banks, _ = kaldi.get_mel_banks(num_mel_bins, FFT_SIZE, float(sample_rate), 20.0, 0.0, 100.0, -500.0, 1.0)
    return torch.nn.functional.pad(banks, (0, 1)).T.contiguous()


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
        """Kaldi's log-mel fbank (torchaudio.compliance.kaldi.fbank with dither=0, use_energy=False,
        snip_edges), computed in one pass: about 1.5x faster, equal to it within float32 rounding.

        Per frame: remove the DC offset, pre-emphasise (the first sample is its own predecessor),
        window, zero-pad to 512, power spectrum, mel filterbank, log floored at float32's epsilon.
        torchaudio's version spends most of its time on |X| (a square root) and padding copies.
        """
        if waveform.numel() < FRAME_LENGTH:  # kaldi refuses clips shorter than one frame
            return waveform.new_zeros(0, self.num_mel_bins)
        frames = waveform.unfold(0, FRAME_LENGTH, FRAME_SHIFT)
        frames = frames - frames.mean(dim=1, keepdim=True)
        previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
        frames = (frames - PREEMPHASIS * previous) * _window(self.window_type)
        spectrum = torch.fft.rfft(frames, n=FFT_SIZE)
        power = spectrum.real.square() + spectrum.imag.square()
        return (power @ _mel_banks(self.num_mel_bins, self.sample_rate)).clamp_min(torch.finfo(torch.float32).eps).log()

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
