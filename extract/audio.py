"""Decode one window of a recording as float32 mono at the encoder's sample rate.

Only the window's frames are read (soundfile seeks), so an hour-long recording costs what its
windows cost; but for lossy formats libsndfile's seeks are not exact, so those files are read from
their start (see DECODED_FROM_START). A file that cannot give usable audio raises BadAudio: the
extractor records the reason for that item and goes on with the rest.

A WAV file cut short in its data still opens: libsndfile reports the frames that are there, and
those are read like any other; only a window wholly past them fails. A file cut short in its
header does not open and fails.
"""

import math
import os
import threading
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
        reader = _reader_for(path, offset)
        try:
            native = reader.file.samplerate
            if reader.file.frames == 0:
                raise BadAudio("empty: the file holds no audio frames")
            start = round(offset * native)
            if start >= reader.file.frames:
                raise BadAudio(f"offset {offset:g} s is not before the end of the file ({reader.file.frames / native:g} s)")
            audio = reader.read(start, None if duration is None else round(duration * native))
        except BaseException:
            reader.file.close()
            raise
        _keep(reader)
    except FileNotFoundError as e:  # deleted since the check above
        raise BadAudio(f"file not found: {path}") from e
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


# libsndfile's seeks are exact in uncompressed and lossless files, not in lossy ones: after a seek in
# an MP3, its decoder (mpg123) gives wrong samples, without an error, for up to a third of a second of
# tonal audio; in Ogg Vorbis a seek can land a block off (libsndfile issue #885). Windows of these,
# and of the encodings that cannot seek at all (GSM 6.10, G.72x), are read from the file's start.
# Each thread keeps the last such file open where its last read ended: the windows of a batch come
# in order, so a long recording is decoded about once per DataLoader worker, not once per window.
DECODED_FROM_START = {"MP3", "OGG", "MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III", "VORBIS", "OPUS"}  # formats, encodings


class _Reader:
    """An open file and the frame it is at, read forward only unless it seeks exactly."""

    def __init__(self, path: Path):
        self.path, self.stat, self.pid = path, _identity(path), os.getpid()  # a forked child has its own
        self.file = sf.SoundFile(path)
        lossy = {self.file.format, self.file.subtype} & DECODED_FROM_START  # an MP3 inside a WAV file too
        self.exact_seeks = self.file.seekable() and not lossy
        if not self.exact_seeks:
            # SoundFile.read seeks to where it stopped after each read, and in an MP3 that seek alone
            # gives wrong samples for a while. Told that the file cannot seek, it reads on without.
            self.file._info.seekable = 0  # libsndfile's SF_FALSE
        self.at = 0

    def read(self, start: int, count: int | None) -> np.ndarray:
        """`count` frames (None: to the end) from frame `start`, never before `self.at` in a file
        read forward (see _reader_for)."""
        if self.exact_seeks:
            self.file.seek(start)
            count = -1 if count is None else count
        else:
            for _ in self.file.blocks(blocksize=1 << 16, frames=start - self.at, dtype="float32"):
                pass  # decoded and dropped, in blocks: an hour of audio is never held whole
            left = self.file.frames - start  # a file read forward needs a count, and is not cut to the file's end
            count = left if count is None else min(count, left)
        audio = self.file.read(count, dtype="float32", always_2d=True)
        self.at = start + len(audio)
        return audio


_kept = threading.local()  # .reader: the last file read forward, in this thread


def _identity(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _take_kept() -> _Reader | None:
    """The reader this thread kept, no longer kept; None if none, or if it is a forked parent's."""
    kept, _kept.reader = getattr(_kept, "reader", None), None
    return kept if kept is not None and kept.pid == os.getpid() else None


def _reader_for(path: Path, offset: float) -> _Reader:
    """A reader of `path` that can reach `offset` seconds: the kept one where it can, else a new one."""
    if kept := _take_kept():
        if kept.path == path and kept.at <= round(offset * kept.file.samplerate) and kept.stat == _identity(path):
            return kept
        kept.file.close()
    return _Reader(path)


def _keep(reader: _Reader):
    """Keep a reader that reads forward for the next window; close any other."""
    if reader.exact_seeks or reader.at >= reader.file.frames:
        reader.file.close()
    else:
        _kept.reader = reader


def close_kept_file():
    """Close the file this thread keeps open for its next window, once no window follows: DataLoader
    workers end with their process, but with --num-workers 0 the main thread reads the audio."""
    if kept := _take_kept():
        kept.file.close()


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
