"""HDF5 file stores: one file, contiguous token datasets when uncompressed.

A contiguous dataset is fixed-size items back to back, so reads go straight to byte offsets.
HDF5 takes one writer at a time (two writers on one file corrupt it silently without locking):
use zarr stores for job arrays.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import h5py
import numpy as np

from tokens.cache.store import STORAGE_DTYPE, RawItems, StoreError, StoreSpec

CODECS = {"gzip": {"compression": "gzip", "compression_opts": 1}, "lzf": {"compression": "lzf"}}
STRING = h5py.string_dtype()


def create(path: Path, spec: StoreSpec):
    """Write the empty file aside, then link it into place: a racing creator finds it whole or not at all."""
    if spec.codec is not None and spec.codec not in CODECS:
        raise StoreError(f"codec {spec.codec!r} is not available for HDF5 stores: use one of {', '.join(CODECS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    storage = STORAGE_DTYPE[spec.dtype]
    S = spec.shard_size
    with h5py.File(tmp, "w") as f:
        f.attrs["meta"] = json.dumps(spec.to_meta())
        for split, n in spec.splits.items():
            group = f.create_group(split)
            item_arrays = [(f"tokens/{layer}", spec.num_tokens) for layer in spec.layers]
            if spec.num_prefix:
                item_arrays += [(f"prefix/{layer}", spec.num_prefix) for layer in spec.layers]
            for name, count in item_arrays:
                if spec.codec:
                    group.create_dataset(name, shape=(n, count, spec.dim), dtype=storage, chunks=(1, count, spec.dim), **CODECS[spec.codec])
                else:
                    group.create_dataset(name, shape=(n, count, spec.dim), dtype=storage)
            if spec.task == "multilabel":
                group.create_dataset("labels", shape=(n, len(spec.classes)), dtype=np.uint8)
            else:
                group.create_dataset("labels", shape=(n,), dtype=np.int64)
            if spec.masked:
                group.create_dataset("mask", shape=(n, spec.num_tokens), dtype=np.bool_)
            for name in ("offsets", "durations"):
                group.create_dataset(name, shape=(n,), dtype=np.float64)
            for name in ("ids", "sources", "errors"):
                group.create_dataset(name, shape=(n,), dtype=STRING)
            group.create_dataset("complete", shape=(-(-n // S),), dtype=np.uint8)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def open(path: Path, mode: str) -> "HDF5Handle":  # noqa: A001 - the backend's verb
    return HDF5Handle(path, mode)


class HDF5Handle:
    def __init__(self, path: Path, mode: str):
        self.path = path
        try:
            # Readers do not lock, so `tokens info` works while an extraction writes.
            self.file = h5py.File(path, "r", locking=False) if mode == "r" else h5py.File(path, "r+")
        except BlockingIOError as error:
            raise StoreError(
                f"{path} is open for writing by another process; an HDF5 store takes one writer "
                "(use a zarr store for job arrays)"
            ) from error
        except OSError as error:
            raise StoreError(f"{path}: cannot open as HDF5 ({error}); the file may be truncated or not a store") from error

    def meta(self) -> dict:
        return json.loads(self.file.attrs["meta"])

    def dataset(self, split: str, name: str) -> h5py.Dataset:
        try:
            return self.file[f"{split}/{name}"]
        except KeyError as error:
            raise StoreError(f"{self.path}: dataset {split}/{name} is missing") from error

    def complete(self, split: str, num_shards: int) -> np.ndarray:
        return self.dataset(split, "complete")[:].astype(bool)

    def write_shard(self, split: str, shard: int, start: int, arrays: dict):
        for name, data in arrays.items():
            self.dataset(split, name)[start:start + len(data)] = data
        self.file.flush()
        os.fsync(self.file.id.get_vfd_handle())
        self.dataset(split, "complete")[shard] = 1
        self.file.flush()

    def read_rows(self, split: str, name: str, indices: np.ndarray) -> np.ndarray:
        order = np.argsort(indices, kind="stable")
        sorted_indices = indices[order]
        unique, inverse = np.unique(sorted_indices, return_inverse=True)
        rows = self.dataset(split, name)[unique][inverse]
        out = np.empty_like(rows)
        out[order] = rows
        return out

    def read_column(self, split: str, name: str, num_items: int) -> np.ndarray:
        data = self.dataset(split, name)
        if data.dtype == STRING:
            return data.asstr()[:]
        return data[:]

    def raw_layout(self, split: str, name: str, num_items: int, shard_size: int) -> RawItems | None:
        data = self.dataset(split, name)
        offset = data.id.get_offset()
        if data.chunks is not None or offset is None:  # compressed, or nothing written yet
            return None
        item_bytes = int(np.prod(data.shape[1:])) * data.dtype.itemsize
        paths = [str(self.path)]

        def locate(indices: np.ndarray):
            return paths, np.zeros(len(indices), dtype=np.int64), offset + indices.astype(np.int64) * item_bytes

        return RawItems(locate, item_bytes)

    def close(self):
        self.file.close()
