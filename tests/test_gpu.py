"""The CUDA path of `tokens extract` (bf16 autocast, tokens copied from the GPU straight into pinned
shard buffers): stored tokens equal a direct forward pass. Skipped without a GPU; run on the GPU
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
    with open_store(store_path) as store:
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
