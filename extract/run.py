"""The extraction recipe: plan the work, open the store, run the frozen backbone once, write shards.

Read top to bottom: `extract()` builds the backbone, checks the whole dataset, creates (or
reopens) the store, then streams the shards this process owns through DataLoader workers
(decoding), a batched forward pass on the device (front-end included), a landing thread that copies
each batch's tokens into its shards, and writer threads that store complete shards while the
next batches compute.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import queue
import socket
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tokens.cache import StoreSpec, TokenStore, create_or_open, open_store
from tokens.cache.store import (SUFFIX_FORMATS, STORAGE_DTYPE, StoreError, check_codec, check_writable, detect_format, failed,
                                shard_count, store_exists)
from tokens.cache.zarr_backend import PAGE
from tokens.cluster import pick_device, usable_cores
from tokens.extract.audio import BadAudio, close_kept_file, load_window
from tokens.extract.backbones import DEFAULT_BACKBONE, Backbone, build_backbone, checked_options
from tokens.extract.forward import TORCH_DTYPE, Forward
from tokens.extract.images import BadImage, load_image
from tokens.extract.manifest import SPLITS, Dataset, Item, read_dataset
from tokens.extract.workers import signals_held, start_decoding_worker, stop_decoding_workers


class ExtractionError(Exception):
    """The run cannot go on (bad option, --strict on a bad item); the message says what to fix."""


@dataclass
class Summary:
    store: Path
    items_written: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (item id, reason)
    retried: int = 0  # failed items whose shards this run writes again (retry_failed)
    good_before: int = 0  # items of the shards already complete, by outcome
    failed_before: int = 0
    seconds: float = 0.0  # the whole run, planning and start-up included
    streaming_seconds: float = 0.0  # from the first batch out of the loader to the last shard written


@dataclass
class Plan:
    """What one run does: the store it fills and the (split, shard) units this process owns."""

    spec: StoreSpec
    dataset: Dataset
    units: list[tuple[str, int]]
    complete: int = 0  # of these units, shards an earlier run already wrote (known after check_existing)

    def shard_count(self) -> int:
        """Shards of the whole dataset, every part's."""
        return sum(shard_count(n, self.spec.shard_size) for n in self.spec.splits.values())

    def item_bytes(self) -> int:
        s = self.spec
        per_layer = (s.num_tokens + s.num_prefix) * s.dim * np.dtype(STORAGE_DTYPE[s.dtype]).itemsize
        return per_layer * len(s.layers) + (s.num_tokens if s.masked else 0)

    def disk_bytes(self) -> int:
        """What the whole store will take: every item's tokens, and its per-item columns (mask, labels,
        offsets, durations, ids, sources, errors), which a zarr store pads to whole shards in each
        split: about 1 MiB per split for CREPE, which a small dataset notices."""
        s = self.spec
        mask = s.num_tokens if s.masked else 0
        columns = mask + (len(s.classes) if s.task == "multilabel" else 8) + 8 + 8 + 3 * 4  # strings: a 4-byte length each
        token_arrays = len(s.layers) * (2 if s.num_prefix else 1)
        total = 0
        for items in self.dataset.splits.values():
            strings = sum(len(item.id.encode()) + len(item.source.encode()) for item in items)
            total += len(items) * (self.item_bytes() - mask) + strings
            if s.extra["format"] == "zarr":  # whole shards of columns, and each token shard file's index
                shards = shard_count(len(items), s.shard_size)
                total += shards * s.shard_size * columns + shards * token_arrays * (16 * s.shard_size + 4)
            else:
                total += len(items) * columns
        return total


def load_backbone(backbone: str, checkpoint: str | None, allow_pickle: bool, backbone_options: dict | None,
                  final_norm: bool, layers: list[int] | str | None) -> tuple[Backbone, list[int]]:
    """The backbone with its checkpoint loaded and checked, and the blocks to cache; `tokens slurm`
    loads it too, so that a bad name, option, checkpoint or layer fails before the array is queued."""
    check_backbone_options(backbone, backbone_options or {})
    model = build_backbone(backbone, checkpoint, allow_pickle=allow_pickle, final_norm=final_norm, **(backbone_options or {}))
    return model, resolve_layers(layers, model.depth)


def check_backbone_options(backbone: str, backbone_options: dict):
    """What can be checked of a backbone before its checkpoint is there: its name and options
    (`tokens slurm` checks them so when the checkpoint is still to come)."""
    if "final_norm" in backbone_options:
        raise ExtractionError("--backbone-option final_norm: use --final-norm (final_norm=True in Python)")
    checked_options(backbone, backbone_options)


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
    precision: str = "fp32",
    progress: bool = False,
) -> Plan:
    def spec_with(**dataset_fields) -> StoreSpec:
        return StoreSpec(
            backbone=backbone.name,
            backbone_config=backbone.config,
            checkpoint_sha256=backbone.checkpoint_sha256,
            frontend=backbone.config.get("frontend", {}),
            layers=resolve_layers(layers, backbone.depth),
            final_norm=backbone.final_norm,
            final_norm_params=backbone.final_norm_params,
            dtype=dtype,
            grid=backbone.grid,
            dim=backbone.dim,
            num_prefix=backbone.num_prefix,
            class_token=backbone.class_token,
            masked=backbone.modality == "audio",
            precision=precision,
            shard_size=shard_size,
            codec=codec,
            extra={"dataset": str(Path(dataset_source).absolute()), "format": fmt, **provenance()},
            **dataset_fields,
        )

    existing_classes = None
    if store_exists(store_path):
        with open_store(store_path) as store:
            existing_classes = store.classes
            if not shard_size:  # resuming without --shard-size: the store's, not what the default would be now
                shard_size = int(store.meta["shard_size"])
            # The encoder's settings before the dataset is read: a store of another backbone or task
            # would otherwise be blamed on every row whose labels it lacks.
            unread = {"task": store.task, "classes": store.classes, "splits": {}, "dataset_fingerprint": ""}
            store.check_compatible(spec_with(**unread), unknown=(*unread, "precision"))
    dataset = read_dataset(
        dataset_source, window_seconds=backbone.window_seconds, sample_rate=backbone.sample_rate,
        modality=backbone.modality, classes=existing_classes, progress=progress, store=store_path,
    )
    spec = spec_with(task=dataset.task, classes=dataset.classes, dataset_fingerprint=dataset.fingerprint(),
                     splits={name: len(items) for name, items in dataset.splits.items()})
    units = [(name, s) for name, n in spec.splits.items() for s in range(shard_count(n, spec.shard_size))]
    index, count = part
    return Plan(spec, dataset, units[index - 1::count])


def holds_only_this_dataset(store, dataset: Dataset) -> bool:
    """Whether the dataset differs from the store's only in files that could not be read when their
    shards were written (failed items of unknown length), which are readable now: `--retry-failed`
    extracts them. Any other change is refused, even in shards not written yet: a task of the same
    job array may still be writing those from the dataset as it was. The store's earlier
    fingerprints count too: a file fixed since, whose shard was not written again, is still unknown there."""
    known = set()  # (split, index) of failed items stored without a length that have one now
    try:
        for name, items in dataset.splits.items():
            split = store.split(name)
            rows = np.flatnonzero(split.complete_items())
            if not len(rows) or len(items) != split.num_items:
                continue
            unknown = rows[np.isnan(split.column("durations", rows)) & failed(split.column("errors", rows))]
            known |= {(name, int(row)) for row in unknown if items[row].duration is not None}
    except (StoreError, OSError, ValueError):  # a damaged column: refused as before, by the fingerprint
        return False
    if not known:
        return False
    as_stored = Dataset(dataset.root, dataset.task, dataset.classes, {
        name: [replace(item, duration=None) if (name, index) in known else item for index, item in enumerate(items)]
        for name, items in dataset.splits.items()}, dataset.sample_rate)
    return as_stored.fingerprint() in {store.meta["dataset_fingerprint"], *store.meta.get("earlier_dataset_fingerprints", [])}


def dataset_change(store, dataset: Dataset, rows_at_once: int = 65536) -> str:
    """The first difference between the items a store holds and those the dataset gives now, as a
    user would look for it: a split's size, then item by item (in the shards written so far) its id,
    file, window and labels. "" when none shows there, or the store's columns cannot be read."""
    for name in SPLITS:
        held, now = store.splits[name].num_items if name in store.splits else 0, len(dataset.splits.get(name, []))
        if held != now:  # where the items first differ tells which file gained or lost windows
            first = _first_change(store, dataset, name, min(held, now), rows_at_once)
            return f"{name} has {held} items in the store, {now} now" + (f"; the first to differ: {first}" if first else "")
    for name in dataset.splits:
        if found := _first_change(store, dataset, name, len(dataset.splits[name]), rows_at_once):
            return found
    return ""


def _first_change(store, dataset: Dataset, name: str, count: int, rows_at_once: int) -> str:
    """dataset_change() item by item over the first `count` items of a split, in the shards written so far."""
    items = dataset.splits.get(name, [])  # a split the dataset no longer has: none to compare
    try:
        split = store.split(name)
        complete = split.complete_items()
        for first in range(0, count, rows_at_once):  # a column of millions of rows is read in parts
            rows = np.flatnonzero(complete[first:min(first + rows_at_once, count)]) + first
            if len(rows) and (found := _first_item_change(split, dataset, items, rows, complete)):
                return found
    except (StoreError, OSError, ValueError, KeyError):  # a damaged column: the refusal stays the fingerprint's
        return ""
    return ""


def _first_item_change(split, dataset: Dataset, items: list[Item], rows: np.ndarray, complete: np.ndarray) -> str:
    """dataset_change() for some rows of a split: each column compared as a whole, the first row named."""
    held = {name: split.column(name, rows) for name in ("ids", "sources", "offsets", "durations", "labels", "errors")}
    planned = [items[row] for row in rows]
    labels = held["labels"]
    wanted = np.zeros_like(labels)
    if labels.ndim == 2:
        for n, item in enumerate(planned):
            wanted[n, item.labels] = 1
    else:
        wanted[:] = [item.labels[0] for item in planned]
    durations = np.array([np.nan if item.duration is None else item.duration for item in planned])
    differs = {  # in the order a user would look
        "id": np.asarray(held["ids"], object) != np.array([item.id for item in planned], object),
        "file": np.asarray(held["sources"], object) != np.array([item.source for item in planned], object),
        # a file that could not be read had no known length (NaN): read now, it has one
        "window": (held["offsets"] != np.array([item.offset for item in planned]))
                  | ~((held["durations"] == durations) | (np.isnan(held["durations"]) & (np.isnan(durations) | failed(held["errors"])))),
        "labels": (labels != wanted).reshape(len(rows), -1).any(axis=1),
    }
    anywhere = np.logical_or.reduce(list(differs.values()))
    if not anywhere.any():
        return ""
    n = int(np.argmax(anywhere))
    what = next(name for name, found in differs.items() if found[n])
    item, where = planned[n], f"{split.name} item {int(rows[n])}"
    if what == "id":
        reordered = len(items) == split.num_items and set(split.column("ids")[complete]) <= {it.id for it in items}
        return (f"{where} is {held['ids'][n]!r} in the store but {item.id!r} now"
                + (" (the same items in another order: were the manifest's rows reordered?)" if reordered else ""))
    if what == "file":
        return f"{where} ({item.id}) is read from {held['sources'][n]} in the store but {item.source} now"
    if what == "window":
        return (f"{where} ({item.id}) is {held['durations'][n]:g} s from {held['offsets'][n]:g} s in the store, "
                f"{durations[n]:g} s from {item.offset:g} s now")

    def named(indices) -> str:
        return ";".join(dataset.classes[i] for i in indices) or "none"

    stored = np.flatnonzero(labels[n]) if labels.ndim == 2 else [int(labels[n])]
    return f"{where} ({item.id}) is labelled {named(stored)} in the store but {named(item.labels)} now"


def check_existing(work: Plan, store_path: Path, retry_failed: bool = False) -> Plan:
    """What a dry run can say of a store already there: the run would be refused (another
    configuration), or how many of its shards are complete (less those with failed items, which
    `retry_failed` writes again). Not the precision: a dry run on a login node without a GPU cannot
    know what the job on a GPU node will run in."""
    if not store_exists(store_path):
        return work
    with open_store(store_path) as store:
        store.check_compatible(work.spec, unknown=("precision",), dataset_change=functools.partial(dataset_change, dataset=work.dataset),
                               holds_dataset=functools.partial(holds_only_this_dataset, dataset=work.dataset))
        work.complete = len(work.units) - len(incomplete_units(store, work))
        if retry_failed:
            work.complete -= sum(1 for count in failed_in_complete_shards(store, work).values() if count)
    return work


def incomplete_units(store, work: Plan) -> list[tuple[str, int]]:
    """The (split, shard) units of this run that the store does not hold complete yet."""
    done = {name: store.split(name).complete_mask() for name in work.spec.splits}
    return [(split, shard) for split, shard in work.units if not done[split][shard]]


def failed_in_complete_shards(store: TokenStore, work: Plan) -> dict[tuple[str, int], int]:
    """For each of this run's shards that an earlier run completed (and only those), how many of its
    items failed."""
    counts = {}
    for name in dict.fromkeys(split for split, _ in work.units):
        split = store.split(name)
        done = split.complete_mask()
        shards = [shard for unit, shard in work.units if unit == name and done[shard]]
        if not shards:
            continue
        rows = [_shard_items(work.spec, name, shard) for shard in shards]  # only these shards' files are read
        failures = iter(failed(split.column("errors", np.concatenate([np.arange(r.start, r.stop) for r in rows]))))
        for shard, shard_rows in zip(shards, rows):
            counts[(name, shard)] = int(sum(next(failures) for _ in shard_rows))
    return counts


IN_FLIGHT = 2  # batches launched ahead of the one landing: a late batch from the loader does not idle the GPU
MAX_WORKERS = 32  # beyond this decoding outruns any disk, and each worker holds batches in memory


def default_workers(backbone: Backbone) -> int:
    """DataLoader workers: the cores this process may use (its affinity: SLURM's --cpus-per-task),
    shared among the torchrun ranks of the node, less one for the main process; no more than the
    backbone needs when its workers only decode (more took from the disk's writes)."""
    cores = usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(backbone.enough_workers or MAX_WORKERS, cores - 1))


class ItemSource(torch.utils.data.Dataset):
    """Decoding and Backbone.preprocess for one item, run in DataLoader workers; failures become records."""

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
            if mask is not None and not mask.any():  # shorter than the front-end's first frame (25 ms for an fbank)
                inputs, mask = None, None
                error = f"too short: {len(raw) / self.backbone.sample_rate * 1000:.0f} ms of audio gives no token"
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


SMALLEST_PART = 16  # items: fewer, and the loader's per-batch cost outweighs the earlier start


def loader_batches(count: int, batch_size: int, workers: int) -> list[range]:
    """The positions of each DataLoader batch: batches of `batch_size`, except that the first ones
    come in up to 8 parts (no more than there are workers), one for each worker's first task.

    The DataLoader gives each batch to one worker. Whole, the first batch waited for one worker to
    decode all its items while the other workers decoded theirs on every core: 2.5 s with batches
    of 128 on the two-GPU H200 host, out of 11-17 s of fixed costs per command. In parts, several
    workers decode it at once; joined_batches() puts the parts back together.
    """
    parts = max(1, min(8, batch_size // SMALLEST_PART, workers))
    in_parts = -(-workers // parts) if parts > 1 else 0  # batches to split: a part for every worker
    sizes = [len(piece) for piece in np.array_split(np.arange(batch_size), parts)] * in_parts
    sizes += [batch_size] * -(-count // batch_size)
    batches, start = [], 0
    for size in sizes:
        if start >= count:
            break
        batches.append(range(start, min(start + size, count)))
        start += size
    return batches


def joined_batches(loader_batches, batch_size: int):
    """Batches of `batch_size` items (the last may be short) from the DataLoader's, which are either
    that size or parts of it (see loader_batches)."""
    parts, count = [], 0
    for part in loader_batches:
        parts.append(part)
        count += len(part[0])
        if count == batch_size:
            yield _join(parts)
            parts, count = [], 0
    if parts:
        yield _join(parts)


def _join(parts: list[tuple]) -> tuple:
    """One batch from consecutive parts, as collate() would have made it of all their items.

    The joined tensors are not pinned: the copy of these few first batches to the GPU goes through
    a staging buffer, which costs less than pinning new memory for each of them."""
    if len(parts) == 1:
        return parts[0]
    return collate([(position, None if inputs is None else inputs[row], None if masks is None else masks[row], errors[row])
                    for positions, inputs, masks, errors in parts for row, position in enumerate(positions.tolist())])


class ShardBuffer:
    """One shard's items, filled batch by batch and written when full.

    Its arrays come from the pool, and each batch's tokens are copied into their rows as the batch
    lands: the shard is written from them without another copy.
    """

    def __init__(self, spec: StoreSpec, split: str, shard: int, items: list[Item], pool: "ArrayPool"):
        start = shard * spec.shard_size
        self.split, self.shard, self.start = split, shard, start
        self.items = items[start:start + spec.shard_size]
        n = len(self.items)
        self.arrays = pool.take(n)  # every row is overwritten before the shard is written
        self.targets, self.tokens, self.prefix, self.mask = self.arrays
        if spec.task == "multilabel":
            self.labels = np.zeros((n, len(spec.classes)), np.uint8)
            for row, item in enumerate(self.items):
                self.labels[row, item.labels] = 1
        else:
            self.labels = np.array([item.labels[0] for item in self.items], np.int64)
        self.errors = [""] * n
        self.filled = 0

    def fill_rows(self, first: int, batch: "Forwarded", rows: np.ndarray):
        """Rows `first`... of this shard from consecutive rows of a landed batch: tokens, masks and
        errors; failed items' rows become zero."""
        target, source = slice(first, first + len(rows)), slice(rows[0], rows[-1] + 1)
        if batch.tokens is not None:
            for layer, pair in batch.tokens.items():
                for tokens, into in zip(pair, self.targets[layer]):
                    if tokens is not None:
                        into[target].copy_(tokens[source])
        failed_rows = [first + i for i, row in enumerate(rows) if batch.errors[row]]
        for layer in self.tokens:
            self.tokens[layer][failed_rows] = 0
            if self.prefix is not None:
                self.prefix[layer][failed_rows] = 0
        if self.mask is not None:
            self.mask[target] = batch.masks[rows[0]:rows[-1] + 1] if batch.masks is not None else False
            self.mask[failed_rows] = False
        for i, row in enumerate(rows):
            self.errors[first + i] = batch.errors[row]
        self.filled += len(rows)

    @property
    def full(self) -> bool:
        return self.filled == len(self.items)

    def write_to(self, store):
        store.split(self.split).write_shard(
            self.shard, tokens=self.tokens, prefix=self.prefix, mask=self.mask, labels=self.labels,
            ids=[it.id for it in self.items], sources=[it.source for it in self.items],
            offsets=np.array([it.offset for it in self.items]),
            durations=np.array([np.nan if it.duration is None else it.duration for it in self.items]),
            errors=self.errors,
        )


class ArrayPool:
    """Shard-sized host arrays, handed back after each write and reused.

    Fresh arrays cost a page fault per 4 KiB on first write: for one ViT-B layer, more than half
    the time per batch of the thread that fills them. The pool makes them ahead on a thread of its own (see
    reserve) and touches every page there, and the run reuses them.
    """

    def __init__(self, spec: StoreSpec):
        self.spec = spec
        self.free: dict[int, list] = {}
        self.pending: list[int] = []  # sizes that reserve() is still to allocate, in its order
        self.changed = threading.Condition()

    def take(self, n: int) -> tuple:
        """(torch targets per layer, numpy tokens per layer, numpy prefix per layer, mask) for n items.
        Waits for reserve() when it is about to make arrays of this size, rather than racing it."""
        with self.changed:
            self.changed.wait_for(lambda: self.free.get(n) or n not in self.pending)
            if self.free.get(n):
                return self.free[n].pop()
        return self._allocate(n)

    def reserve(self, sizes: list[int]) -> threading.Thread:
        """Start making the arrays of the shards in flight (these numbers of items) on a thread of
        their own, rather than on the main thread between batches; take() waits for them from now
        on. A failure is left for take() to raise.

        Call it after the DataLoader workers are forked: pages touched before a fork are shared
        copy-on-write with every worker, and the first write to each then copies it: 1.7 s per GiB
        once 8 workers were forked, against 0.03 s without them, on the 2-core machine."""
        with self.changed:
            self.pending = list(sizes)
        thread = threading.Thread(target=self._make, args=(sizes,), daemon=True, name="reserve")
        thread.start()
        return thread

    def _make(self, sizes: list[int]):
        try:
            for n in sizes:
                self.give(self._allocate(n, touch=True), reserved=True)
        except (RuntimeError, MemoryError):  # out of memory
            pass
        finally:
            with self.changed:
                self.pending = []
                self.changed.notify_all()

    def _allocate(self, n: int, touch: bool = False) -> tuple:
        s = self.spec

        def array(count):
            made = _page_aligned((n, count, s.dim), TORCH_DTYPE[s.dtype])
            return made.zero_() if touch else made

        targets = {layer: (array(s.num_tokens), array(s.num_prefix) if s.num_prefix else None) for layer in s.layers}
        tokens = {layer: _numpy(t) for layer, (t, _) in targets.items()}
        prefix = {layer: _numpy(p) for layer, (_, p) in targets.items()} if s.num_prefix else None
        mask = np.empty((n, s.num_tokens), bool) if s.masked else None
        return targets, tokens, prefix, mask

    def give(self, arrays: tuple, reserved: bool = False):
        n = len(next(iter(arrays[1].values())))
        with self.changed:
            self.free.setdefault(n, []).append(arrays)
            if reserved:
                self.pending.remove(n)
            self.changed.notify_all()


def _page_aligned(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An empty host tensor that starts on a page boundary: the zarr store writes a shard's tokens
    from it around the page cache (O_DIRECT), which takes page-aligned memory only."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    return raw[start:start + nbytes].view(dtype).view(shape)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view in the store's storage dtype (bfloat16 as its uint16 bits)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def shards_in_flight(spec: StoreSpec, batch_size: int) -> int:
    """Shards that hold a buffer at once: written, queued, handed over, and open to the batches in flight."""
    open_to_batches = -(-(IN_FLIGHT + 1) * batch_size // spec.shard_size) + 1
    return ShardWriter.THREADS + ShardWriter.DEPTH + 1 + open_to_batches


class ShardWriter:
    """Background threads that write finished shards while the device computes the next batches.

    Several threads let one shard's fsync and small per-item columns overlap other shards'
    writes: on the two-GPU H200 host's cloud disk, eight wrote 3% (one layer) and 13% (twelve)
    faster than four (an earlier form of benchmarks/shard_writers.py, one pass each), and the disk probe with 8
    files in flight beat 4 in every run. The short queue stops the forward pass from
    running further ahead of the disk. Each shard being written, queued or filled holds a
    buffer of about 128 MiB per cached layer and 384 MiB at least (see shards_in_flight): 13 of
    them at batches of 128, 4.9 GiB with one ViT-B layer; 15, 23 GiB, with all twelve.
    """

    THREADS, DEPTH = 8, 2

    def __init__(self, store, pool: ArrayPool):
        self.store = store
        self.pool = pool
        self.queue: queue.Queue = queue.Queue(maxsize=self.DEPTH)
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"shard-writer-{i}") for i in range(self.THREADS)]
        for thread in self.threads:
            thread.start()

    def _run(self):
        while (buffer := self.queue.get()) is not None:
            try:
                if self.error is None:
                    buffer.write_to(self.store)
                    self.pool.give(buffer.arrays)
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


def check_options(store_path: Path, *, fmt: str | None, dtype: str, precision: str, codec: str | None,
                  part: tuple[int, int], batch_size: int, num_workers: int | None, shard_size: int) -> str:
    """Refuse options that no run could use, and return the store's format. Nothing is read or
    written: extract() calls it before the store exists (a refused run leaves nothing behind), and
    `tokens slurm extract` before it submits, so that a mistake does not fail in every task."""
    if fmt not in (None, "zarr", "hdf5"):
        raise ExtractionError(f"--format {fmt!r}: use zarr or hdf5")
    implied = SUFFIX_FORMATS.get(Path(store_path).suffix.lower())
    if fmt and implied and implied != fmt:  # a zarr folder named .h5 misleads every tool and person that meets it
        suffix = ".zarr" if fmt == "zarr" else ".h5"
        raise ExtractionError(f"--format {fmt} for {store_path}, whose name says {implied}: name the store "
                              f"{Path(store_path).with_suffix(suffix).name}, or leave out --format")
    fmt = fmt or detect_format(store_path, default="zarr")
    if dtype not in TORCH_DTYPE:
        raise ExtractionError(f"--dtype {dtype!r}: use {', '.join(TORCH_DTYPE)}")
    if precision not in ("bf16", "fp32"):
        raise ExtractionError(f"--precision {precision!r}: use bf16 or fp32")
    check_codec(fmt, codec)
    if fmt == "hdf5" and part[1] > 1:  # HDF5 has no concurrent writers; with its file locking off, they corrupt it
        raise ExtractionError(f"{store_path}: an HDF5 store takes one writer, so it cannot be filled in {part[1]} parts "
                              "(--part, a job array, torchrun): use a zarr store")
    for option, value, least in (("--batch-size", batch_size, 1), ("--num-workers", num_workers, 0), ("--shard-size", shard_size, 0)):
        if value is not None and value < least:
            raise ExtractionError(f"{option} {value}: use {least} or more")
    return fmt


def extract(
    dataset_source: str | Path,
    store_path: str | Path,
    *,
    backbone: str = DEFAULT_BACKBONE,
    checkpoint: str | None = None,
    allow_pickle: bool = False,
    backbone_options: dict | None = None,
    layers: list[int] | str | None = None,
    final_norm: bool = False,
    fmt: str | None = None,
    dtype: str = "float16",
    codec: str | None = None,
    shard_size: int = 0,
    precision: str = "bf16",
    batch_size: int = 32,
    device: str = "auto",
    num_workers: int | None = None,
    part: tuple[int, int] = (1, 1),
    strict: bool = False,
    retry_failed: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    log=print,
) -> Summary | Plan:
    """Fill `store_path` with the token maps of every item of the dataset (or of this part of it)."""
    started = time.time()
    store_path = Path(store_path)
    fmt = check_options(store_path, fmt=fmt, dtype=dtype, precision=precision, codec=codec, part=part,
                        batch_size=batch_size, num_workers=num_workers, shard_size=shard_size)
    if not dry_run:  # a read-only store (or directory): say so before hours of work, not at the first shard
        check_writable(store_path)
    try:
        target = pick_device(device)
    except ValueError as error:
        raise ExtractionError(f"--device {error}") from None
    model, layers = load_backbone(backbone, checkpoint, allow_pickle, backbone_options, final_norm, layers)
    forward = Forward(model, target, layers, dtype, precision, batch_size, slots=IN_FLIGHT + 1)
    warm_up = WarmUp(forward) if target.type == "cuda" and not dry_run else None
    store = batches = None
    try:  # until the first batch: a failure stops the warm-up and the workers, and closes the store
        work = plan(Path(dataset_source), store_path, model, layers=layers, dtype=dtype, fmt=fmt, codec=codec,
                    shard_size=shard_size, part=part, precision=forward.precision, progress=progress)
        spec = work.spec
        for note in work.dataset.notes:
            log(f"note: {note}")
        if not work.units:
            log(f"note: part {part[0]}/{part[1]} has no shard to write: the dataset makes {work.shard_count()} "
                f"(of up to {spec.shard_size} items); {work.shard_count()} parts or fewer give each part one")
        if dry_run:
            return check_existing(work, store_path, retry_failed)
        summary = Summary(store_path)
        # Before the DataLoader workers start: once they decode on every core, each of zarr's many thread
        # hand-offs while it creates a store waits for a core (2.5 s instead of 0.8 on the H200 host).
        store = create_or_open(store_path, spec, fmt, dataset_change=functools.partial(dataset_change, dataset=work.dataset),
                               holds_dataset=functools.partial(holds_only_this_dataset, dataset=work.dataset))
        failed_in = failed_in_complete_shards(store, work)
        if retry_failed:  # the shards holding failed items are written again, whole
            for split, shard in [unit for unit, count in failed_in.items() if count]:
                store.split(split).mark_incomplete(shard)
                summary.retried += failed_in.pop((split, shard))
            if summary.retried:
                log(f"retrying {summary.retried} failed item{'s' * (summary.retried != 1)}: their shards are written again")
        summary.failed_before = sum(failed_in.values())
        summary.good_before = sum(len(_shard_items(spec, *unit)) for unit in failed_in) - summary.failed_before
        todo = [unit for unit in work.units if unit not in failed_in]  # failed_in holds the shards complete now
        summary.shards_skipped = len(failed_in)
        items = [(split, index, work.dataset.splits[split][index]) for split, shard in todo
                 for index in _shard_items(spec, split, shard)]
        if summary.shards_skipped:
            log(f"resuming: {summary.shards_skipped} of {len(work.units)} shards already complete")
            if items and (differ := library_changes(store.meta.get("extra", {}).get("versions"), spec.extra["versions"])):
                log(f"note: the store was begun under {differ}: the shards written now will be made another way "
                    "(allowed, as the cache key leaves library versions out; the store records the first run's)")
        for name in spec.splits:  # what killed runs left half-written (and, in HDF5, the string rows they tore)
            store.split(name).discard_partial_writes(shard for split, shard in todo if split == name)
        if not items:
            if warm_up is not None:
                warm_up.join()
            store.close()
            summary.seconds = time.time() - started
            return summary

        if warm_up is None:
            forward.place()  # on a GPU, WarmUp does it
        workers = default_workers(model) if num_workers is None else num_workers
        loader = torch.utils.data.DataLoader(
            ItemSource(model, items), batch_sampler=loader_batches(len(items), batch_size, workers), num_workers=workers, collate_fn=collate,
            pin_memory=target.type == "cuda", persistent_workers=False, prefetch_factor=4 if workers else None,
            worker_init_fn=start_decoding_worker if workers else None,
            # fork, whatever the platform's default: forkserver and spawn would pickle the model for each worker
            multiprocessing_context="fork" if workers else None,
        )
        # The workers start decoding the first batches while the GPU warms up (they never touch CUDA, so
        # forking them beside the warm-up thread is safe, as for the dataset check).
        with signals_held():
            batches = iter(loader)
        pool = ArrayPool(spec)
        pool.reserve([len(_shard_items(spec, split, shard)) for split, shard in todo[:shards_in_flight(spec, batch_size)]])
        if warm_up is not None:
            warm_up.finish()
            if forward.not_graphed:
                log(f"note: {model.name}'s forward pass runs eagerly, not as a CUDA graph ({forward.not_graphed})")
    except BaseException:  # the dataset's, the store's or the warm-up's error: the first one is reported
        if warm_up is not None:
            warm_up.join()
        stop_decoding_workers(batches)
        _close_quietly(store)
        raise
    buffers: dict[tuple[str, int], ShardBuffer] = {}  # shards with rows still to come: only shards in flight take memory
    writer = bar = landing = None

    def destinations(positions: list[int]) -> list[tuple[ShardBuffer, int, np.ndarray]]:
        """(shard buffer, first row in it, batch rows) for each run of a batch that lands in one shard."""
        found = []
        for (split, shard), run in _runs(np.arange(len(positions)), [items[p][:2] for p in positions], spec.shard_size):
            if (split, shard) not in buffers:
                buffers[(split, shard)] = ShardBuffer(spec, split, shard, work.dataset.splits[split], pool)
            buffer = buffers[(split, shard)]
            first = items[positions[run[0]]][1] - buffer.start
            if first + len(run) == len(buffer.items):  # a shard's items come in order: its last row is placed
                del buffers[(split, shard)]
            found.append((buffer, first, run))
        return found

    def land(batch: "Forwarded"):
        """Wait for a batch's tokens to reach the host, copy them into their shards, and hand every
        shard now full to the writer. Runs on the landing thread, so that the main thread goes on
        feeding the device meanwhile."""
        if batch.landed is not None:
            batch.landed.synchronize()
        for buffer, first, rows in batch.destinations:
            buffer.fill_rows(first, batch, rows)
            if buffer.full:
                writer.put(buffer)
                summary.shards_written += 1
                summary.items_written += len(buffer.items)
        bar.update(len(batch.positions))

    in_flight: deque[Future] = deque()  # batches launched on the device, landing or to land
    try:
        writer = ShardWriter(store, pool)
        bar = tqdm(total=len(items), unit="item", desc=f"extract {spec.backbone}", disable=not progress, smoothing=0.05)
        # One landing thread lands batches in order; a batch's host buffer is reused IN_FLIGHT + 1 launches
        # later, so the main thread waits for a batch to land before it launches the one after the next two.
        landing = ThreadPoolExecutor(1, thread_name_prefix="land")
        for number, (positions, inputs, masks, errors) in enumerate(joined_batches(batches, batch_size)):
            if number == 0:
                first_batch = time.time()
            for position, error in zip(positions.tolist(), errors):
                if error:
                    item = items[position][2]
                    if strict:
                        while in_flight:  # keep the shards that the batches before this one complete
                            in_flight.popleft().result()
                        raise ExtractionError(f"item {item.id} ({item.path}): {error} (--strict stops at the first bad item)")
                    summary.failed.append((item.id, error))
            positions = positions.tolist()
            batch = Forwarded(positions, errors, None if masks is None else masks.numpy(), destinations(positions))
            if inputs is not None:  # the forward pass and its copy to the host run while earlier batches land
                batch.tokens, batch.landed = forward(inputs, masks)
            in_flight.append(landing.submit(land, batch))
            if len(in_flight) > IN_FLIGHT:
                in_flight.popleft().result()  # raises the landing's error (a failed write)
        while in_flight:
            in_flight.popleft().result()
    except BaseException:  # the first error is the one to report; the store is closed all the same
        stop_decoding_workers(batches)
        if landing is not None:  # no landing hands the writer a shard once it closes
            landing.shutdown(wait=True, cancel_futures=True)
        _close_quietly(bar, writer, store)
        raise
    finally:
        close_kept_file()  # read here, in this thread, with --num-workers 0
    landing.shutdown()
    bar.close()
    try:
        writer.close()  # raises a failed write of the last shards (a full disk)
    finally:
        store.close()
    summary.seconds = time.time() - started
    summary.streaming_seconds = time.time() - first_batch
    return summary


class WarmUp(threading.Thread):
    """Runs Forward.warm_up() on a GPU while the dataset is checked and the DataLoader workers
    start, rather than after them; finish() raises its error in the thread that runs the extraction."""

    def __init__(self, forward: Forward):
        super().__init__(name="warm-up", daemon=True)
        self.forward = forward
        self.error: BaseException | None = None
        self.start()

    def run(self):
        try:
            self.forward.warm_up()
        except BaseException as error:
            self.error = error

    def finish(self):
        self.join()
        if self.error is not None:
            raise self.error


def _shard_items(spec: StoreSpec, split: str, shard: int) -> range:
    """The indices of a shard's items in its split (the last shard of a split may be short)."""
    return range(shard * spec.shard_size, min((shard + 1) * spec.shard_size, spec.splits[split]))


def _close_quietly(*closeables):
    for closeable in closeables:
        try:
            if closeable is not None:
                closeable.close()
        except BaseException:  # an error is already on its way up: it stays the one reported
            pass


@dataclass
class Forwarded:
    """A batch whose forward pass was launched: where its rows go, its tokens on the host (none if
    all its items failed), and on a GPU the event after which they are there."""

    positions: list[int]
    errors: list[str]
    masks: np.ndarray | None
    destinations: list[tuple[ShardBuffer, int, np.ndarray]]
    tokens: dict | None = None
    landed: torch.cuda.Event | None = None


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


# Libraries whose versions can change the tokens: kernels, front-ends, timm's and transformers' models
# and transforms, Pillow's resampling, audio decoding.
TOKEN_LIBRARIES = ("torch", "torchaudio", "timm", "transformers", "pillow", "soundfile", "torchcrepe")


def library_changes(before: dict | None, now: dict) -> str:
    """'torch 2.10.0 (2.11.0 now), timm 1.0.30 (1.0.31 now)' for the libraries whose version differs
    from a store's first run; '' when none does, or the store did not record them."""
    if not before:
        return ""
    return ", ".join(f"{name} {version} ({now.get(name, 'none')} now)" for name, version in before.items() if now.get(name) != version)


def provenance() -> dict:
    """Who made the store and how, with the versions of the libraries that shape its tokens (those
    installed): kept in the store, outside the cache key, so that a resume under an upgrade is
    allowed, with a note (library_changes)."""
    versions = {}
    for package in TOKEN_LIBRARIES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"host": socket.gethostname(), "argv": sys.argv, "versions": versions}
