"""Decode one window of a recording as float32 mono at the encoder's sample rate.

Only the window's frames are read (soundfile seeks), so an hour-long recording costs what its
windows cost. A file that cannot give usable audio raises BadAudio: the extractor records the
reason for that item and goes on with the rest.

A WAV file cut short in its data still opens: libsndfile reports the frames that are there, and
those are read like any other; only a window wholly past them fails. A file cut short in its
header does not open and fails.
"""

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
        mono = torchaudio.functional.resample(torch.from_numpy(mono), native, sample_rate).numpy()
        if duration is not None:  # both roundings, at the file's rate and at ours, can add a sample past the window
            mono = mono[:round(duration * sample_rate)]
    return mono
