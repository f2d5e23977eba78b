"""Front-ends against direct torchaudio / torchcrepe / transformers calls with the documented settings."""

import pytest
import torch
import torchaudio.compliance.kaldi as kaldi

from tokens.extract.frontends import (
    AUDIOMAE_FBANK,
    BEATS_FBANK,
    EAT_FBANK,
    CrepeFrames,
    fbank_frames,
    time_patch_mask,
)

RATE = 16000
WINDOW = 10 * RATE


@pytest.fixture
def clip():
    torch.manual_seed(0)
    t = torch.arange(4 * RATE) / RATE
    return 0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.05 * torch.randn_like(t) + 0.01  # with a DC offset


def audiomae_reference(waveform, mean, std):
    """AudioMAE's dataset.py recipe, spelled out."""
    fbank = kaldi.fbank((waveform - waveform.mean())[None], htk_compat=True, sample_frequency=RATE, use_energy=False,
                        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    fbank = torch.nn.functional.pad(fbank, (0, 0, 0, 1024 - len(fbank)))
    return (fbank - mean) / (std * 2)


@pytest.mark.parametrize("frontend, mean, std", [(AUDIOMAE_FBANK, -4.2677393, 4.5689974), (EAT_FBANK, -4.268, 4.569)])
def test_audiomae_and_eat_fbank_pad_before_normalising(clip, frontend, mean, std):
    features, valid = frontend(clip, WINDOW)
    assert features.shape == (1024, 128)
    assert valid == fbank_frames(len(clip)) == 398
    torch.testing.assert_close(features, audiomae_reference(clip, mean, std), rtol=1e-5, atol=1e-5)
    # the padding is zero fbank, normalised: not zero
    assert torch.allclose(features[valid:], torch.full_like(features[valid:], -mean / (2 * std)))


def test_a_full_10_s_clip_leaves_the_last_audiomae_time_patch_empty():
    features, valid = AUDIOMAE_FBANK(torch.randn(WINDOW) * 0.1, WINDOW)
    assert valid == 998
    mask = time_patch_mask(valid, (64, 8), stride=16).view(64, 8)
    assert mask[:63].all() and not mask[63].any()


def test_beats_fbank_scales_pads_audio_and_crops_to_patches(clip):
    features, valid = BEATS_FBANK(clip, WINDOW)
    padded = torch.nn.functional.pad(clip, (0, WINDOW - len(clip)))
    reference = kaldi.fbank(padded[None] * 2**15, num_mel_bins=128, sample_frequency=RATE,
                            frame_length=25, frame_shift=10)
    reference = (reference - 15.41663) / (2 * 6.55582)
    assert reference.shape == (998, 128) and features.shape == (992, 128)
    torch.testing.assert_close(features, reference[:992], rtol=1e-5, atol=1e-4)
    assert valid == len(clip) // 160  # frames whose first 10 ms lie in the clip
    assert time_patch_mask(valid, (62, 8), stride=16).view(62, 8)[:, 0].sum() == 25  # 400 frames -> 25 patches


def test_ast_feature_extractor_is_the_documented_kaldi_fbank(clip):
    transformers = pytest.importorskip("transformers")
    extractor = transformers.ASTFeatureExtractor()
    features = extractor(clip.numpy(), sampling_rate=RATE, return_tensors="pt")["input_values"][0]
    reference = kaldi.fbank(clip[None], sample_frequency=RATE, window_type="hanning", num_mel_bins=128)
    reference = torch.nn.functional.pad(reference, (0, 0, 0, 1024 - len(reference)))
    torch.testing.assert_close(features, (reference + 4.2677393) / (2 * 4.5689974), rtol=1e-5, atol=1e-5)


def test_crepe_frames_are_torchcrepes(clip):
    torchcrepe = pytest.importorskip("torchcrepe")
    short = clip[:5000]
    frames, valid = CrepeFrames()(short, RATE)
    reference = next(torchcrepe.preprocess(short[None], RATE))
    assert frames.shape == (101, 1024) and valid == len(reference) == 32
    torch.testing.assert_close(frames[:valid], reference)


def test_clips_shorter_than_one_frame_have_no_valid_tokens():
    features, valid = AUDIOMAE_FBANK(torch.randn(300), WINDOW)
    assert valid == 0 and features.shape == (1024, 128)
    assert not time_patch_mask(valid, (64, 8), stride=16).any()
    assert BEATS_FBANK(torch.randn(300), WINDOW)[1] == 2  # its audio fills the first 2 frames


@pytest.mark.parametrize("frontend, window_type, htk", [(AUDIOMAE_FBANK, "hanning", True), (BEATS_FBANK, "povey", False)])
def test_our_fbank_is_torchaudios_kaldi_fbank(frontend, window_type, htk):
    """The one-pass fbank against torchaudio's kaldi.fbank on clips of random length, loudness and DC
    offset, from one frame to a full window: the same log-mel energies to float32 rounding."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        length = int(torch.randint(400, WINDOW, (), generator=generator))
        scale = 10 ** float(torch.empty(()).uniform_(-4, 0, generator=generator))
        waveform = (torch.randn(length, generator=generator) + 0.1 * torch.randn((), generator=generator)) * scale
        waveform = waveform * frontend.waveform_scale
        reference = kaldi.fbank(waveform[None], num_mel_bins=128, sample_frequency=RATE, frame_length=25.0,
                                frame_shift=10.0, window_type=window_type, htk_compat=htk, use_energy=False, dither=0.0)
        torch.testing.assert_close(frontend._fbank(waveform), reference, rtol=0, atol=1e-4)
