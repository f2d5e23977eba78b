"""Front-ends against direct torchaudio / torchcrepe / transformers calls with the documented settings."""

import pytest
import torch
import torchaudio.compliance.kaldi as kaldi

from tokens.extract.frontends import (
    AUDIOMAE_FBANK,
    BEATS_FBANK,
    EAT_FBANK,
    CrepeFrames,
    FbankFeatures,
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


def features(frontend, *clips):
    """The front-end as an extraction runs it: prepare() each clip (the workers), then one batch
    through FbankFeatures (the device). -> (features (B, frames, mel), valid frames of each clip)."""
    prepared, valid = zip(*(frontend.prepare(clip, WINDOW) for clip in clips))
    return FbankFeatures(frontend)(torch.stack(prepared)), list(valid)


@pytest.mark.parametrize("frontend, mean, std", [(AUDIOMAE_FBANK, -4.2677393, 4.5689974), (EAT_FBANK, -4.268, 4.569)])
def test_audiomae_and_eat_fbank_pad_before_normalising(clip, frontend, mean, std):
    (features_, ), (valid, ) = features(frontend, clip)
    assert features_.shape == (1024, 128)
    assert valid == fbank_frames(len(clip)) == 398
    torch.testing.assert_close(features_, audiomae_reference(clip, mean, std), rtol=1e-5, atol=1e-5)
    # the padding is zero fbank, normalised: not zero
    assert torch.allclose(features_[valid:], torch.full_like(features_[valid:], -mean / (2 * std)))


def test_a_full_10_s_clip_leaves_the_last_audiomae_time_patch_empty():
    _, (valid, ) = features(AUDIOMAE_FBANK, torch.randn(WINDOW) * 0.1)
    assert valid == 998
    mask = time_patch_mask(valid, (64, 8), stride=16).view(64, 8)
    assert mask[:63].all() and not mask[63].any()


def test_beats_fbank_scales_pads_audio_and_crops_to_patches(clip):
    (features_, ), (valid, ) = features(BEATS_FBANK, clip)
    padded = torch.nn.functional.pad(clip, (0, WINDOW - len(clip)))
    reference = kaldi.fbank(padded[None] * 2**15, num_mel_bins=128, sample_frequency=RATE,
                            frame_length=25, frame_shift=10)
    reference = (reference - 15.41663) / (2 * 6.55582)
    assert reference.shape == (998, 128) and features_.shape == (992, 128)
    torch.testing.assert_close(features_, reference[:992], rtol=1e-5, atol=1e-4)
    assert valid == len(clip) // 160  # frames whose first 10 ms lie in the clip
    assert time_patch_mask(valid, (62, 8), stride=16).view(62, 8)[:, 0].sum() == 25  # 400 frames -> 25 patches


def test_ast_feature_extractor_is_the_documented_kaldi_fbank(clip):
    transformers = pytest.importorskip("transformers")
    extractor = transformers.ASTFeatureExtractor()
    features_ = extractor(clip.numpy(), sampling_rate=RATE, return_tensors="pt")["input_values"][0]
    reference = kaldi.fbank(clip[None], sample_frequency=RATE, window_type="hanning", num_mel_bins=128)
    reference = torch.nn.functional.pad(reference, (0, 0, 0, 1024 - len(reference)))
    torch.testing.assert_close(features_, (reference + 4.2677393) / (2 * 4.5689974), rtol=1e-5, atol=1e-5)


def test_crepe_frames_are_torchcrepes(clip):
    torchcrepe = pytest.importorskip("torchcrepe")
    short = clip[:5000]
    prepared, valid = CrepeFrames().prepare(short, RATE)
    frames = CrepeFrames().frames(prepared[None])[0]
    reference = next(torchcrepe.preprocess(short[None], RATE))
    assert frames.shape == (101, 1024) and valid == len(reference) == 32
    torch.testing.assert_close(frames[:valid], reference)


def test_clips_shorter_than_one_frame_have_no_valid_tokens():
    (features_, ), (valid, ) = features(AUDIOMAE_FBANK, torch.randn(300))
    assert valid == 0 and features_.shape == (1024, 128)
    assert not time_patch_mask(valid, (64, 8), stride=16).any()
    assert features(BEATS_FBANK, torch.randn(300))[1] == [2]  # its audio fills the first 2 frames


def kaldi_recipe(frontend, waveform):
    """A family's recipe for one clip through torchaudio's kaldi.fbank, as its training code writes it."""
    if frontend.remove_mean:
        waveform = waveform - waveform.mean()
    if frontend.pad_waveform:
        waveform = torch.nn.functional.pad(waveform, (0, WINDOW - len(waveform)))
    fbank = kaldi.fbank(waveform[None] * frontend.waveform_scale, num_mel_bins=128, sample_frequency=RATE,
                        frame_length=25.0, frame_shift=10.0, window_type=frontend.window_type,
                        htk_compat=frontend.htk_compat, use_energy=False, dither=0.0)
    if frontend.target_frames:
        fbank = torch.nn.functional.pad(fbank, (0, 0, 0, frontend.target_frames - len(fbank)))
    else:
        fbank = fbank[: len(fbank) // frontend.frame_multiple * frontend.frame_multiple]
    return (fbank - frontend.mean) / (2 * frontend.std)


@pytest.mark.parametrize("frontend", [AUDIOMAE_FBANK, BEATS_FBANK], ids=["audiomae", "beats"])
def test_a_batch_of_clips_of_any_length_gives_each_clips_own_recipe(frontend):
    """Clips of random length (from one frame to a full window), loudness and DC offset, in one
    batch: each clip's features are torchaudio's kaldi.fbank recipe for that clip alone, to float32
    rounding. Where the fbank frames are padded, the frames past each clip's end are the recipe's
    padding, whatever the clip's neighbours in the batch."""
    generator = torch.Generator().manual_seed(0)
    clips = []
    for _ in range(12):
        length = int(torch.randint(400, WINDOW, (), generator=generator))
        scale = 10 ** float(torch.empty(()).uniform_(-4, 0, generator=generator))
        clips.append((torch.randn(length, generator=generator) + 0.1 * torch.randn((), generator=generator)) * scale)
    clips.append(0.1 * torch.randn(WINDOW, generator=generator))
    batch, _ = features(frontend, *clips)
    for clip, ours in zip(clips, batch):
        torch.testing.assert_close(ours, kaldi_recipe(frontend, clip), rtol=0, atol=1e-4 / frontend.std)


def test_an_overflowing_clip_is_not_taken_for_padding():
    """Only the samples past a clip's end become the recipe's padding: a finite clip loud enough to
    overflow float32's power spectrum gives non-finite features (and tokens that verify flags), as
    kaldi.fbank does, rather than a clip of silence."""
    loud = torch.randn(WINDOW // 2) * 1e18
    (features_, ), _ = features(AUDIOMAE_FBANK, loud)
    assert not features_[:100].isfinite().all()
    assert features_[-20:].isfinite().all()  # the padding past its end
    assert not kaldi_recipe(AUDIOMAE_FBANK, loud)[:100].isfinite().all()
