"""Random batches of 128 items from a store against a numpy memmap of the same bytes on the same disk.

    python benchmarks/store_read.py --items 4000 --dir /tmp/bench   # 3 GB of (512, 768) float16

Writes the same tokens as a zarr store, an HDF5 store and a plain .npy file, then times batches
of 128 random item indices (sorted within the batch, as a shuffled loader would ask) read with
`Split.read_tokens` and with numpy memmap fancy indexing. "warm": data in the page cache;
"cold": page cache dropped before each pass (needs root; skipped otherwise). Prints GB/s and the
ratio ours / memmap, measured in one run, and writes them as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from tokens.cache import StoreSpec, create_or_open, open_store


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def build(directory: Path, items: int, tokens: int, dim: int, shard_size: int):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(32, dim)).astype(np.float32)
    npy = np.lib.format.open_memmap(directory / "tokens.npy", mode="w+", dtype=np.float16, shape=(items, tokens, dim))
    spec = StoreSpec(
        backbone="bench", backbone_config={}, checkpoint_sha256=None, frontend={}, layers=[0], final_norm=False,
        dtype="float16", grid=(tokens // 8, 8), dim=dim, num_prefix=0, task="multiclass", classes=["x"],
        splits={"train": items}, dataset_fingerprint="bench", masked=False, shard_size=shard_size,
    )
    stores = {"zarr": directory / "bench.zarr", "hdf5": directory / "bench.h5"}
    opened = {fmt: create_or_open(path, spec, fmt) for fmt, path in stores.items()}
    for shard in range(-(-items // shard_size)):
        a, b = shard * shard_size, min((shard + 1) * shard_size, items)
        # realistic activations: low rank plus noise, cast to float16
        block = (rng.normal(size=(b - a, tokens, 32)).astype(np.float32) @ basis + 0.1 * rng.normal(size=(b - a, tokens, dim)).astype(np.float32)).astype(np.float16)
        npy[a:b] = block
        for store in opened.values():
            store.split("train").write_shard(shard, tokens={0: block}, labels=np.zeros(b - a, np.int64),
                                             ids=[str(i) for i in range(a, b)], sources=[""] * (b - a),
                                             offsets=np.zeros(b - a), durations=np.zeros(b - a))
    npy.flush()
    del npy
    for store in opened.values():
        store.close()
    return stores


def batches(items: int, batch: int, count: int, seed: int):
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(items, batch, replace=False)) for _ in range(count)]


def time_reads(read, index_batches, cold: bool) -> float:
    if cold and not drop_caches():
        return float("nan")
    started = time.perf_counter()
    nbytes = 0
    for idx in index_batches:
        nbytes += read(idx).nbytes
    return nbytes / (time.perf_counter() - started) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tokens-bench"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    if args.dir.exists():
        shutil.rmtree(args.dir)
    stores = build(args.dir, args.items, args.tokens, args.dim, args.shard_size)
    memmap = np.load(args.dir / "tokens.npy", mmap_mode="r")
    readers = {"numpy memmap": lambda idx: memmap[idx]}
    for fmt, path in stores.items():
        split = open_store(path).split("train")
        readers[f"tokens {fmt}"] = lambda idx, split=split: split.read_tokens(0, idx)
    index_batches = batches(args.items, 128, args.batches, seed=1)
    reference = memmap[index_batches[0]]
    for name, read in readers.items():  # same bytes from every reader
        assert np.array_equal(read(index_batches[0]), reference), name

    results = {}
    for mode in ("cold", "warm"):
        for name, read in readers.items():
            if mode == "warm":
                time_reads(read, index_batches, cold=False)  # fill the page cache
            results[(name, mode)] = time_reads(read, index_batches, cold=mode == "cold")
    figures = {
        "machine": f"{platform.node()} ({os.cpu_count()} cores)",
        "items": args.items, "item_shape": [args.tokens, args.dim], "batch": 128, "batches": args.batches,
        "gb_per_s": {f"{name} {mode}": round(v, 3) for (name, mode), v in results.items()},
    }
    print(f"random batches of 128 items, {args.items} x ({args.tokens}, {args.dim}) float16, {figures['machine']}")
    print(f"{'reader':<16} {'cold GB/s':>10} {'warm GB/s':>10} {'cold ratio':>11} {'warm ratio':>11}")
    for name in readers:
        cold, warm = results[(name, "cold")], results[(name, "warm")]
        ratio_cold = cold / results[("numpy memmap", "cold")]
        ratio_warm = warm / results[("numpy memmap", "warm")]
        figures[f"ratio {name} / memmap"] = {"cold": round(ratio_cold, 2), "warm": round(ratio_warm, 2)}
        print(f"{name:<16} {cold:>10.2f} {warm:>10.2f} {ratio_cold:>11.2f} {ratio_warm:>11.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
