"""What the store's threads cost the thread that feeds the GPU, measured on the CPU.

    python benchmarks/gil_contention.py --dir /dev/shm/bench-gil

`tokens extract` issues the forward pass from its main thread, one Python call per operation,
while writer threads store finished shards. Every operation gives up the GIL and takes it back; a
writer thread that runs Python meanwhile makes it wait, up to the interpreter's switch interval
(5 ms). This models that loop without a GPU: the main thread issues batches of 400 small torch
operations while the extractor's own ShardWriter writes a shard every second batch into a real
store, and the time per batch is set against the same batches with no writes. It also times the
creation of a store beside one thread that runs Python without pause (as the extractor creates
a new store while its GPU warm-up thread works).
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch

from tokens.cache import StoreSpec, create_or_open
from tokens.extract.run import ArrayPool, ShardWriter

SHARD = 64


def spec(shards: int) -> StoreSpec:
    return StoreSpec(backbone="model", backbone_config={}, checkpoint_sha256=None, frontend={}, layers=[0],
                     final_norm=False, dtype="float16", grid=(8, 8), dim=16, num_prefix=1, task="multilabel",
                     classes=[f"c{i}" for i in range(50)], splits={"train": SHARD * shards}, dataset_fingerprint="f",
                     shard_size=SHARD)


class Shard:
    """A full shard as the extractor hands it to the ShardWriter."""

    def __init__(self, number: int, pool: ArrayPool):
        self.number, self.arrays = number, pool.take(SHARD)

    def write_to(self, store):
        _, tokens, prefix, mask = self.arrays
        store.split("train").write_shard(
            self.number, tokens=tokens, prefix=prefix, mask=mask, labels=np.zeros((SHARD, 50), np.uint8),
            ids=[f"{self.number}-{i}" for i in range(SHARD)], sources=["clip.wav"] * SHARD,
            offsets=np.zeros(SHARD), durations=np.full(SHARD, 10.0), errors=[""] * SHARD)


def batch_of_ops(x: torch.Tensor, ops: int = 400) -> float:
    started = time.perf_counter()
    for _ in range(ops):
        x.add_(1.0)
    return time.perf_counter() - started


def dispatch_while_writing(directory: Path, batches: int) -> dict:
    shards = batches // 2
    store = create_or_open(directory / "dispatch.zarr", spec(shards))
    pool = ArrayPool(spec(shards))
    x = torch.zeros(64)
    quiet = [batch_of_ops(x) for _ in range(batches)]
    writer = ShardWriter(store, pool)
    writing = []
    for number in range(batches):
        writing.append(batch_of_ops(x))
        if number % 2 == 0:
            writer.put(Shard(number // 2, pool))
    writer.close()
    store.close()
    return {"ms_per_batch_quiet": round(1e3 * float(np.mean(quiet)), 2),
            "ms_per_batch_while_writing": round(1e3 * float(np.mean(writing)), 2)}


def creation_beside_a_busy_thread(directory: Path) -> dict:
    def create(name: str) -> float:
        started = time.perf_counter()
        create_or_open(directory / name, spec(400)).close()
        return time.perf_counter() - started

    create("warm.zarr")  # zarr's event loop and codecs start once per process
    quiet = create("quiet.zarr")
    running = True

    def busy():
        while running:
            sum(range(1000))

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    contended = create("contended.zarr")
    running = False
    thread.join()
    return {"create_s_quiet": round(quiet, 3), "create_s_beside_a_busy_thread": round(contended, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tokens-bench-gil"))
    parser.add_argument("--batches", type=int, default=600)
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    torch.set_num_threads(1)
    figures = {**dispatch_while_writing(args.dir, args.batches), **creation_beside_a_busy_thread(args.dir)}
    print(json.dumps(figures, indent=2))
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
