"""Audio front-ends: the exact features each encoder family was trained on, and the token validity mask.

A pretrained encoder only gives its published quality on the features it was trained with; small
differences (window type, waveform scale, padding before or after normalising) shift every token.
The settings below are the ones in each family's training code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torchaudio.compliance.kaldi as kaldi

FRAME_LENGTH = 400  # kaldi fbank: 25 ms frames ...
FRAME_SHIFT = 160  # ... every 10 ms at 16 kHz, snip_edges: 10 s give 998 frames


PREEMPHASIS = 0.97
FFT_SIZE = 512  # the frame length rounded up to a power of two


def _window(window_type: str) -> torch.Tensor:
    """Kaldi's frame windows: a symmetric Hann window, or Povey's (Hann to the power 0.85)."""
    hann = torch.hann_window(FRAME_LENGTH, periodic=False)
    return {"hanning": hann, "povey": hann.pow(0.85)}[window_type]


def _mel_banks(num_mel_bins: int, sample_rate: int) -> torch.Tensor:
    """(FFT_SIZE // 2 + 1, num_mel_bins): kaldi's triangular mel filters from 20 Hz to Nyquist."""
    banks, _ = kaldi.get_mel_banks(num_mel_bins, FFT_SIZE, float(sample_rate), 20.0, 0.0, 100.0, -500.0, 1.0)
    return torch.nn.functional.pad(banks, (0, 1)).T.contiguous()


def fbank_frames(num_samples: int) -> int:
    """Number of kaldi fbank frames (snip_edges) for a clip of num_samples samples."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


@dataclass(frozen=True)
class Fbank:
    """Kaldi log-mel filterbank of one encoder family, normalised as (x - mean) / (2 * std).

    It runs in two steps: prepare() in the DataLoader workers (the clip's own mean, padding to the
    window) and FbankFeatures on the device, a whole batch at once. The fbank is most of the
    front-end's work: 7-9 ms per 10 s clip on one core of the two-GPU H200 host, against 1.1 ms for
    decoding the wav file. On the CPU, a GPU's rate (2 700 clips/s) took some 20 cores.
    """

    mean: float
    std: float
    num_mel_bins: int = 128
    window_type: str = "hanning"
    htk_compat: bool = True  # recorded as the family's kaldi call sets it; without energy it changes nothing here
    waveform_scale: float = 1.0  # BEATs was trained on int16-scaled audio: x 2**15
    remove_mean: bool = True  # subtract the clip's mean sample first ("DC removed", AudioMAE/EAT)
    pad_waveform: bool = False  # True: zero-pad the audio to the window (BEATs); False: pad the fbank frames
    target_frames: int | None = 1024  # pad (before normalising) or crop to this many frames
    frame_multiple: int = 1  # crop to a multiple of the patch height (BEATs: 16)
    sample_rate: int = 16000

    def prepare(self, waveform: torch.Tensor, window_samples: int) -> tuple[torch.Tensor, int]:
        """One clip of at most window_samples -> (the clip as FbankFeatures takes it (window_samples,),
        number of feature frames holding audio).

        Recipes that pad the fbank frames rather than the audio must know where the clip ends: the
        samples past it are NaN, so that every frame reaching past the end comes out NaN, and
        FbankFeatures puts the recipe's zero frames there. Decoded audio has no NaN (see audio.py).
        """
        num_samples = waveform.numel()
        if self.remove_mean and num_samples:
            waveform = waveform - waveform.mean()
        past_end = 0.0 if self.pad_waveform else math.nan
        clip = torch.nn.functional.pad(waveform, (0, window_samples - num_samples), value=past_end)
        if self.pad_waveform:  # frames whose first 10 ms hold audio
            valid = math.ceil(num_samples / FRAME_SHIFT)
        else:
            valid = fbank_frames(num_samples)
        return clip, min(valid, self.output_frames(window_samples))

    def output_frames(self, window_samples: int) -> int:
        """Feature frames per window, after padding or cropping."""
        if self.target_frames is not None:
            return self.target_frames
        return fbank_frames(window_samples) // self.frame_multiple * self.frame_multiple

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class FbankFeatures(torch.nn.Module):
    """A batch of prepared clips (B, window_samples) -> normalised features (B, frames, mel), on
    the clips' device, always in float32 (the log of a bfloat16 power spectrum would lose most of it).

    Kaldi's log-mel fbank (torchaudio.compliance.kaldi.fbank with dither=0, use_energy=False,
    snip_edges) in one pass, equal to it within float32 rounding. Per frame: remove the DC offset,
    pre-emphasise (the first sample is its own predecessor), window, zero-pad to 512, power
    spectrum, mel filterbank, log floored at float32's epsilon. The window and the filterbank are
    buffers, so that they move with the model and a CUDA graph can capture the whole pass.
    """

    def __init__(self, settings: Fbank):
        super().__init__()
        self.settings = settings
        with torch.device("cpu"):  # real tensors, even while the model is built on the meta device
            self.register_buffer("window", _window(settings.window_type), persistent=False)
            self.register_buffer("mel_banks", _mel_banks(settings.num_mel_bins, settings.sample_rate), persistent=False)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        s = self.settings
        with torch.autocast(clips.device.type, enabled=False):
            frames = (clips.float() * s.waveform_scale).unfold(1, FRAME_LENGTH, FRAME_SHIFT)
            past_end = frames.isnan().any(dim=2, keepdim=True)  # (B, frames, 1): see Fbank.prepare
            frames = frames - frames.mean(dim=2, keepdim=True)
            previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=2)
            spectrum = torch.fft.rfft((frames - PREEMPHASIS * previous) * self.window, n=FFT_SIZE)
            power = spectrum.real.square() + spectrum.imag.square()
            fbank = (power @ self.mel_banks).clamp_min(torch.finfo(torch.float32).eps).log()
            # the recipe's zero padding past the clip's end; an overflow elsewhere stays visible as non-finite tokens
            fbank = fbank.masked_fill(past_end, 0.0)
            frames_out = s.output_frames(clips.shape[1])
            fbank = torch.nn.functional.pad(fbank, (0, 0, 0, max(0, frames_out - fbank.shape[1])))[:, :frames_out]
            return (fbank - s.mean) / (2 * s.std)


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
    unit standard deviation. prepare() runs in the DataLoader workers, frames() on the device: a
    batch's frames are about 6 times the bytes of its audio."""

    hop: int = 160
    frame_length: int = 1024
    sample_rate: int = 16000

    def prepare(self, waveform: torch.Tensor, window_samples: int) -> tuple[torch.Tensor, int]:
        """One clip of at most window_samples -> (the clip zero-padded to the window, number of frames
        in the clip: torchcrepe gives a clip 1 + len // hop frames, those whose centre lies in it)."""
        num_samples = waveform.numel()
        clip = torch.nn.functional.pad(waveform, (0, window_samples - num_samples))
        valid = min(1 + num_samples // self.hop, self.num_frames(window_samples)) if num_samples else 0
        return clip, valid

    def num_frames(self, window_samples: int) -> int:
        return 1 + window_samples // self.hop

    def frames(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, window_samples) prepared clips -> (B, 1 + window // hop, 1024) normalised frames."""
        half = self.frame_length // 2
        frames = torch.nn.functional.pad(clips, (half, half)).unfold(1, self.frame_length, self.hop)
        frames = frames - frames.mean(dim=2, keepdim=True)
        return frames / frames.std(dim=2, keepdim=True).clamp_min(1e-10)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def time_patch_mask(valid_frames: int, grid: tuple[int, int], stride: int) -> torch.Tensor:
    """Token validity (T*F,) bool, time-major: a token is valid when its time patch covers at least one
    frame that holds audio. Those frames come first, so that is when the patch starts (t * stride) among them."""
    time_steps, freq = grid
    valid = torch.arange(time_steps) * stride < valid_frames
    return valid.repeat_interleave(freq)
