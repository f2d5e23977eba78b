"""Extraction under torchrun on 2 GPUs against 1 GPU: the same store, and the throughput ratio.

    python benchmarks/extract_multi_gpu.py --clips 4096 --gpus 2 --dir /tmp/bench-multi

Each torchrun rank takes every N-th shard (`--part` defaults to RANK+1/WORLD_SIZE) on its own
GPU (LOCAL_RANK) and writes into the one shared zarr store, which all ranks create at once.
AudioMAE ViT-B/16 with random weights in AudioMAE's checkpoint format, 10 s clips, fp32 forward
by default so that the GPUs, not the disk, set the pace (bf16 at one layer is disk-bound, see
extract_throughput.py). Batches never straddle shards (shard size a multiple of the batch size),
so both runs compute every item in an identical batch. The stores go under --dir: on a disk that
writes slower than the GPUs compute, the disk sets the pace of both runs (use /dev/shm to measure
the GPUs). Besides the wall-time ratio of the two commands, the streaming ratio compares their
items/s once the first batch is out (the start-up, checking the dataset and warming the GPU up,
is paid by every rank at once and does not shrink with more GPUs). torchrun sets OMP_NUM_THREADS=1 for its
ranks; the 1-GPU run gets the same, so that the CPU front-end sums in the same order and the
stores can be compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tokens.cache import open_store
from tokens.extract.backbones.audiomae import AudioMAE

sys.path.insert(0, str(Path(__file__).parent))
from extract_throughput import summaries, write_clips  # noqa: E402


def extract(launcher: list[str], manifest: Path, store: Path, checkpoint: Path, args) -> tuple[float, list[dict]]:
    """Wall seconds of the whole command, and each process's summary as `tokens extract` prints it."""
    command = launcher + [
        "-m", "tokens", "extract", str(manifest), "--store", str(store), "--backbone", "audiomae",
        "--checkpoint", str(checkpoint), "--precision", args.precision, "--batch-size", str(args.batch_size),
        "--shard-size", str(args.batch_size * 2), "--num-workers", str(args.num_workers), "--quiet",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    print(done.stdout, end="")
    return wall, summaries(done.stdout)


def same_store(a: Path, b: Path) -> dict:
    with open_store(a) as x, open_store(b) as y:
        split_x, split_y = x.split("train"), y.split("train")
        worst, largest = 0.0, 0.0
        for start in range(0, split_x.num_items, 512):
            idx = np.arange(start, min(start + 512, split_x.num_items))
            tx, ty = split_x.read_tokens(11, idx).astype(np.float32), split_y.read_tokens(11, idx).astype(np.float32)
            worst = max(worst, float(np.abs(tx - ty).max()))
            largest = max(largest, float(np.abs(tx).max()))
        identical_ids = list(split_x.column("ids")) == list(split_y.column("ids"))
        return {"complete": split_x.is_complete and split_y.is_complete, "same_ids": identical_ids,
                "max_abs_token_difference": worst, "max_abs_token": largest, "bit_identical": worst == 0.0 and identical_ids}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=4096)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=12)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tokens-bench-multi"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    assert torch.cuda.device_count() >= args.gpus, f"needs {args.gpus} GPUs"

    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    torch.manual_seed(0)
    model = AudioMAE()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    checkpoint = args.dir / "audiomae-random.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    manifest = write_clips(args.dir, 256, args.clips)

    one, one_rank = extract([sys.executable], manifest, args.dir / "one.zarr", checkpoint, args)
    many, ranks = extract([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"],
                          manifest, args.dir / "many.zarr", checkpoint, args)
    streaming_one = one_rank[0]["streaming_items_per_s"]
    streaming_many = sum(rank["streaming_items_per_s"] for rank in ranks)
    figures = {
        "gpu": torch.cuda.get_device_name(), "gpus": args.gpus, "clips": args.clips, "precision": args.precision,
        "store_dir": str(args.dir),
        "one_gpu_s": round(one, 1), f"{args.gpus}_gpus_s": round(many, 1),
        "one_gpu_clips_per_s": round(args.clips / one, 1), f"{args.gpus}_gpus_clips_per_s": round(args.clips / many, 1),
        "throughput_ratio": round(one / many, 2),
        "streaming_ratio": round(streaming_many / streaming_one, 2),
        "one_gpu_process": one_rank[0], "ranks": ranks,
        **same_store(args.dir / "one.zarr", args.dir / "many.zarr"),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
