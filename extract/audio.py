"""Decode one window of a recording as float32 mono at the encoder's sample rate.

Only the window's frames are read (soundfile seeks), so an hour-long recording costs what its
windows cost. A file that cannot give usable audio raises BadAudio: the extractor records the
reason for that item and goes on with the rest.

A WAV file cut short in its data still opens: libsndfile reports the frames that are there, and
those are read like any other; only a window wholly past them fails. A file cut short in its
header does not open and fails.
"""

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio


class BadAudio(Exception):
    """Why an item's audio cannot be used; recorded next to the item."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def load_window(path: str | Path, offset: float, duration: float | None, sample_rate: int) -> np.ndarray:
    """`duration` seconds from `offset` (None: to the end) as float32 mono at `sample_rate`.

    Channels are averaged. Fewer samples come back where the file ends early: the caller pads.
    """
    path = Path(path)
    if not path.is_file():
        raise BadAudio(f"file not found: {path}")
    try:
        with sf.SoundFile(path) as f:
            native = f.samplerate
            if f.frames == 0:
                raise BadAudio("empty: the file holds no audio frames")
            start = round(offset * native)
            if start >= f.frames:
                raise BadAudio(f"offset {offset:g} s is not before the end of the file ({f.frames / native:g} s)")
            f.seek(start)
            audio = f.read(-1 if duration is None else round(duration * native), dtype="float32", always_2d=True)
    except sf.SoundFileError as e:
        if "does not exist or is not a regular file" in str(e):  # libsndfile's words for data it cannot parse
            raise BadAudio(f"cannot decode: damaged, or not audio that libsndfile reads (a {path.suffix or 'suffix-less'} file)") from e
        raise BadAudio(f"cannot decode: {e}") from e
    if audio.size == 0:
        raise BadAudio(f"no audio in the window at {offset:g} s")
    mono = audio.mean(axis=1)
    if not np.isfinite(mono).all():
        raise BadAudio("NaN or infinite samples")
    if native != sample_rate:
        mono = resample(mono, native, sample_rate)
        if duration is not None:  # both roundings, at the file's rate and at ours, can add a sample past the window
            mono = mono[:round(duration * sample_rate)]
    return mono


# torchaudio's resampler holds one filter per output phase: (rate / gcd) filters of (native / gcd)
# taps. For rates with a small common divisor (the old Mac rate 11 127 Hz against 16 kHz: 16 000
# filters of 11 127 taps) that took 2.5 s and 3 GB for each 10 s window. Beyond this many filter
# values the same filter is evaluated at each output sample instead.
MAX_FILTER_VALUES = 1 << 22
LOWPASS_WIDTH, ROLLOFF = 6, 0.99  # torchaudio's defaults: zero crossings of the sinc kept, and its cut-off
BLOCK = 1 << 16  # output samples computed at once


def resample(audio: np.ndarray, native: int, rate: int) -> np.ndarray:
    """`audio` at `native` Hz as float32 at `rate` Hz: torchaudio's windowed-sinc (Hann) resampling."""
    divisor = math.gcd(native, rate)
    if (native // divisor) * (rate // divisor) <= MAX_FILTER_VALUES:
        return torchaudio.functional.resample(torch.from_numpy(audio), native, rate).numpy()
    return resample_any_ratio(audio, native, rate)


def resample_any_ratio(audio: np.ndarray, native: int, rate: int) -> np.ndarray:
    """torchaudio's filter, evaluated at each output sample's own offset from its input samples:
    output j is the sum over inputs n of audio[n] * h((n / native - j / rate) * cutoff), h a sinc
    under a Hann window, as torchaudio.functional.resample computes it, in memory that grows with
    the audio rather than with the rates' ratio."""
    cutoff = min(native, rate) * ROLLOFF
    width = math.ceil(LOWPASS_WIDTH * native / cutoff)  # input samples on each side with a nonzero weight
    length = math.ceil(rate * len(audio) / native)
    out = np.empty(length, dtype=np.float32)
    taps = np.arange(-width, width + 2)
    for start in range(0, length, BLOCK):
        j = np.arange(start, min(start + BLOCK, length))
        n = (j * native // rate)[:, None] + taps
        t = np.clip((n / native - j[:, None] / rate) * cutoff, -LOWPASS_WIDTH, LOWPASS_WIDTH)
        weights = np.sinc(t) * np.cos(t * np.pi / LOWPASS_WIDTH / 2) ** 2 * (cutoff / native)
        inside = (n >= 0) & (n < len(audio))
        out[start:start + len(j)] = (np.where(inside, audio[np.clip(n, 0, len(audio) - 1)], 0) * weights).sum(axis=1)
    return out
