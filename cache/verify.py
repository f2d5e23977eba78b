"""Check a store the way a careful user would before trusting a probe result on it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from tokens.cache.store import STORAGE_DTYPE, DamagedShard, StoreError, TokenStore, column_layout, labels_outside, ranges

COLUMNS = ("ids", "sources", "durations", "offsets", "errors", "labels")


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    shards_checked: int = 0
    damaged: list[tuple[str, int]] = field(default_factory=list)  # (split, shard): complete shards with a problem
    nonfinite: bool = False  # some tokens are NaN or Inf: the model's own would come back if written again

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: TokenStore, progress: bool = True) -> Report:
    """Completeness, shape/dtype agreement and finite values, shard by shard; damaged shards by name."""
    report = Report()
    for split in store.splits.values():
        names = [f"tokens/{layer}" for layer in split.layers]
        names += [f"prefix/{layer}" for layer in split.layers] if split.num_prefix else []
        columns = [*COLUMNS, *(["mask"] if split.masked else [])]
        if structure := _structure_problems(store, split, names, columns):
            report.problems += structure
            continue
        missing = split.missing_shards()
        if missing:
            report.problems.append(f"{split.name}: {len(missing)} of {split.num_shards} shards not complete: {ranges(missing)}")
        missing_set = set(missing)  # once, not per shard: a large store has tens of thousands
        complete = [s for s in range(split.num_shards) if s not in missing_set]
        for shard in tqdm(complete, desc=f"verify {split.name}", unit="shard", disable=not progress, leave=False):
            found_before = len(report.problems)
            start, stop = split.shard_range(shard)
            gone = _missing_files(store, split, names + columns, shard)
            report.problems += [f"{_shard_name(store, split, name, shard)}: file missing" for name in gone]
            for name in names:
                if name in gone:
                    continue
                where = _shard_name(store, split, name, shard)
                try:
                    layer = int(name.split("/")[1])
                    read = split.read_tokens if name.startswith("tokens") else split.read_prefix
                    data = read(layer, np.arange(start, stop))
                except DamagedShard as error:
                    report.problems.append(f"{where}: {error.problem}")
                    continue
                except (StoreError, OSError, ValueError, KeyError) as error:
                    report.problems.append(f"{where}: unreadable ({error})")
                    continue
                if split.dtype == "bfloat16":
                    exponent_all_ones = (data & 0x7F80) == 0x7F80
                    bad = int(exponent_all_ones.any(axis=(1, 2)).sum())
                else:
                    bad = int((~np.isfinite(data)).any(axis=(1, 2)).sum())
                if bad:
                    report.problems.append(f"{where}: {bad} items hold NaN or Inf")
                    report.nonfinite = True
            report.problems += _check_columns(store, split, shard, [name for name in columns if name not in gone])
            report.shards_checked += 1
            if len(report.problems) > found_before:
                report.damaged.append((split.name, shard))
    return report


def _structure_problems(store: TokenStore, split, names: list[str], columns: list[str]) -> list[str]:
    """What writing shards again cannot mend: an array missing, or of another shape or dtype than
    the metadata says (a hand edit of either). Reported for the split, not as damage to each shard,
    whose advice (unmark and extract again) would only fail."""
    problems = []
    token_dtype = np.dtype(STORAGE_DTYPE[split.dtype])
    labels_shape, labels_dtype = column_layout(split.num_items, store.task, len(store.classes))["labels"]
    for name in dict.fromkeys([*names, "labels", *columns, "complete"]):  # labels is among the columns too
        try:
            array = split.array(name)
        except StoreError as error:  # missing, or its own record damaged
            problems.append(str(error))
            continue
        shape = tuple(array.shape)
        if name in names:
            expected = (split.num_items, split.num_tokens if name.startswith("tokens") else split.num_prefix, split.dim)
            if shape != expected or np.dtype(array.dtype) != token_dtype:
                problems.append(f"{split.name}/{name}: shape {shape} {array.dtype}, expected {expected} {token_dtype}")
        elif name == "labels":
            if shape != labels_shape or np.dtype(array.dtype) != np.dtype(labels_dtype):
                problems.append(f"{split.name}/labels: shape {shape} {array.dtype}, expected {labels_shape} "
                                f"{np.dtype(labels_dtype)} ({store.task} over {len(store.classes)} classes)")
        elif name == "complete":
            if shape != (split.num_shards,):
                problems.append(f"{split.name}/complete: {shape[0]} shard flags, but {split.num_items} items in shards of "
                                f"{split.shard_size} make {split.num_shards}")
        elif shape[0] != split.num_items:
            problems.append(f"{split.name}/{name}: {shape[0]} items, the metadata says {split.num_items}")
    if problems:
        problems.append(f"{split.name}: these arrays or the store's metadata were changed or removed by hand, which "
                        "extracting again cannot mend (it writes shards into the arrays there): extract into a new store")
    return problems


def _missing_files(store: TokenStore, split, names: list[str], shard: int) -> list[str]:
    """The arrays whose file of this complete shard is missing: zarr would read their items as the
    fill value (zeros, empty strings), which labels, offsets and errors may legitimately hold, so
    only the file's absence tells. An HDF5 store is one file: a missing dataset fails to open."""
    if store.format != "zarr":
        return []
    return [name for name in names if not split._h.chunk_file(split.name, name, shard).exists()]


def _check_columns(store: TokenStore, split, shard: int, names: list[str]) -> list[str]:
    """The per-item columns of a complete shard whose files are there: readable, and without values
    no writer stores (an empty id or source, a zero duration or an empty mask on an item that did
    not fail), which a damaged file or dataset can hold."""
    start, stop = split.shard_range(shard)
    rows = np.arange(start, stop)
    values, problems = {}, []
    for name in names:
        try:
            values[name] = split._h.read_rows(split.name, name, rows)
        except DamagedShard as error:
            problems.append(f"{_shard_name(store, split, name, shard)}: {error.problem}")
        except Exception as error:  # codecs raise many types on a damaged chunk
            problems.append(f"{_shard_name(store, split, name, shard)}: unreadable ({type(error).__name__}: {error})")
    where = {name: _shard_name(store, split, name, shard) for name in names}
    for name in ("ids", "sources"):
        if name in values and (count := sum(len(v) == 0 for v in values[name])):
            problems.append(f"{where[name]}: {count} items read as an empty string: file missing or damaged")
    ok_items = np.array([len(e) == 0 for e in values["errors"]]) if "errors" in values else np.ones(len(rows), bool)
    if "durations" in values and (count := int((ok_items & (values["durations"] == 0)).sum())):
        problems.append(f"{where['durations']}: {count} items that did not fail read as zero seconds long: file missing or damaged")
    if "labels" in values:
        allowed = "0 or 1" if store.task == "multilabel" else f"0..{len(store.classes) - 1}"
        if count := int(labels_outside(values["labels"], len(store.classes)).sum()):
            problems.append(f"{where['labels']}: {count} items hold labels other than {allowed}: file damaged")
    if "mask" in values and "errors" in values:
        if count := int((ok_items & ~values["mask"].any(axis=1)).sum()):
            problems.append(
                f"{where['mask']}: {count} items that did not fail have no valid token: this file or "
                f"{where['errors']} is missing or damaged"
            )
    return problems


def _shard_name(store: TokenStore, split, name: str, shard: int) -> str:
    if store.format == "zarr":
        return str(split._h.chunk_file(split.name, name, shard))
    start, stop = split.shard_range(shard)
    return f"{store.path}:{split.name}/{name} items {start}-{stop - 1} (shard {shard})"

