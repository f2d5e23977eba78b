"""The extraction recipe: plan the work, open the store, run the frozen backbone once, write shards.

Read top to bottom: `extract()` builds the backbone, checks the whole dataset, creates (or
reopens) the store, then streams the shards this process owns through DataLoader workers
(decoding and front-end), a batched forward pass on the device, and a writer thread that
stores complete shards while the next batches compute.
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tokens.cache import StoreSpec, create_or_open, open_store
from tokens.cache.store import STORAGE_DTYPE
from tokens.extract.audio import BadAudio, load_window
from tokens.extract.backbones import Backbone, build_backbone
from tokens.extract.images import BadImage, load_image
from tokens.extract.manifest import Dataset, Item, read_dataset

TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ExtractionError(Exception):
    """The run cannot go on (bad option, --strict on a bad item); the message says what to fix."""


@dataclass
class Summary:
    store: Path
    items_written: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (item id, reason)
    seconds: float = 0.0  # the whole run, planning and start-up included
    streaming_seconds: float = 0.0  # from the first batch out of the loader to the last shard written


@dataclass
class Plan:
    """What one run does: the store it fills and the (split, shard) units this process owns."""

    spec: StoreSpec
    dataset: Dataset
    units: list[tuple[str, int]]

    def item_bytes(self) -> int:
        s = self.spec
        per_layer = (s.num_tokens + s.num_prefix) * s.dim * np.dtype(STORAGE_DTYPE[s.dtype]).itemsize
        return per_layer * len(s.layers) + (s.num_tokens if s.masked else 0)


def resolve_layers(layers: list[int] | str | None, depth: int) -> list[int]:
    """Block indices as given (negative counts from the end), "all", or by default the last block."""
    if layers == "all":
        return list(range(depth))
    chosen = []
    for layer in layers or [-1]:
        index = layer + depth if layer < 0 else layer
        if not 0 <= index < depth:
            raise ExtractionError(f"--layers: {layer} is not a block of this backbone (it has {depth}: 0..{depth - 1} or -1..-{depth})")
        if index not in chosen:
            chosen.append(index)
    return sorted(chosen)


def plan(
    dataset_source: Path,
    store_path: Path,
    backbone: Backbone,
    *,
    layers: list[int] | str | None,
    dtype: str,
    fmt: str,
    codec: str | None,
    shard_size: int,
    part: tuple[int, int],
) -> Plan:
    existing_classes = None
    if store_path.exists():
        with open_store(store_path) as store:
            existing_classes = store.classes
    dataset = read_dataset(
        dataset_source, window_seconds=backbone.window_seconds, sample_rate=backbone.sample_rate,
        modality=backbone.modality, classes=existing_classes,
    )
    spec = StoreSpec(
        backbone=backbone.name,
        backbone_config=backbone.config,
        checkpoint_sha256=backbone.checkpoint_sha256,
        frontend=backbone.config.get("frontend", {}),
        layers=resolve_layers(layers, backbone.depth),
        final_norm=backbone.final_norm,
        dtype=dtype,
        grid=backbone.grid,
        dim=backbone.dim,
        num_prefix=backbone.num_prefix,
        task=dataset.task,
        classes=dataset.classes,
        splits={name: len(items) for name, items in dataset.splits.items()},
        dataset_fingerprint=dataset.fingerprint(),
        masked=backbone.modality == "audio",
        shard_size=shard_size,
        codec=codec,
        extra={"dataset": str(dataset_source), "format": fmt, **provenance()},
    )
    units = [(name, s) for name, n in spec.splits.items() for s in range(-(-n // spec.shard_size))]
    index, count = part
    return Plan(spec, dataset, units[index - 1::count])


class ItemSource(torch.utils.data.Dataset):
    """Decoding and front-end for one item, run in DataLoader workers; failures become records."""

    def __init__(self, backbone: Backbone, items: list[tuple[str, int, Item]]):
        self.backbone = backbone
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, position: int):
        split, index, item = self.items[position]
        try:
            if self.backbone.modality == "audio":
                raw = load_window(item.path, item.offset, item.duration, self.backbone.sample_rate)
            else:
                raw = load_image(item.path)
            inputs, mask = self.backbone.preprocess(raw)
            error = ""
        except (BadAudio, BadImage) as bad:
            inputs, mask, error = None, None, bad.reason
        except Exception as bad:  # a front-end failure on odd input is one bad item, not a dead run
            inputs, mask, error = None, None, f"{type(bad).__name__}: {bad}"
        return position, inputs, mask, error


def collate(rows):
    """Stack good items; failed ones get the first good item's shape filled with zeros."""
    template = next((r for r in rows if r[1] is not None), None)
    positions = torch.tensor([r[0] for r in rows])
    errors = [r[3] for r in rows]
    if template is None:
        return positions, None, None, errors
    inputs = torch.stack([r[1] if r[1] is not None else torch.zeros_like(template[1]) for r in rows])
    masks = torch.stack([r[2] if r[2] is not None else torch.zeros_like(template[2]) for r in rows])
    return positions, inputs, masks, errors


class ShardBuffer:
    """One shard's items, filled batch by batch in any order and written when full."""

    def __init__(self, spec: StoreSpec, split: str, shard: int, items: list[Item], root: Path):
        start = shard * spec.shard_size
        self.split, self.shard, self.start = split, shard, start
        self.items = items[start:start + spec.shard_size]
        n, storage = len(self.items), STORAGE_DTYPE[spec.dtype]
        self.tokens = {layer: np.zeros((n, spec.num_tokens, spec.dim), storage) for layer in spec.layers}
        self.prefix = {layer: np.zeros((n, spec.num_prefix, spec.dim), storage) for layer in spec.layers} if spec.num_prefix else None
        self.mask = np.zeros((n, spec.num_tokens), bool) if spec.masked else None
        if spec.task == "multilabel":
            self.labels = np.zeros((n, len(spec.classes)), np.uint8)
            for row, item in enumerate(self.items):
                self.labels[row, item.labels] = 1
        else:
            self.labels = np.array([item.labels[0] for item in self.items], np.int64)
        self.errors = [""] * n
        self.filled = 0
        self.root = root

    def put_rows(self, first: int, batch: "Forwarded", rows: np.ndarray, host: tuple[dict, dict | None]):
        """Copy consecutive batch rows into this shard from row `first` on; failed items stay zero."""
        tokens, prefix = host
        target = slice(first, first + len(rows))
        source = slice(rows[0], rows[-1] + 1)
        failed = [first + i for i, row in enumerate(rows) if batch.errors[row]]
        for layer in self.tokens:
            self.tokens[layer][target] = tokens[layer][source]
            self.tokens[layer][failed] = 0
            if self.prefix is not None:
                self.prefix[layer][target] = prefix[layer][source]
                self.prefix[layer][failed] = 0
        if self.mask is not None:
            self.mask[target] = batch.masks[source] if batch.masks is not None else False
            self.mask[failed] = False
        for i, row in enumerate(rows):
            self.errors[first + i] = batch.errors[row]
        self.filled += len(rows)

    @property
    def full(self) -> bool:
        return self.filled == len(self.items)

    def write_to(self, store):
        store.split(self.split).write_shard(
            self.shard, tokens=self.tokens, prefix=self.prefix, mask=self.mask, labels=self.labels,
            ids=[it.id for it in self.items], sources=[_relative(it.path, self.root) for it in self.items],
            offsets=np.array([it.offset for it in self.items]),
            durations=np.array([np.nan if it.duration is None else it.duration for it in self.items]),
            errors=self.errors,
        )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


class ShardWriter:
    """Background threads that write finished shards, so the device never waits on the disk.

    Two threads let one shard's fsync overlap the next shard's write; the bounded queue stops
    the forward pass from running ahead of the disk by more than a few shards of memory.
    """

    def __init__(self, store, threads: int = 2, depth: int = 2):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"shard-writer-{i}") for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self):
        while (buffer := self.queue.get()) is not None:
            try:
                if self.error is None:
                    buffer.write_to(self.store)
            except BaseException as error:  # re-raised in the main thread by put()/close()
                self.error = error

    def put(self, buffer: ShardBuffer):
        self._raise()
        self.queue.put(buffer)

    def close(self):
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        self._raise()

    def _raise(self):
        if self.error is not None:
            raise self.error


def pick_device(device: str) -> torch.device:
    if device == "auto":
        from tokens.cluster import local_device_index

        if torch.cuda.is_available():
            local = local_device_index()
            return torch.device("cuda", local if local is not None else 0)
        return torch.device("cpu")
    return torch.device(device)


def extract(
    dataset_source: str | Path,
    store_path: str | Path,
    *,
    backbone: str = "crepe-tiny",
    checkpoint: str | None = None,
    allow_pickle: bool = False,
    backbone_options: dict | None = None,
    layers: list[int] | str | None = None,
    final_norm: bool = False,
    fmt: str = "zarr",
    dtype: str = "float16",
    codec: str | None = None,
    shard_size: int = 0,
    precision: str = "bf16",
    batch_size: int = 32,
    device: str = "auto",
    num_workers: int | None = None,
    part: tuple[int, int] = (1, 1),
    strict: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    log=print,
) -> Summary | Plan:
    """Fill `store_path` with the token maps of every item of the dataset (or of this part of it)."""
    started = time.time()
    store_path = Path(store_path)
    model = build_backbone(backbone, checkpoint, allow_pickle=allow_pickle, final_norm=final_norm, **(backbone_options or {}))
    work = plan(Path(dataset_source), store_path, model, layers=layers, dtype=dtype, fmt=fmt, codec=codec,
                shard_size=shard_size, part=part)
    spec = work.spec
    if dry_run:
        return work

    store = create_or_open(store_path, spec, fmt)
    summary = Summary(store_path)
    done = {name: store.split(name).complete_mask() for name in spec.splits}
    todo = [(split, shard) for split, shard in work.units if not done[split][shard]]
    summary.shards_skipped = len(work.units) - len(todo)
    items = [
        (split, index, work.dataset.splits[split][index])
        for split, shard in todo
        for index in range(shard * spec.shard_size, min((shard + 1) * spec.shard_size, spec.splits[split]))
    ]
    if summary.shards_skipped:
        log(f"resuming: {summary.shards_skipped} of {len(work.units)} shards already complete")
    if not items:
        store.close()
        summary.seconds = time.time() - started
        return summary

    target = pick_device(device)
    model = model.to(target).eval()
    workers = min(8, max(1, (os.cpu_count() or 1) - 1)) if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(
        ItemSource(model, items), batch_size=batch_size, num_workers=workers, collate_fn=collate,
        pin_memory=target.type == "cuda", persistent_workers=False, prefetch_factor=4 if workers else None,
    )
    autocast = (
        torch.autocast(target.type, dtype=torch.bfloat16) if precision == "bf16" and target.type == "cuda"
        else nullcontext()
    )
    buffers: dict[tuple[str, int], ShardBuffer] = {}  # made on first use: only shards in flight take memory
    writer = ShardWriter(store)
    host = HostBuffers(spec, batch_size, pinned=target.type == "cuda")

    def land(batch: "Forwarded"):
        """Wait for a batch's tokens to reach host memory, then file its rows into shard buffers."""
        if batch.event is not None:
            batch.event.synchronize()
        rows = np.arange(len(batch.positions))
        for (split, shard), run in _runs(rows, [items[p][:2] for p in batch.positions], spec.shard_size):
            if (split, shard) not in buffers:
                buffers[(split, shard)] = ShardBuffer(spec, split, shard, work.dataset.splits[split], work.dataset.root)
            buffer = buffers[(split, shard)]
            buffer.put_rows(items[batch.positions[run[0]]][1] - buffer.start, batch, run, host.slot(batch.slot))
            if buffer.full:
                writer.put(buffers.pop((split, shard)))
                summary.shards_written += 1
                summary.items_written += len(buffer.items)
        bar.update(len(batch.positions))

    bar = tqdm(total=len(items), unit="item", desc=f"extract {spec.backbone}", disable=not progress, smoothing=0.05)
    pending = None
    try:
        for number, (positions, inputs, masks, errors) in enumerate(loader):
            if number == 0:
                first_batch = time.time()
            for position, error in zip(positions.tolist(), errors):
                if error:
                    item = items[position][2]
                    if strict:
                        raise ExtractionError(f"item {item.id} ({item.path}): {error} (--strict stops at the first bad item)")
                    summary.failed.append((item.id, error))
            batch = Forwarded(positions.tolist(), errors, None if masks is None else masks.numpy(), number % 2)
            if inputs is not None:  # the forward pass and its copy to the host run while the last batch lands
                with torch.inference_mode(), autocast:
                    outputs = model(inputs.to(target, non_blocking=True), spec.layers, masks.to(target, non_blocking=True))
                batch.event = host.fill(batch.slot, outputs, len(positions))
            if pending is not None:
                land(pending)
            pending = batch
        if pending is not None:
            land(pending)
    finally:
        bar.close()
        writer.close()
        store.close()
    summary.seconds = time.time() - started
    summary.streaming_seconds = time.time() - first_batch
    return summary


@dataclass
class Forwarded:
    """A batch whose forward pass was launched: where its rows go and which host slot holds its tokens."""

    positions: list[int]
    errors: list[str]
    masks: np.ndarray | None
    slot: int
    event: torch.cuda.Event | None = None


class HostBuffers:
    """Two sets of (pinned, on GPU runs) host tensors per layer: one fills while the other is read."""

    def __init__(self, spec: StoreSpec, batch_size: int, pinned: bool):
        dtype = TORCH_DTYPE[spec.dtype]

        def tensor(count):
            return torch.empty((batch_size, count, spec.dim), dtype=dtype, pin_memory=pinned)

        self.tokens = [{layer: tensor(spec.num_tokens) for layer in spec.layers} for _ in range(2)]
        self.prefix = [{layer: tensor(spec.num_prefix) for layer in spec.layers} if spec.num_prefix else None for _ in range(2)]
        self.storage = STORAGE_DTYPE[spec.dtype]

    def fill(self, slot: int, outputs: dict, n: int) -> torch.cuda.Event | None:
        """Start copying a batch's outputs (cast to the storage dtype on the device) into `slot`."""
        for layer, (patch, prefix) in outputs.items():
            dtype = self.tokens[slot][layer].dtype
            self.tokens[slot][layer][:n].copy_(patch.to(dtype, memory_format=torch.contiguous_format), non_blocking=True)
            if self.prefix[slot] is not None:
                self.prefix[slot][layer][:n].copy_(prefix.to(dtype, memory_format=torch.contiguous_format), non_blocking=True)
        if not torch.cuda.is_available() or next(iter(outputs.values()))[0].device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def slot(self, slot: int) -> tuple[dict, dict | None]:
        """numpy views of a slot in storage dtype (bfloat16 as its uint16 bits)."""
        def view(t):
            return t.view(torch.int16).numpy().view(self.storage) if t.dtype == torch.bfloat16 else t.numpy()

        tokens = {layer: view(t) for layer, t in self.tokens[slot].items()}
        prefix = {layer: view(t) for layer, t in self.prefix[slot].items()} if self.prefix[slot] is not None else None
        return tokens, prefix


def _runs(rows: np.ndarray, keys: list[tuple[str, int]], shard_size: int):
    """Consecutive batch rows that land in the same shard: ((split, shard), rows)."""
    start = 0
    for row in range(1, len(rows) + 1):
        if row == len(rows) or _unit(keys[row], shard_size) != _unit(keys[start], shard_size):
            yield _unit(keys[start], shard_size), rows[start:row]
            start = row


def _unit(key: tuple[str, int], shard_size: int) -> tuple[str, int]:
    split, index = key
    return split, index // shard_size


def provenance() -> dict:
    """Who made the store and how: kept in the store, outside the cache key."""
    return {"host": socket.gethostname(), "argv": sys.argv, "torch": torch.__version__}
