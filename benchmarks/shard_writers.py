"""The store's shard writes at 4 and 8 threads against the disk's raw write bandwidth, same bytes.

    python benchmarks/shard_writers.py --shards 96 --layers 1 --dir /tmp/bench-writers    # 12.9 GB a pass
    python benchmarks/shard_writers.py --shards 8 --layers 12 --dir /tmp/bench-writers

Each pass writes ViT-B shards (170 items of 513 x 768 float16 tokens per layer, with the mask and
per-item columns) through `Split.write_shard` from a pool of threads, as `tokens extract`'s
writer threads do, and the raw probe writes the same number of bytes in large fsync'd files
(benchmarks/extract_throughput.py's disk bound). A cloud disk varies from minute to minute:
compare passes of one run only; each thread count runs twice, in both orders. Needs no GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from extract_throughput import disk_bound

from tokens.cache import StoreSpec, create_or_open


def shard_rate(directory: Path, spec: StoreSpec, shards: int, threads: int) -> float:
    """Bytes/s of token maps written through the store's shard writer by `threads` threads."""
    n = spec.shard_size
    tokens = np.random.default_rng(0).standard_normal((n, spec.num_tokens, spec.dim), dtype=np.float32).astype(np.float16)
    shard = dict(
        tokens={layer: tokens for layer in spec.layers}, prefix={layer: tokens[:, :1].copy() for layer in spec.layers},
        mask=np.ones((n, spec.num_tokens), bool), labels=np.zeros(n, np.int64), ids=[f"clip{i}" for i in range(n)],
        sources=["audio/0.wav"] * n, offsets=np.zeros(n), durations=np.full(n, 10.0), errors=[""] * n,
    )
    path = directory / "store.zarr"
    store = create_or_open(path, spec, "zarr")
    split = store.split("train")
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda index: split.write_shard(index, **shard), range(shards)))
    seconds = time.perf_counter() - started
    store.close()
    shutil.rmtree(path)
    return shards * n * len(spec.layers) * (spec.num_tokens + 1) * spec.dim * 2 / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=96)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tokens-bench-writers"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    base = dict(backbone="vit-b", backbone_config={}, checkpoint_sha256=None, frontend={}, final_norm=False,
                dtype="float16", grid=(64, 8), dim=768, num_prefix=1, task="multiclass", classes=["a"],
                dataset_fingerprint="benchmark", layers=list(range(args.layers)))
    shard_size = StoreSpec(**base, splits={"train": 1}).shard_size
    spec = StoreSpec(**base, splits={"train": args.shards * shard_size}, shard_size=shard_size)
    nbytes = args.shards * shard_size * args.layers * (spec.num_tokens + 1) * spec.dim * 2
    print(f"{args.shards} shards of {shard_size} items, {args.layers} layer(s): {nbytes / 1e9:.1f} GB a pass", flush=True)
    figures = {"gb_per_pass": round(nbytes / 1e9, 2), "passes": []}
    # 4 and 8 threads in both orders, between two probes: the disk is not as fast in every minute
    for name, measure in [
        ("probe, 8 files in flight", lambda: disk_bound(args.dir, nbytes, 8)),
        ("shard writer, 4 threads", lambda: shard_rate(args.dir, spec, args.shards, 4)),
        ("shard writer, 8 threads", lambda: shard_rate(args.dir, spec, args.shards, 8)),
        ("shard writer, 8 threads", lambda: shard_rate(args.dir, spec, args.shards, 8)),
        ("shard writer, 4 threads", lambda: shard_rate(args.dir, spec, args.shards, 4)),
        ("probe, 4 files in flight", lambda: disk_bound(args.dir, nbytes, 4)),
    ]:
        rate = round(measure() / 1e9, 3)
        figures["passes"].append([name, rate])
        print(f"{name}: {rate:.2f} GB/s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
