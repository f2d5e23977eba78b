"""Feeding batches of cached tokens to the heads: read once per batch, every needed layer.

A `Source` gives the rows of one split: streamed from the store (`stream`), from arrays loaded
into RAM (`ram`) or onto the GPU (`gpu`). All three return the same numbers for the same item
indices, and the batch order depends only on the data seed and the epoch, so the mode never
changes a result. Streaming reads the next batch in a background thread while the current one
trains; its order is shuffled in runs (see `epoch_order`) so that reads come in short stretches
of a shard file.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from tokens.cache.store import STORAGE_DTYPE, Split, failed

RUN_ITEMS = 16  # consecutive items of one shard that an epoch reads within one block
BLOCK_ITEMS = 2048  # items shuffled together: runs from anywhere in the split
# How batches and held-out items are drawn, as a run's plan records it: a checkpoint or a sweep
# part drawn another way (by an earlier version) is not resumed or merged.
SAMPLING = f"runs of {RUN_ITEMS} items in blocks of {BLOCK_ITEMS}; whole files held out"
HELD_OUT = "whole files, each class in proportion"  # how hold_out draws, in a plan without a valid split
MODES = ("auto", "stream", "ram", "gpu")


@dataclass
class Batch:
    """One batch on the compute device, float32: tokens and class tokens per layer."""

    tokens: dict[int, torch.Tensor]  # layer -> (B, N, D)
    cls: dict[int, torch.Tensor]  # layer -> (B, D); empty when the store has no class token or none is needed
    mask: torch.Tensor | None  # (B, N) bool, True = valid
    labels: torch.Tensor  # (B, C) float multilabel, (B,) int64 multiclass
    _stacked: tuple | None = None

    def all_layers(self) -> tuple:
        """(tokens (B, L, N, D), class tokens (B, L, D) or None) for multi-layer heads, stacked once."""
        if self._stacked is None:
            cls = torch.stack(list(self.cls.values()), 1) if self.cls else None
            self._stacked = torch.stack(list(self.tokens.values()), 1), cls
        return self._stacked


@dataclass
class FinalNorm:
    """The encoder's final LayerNorm, applied to raw tokens as they are read (`tokens probe
    --final-norm`): one store of raw block outputs gives both the EP protocol's tokens and the normed
    ones that cosine-similarity heads may want, in float32 from the stored dtype."""

    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def recorded(cls, meta: dict, device: torch.device) -> FinalNorm:
        """The norm a store of raw tokens records; ValueError saying why there is none to apply."""
        if meta["final_norm"]:
            raise ValueError("its tokens are normed already (extracted with --final-norm): leave out --final-norm")
        params = meta.get("final_norm_params")
        if params is None:
            raise ValueError("it records no final norm to apply: its encoder has none (EAT, SSLAM and BEATs end in "
                             "post-norm blocks), or not a LayerNorm, or its checkpoint lacks it, or the store was made by a "
                             "version of tokens that did not record it (extract into a new store: resuming this one keeps "
                             "its record as it is)")
        return cls.from_params(params, meta["dim"], device, "its metadata's final_norm_params")

    @classmethod
    def from_params(cls, params: dict, dim: int, device: torch.device, where: str) -> FinalNorm:
        """From a store's record (lists) or a saved head's (tensors), checked against the tokens' `dim`:
        a damaged or hand-edited record is named (`where`), not met as a shape error mid-training."""
        if not isinstance(params, dict) or params.get("kind", "layer_norm") != "layer_norm":
            kind = params.get("kind") if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"{where}: a final norm of kind {kind!r}, which this version of tokens cannot apply "
                             "(it applies a layer_norm)")
        eps = params.get("eps")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"{where}: eps is {eps!r}, not a small positive number")

        def tensor(name):
            values = params.get(name)
            if values is None:
                return None
            try:
                t = torch.as_tensor(values, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                t = None
            if t is None or t.shape != (dim,) or not torch.isfinite(t).all():
                raise ValueError(f"{where}: its {name} is not {dim} finite numbers, one per token dimension")
            return t.to(device)

        return cls(float(eps), tensor("weight"), tensor("bias"))

    def params(self) -> dict:
        """As a saved head keeps it: tensors, loadable with weights_only."""
        return {"kind": "layer_norm", "eps": self.eps, "weight": None if self.weight is None else self.weight.cpu(),
                "bias": None if self.bias is None else self.bias.cpu()}

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(tokens, tokens.shape[-1:], self.weight, self.bias, self.eps)


def usable_items(split: Split, shards_done: np.ndarray | None = None) -> np.ndarray:
    """Items in complete shards whose extraction did not fail, sorted: the only items ever used
    (`shards_done`: see Split.complete_items)."""
    complete = split.complete_items(shards_done)
    if not complete.any():
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(complete & ~failed(split.column("errors"))).astype(np.int64)


def split_bytes(split: Split, layers, with_cls: bool, with_tokens: bool = True) -> int:
    """Uncompressed bytes of the given layers' tokens and class tokens (and the mask) of a whole split."""
    itemsize = np.dtype(STORAGE_DTYPE[split.dtype]).itemsize
    tokens = split.num_tokens * split.dim if with_tokens else 0
    per_layer = tokens + (split.dim if with_cls and split.class_token else 0)
    return split.num_items * (len(layers) * per_layer * itemsize + (split.num_tokens if split.masked and with_tokens else 0))


def available_ram() -> int:
    """Memory that can be taken without swapping: MemAvailable where Linux reports it."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_mode(mode: str, needed: int, device: torch.device) -> tuple[str, str]:
    """The data mode for `needed` bytes of splits, and why: GPU if it fits in half the free
    device memory, else RAM if it fits in half the available memory, else stream."""
    gib = needed / 2**30
    if mode != "auto":
        return mode, f"data: {mode} ({gib:.2f} GiB of tokens), as asked"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if needed < free / 2:
            return "gpu", f"data: gpu ({gib:.2f} GiB of tokens, {free / 2**30:.1f} GiB free on {device})"
    free = available_ram()
    if needed < free / 2:
        return "ram", f"data: ram ({gib:.2f} GiB of tokens, {free / 2**30:.1f} GiB memory available)"
    return "stream", f"data: stream from disk ({gib:.2f} GiB of tokens, {free / 2**30:.1f} GiB memory available)"


def _tokens(split: Split, layer: int, index) -> torch.Tensor:
    """Tokens (B, N, D) as a storage-dtype tensor (bfloat16 from its stored bit pattern)."""
    return as_tensor(split.read_tokens(layer, index), split.dtype)


def _cls(split: Split, layer: int, index) -> torch.Tensor:
    """The class token (B, D): the first prefix token."""
    return as_tensor(split.read_prefix(layer, index)[:, 0], split.dtype)


def as_tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Tokens as read from a store, as a torch tensor of the store's dtype: numpy has no bfloat16,
    so a bfloat16 store gives its bits as uint16, which this reinterprets (a plain .float() on
    them would give wrong numbers)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _cpu_rows(t: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """Rows of a CPU tensor gathered by numpy, 4x faster than torch's indexing of float16 rows (8.5
    against 34 ms for 128 items of 512 x 768 on 2 cores); bfloat16, which numpy lacks, as its bits."""
    if t.dtype == torch.bfloat16:
        return torch.from_numpy(t.view(torch.int16).numpy()[index]).view(torch.bfloat16)
    return torch.from_numpy(t.numpy()[index])


class Source:
    """The rows of one split for a fixed set of layers, from disk, RAM or the GPU."""

    def __init__(self, split: Split, layers: list[int], with_cls: bool, mode: str, device: torch.device,
                 labels: np.ndarray | None = None, with_tokens: bool = True, norm: FinalNorm | None = None):
        """`labels`: the split's labels column, when the caller has read it already (to check it);
        `with_tokens=False`: the class tokens alone, for heads that read nothing else; `norm`: applied
        to every token and class token of a batch."""
        self.split, self.layers, self.mode, self.device, self.norm = split, list(layers), mode, device, norm
        self.with_cls = with_cls and split.class_token
        self.with_tokens = with_tokens or not self.with_cls
        labels = split.column("labels") if labels is None else labels
        self.labels = torch.from_numpy(labels.astype(np.float32) if labels.ndim == 2 else labels.astype(np.int64))
        self.arrays = None
        if mode in ("ram", "gpu"):
            self.arrays = self._load_all()

    def _load_all(self) -> dict:
        """Every needed array of the split in storage dtype, in RAM or on the GPU, filled shard by
        shard (so loading onto the GPU never holds the whole split in RAM).

        Unwritten shards stay zero: their items are never used (see `usable_items`).
        """
        readers = self._readers()
        target = self.device if self.mode == "gpu" else torch.device("cpu")
        arrays = {}
        for shard in np.flatnonzero(self.split.complete_mask()):
            start, stop = self.split.shard_range(shard)
            for key, read in readers.items():
                rows = read(np.arange(start, stop))
                if key not in arrays:
                    arrays[key] = torch.zeros((self.split.num_items, *rows.shape[1:]), dtype=rows.dtype, device=target)
                arrays[key][start:stop] = rows
        self.labels = self.labels.to(target)
        return arrays

    def _readers(self) -> dict:
        """key -> function of item indices giving a storage-dtype tensor."""
        split = self.split
        readers = {("tokens", layer): functools.partial(_tokens, split, layer) for layer in self.layers if self.with_tokens}
        if self.with_cls:
            readers.update({("cls", layer): functools.partial(_cls, split, layer) for layer in self.layers})
        if split.masked and self.with_tokens:
            readers["mask"] = lambda index: torch.from_numpy(split.read_mask(index))
        return readers

    def read(self, index: np.ndarray) -> dict:
        """Storage-dtype tensors of items `index` (pinned when they will go to a GPU)."""
        rows = torch.from_numpy(index).to(self.labels.device)
        if self.arrays is not None:
            raw = {key: t[rows] if t.is_cuda else _cpu_rows(t, index) for key, t in self.arrays.items()}
        else:
            raw = {key: read(index) for key, read in self._readers().items()}
        raw["labels"] = self.labels[rows]
        if self.device.type == "cuda" and self.mode != "gpu":
            raw = {key: t.pin_memory() for key, t in raw.items()}
        return raw

    def to_batch(self, raw: dict) -> Batch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=True)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            t = move(t).float()
            return t if self.norm is None else self.norm(t)

        return Batch(
            tokens={layer: tokens(raw["tokens", layer]) for layer in self.layers if self.with_tokens},
            cls={layer: tokens(raw["cls", layer]) for layer in self.layers} if self.with_cls else {},
            mask=move(raw["mask"]) if "mask" in raw else None,
            labels=move(raw["labels"]),
        )

    def batches(self, order: np.ndarray, batch_size: int, drop_last: bool = False):
        """Batches of items in `order`, the next one read in a background thread while this one is used."""
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if drop_last and len(chunks) > 1 and len(chunks[-1]) < batch_size:
            chunks.pop()  # a tiny last batch makes a noisy step (and breaks BatchNorm at size 1)
        if not chunks:
            return
        with ThreadPoolExecutor(1) as reader:
            pending = reader.submit(self.read, chunks[0])
            for i in range(len(chunks)):
                raw = pending.result()
                if i + 1 < len(chunks):
                    pending = reader.submit(self.read, chunks[i + 1])
                yield self.to_batch(raw)


def epoch_order(items: np.ndarray, shard_size: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of `items` in an epoch: a function of (seed, epoch) and the shard size.

    Items are cut into runs of up to RUN_ITEMS consecutive items of one shard; the runs are
    shuffled over the whole split, and items are shuffled within each block of BLOCK_ITEMS. A
    block's reads are then stretches of a shard file, while a batch draws from runs all over the
    split: a store written class by class (as a class-folder dataset is) still gives batches of
    every class. Shuffling whole shards instead gave batches of a few classes, which biased the
    gradients and BatchNorm's running statistics.
    """
    rng = np.random.default_rng([seed, epoch])
    if not len(items):
        return items
    by_shard = np.split(items, np.flatnonzero(np.diff(items // shard_size)) + 1)
    runs = [shard[i : i + RUN_ITEMS] for shard in by_shard for i in range(0, len(shard), RUN_ITEMS)]
    shuffled = np.concatenate([runs[i] for i in rng.permutation(len(runs))])
    return np.concatenate([rng.permutation(shuffled[i : i + BLOCK_ITEMS]) for i in range(0, len(shuffled), BLOCK_ITEMS)])


def hold_out(items: np.ndarray, recordings: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out): a seeded `fraction` of `items` set aside for validation, whole recordings
    at a time (`recordings`: each item's source file; windows of one recording are near-duplicates:
    holding out some of them would select heads on what they trained on), each class in proportion
    (`labels`: the items' rows). A random draw of a few files left small classes out of validation.

    Each recording takes its rarest class (by items; multi-label items count every class they
    hold). The recordings of a class are spread evenly through a seeded order, so that its first
    recordings, which are held out, hold every class of several recordings near `fraction` of its
    items. A recording that holds a class no other recording holds comes last: held out, that class
    would not be trained on."""
    names, group = np.unique(recordings, return_inverse=True)
    rng = np.random.default_rng(seed)
    strata, alone = _strata(labels, group, len(names))
    shuffled = rng.permutation(len(names))
    by_stratum = shuffled[np.argsort(strata[shuffled], kind="stable")]  # shuffled within each stratum
    sizes = np.bincount(strata)
    rank = np.empty(len(names))
    rank[by_stratum] = np.arange(len(names)) - (np.cumsum(sizes) - sizes)[strata[by_stratum]]
    spread = (rank + rng.random(len(names))) / sizes[strata] + alone
    order = np.argsort(spread, kind="stable")
    held_so_far = np.cumsum(np.bincount(group, minlength=len(names))[order])
    wanted = max(1, round(fraction * len(items)))
    crossing = int(np.searchsorted(held_so_far, wanted))  # the file that takes the count to `wanted`
    files = crossing + 1 if crossing == 0 or held_so_far[crossing] - wanted <= wanted - held_so_far[crossing - 1] else crossing
    held = np.isin(group, order[:files])
    return items[~held], items[held]


def _strata(labels: np.ndarray, group: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Of each group (recording): its rarest class, the one of fewest items among its items' classes
    (C, a stratum of its own, for a group with none), and whether it holds a class that no other
    group holds. From the labels' nonzero entries, multi-hot rows (N, C) or class indices (N,): a
    matrix of millions of rows is not copied whole."""
    rows, classes = np.nonzero(labels) if labels.ndim == 2 else (np.arange(len(labels)), labels)
    count = labels.shape[1] if labels.ndim == 2 else int(labels.max(initial=0)) + 1
    none = np.iinfo(np.int64).max
    rarest = np.full(groups, none)  # a class as one number, its item count first: a group's smallest is its rarest
    np.minimum.at(rarest, group[rows], np.bincount(classes, minlength=count)[classes].astype(np.int64) * (count + 1) + classes)
    pairs = np.unique(classes.astype(np.int64) * groups + group[rows])  # (class, group), once each
    pair_class, pair_group = np.divmod(pairs, groups)
    alone = np.zeros(groups, bool)
    alone[pair_group[np.bincount(pair_class)[pair_class] == 1]] = True
    return np.where(rarest == none, count, rarest % (count + 1)), alone
