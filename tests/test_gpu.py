"""The CUDA path of `tokens extract` (bf16 autocast, a CUDA graph, tokens copied from the GPU into
pinned host buffers used in turn): stored tokens equal a direct forward pass. Skipped without a GPU; run on the GPU
machine with `python -m pytest tests/test_gpu.py`."""

import numpy as np
import pytest
import soundfile as sf
import torch

from tokens.cache import open_store
from tokens.extract.audio import load_window
from tokens.extract.backbones import build_backbone
from tokens.extract.backbones.audiomae import AudioMAE
from tokens.extract.run import extract

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = {"dim": 64, "depth": 2, "num_heads": 4}
SR = 16000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Nine clips (one short, one unreadable) and a small AudioMAE checkpoint in its release format."""
    root = tmp_path_factory.mktemp("gpu")
    torch.manual_seed(0)
    model = AudioMAE(**SMALL)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.save({"model": model.state_dict()}, root / "audiomae.pth")
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for i in range(8):
        seconds = 3.0 if i == 5 else 10.0
        sf.write(root / f"{i}.wav", (0.1 * rng.standard_normal(round(seconds * SR))).astype(np.float32), SR)
        rows.append(f"{i}.wav,{'ab'[i % 2]},{'train' if i < 6 else 'test'}")
    (root / "bad.wav").write_text("not audio")
    rows.append("bad.wav,a,train")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def expected_tokens(root, name, layers):
    model = build_backbone("audiomae", str(root / "audiomae.pth"), **SMALL)
    inputs, mask = model.preprocess(load_window(root / name, 0.0, 10.0, SR))
    with torch.inference_mode():
        out = model(inputs[None], layers, mask[None])
    return {layer: out[layer][0][0].numpy() for layer in layers}, mask.numpy()


def as_float(stored: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # stored as the upper 16 bits of float32
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


@pytest.mark.parametrize("precision, dtype, tolerance", [("fp32", "float16", 0.01), ("bf16", "bfloat16", 0.05)])
def test_gpu_extraction_equals_a_direct_forward(dataset, tmp_path, precision, dtype, tolerance):
    store_path = tmp_path / "s.zarr"
    summary = extract(dataset / "manifest.csv", store_path, backbone="audiomae", checkpoint=str(dataset / "audiomae.pth"),
                      backbone_options=SMALL, layers="all", precision=precision, dtype=dtype, device="cuda",
                      batch_size=3, shard_size=4, num_workers=2, progress=False)
    assert [item for item, _ in summary.failed] == ["bad.wav"]
    norm = torch.load(dataset / "audiomae.pth", weights_only=True)["model"]
    with open_store(store_path) as store:
        assert store.meta["precision"] == precision
        # the final norm is recorded (for probe --final-norm) as the checkpoint has it; read before the warm-up
        # checks that the forward pass never synchronises, which a read of the weights on the GPU would
        for name in ("weight", "bias"):
            assert np.array(store.meta["final_norm_params"][name], np.float32).tobytes() == norm[f"norm.{name}"].numpy().tobytes()
        train = store.split("train")
        ids = list(train.column("ids"))
        for index, name in enumerate(ids):
            if name == "bad.wav":
                assert not train.read_tokens(1, [index]).any() and not train.read_mask([index]).any()
                continue
            expected, mask = expected_tokens(dataset, name, [0, 1])
            np.testing.assert_array_equal(train.read_mask([index])[0], mask)
            for layer in (0, 1):
                stored = as_float(train.read_tokens(layer, [index])[0], dtype)
                error = np.abs(stored - expected[layer]).max() / np.abs(expected[layer]).max()
                assert error < tolerance, (name, layer, error)
        assert train.read_mask([ids.index("5.wav")])[0].mean() == pytest.approx(0.3, abs=0.05)  # 3 s of 10


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_torchrun_rank_extracts_on_its_own_gpu(dataset, tmp_path, monkeypatch):
    """Under torchrun, rank 1 runs on cuda:1; its copies to the host are waited for on that GPU's
    stream (an event on cuda:0 returned at once and let torn rows into the store)."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    before = torch.cuda.current_device()
    try:
        extract(dataset / "manifest.csv", tmp_path / "s.zarr", backbone="audiomae", checkpoint=str(dataset / "audiomae.pth"),
                backbone_options=SMALL, layers="all", precision="fp32", device="auto", batch_size=3, shard_size=4,
                num_workers=2, progress=False)
        assert torch.cuda.current_device() == 1
    finally:
        torch.cuda.set_device(before)
    with open_store(tmp_path / "s.zarr") as store:
        train = store.split("train")
        for index, name in enumerate(train.column("ids")):
            if name != "bad.wav":
                expected, _ = expected_tokens(dataset, name, [0, 1])
                stored = train.read_tokens(1, [index])[0].astype(np.float32)
                assert np.abs(stored - expected[1]).max() / np.abs(expected[1]).max() < 0.01, name


FAMILIES = ["audiomae", "eat", "beats", "ast", "timm", "crepe-tiny"]


def build_family(family: str):
    """A small random-weight model of one backbone family, built directly (loading is tested on CPU)."""
    torch.manual_seed(0)
    if family == "audiomae":
        return AudioMAE(**SMALL)
    if family == "eat":
        from tokens.extract.backbones.eat import EAT

        return EAT(**SMALL)
    if family == "beats":
        from tokens.extract.backbones.beats import BEATs, RELEASED

        return BEATs({**RELEASED, "encoder_layers": 2, "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 128,
                      "encoder_attention_heads": 4, "embed_dim": 32, "conv_pos": 16, "conv_pos_groups": 4})
    if family == "ast":
        transformers = pytest.importorskip("transformers")
        from tokens.extract.backbones.ast import AST

        config = transformers.ASTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        return AST(transformers.ASTModel(config), transformers.ASTFeatureExtractor())
    if family == "timm":
        timm = pytest.importorskip("timm")
        from timm.data import create_transform, resolve_data_config

        from tokens.extract.backbones.timm_vit import TimmViT

        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
        return TimmViT(vit, create_transform(**resolve_data_config(model=vit)), name="timm")
    pytest.importorskip("torchcrepe")  # (not on the GPU machine)
    return build_backbone(family)


def random_batch(model, batch_size, seed):
    rng = np.random.default_rng(seed)
    if model.modality == "audio":
        lengths = [model.window_samples] * (batch_size - 1) + [model.window_samples // 3]  # one short clip: padding
        items = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]
    else:
        from PIL import Image

        items = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(batch_size)]
    inputs, masks = zip(*(model.preprocess(item) for item in items))
    return torch.stack(inputs).pin_memory(), torch.stack(masks).pin_memory()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_backbone_family_replays_its_forward_as_a_cuda_graph(family):
    """Full batches replay the graph captured at warm-up: two different batches launched one after
    the other, before either lands, each give the eager forward's tokens in their own host buffer
    (a graph reading stale inputs, a capture that fails, or a host buffer shared by two batches in
    flight would not)."""
    from tokens.extract.forward import Forward

    model = build_family(family)
    forward = Forward(model, torch.device("cuda", 0), [0, model.depth - 1], "float32", "bf16", batch_size=4, slots=2)
    forward.warm_up()
    assert forward.graph is not None, forward.not_graphed
    batches = [random_batch(model, 4, seed) for seed in (1, 2)]
    launched = [forward(inputs, masks) for inputs, masks in batches]
    for (inputs, masks), (host, landed) in zip(batches, launched):
        landed.synchronize()
        assert all(t.is_pinned() for pair in host.values() for t in pair if t is not None)
        with torch.inference_mode():
            eager = forward._eager(inputs.cuda(), masks.cuda())
        for layer in host:
            for got, want in zip([t for t in host[layer] if t is not None], [t for t in eager[layer] if t is not None]):
                torch.testing.assert_close(got, want.cpu(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("settings", ["AUDIOMAE_FBANK", "BEATS_FBANK"])
def test_the_fbank_on_the_gpu_is_the_fbank_on_the_cpu(settings):
    """cuFFT and cuBLAS against the CPU's FFT and matmul, on a batch of clips of several lengths (the
    frames past a short clip's end go through the GPU's FFT as NaN before they become padding)."""
    from tokens.extract import frontends

    frontend = getattr(frontends, settings)
    rng = np.random.default_rng(0)
    clips = [torch.from_numpy((0.1 * rng.standard_normal(n)).astype(np.float32)) for n in (160_000, 52_345, 401, 300)]
    batch = torch.stack([frontend.prepare(clip, 160_000)[0] for clip in clips])
    fbank = frontends.FbankFeatures(frontend)
    on_cpu = fbank(batch)
    on_gpu = fbank.cuda()(batch.cuda())
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-4)


def test_a_forward_that_waits_for_the_gpu_runs_eagerly_and_says_why():
    """A host-side branch on a tensor cannot be captured: the run goes on without a graph, and the
    note names the synchronizing operation, not a later error of a failed capture."""
    from tokens.extract.forward import Forward

    class Syncing(AudioMAE):
        def block_outputs(self, inputs, mask):
            if inputs.isnan().sum().item() >= 0:  # waits for the GPU
                yield from super().block_outputs(inputs, mask)

    torch.manual_seed(0)
    forward = Forward(Syncing(**SMALL), torch.device("cuda", 0), [1], "float32", "fp32", batch_size=2)
    forward.warm_up()
    assert forward.graph is None and "synchronizing" in forward.not_graphed, forward.not_graphed
    plain = AudioMAE(**SMALL).cuda().eval()
    plain.load_state_dict(forward.model.state_dict())
    inputs, masks = random_batch(plain, 2, seed=3)
    with torch.inference_mode():
        want = plain(inputs.cuda(), [1], masks.cuda())[1][0]
    host, landed = forward(inputs, masks)
    landed.synchronize()
    torch.testing.assert_close(host[1][0], want.cpu())


def test_an_fp32_forward_is_ieee_float32_whatever_the_process_set():
    """--precision fp32 is IEEE float32 on the GPU, as the store records: cuDNN's default TF32
    convolutions (the patch embedding) or TF32 matrix products a user turned on would be off by about
    1e-3. The process's settings come back afterwards."""
    from tokens.extract.forward import Forward

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "tf32"
    try:
        torch.manual_seed(0)
        model = AudioMAE(**SMALL)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
        on_cpu = AudioMAE(**SMALL).eval()
        on_cpu.load_state_dict(model.state_dict())
        forward = Forward(model, torch.device("cuda", 0), [1], "float32", "fp32", batch_size=4)
        forward.warm_up()
        inputs, masks = random_batch(on_cpu, 4, seed=4)
        host, landed = forward(inputs, masks)
        landed.synchronize()
        with torch.inference_mode():
            want = on_cpu(inputs, [1], masks)[1][0]
        # On the H200: 1.1e-5 at most in IEEE float32, 1.2e-4 with TF32 (tokens up to 1.4)
        torch.testing.assert_close(host[1][0], want, rtol=0, atol=4e-5)
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def test_the_command_on_a_gpu_prints_no_warning_of_torch_s(dataset, tmp_path):
    """Looking for operations that cannot be captured turns on torch's sync debug mode, which warns
    that it is a prototype: nothing a user can act on, so it must not reach the command's output."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "tokens", "extract", str(dataset / "manifest.csv"), "--store", str(tmp_path / "s.zarr"),
               "--backbone", "audiomae", "--checkpoint", str(dataset / "audiomae.pth"), "--device", "cuda", "--quiet",
               "--batch-size", "3", "--num-workers", "2"] + [arg for key, value in SMALL.items() for arg in ("-o", f"{key}={value}")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr


def test_a_sweep_moves_between_gpu_and_cpu_and_predict_scores_as_the_run_did(tmp_path, monkeypatch):
    """A job resubmitted to another kind of node resumes (new dropout states, with a note), both
    ways; and on a GPU, where a sweep trains in TF32, its test figures are scored in full float32,
    so that `tokens predict` reproduces them to the last digit."""
    import functools

    from sklearn.metrics import average_precision_score
    from test_probe import CLASSES, invoke, leaderboard, make_store, ok, read_csv

    from tokens.train import probe as recipe
    from tokens.train.data import usable_items

    store = make_store(tmp_path / "s.zarr")
    sweep = ["--heads", "mlp,protobin", "--option", "mlp.dropout=0.5", "--option", "protobin.prototypes_per_class=4",
             "--epochs", "3", "--batch-size", "16", "--warmup-epochs", "1"]
    for first, second in (("cuda", "cpu"), ("cpu", "cuda")):
        out = tmp_path / f"{first}-then-{second}"
        with monkeypatch.context() as patch:
            patch.setattr(recipe, "run", functools.partial(recipe.run, stop_after=2))
            ok("probe", store, *sweep, "--device", first, "--out", out)
        result = invoke("probe", store, *sweep, "--device", second, "--out", out)
        assert result.exit_code == 0 and "saved on another kind of device" in result.output, result.output
        assert len(leaderboard(out)) == 2

    run = tmp_path / "on-the-gpu"
    ok("probe", store, *sweep, "--device", "cuda", "--out", run)
    split = open_store(store).split("test")
    labels = split.column("labels")[usable_items(split)]
    for head in ("mlp", "protobin"):
        ok("predict", store, "--head", run / "best" / f"{head}.pt", "--device", "cuda", "--log-scores",
           "--out", tmp_path / f"{head}.csv")
        scores = np.array([[float(row[c]) for c in CLASSES] for row in read_csv(tmp_path / f"{head}.csv")])
        expected = np.mean([average_precision_score(labels[:, c], scores[:, c]) for c in range(len(CLASSES))])
        (row,) = [row for row in leaderboard(run).values() if row["head"] == head]
        assert float(row["test_map"]) == pytest.approx(expected, abs=1e-12), head


@pytest.mark.parametrize("data", ["gpu", "stream"])
def test_a_sweep_behind_the_final_norm_on_a_gpu_trains_as_on_normed_tokens(tmp_path, data):
    """The recorded norm, moved to the GPU with the tokens (loaded there whole, or streamed and
    pinned), gives the figures of tokens written normed, and predict applies it there too."""
    from test_probe import D, leaderboard, make_store, ok, read_csv

    rng = np.random.default_rng(1)
    params = {"kind": "layer_norm", "eps": 1e-6, "weight": rng.uniform(0.5, 2, D).astype(np.float32).tolist(),
              "bias": rng.normal(size=D).astype(np.float32).tolist()}
    raw = make_store(tmp_path / "raw.zarr", dtype="float32", final_norm_params=params)
    normed = make_store(tmp_path / "normed.zarr", dtype="float32", final_norm=True, normed_by=params)
    sweep = ["--heads", "linear,ep", "--option", "ep.num_queries=4", "--epochs", "4", "--batch-size", "16",
             "--device", "cuda", "--data", data]
    ok("probe", raw, *sweep, "--final-norm", "--out", tmp_path / "behind")
    ok("probe", normed, *sweep, "--out", tmp_path / "stored")
    behind, stored = leaderboard(tmp_path / "behind"), leaderboard(tmp_path / "stored")
    for config, row in stored.items():
        for key in ("val_map", "test_map"):
            assert float(behind[config][key]) == pytest.approx(float(row[key]), abs=1e-3), (config, key)
    ok("predict", raw, "--head", tmp_path / "behind" / "best" / "ep.pt", "--device", "cuda", "--out", tmp_path / "behind.csv")
    ok("predict", normed, "--head", tmp_path / "stored" / "best" / "ep.pt", "--device", "cuda", "--out", tmp_path / "stored.csv")
    ours, theirs = read_csv(tmp_path / "behind.csv"), read_csv(tmp_path / "stored.csv")
    assert [row["id"] for row in ours] == [row["id"] for row in theirs]
    item = ("id", "source", "offset")
    np.testing.assert_allclose([[float(v) for k, v in row.items() if k not in item] for row in ours],
                               [[float(v) for k, v in row.items() if k not in item] for row in theirs], atol=1e-3)


def test_a_sweep_on_a_gpu_stopped_mid_epoch_resumes_from_the_step(tmp_path, monkeypatch):
    """SIGTERM mid-epoch on a GPU: the step in hand is saved, dropout's CUDA random states with it,
    and the resumed sweep ends as the uninterrupted one (compared to 1e-6: TF32 products)."""
    import os
    import signal

    from test_probe import invoke, leaderboard, make_store, ok

    from tokens.train import probe as recipe

    store = make_store(tmp_path / "s.zarr")
    sweep = ["--heads", "mlp,ep", "--option", "mlp.dropout=0.5", "--option", "ep.num_queries=4",
             "--epochs", "3", "--batch-size", "16", "--warmup-epochs", "1", "--device", "cuda"]
    ok("probe", store, *sweep, "--out", tmp_path / "whole")
    calls, factor = [], recipe.lr_factor

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 13:  # the 4th step of the 2nd epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return factor(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(recipe, "lr_factor", signalled)
        result = invoke("probe", store, *sweep, "--out", tmp_path / "stopped")
    assert result.exit_code == 130 and "stopped at step 4 of 9 of epoch 2" in result.output, result.output
    ok("probe", store, *sweep, "--out", tmp_path / "stopped")
    whole, resumed = leaderboard(tmp_path / "whole"), leaderboard(tmp_path / "stopped")
    assert whole.keys() == resumed.keys()
    for config in whole:
        for column in ("val_map", "test_map"):
            assert float(resumed[config][column]) == pytest.approx(float(whole[config][column]), abs=1e-6), (config, column)
