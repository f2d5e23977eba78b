"""End-to-end extraction throughput of a ViT-B audio encoder against its bound, measured in one run.

    python benchmarks/extract_throughput.py --clips 65536 --clips-all-layers 5120 --dir /tmp/bench-extract

AudioMAE architecture (ViT-B/16, 512 patch tokens + class token, 768 dims), random weights saved
in AudioMAE's checkpoint format, 10 s 16 kHz wav clips, bf16 autocast, float16 tokens. The bound
is the lower of
  (a) the encoder alone: forward passes on inputs already on the GPU (the faster of eager passes
      and a CUDA graph replaying them), and
  (b) the disk: bytes each item stores / the write bandwidth of the store's disk, measured just
      before the run by writing as many bytes as it stores, in large fsync'd files, 4 and then 8
      at a time, taking the faster (a cloud disk's short bursts can be faster than what it
      sustains over tens of GB, and one writer at a time can be slower than several),
and the figure is the end-to-end items/s of the `tokens extract` command, run as a user runs it
in a fresh process (start-up, dataset check, decode, fbank and forward on the GPU, write; Python's
bytecode cached, as an installed copy has it), divided by that bound, for one cached layer and for all 12; its rate once the first batch is out is beside it.
The rate of decoding alone (the DataLoader workers, on the CPU; the fbank runs on the GPU, in the
forward pass) is reported beside it: it is not part of the bound but is the next limit on machines
with few cores per GPU. So is the
disk probe run again (up to 20 GB) while the DataLoader decodes at the bound's rate, as it must
during an extraction: on a cloud host the disk may give less while the cores decode. The default
sizes write about 50 GB per run: the disk needs that much free space.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from tokens.extract.backbones.audiomae import AudioMAE
from tokens.extract.backbones import build_backbone
from tokens.extract.run import ItemSource, collate, default_workers, plan


def write_clips(directory: Path, distinct: int, clips: int) -> Path:
    """`distinct` 10 s noise files listed `clips` times under distinct ids (decode cost stays real)."""
    audio = directory / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(distinct):
        sf.write(audio / f"{i}.wav", (0.1 * rng.standard_normal(160_000)).astype(np.float32), 16000)
    manifest = directory / f"manifest-{clips}.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "split", "id"])
        for i in range(clips):
            writer.writerow([f"audio/{i % distinct}.wav", "noise", "train", f"clip{i}"])
    return manifest


def encoder_bound(checkpoint_model: AudioMAE, batch: int, layers: list[int], steps: int = 20, repeats: int = 3) -> float:
    """Clips/s of the forward pass alone: inputs already on the GPU, bf16 autocast, tokens cast to
    float16. The best of eager passes and of a CUDA graph replaying them (what `tokens extract`
    does), each after a warm-up and over several repeats: a bound measured low would flatter the ratio."""
    model = checkpoint_model.cuda().eval()
    fbank, model.fbank = model.fbank, torch.nn.Identity()  # the encoder alone, on features already made
    inputs = torch.randn(batch, 1024, 128, device="cuda")

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return [tensor.to(torch.float16) for pair in model(inputs, layers).values() for tensor in pair]

    def rate(step) -> float:
        for _ in range(10):  # kernel choice, clocks
            step()
        best = 0.0
        for _ in range(repeats):
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            best = max(best, batch * steps / (time.perf_counter() - started))
        return best

    with torch.inference_mode():
        eager = rate(forward)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            forward()
        graphed = rate(graph.replay)
    del graph
    model.fbank = fbank
    model.cpu()
    torch.cuda.empty_cache()
    return max(eager, graphed)


SUMMARY = re.compile(r"wrote (\d+) items? .* in ([\d.]+) s \(([\d.]+) s to the first batch, then ([\d.]+) items/s\)")


def summaries(stdout: str) -> list[dict]:
    """The summary line of each `tokens extract` process in a command's output (one per torchrun rank)."""
    return [{"items": int(m[1]), "seconds": float(m[2]), "startup_s": float(m[3]), "streaming_items_per_s": float(m[4])}
            for m in SUMMARY.finditer(stdout)]


def command_run(manifest: Path, store: Path, checkpoint: Path, layers: str, args) -> tuple[float, dict]:
    """`tokens extract` as a user runs it, in a fresh process: (wall seconds of the command, its
    summary line: seconds inside the extraction, to its first batch, and items/s from then on).

    With Python's bytecode cached, as `pip install` leaves it: a machine that keeps none (the GPU
    hosts set PYTHONDONTWRITEBYTECODE, and their torch has no __pycache__) compiles torch's source
    in every process, 3 s of each start that no installed copy pays. The cache goes under --dir,
    filled by a first run of the same command (warm_bytecode)."""
    command = [sys.executable, "-m", "tokens", "extract", str(manifest), "--store", str(store), "--backbone", "audiomae",
               "--checkpoint", str(checkpoint), "--layers", layers, "--batch-size", str(args.batch_size), "--quiet"]
    if args.num_workers is not None:
        command += ["--num-workers", str(args.num_workers)]
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    environment["PYTHONPYCACHEPREFIX"] = str(args.dir / "bytecode")
    started = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
    wall = time.perf_counter() - started
    found = summaries(done.stdout)
    assert found, f"no summary in the output of {' '.join(command)}:\n{done.stdout}"
    return wall, found[0]


def warm_bytecode(checkpoint: Path, args):
    """The measured commands' bytecode, compiled by a small run of the same command (command_run)."""
    directory = args.dir / "warm"
    command_run(write_clips(directory, 8, 256), directory / "store.zarr", checkpoint, "-1", args)
    shutil.rmtree(directory)


def front_end_loader(manifest: Path, checkpoint: Path, batch: int, workers: int | None, clips: int):
    """`tokens extract`'s DataLoader (decoding, padding; the fbank is on the GPU) over the manifest's first clips, repeated to `clips`."""
    backbone = build_backbone("audiomae", str(checkpoint))
    work = plan(manifest, manifest.parent / "unused.zarr", backbone, layers=None, dtype="float16", fmt="zarr",
                codec=None, shard_size=0, part=(1, 1))
    listed = work.dataset.splits["train"]
    items = [("train", i, listed[i % len(listed)]) for i in range(clips)]
    workers = default_workers(backbone) if workers is None else workers
    return torch.utils.data.DataLoader(ItemSource(backbone, items), batch_size=batch, num_workers=workers,
                                       collate_fn=collate, pin_memory=True, prefetch_factor=4)


def front_end_rate(manifest: Path, checkpoint: Path, batch: int, workers: int | None, clips: int = 4096) -> float:
    """Clips/s of `tokens extract`'s DataLoader alone (decoding: the CPU's share; not in the bound)."""
    count, started = 0, None
    for number, (positions, *_) in enumerate(front_end_loader(manifest, checkpoint, batch, workers, clips)):
        if number == 2:  # workers started and warm
            count, started = 0, time.perf_counter()
        count += len(positions)
    return count / (time.perf_counter() - started)


def disk_while_decoding(directory: Path, nbytes: float, threads: int, rate: float, loader_args: tuple) -> float:
    """The disk probe while the DataLoader decodes `rate` clips/s in the same process, as it must
    during an extraction that reaches the bound. Not the bound: it shows what the host's disk gives
    while its cores decode (on the two-GPU H200 host, 9-40% less than idle so far)."""
    manifest, checkpoint, batch, workers = loader_args
    seconds = nbytes / 1e9 + 60  # longer than the probe at 1 GB/s, after the workers' start
    loader = front_end_loader(manifest, checkpoint, batch, workers, int(rate * seconds))
    warm, stop = threading.Event(), threading.Event()

    def decode():
        started, count = time.perf_counter(), 0
        for number, (positions, *_) in enumerate(loader):
            if stop.is_set():
                break
            count += len(positions)
            if number == 4:
                warm.set()
            time.sleep(max(0.0, started + count / rate - time.perf_counter()))
        warm.set()

    decoder = threading.Thread(target=decode, daemon=True)
    decoder.start()
    warm.wait()
    try:
        return disk_bound(directory, nbytes, threads)
    finally:
        stop.set()
        decoder.join()


def disk_bound(directory: Path, nbytes: float, threads: int, block_mib: int = 192) -> float:
    """Write bandwidth in bytes/s of the store's disk over `nbytes`: large blocks, one fsync'd file
    per block, `threads` files at a time (a cloud disk may need several requests in flight)."""
    block = np.random.default_rng(1).integers(0, 255, block_mib * 2**20, dtype=np.uint8)
    count = max(1, round(nbytes / block.nbytes))
    target = directory / "disk-probe"
    target.mkdir(exist_ok=True)

    def write(i):
        fd = os.open(target / f"{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, block)
        os.fsync(fd)
        os.close(fd)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(count)))
    rate = count * block.nbytes / (time.perf_counter() - started)
    shutil.rmtree(target)
    return rate


DISK_PROBE_THREADS = (4, 8)  # the bound is the faster: tokens extract writes with 8 threads


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=65536, help="clips for the one-layer run")
    parser.add_argument("--clips-all-layers", type=int, default=5120, help="clips for the 12-layer run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tokens-bench-extract"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark measures the GPU path"

    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    torch.manual_seed(0)
    model = AudioMAE()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    checkpoint = args.dir / "audiomae-random.pth"
    torch.save({"model": model.state_dict()}, checkpoint)

    tokens_per_item = model.num_tokens + model.num_prefix
    figures = {"gpu": torch.cuda.get_device_name(), "cpu_cores": os.cpu_count()}
    warm_bytecode(checkpoint, args)
    for name, layers, clips in (("1 layer", [-1], args.clips), ("12 layers", "all", args.clips_all_layers)):
        count = 1 if layers != "all" else model.depth
        item_bytes = count * tokens_per_item * model.dim * 2 + model.num_tokens  # float16 tokens + mask
        free = shutil.disk_usage(args.dir).free
        assert 1.05 * clips * item_bytes < free, f"{name}: {clips} clips need {clips * item_bytes / 1e9:.0f} GB; {free / 1e9:.0f} GB free"
        encoder = encoder_bound(model, args.batch_size, list(range(model.depth)) if layers == "all" else layers)
        manifest = write_clips(args.dir, 256, clips)
        if "front_end_clips_per_s" not in figures:
            figures["front_end_clips_per_s"] = round(front_end_rate(manifest, checkpoint, args.batch_size, args.num_workers), 1)
        probes = {threads: disk_bound(args.dir, clips * item_bytes, threads) for threads in DISK_PROBE_THREADS}
        disk = max(probes.values())
        store = args.dir / f"store-{count}.zarr"
        wall, summary = command_run(manifest, store, checkpoint, "all" if layers == "all" else "-1", args)
        startup, streaming = summary["startup_s"], summary["streaming_items_per_s"]
        shutil.rmtree(store)
        disk_items = disk / item_bytes
        end_to_end = clips / wall
        bound = min(encoder, disk_items)
        loaded = disk_while_decoding(args.dir, min(clips * item_bytes, 20e9), max(DISK_PROBE_THREADS), bound,
                                     (manifest, checkpoint, args.batch_size, args.num_workers))
        figures[name] = {
            "clips": clips, "item_mib": round(item_bytes / 2**20, 3),
            "disk_write_gb_per_s": {f"{threads} threads": round(rate / 1e9, 3) for threads, rate in probes.items()},
            "encoder_only_clips_per_s": round(encoder, 1), "disk_clips_per_s": round(disk_items, 1),
            "bound_clips_per_s": round(bound, 1), "end_to_end_clips_per_s": round(end_to_end, 1),
            "ratio_to_bound": round(end_to_end / bound, 3), "seconds": round(wall, 1),
            "streaming_clips_per_s": round(streaming, 1), "streaming_ratio_to_bound": round(streaming / bound, 3),
            "streaming_write_gb_per_s": round(streaming * item_bytes / 1e9, 3),  # to set beside the disk probe
            "disk_write_gb_per_s_while_decoding": round(loaded / 1e9, 3),
            "streaming_ratio_to_disk_while_decoding": round(streaming * item_bytes / loaded, 3),
            "seconds_to_first_batch": startup,
            "seconds_outside_extraction": round(wall - summary["seconds"], 1),  # importing, parsing, exiting
        }
        print(f"{name}: end-to-end {end_to_end:.0f} clips/s ({clips} clips in {wall:.1f} s); encoder alone {encoder:.0f}, "
              f"disk {disk_items:.0f} ({disk / 1e9:.2f} GB/s at {item_bytes / 2**20:.2f} MiB/item) -> ratio {end_to_end / bound:.2f} "
              f"(streaming {streaming:.0f} clips/s, ratio {streaming / bound:.2f}; {startup:.1f} s to the first batch; "
              f"disk while decoding {loaded / 1e9:.2f} GB/s)", flush=True)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
