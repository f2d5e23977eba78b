"""load_window: only the window is read, mono and resampling match an independent computation,
and every kind of bad input fails with a reason instead of stopping the run."""

import struct
import time
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from tokens.extract.audio import BadAudio, load_window

SR = 16000


def noise(frames, channels, seed=0):
    return (np.random.default_rng(seed).standard_normal((frames, channels)) * 0.1).astype("float32")


def reference(path, offset, duration, sample_rate):
    """Decode the whole file, average channels with numpy, cut the window, resample it."""
    audio, native = sf.read(path, dtype="float64", always_2d=True)
    window = audio.mean(axis=1)[round(offset * native) : round((offset + duration) * native)]
    return torchaudio.functional.resample(torch.from_numpy(window), native, sample_rate).numpy()


def dominant_hz(x, sample_rate):
    return np.argmax(np.abs(np.fft.rfft(x))) * sample_rate / len(x)


@pytest.fixture(scope="module")
def hour_long(tmp_path_factory):
    """One hour at 8 kHz, written a minute at a time; minute k holds noise seeded with k."""
    path = tmp_path_factory.mktemp("long") / "hour.wav"
    with sf.SoundFile(path, "w", samplerate=8000, channels=1, subtype="PCM_16") as f:
        for minute in range(60):
            f.write(np.random.default_rng(minute).integers(-20000, 20000, 60 * 8000, dtype=np.int16))
    return path


def test_reads_only_the_window_of_an_hour_long_file(hour_long):
    tracemalloc.start()
    began = time.perf_counter()
    x = load_window(hour_long, 30 * 60 + 5, 10, 8000)
    seconds = time.perf_counter() - began
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Decoding the whole hour as float32 would take 115 MB; the window is 0.3 MB.
    assert peak < 2_000_000, peak
    assert seconds < 1.0
    minute_30 = np.random.default_rng(30).integers(-20000, 20000, 60 * 8000, dtype=np.int16)
    np.testing.assert_array_equal(x, minute_30[5 * 8000 : 15 * 8000] / np.float32(32768))


def test_window_at_the_end_of_an_hour_comes_back_short(hour_long):
    assert load_window(hour_long, 3595, 10, SR).shape == (5 * SR,)


def chirp(native: int, seconds: float) -> np.ndarray:
    """A rising tone: encoders lean on MP3's bit reservoir for it, which a decoder after a seek lacks."""
    t = np.arange(round(seconds * native)) / native
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)


@pytest.mark.parametrize("format, subtype, native, options", [
    ("MP3", "MPEG_LAYER_III", 16000, {"bitrate_mode": "VARIABLE"}),  # wrong for 0.25 s after a seek
    ("MP3", "MPEG_LAYER_III", 24000, {"bitrate_mode": "VARIABLE"}),  # for 0.34 s
    ("MP3", "MPEG_LAYER_III", 44100, {"bitrate_mode": "CONSTANT"}),
    ("WAV", "GSM610", 8000, {}),  # libsndfile refuses any seek in these
    ("WAV", "G721_32", 8000, {}),
    ("OGG", "VORBIS", 22050, {}),
    ("FLAC", "PCM_16", 16000, {}),
])
def test_windows_past_the_start_equal_the_whole_files_decode(tmp_path, format, subtype, native, options):
    """Each window (and a start/end span) of a file is what decoding the whole file gives there,
    in every encoding: no wrong samples after a seek, no encoding refused for seeking."""
    if format not in sf.available_formats() or subtype not in sf.available_subtypes(format):
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {format}/{subtype}")
    path = tmp_path / f"chirp.{format.lower()}"
    sf.write(path, chirp(native, 5.5), native, format=format, subtype=subtype, **options)
    whole, _ = sf.read(path, dtype="float32")
    for offset, duration in [(0.0, 2.0), (2.0, 2.0), (4.0, 2.0), (1.37, 0.5), (3.0, None)]:
        window = load_window(path, offset, duration, native)
        start = round(offset * native)
        expected = whole[start:len(whole) if duration is None else start + round(duration * native)]
        # mpg123's float output moves by a bit between reads of other lengths; wrong samples are off by 0.1 or more
        np.testing.assert_allclose(window, expected, rtol=0, atol=1e-6, err_msg=f"{offset} s")


def test_an_mp3_inside_a_wav_file_is_read_as_an_mp3(tmp_path):
    """WAV files may hold MP3 data (format tag 0x55): libsndfile calls them WAV, and seeking in them
    gives the MP3's wrong samples. What the encoding is, not the container, decides."""
    if "MP3" not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write MP3")
    native, seconds = 24000, 5.5
    sf.write(tmp_path / "c.mp3", chirp(native, seconds), native, format="MP3", subtype="MPEG_LAYER_III",
             bitrate_mode="VARIABLE")
    mp3 = (tmp_path / "c.mp3").read_bytes()
    if mp3[:3] == b"ID3":  # a WAV's data chunk holds the MP3 frames alone
        mp3 = mp3[10 + ((mp3[6] << 21) | (mp3[7] << 14) | (mp3[8] << 7) | mp3[9]):]
    # WAVEFORMATEX of MPEG layer 3 (mono, 8 000 bytes/s, block align 1) and its MPEGLAYER3WAVEFORMAT tail
    fmt = struct.pack("<HHIIHHH", 0x55, 1, native, 8000, 1, 0, 12) + struct.pack("<HIHHH", 1, 2, 576, 1, 0)
    body = (b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<II", 4, round(seconds * native))
            + b"data" + struct.pack("<I", len(mp3)) + mp3 + b"\0" * (len(mp3) % 2))
    path = tmp_path / "c.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    with sf.SoundFile(path) as f:
        assert (f.format, f.subtype) == ("WAV", "MPEG_LAYER_III")
    whole, _ = sf.read(path, dtype="float32")
    for offset, duration in [(2.0, 2.0), (4.0, 1.0), (1.37, 0.5)]:
        start = round(offset * native)
        np.testing.assert_allclose(load_window(path, offset, duration, native), whole[start:start + round(duration * native)],
                                   rtol=0, atol=1e-6, err_msg=f"{offset} s")


def test_windows_of_a_lossy_file_in_order_decode_it_once_and_a_replaced_file_is_read_anew(tmp_path, monkeypatch):
    """A file read from its start is kept open where the last window ended, so the windows of a
    long MP3 in order decode it once, not once per window; a file changed meanwhile is opened again."""
    if "MP3" not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write MP3")
    path = tmp_path / "long.mp3"
    sf.write(path, chirp(SR, 12.0), SR, format="MP3", subtype="MPEG_LAYER_III")
    whole, _ = sf.read(path, dtype="float32")
    opened, real = [], sf.SoundFile
    with monkeypatch.context() as patch:
        patch.setattr(sf, "SoundFile", lambda *args, **kwargs: opened.append(args[0]) or real(*args, **kwargs))
        windows = [load_window(path, 2.0 * k, 2.0, SR) for k in range(6)]
    np.testing.assert_allclose(np.concatenate(windows), whole[:12 * SR], rtol=0, atol=1e-6)
    assert opened == [path]
    load_window(path, 0.0, 2.0, SR)  # kept open at 2 s
    sf.write(path, chirp(SR, 12.0)[::-1].copy(), SR, format="MP3", subtype="MPEG_LAYER_III")
    replaced, _ = sf.read(path, dtype="float32")
    np.testing.assert_allclose(load_window(path, 2.0, 2.0, SR), replaced[2 * SR:4 * SR], rtol=0, atol=1e-6)


@pytest.mark.parametrize("native", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2, 6])
def test_matches_an_independent_decode(tmp_path, native, channels):
    path = tmp_path / "clip.wav"
    sf.write(path, noise(3 * native, channels), native, subtype="FLOAT")
    x = load_window(path, 0.5, 2.0, SR)
    assert x.dtype == np.float32 and x.shape == (2 * SR,)
    np.testing.assert_allclose(x, reference(path, 0.5, 2.0, SR), atol=1e-5)


@pytest.mark.parametrize("native", [8000, 11127, 22050, 44100, 48000])
def test_resampling_keeps_the_pitch(tmp_path, native):
    t = np.arange(2 * native) / native
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    sf.write(tmp_path / "tone.wav", np.stack([tone, tone], axis=1), native, subtype="FLOAT")
    x = load_window(tmp_path / "tone.wav", 0.0, 2.0, SR)
    assert dominant_hz(x, SR) == pytest.approx(1000, abs=1)
    assert np.sqrt(np.mean(x[SR // 4 : -SR // 4] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_silence_is_valid(tmp_path):
    sf.write(tmp_path / "quiet.wav", np.zeros((SR, 2), "float32"), SR)
    np.testing.assert_array_equal(load_window(tmp_path / "quiet.wav", 0.0, 1.0, SR), np.zeros(SR, "float32"))


def test_short_clip_returns_what_there_is(tmp_path):
    sf.write(tmp_path / "blip.wav", noise(2205, 1), 44100)  # 50 ms
    assert load_window(tmp_path / "blip.wav", 0.0, 10.0, SR).shape == (800,)


def test_duration_none_reads_to_the_end(tmp_path):
    sf.write(tmp_path / "a.wav", noise(3 * SR, 1), SR)
    assert load_window(tmp_path / "a.wav", 1.0, None, SR).shape == (2 * SR,)


def bad_file(tmp_path, kind):
    path = tmp_path / ("bad.mp3" if kind == "noise as mp3" else "bad.wav")
    sf.write(tmp_path / "good.wav", noise(3 * SR, 2), SR, subtype="PCM_16")
    data = (tmp_path / "good.wav").read_bytes()
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "header cut":
        path.write_bytes(data[:30])
    elif kind == "text":
        path.write_text("this is a README, not a recording\n" * 20)
    elif kind == "noise as mp3":  # libsndfile calls this "File does not exist or is not a regular file"
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind in ("nan", "inf"):
        x = noise(3 * SR, 2)
        x[SR + 100, 1] = np.nan if kind == "nan" else np.inf
        sf.write(path, x, SR, subtype="FLOAT")
    return path


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("missing", "file not found"),
        ("zero-byte", "cannot decode: .*Format not recognised"),
        ("header cut", "cannot decode: .*No 'data' chunk"),
        ("text", "cannot decode: .*Format not recognised"),
        ("noise as mp3", r"cannot decode: damaged, or not audio that libsndfile reads \(a \.mp3 file\)"),
        ("nan", "NaN or infinite samples"),
        ("inf", "NaN or infinite samples"),
    ],
)
def test_bad_audio_says_why(tmp_path, kind, reason):
    with pytest.raises(BadAudio, match=reason) as e:
        load_window(bad_file(tmp_path, kind), 0.5, 1.0, SR)
    assert e.value.reason == str(e.value)


def test_a_wav_cut_in_its_data_gives_what_survives(tmp_path):
    sf.write(tmp_path / "good.wav", noise(3 * SR, 2), SR, subtype="PCM_16")
    data = (tmp_path / "good.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: 44 + SR * 4])  # header + the first second
    assert load_window(tmp_path / "cut.wav", 0.5, 1.0, SR).shape == (SR // 2,)
    with pytest.raises(BadAudio, match="not before the end of the file"):
        load_window(tmp_path / "cut.wav", 2.0, 1.0, SR)


def test_a_recording_with_no_frames_is_called_empty(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SR)
    with pytest.raises(BadAudio, match="^empty: the file holds no audio frames$"):
        load_window(tmp_path / "empty.wav", 0.0, None, SR)


def test_window_past_the_end_says_so(tmp_path):
    sf.write(tmp_path / "a.wav", noise(SR, 1), SR)
    with pytest.raises(BadAudio, match=r"offset 5 s is not before the end of the file \(1 s\)"):
        load_window(tmp_path / "a.wav", 5.0, 1.0, SR)


@pytest.mark.parametrize(
    "suffix, format, subtype",
    [("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS"), ("mp3", "MP3", "MPEG_LAYER_III")],
)
def test_compressed_formats_round_trip(tmp_path, suffix, format, subtype):
    if format not in sf.available_formats() or subtype not in sf.available_subtypes(format):
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {format}/{subtype}")
    t = np.arange(3 * 44100) / 44100
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / f"tone.{suffix}"
    sf.write(path, np.stack([tone, tone], axis=1), 44100, format=format, subtype=subtype)
    x = load_window(path, 1.0, 1.0, SR)
    assert x.shape == (SR,)
    assert dominant_hz(x, SR) == pytest.approx(440, abs=1)
    assert np.sqrt(np.mean(x**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)
    if suffix == "flac":
        np.testing.assert_allclose(x, reference(path, 1.0, 1.0, SR), atol=1e-5)


@pytest.mark.parametrize("native, window", [(11025, 0.95), (11025, 1.5), (22050, 0.333), (44100, 0.975), (48000, 0.9999)])
def test_a_resampled_window_never_holds_more_samples_than_the_window(tmp_path, native, window):
    """Rounded once at the file's rate and once at ours, a window came back a sample too long, and
    the backbone then refused every such item as longer than its window."""
    path = tmp_path / "a.wav"
    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(3 * native)).astype(np.float32), native)
    for k in range(int(3 / window)):
        assert len(load_window(path, k * window, window, SR)) <= round(window * SR), k


@pytest.mark.parametrize("native", [44100, 22050, 8000, 12345])
def test_resampling_at_any_ratio_is_torchaudios_filter(native):
    """The filter evaluated per output sample equals torchaudio's phase filters (in float64, which
    its float32 filters approach less closely at large ratios)."""
    from tokens.extract.audio import resample_any_ratio

    audio = (0.1 * np.random.default_rng(native).standard_normal(native // 2)).astype(np.float32)
    expected = torchaudio.functional.resample(torch.from_numpy(audio.astype(np.float64)), native, SR).numpy()
    np.testing.assert_allclose(resample_any_ratio(audio, native, SR), expected, rtol=0, atol=1e-6)


def test_a_rate_with_a_small_common_divisor_skips_torchaudios_phase_filters(tmp_path, monkeypatch):
    """11 127 Hz (an old Mac rate) against 16 kHz: torchaudio would build 16 000 filters of 11 127
    taps, 2.5 s and 3 GB for every 10 s window."""
    import tokens.extract.audio as audio_module

    called = []
    monkeypatch.setattr(audio_module.torchaudio.functional, "resample", lambda *args: called.append(args[1:]))
    sf.write(tmp_path / "mac.wav", (0.1 * np.random.default_rng(0).standard_normal(3 * 11127)).astype(np.float32), 11127)
    assert len(load_window(tmp_path / "mac.wav", 0.0, 1.0, SR)) == SR and not called
