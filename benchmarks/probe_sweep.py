"""What a sweep costs against one configuration, cached tokens against the encoder, protobin's memory.

    python benchmarks/probe_sweep.py --items 20000 --dir /tmp/bench-probe --json probe.json

On a store of 20 000 items x 512 tokens x 768 float16 (AudioSet-20K scale; 16 000 train, 2 000
valid, 2 000 test, 50 classes), measured in one run on one GPU:
  (a) wall time of `tokens probe` for a 32-configuration sweep (linear, mhca, ep, protobin x 4
      learning rates x 2 weight decays) against one configuration alone, streaming from disk
      (page cache dropped first) and with the split resident on the GPU;
  (b) one epoch of ep and of protobin from cached tokens against one epoch that runs the
      encoder (AudioMAE ViT-B/16, bf16, random weights) on every batch, as the public Efficient
      Probing code does;
  (c) peak GPU memory of protobin's forward and backward at P = 5270, N = 512, B = 128, against
      the (B, N, P) float32 similarity map a naive implementation holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from tokens.cache import StoreSpec, create_or_open, open_store
from tokens.extract.backbones.audiomae import AudioMAE
from tokens.train import sweep as sweeps
from tokens.train.heads import build_head
from tokens.train.probe import run as run_probe

TOKENS, DIM, CLASSES = 512, 768, 50


def drop_caches():
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("could not drop the page cache (not root?): 'disk' figures are page-cache reads")


def build_store(path: Path, items: int) -> Path:
    """Random float16 tokens made on the GPU; labels random multi-hot."""
    sizes = {"train": int(items * 0.8), "valid": items // 10, "test": items - int(items * 0.8) - items // 10}
    spec = StoreSpec(
        backbone="bench", backbone_config={}, checkpoint_sha256=None, frontend={}, layers=[11], final_norm=False,
        dtype="float16", grid=(64, 8), dim=DIM, num_prefix=1, task="multilabel", classes=[f"c{i}" for i in range(CLASSES)],
        splits=sizes, dataset_fingerprint="bench", masked=True,
    )
    generator = torch.Generator(device="cuda").manual_seed(0)
    with create_or_open(path, spec) as store:
        for name, n in sizes.items():
            split = store.split(name)
            for shard in range(split.num_shards):
                a, b = split.shard_range(shard)
                tokens = torch.randn((b - a, TOKENS, DIM), device="cuda", dtype=torch.float16, generator=generator)
                prefix = torch.randn((b - a, 1, DIM), device="cuda", dtype=torch.float16, generator=generator)
                labels = (torch.rand((b - a, CLASSES), device="cuda", generator=generator) < 0.05).to(torch.uint8)
                split.write_shard(shard, tokens={11: tokens.cpu().numpy()}, prefix={11: prefix.cpu().numpy()},
                                  mask=np.ones((b - a, TOKENS), bool), labels=labels.cpu().numpy(),
                                  ids=[f"{name}{i}" for i in range(a, b)], sources=[""] * (b - a),
                                  offsets=np.zeros(b - a), durations=np.full(b - a, 10.0))
    return path


def timed_sweep(store_path: Path, heads: dict, lrs: list, wds: list, data: str, out: Path) -> float:
    configs = sweeps.expand(heads, lrs, wds, [11], [0])
    if data == "stream":
        drop_caches()
    with open_store(store_path) as store:
        torch.cuda.synchronize()
        started = time.perf_counter()
        run_probe(store, configs, out, sweep={"bench": True}, epochs=1, data=data, device=torch.device("cuda"))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    shutil.rmtree(out)
    return seconds


def epoch_cached_vs_encoder(head_name: str, options: dict, items: int, batch: int = 128) -> dict:
    """One training epoch of a head: tokens already on the GPU vs tokens made by the encoder per batch."""
    steps = items // batch
    head = build_head(head_name, dim=DIM, num_classes=CLASSES, **options).cuda()
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    cached = torch.randn((batch * 8, TOKENS, DIM), device="cuda", dtype=torch.float16)  # cycled: reads from HBM
    labels = (torch.rand((batch, CLASSES), device="cuda") < 0.05).float()
    encoder = AudioMAE().cuda().eval()
    encoder.fbank = torch.nn.Identity()  # the encoder alone, on fbank features already made
    fbank = torch.randn((batch, 1024, 128), device="cuda")

    def step(tokens):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(tokens.float()), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def epoch(from_encoder: bool) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for i in range(steps):
            if from_encoder:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    tokens = encoder(fbank, [-1])[-1][0]
            else:
                tokens = cached[(i % 8) * batch:(i % 8 + 1) * batch]
            step(tokens)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    epoch(False), epoch(True)  # warm-up
    cached_s, encoder_s = epoch(False), epoch(True)
    return {"steps": steps, "cached_epoch_s": round(cached_s, 2), "encoder_epoch_s": round(encoder_s, 2),
            "speed_up": round(encoder_s / cached_s, 1)}


def protobin_memory(batch: int = 128, tokens: int = 512, classes: int = 527, per_class: int = 10) -> dict:
    """Peak memory of a training step on frozen tokens: our chunked protobin against the naive full map."""
    x = torch.randn((batch, tokens, DIM), device="cuda")  # cached tokens: no gradient flows into them
    prototypes = classes * per_class

    def peak(step) -> float:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    head = build_head("protobin", dim=DIM, num_classes=classes, prototypes_per_class=per_class).cuda()
    ours = peak(lambda: head(x).sum().backward())

    def naive():  # sign with a straight-through gradient, the whole (B, N, P) map, then the max
        p = head.prototypes
        binary = p + (torch.where(p >= 0, 1.0, -1.0) - p).detach()
        sim = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(binary, dim=-1).T
        head.classifier(sim.amax(dim=1)).sum().backward()

    theirs = peak(naive)
    return {"P": prototypes, "N": tokens, "B": batch, "protobin_peak_mib": round(ours, 1),
            "naive_full_map_peak_mib": round(theirs, 1),
            "similarity_map_float32_mib": round(batch * tokens * prototypes * 4 / 2**20, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tokens-bench-probe"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark measures the GPU path"
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    figures = {"gpu": torch.cuda.get_device_name(), "items": args.items, "tokens": [TOKENS, DIM]}

    figures["(c) protobin memory"] = protobin_memory()
    print("(c)", figures["(c) protobin memory"], flush=True)
    figures["(b) ep epoch"] = epoch_cached_vs_encoder("ep", {}, int(args.items * 0.8))
    figures["(b) protobin epoch"] = epoch_cached_vs_encoder("protobin", {}, int(args.items * 0.8))
    print("(b)", figures["(b) ep epoch"], figures["(b) protobin epoch"], flush=True)

    started = time.perf_counter()
    store = build_store(args.dir / "store.zarr", args.items)
    figures["store_build_s"] = round(time.perf_counter() - started, 1)
    sweep = {"linear": {}, "mhca": {}, "ep": {}, "protobin": {}}
    lrs, wds = [1e-4, 3e-4, 1e-3, 3e-3], [1e-4, 5e-4]
    for data in ("stream", "gpu"):
        one = timed_sweep(store, {"ep": {}}, [1e-3], [1e-4], data, args.dir / "one")
        many = timed_sweep(store, sweep, lrs, wds, data, args.dir / "many")
        figures[f"(a) {data}"] = {"one_config_s": round(one, 1), "32_configs_s": round(many, 1), "ratio": round(many / one, 2)}
        print("(a)", data, figures[f"(a) {data}"], flush=True)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
