"""Zarr v3 directory stores: one-item chunks inside shards of `shard_size` items.

Chunk = one item so random access reads only what it needs; the sharding codec keeps a
2-million-item store from being 2 million files. Every per-item array is chunked (or sharded)
along the item axis at the same `shard_size`, so a writer that owns a shard owns whole files and
several processes can fill disjoint shards of one store at once.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
import zarr.codecs

from tokens.cache.store import STORAGE_DTYPE, RawItems, StoreError, StoreSpec, write_error

CODECS = {
    "zstd": lambda: [zarr.codecs.ZstdCodec(level=1)],
    "gzip": lambda: [zarr.codecs.GzipCodec(level=1)],
    "blosc-lz4": lambda: [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
}
MISSING = np.uint64(2**64 - 1)
FAST_WRITES = {"write_empty_chunks": True}  # skip the read-back check of empty chunks


def create(path: Path, spec: StoreSpec):
    """Build the store aside and rename it into place, so racing creators cannot half-make it."""
    if spec.codec is not None and spec.codec not in CODECS:
        raise StoreError(f"codec {spec.codec!r} is not available for zarr stores: use one of {', '.join(CODECS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        _build(tmp, spec)
    except BaseException:  # a full disk: leave nothing half-made behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, path)
    except OSError:  # another task created it first (or a file is in the way: open() will say)
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.exists():
            raise


def _build(tmp: Path, spec: StoreSpec):
    compressors = CODECS[spec.codec]() if spec.codec else None
    root = zarr.create_group(tmp, attributes=spec.to_meta())  # one write (attrs.update rewrites per key)
    storage = STORAGE_DTYPE[spec.dtype]
    S = spec.shard_size
    for split, n in spec.splits.items():
        group = root.create_group(split)
        item_arrays = [(f"tokens/{layer}", spec.num_tokens) for layer in spec.layers]
        if spec.num_prefix:
            item_arrays += [(f"prefix/{layer}", spec.num_prefix) for layer in spec.layers]
        for name, count in item_arrays:
            group.create_array(
                name, shape=(n, count, spec.dim), chunks=(1, count, spec.dim), shards=(S, count, spec.dim),
                dtype=storage, compressors=compressors, fill_value=0, config=FAST_WRITES,
            )
        columns = {
            "labels": ((n, len(spec.classes)), np.uint8) if spec.task == "multilabel" else ((n,), np.int64),
            "offsets": ((n,), np.float64),
            "durations": ((n,), np.float64),
        }
        if spec.masked:
            columns["mask"] = ((n, spec.num_tokens), np.bool_)
        for name, (shape, dtype) in columns.items():
            group.create_array(name, shape=shape, chunks=(S, *shape[1:]), dtype=dtype, fill_value=0, config=FAST_WRITES)
        for name in ("ids", "sources", "errors"):
            group.create_array(name, shape=(n,), chunks=(S,), dtype=str, fill_value="", config=FAST_WRITES)
        group.create_array("complete", shape=(-(-n // S),), chunks=(1,), dtype=np.uint8, fill_value=0)


def _write_all(fd: int, data: memoryview):
    """os.write may write less than asked (a signal, a full disk): go on until all is written."""
    while data:
        data = data[os.write(fd, data):]


def open(path: Path, mode: str) -> "ZarrHandle":  # noqa: A001 - the backend's verb
    return ZarrHandle(path, mode)


class ZarrHandle:
    def __init__(self, path: Path, mode: str):
        self.path = path
        try:
            self.root = zarr.open_group(path, mode="r" if mode == "r" else "r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
            raise StoreError(f"{path}: not a zarr store ({error})") from error
        self._arrays = {}

    def meta(self) -> dict:
        return dict(self.root.attrs)

    def array(self, split: str, name: str) -> zarr.Array:
        key = f"{split}/{name}"
        if key not in self._arrays:
            try:
                self._arrays[key] = self.root[key]
            except KeyError as error:
                raise StoreError(f"{self.path}: array {key} is missing") from error
        return self._arrays[key]

    def chunk_file(self, split: str, name: str, shard: int) -> Path:
        ndim = self.array(split, name).ndim
        return self.path / split / name / "c" / "/".join([str(shard)] + ["0"] * (ndim - 1))

    def complete(self, split: str, num_shards: int) -> np.ndarray:
        return self.array(split, "complete")[:].astype(bool)

    def write_shard(self, split: str, shard: int, start: int, arrays: dict):
        """Every array's file of the shard, then its complete flag. A failed write (full disk,
        read-only directory) raises a StoreError naming the file; the shard stays incomplete and
        no temporary file is left behind (every file is written aside and renamed into place)."""
        for name, data in [*arrays.items(), ("complete", None)]:
            try:
                if name == "complete":
                    self.array(split, "complete")[shard] = 1
                else:
                    self._write_array(split, name, shard, start, data)
            except OSError as error:
                raise write_error(self.chunk_file(split, name, shard), error) from error

    def _write_array(self, split: str, name: str, shard: int, start: int, data: np.ndarray):
        array = self.array(split, name)
        if array.shards is not None and not array.compressors:
            self._write_raw_shard(split, name, shard, data)
            return
        array[start:start + len(data)] = data
        chunk = self.chunk_file(split, name, shard)
        if chunk.exists():  # data reaches the disk before the shard is called complete
            fd = os.open(chunk, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _write_raw_shard(self, split: str, name: str, shard: int, data: np.ndarray):
        """Write an uncompressed shard file exactly as zarr's sharding codec lays it out, in one go.

        Items back to back, then the index ((offset, nbytes) little-endian uint64 per inner chunk,
        all-ones for absent ones) and its CRC32C. One write at disk speed instead of zarr's
        per-chunk encoding, and atomic: the file appears whole (tmp + rename) or not at all.
        """
        shard_size = self.array(split, name).shards[0]
        payload = np.ascontiguousarray(data).view(np.uint8).reshape(len(data), -1)
        item_bytes = payload.shape[1]
        index = np.full((shard_size, 2), MISSING, dtype="<u8")
        index[: len(data), 0] = np.arange(len(data), dtype=np.uint64) * np.uint64(item_bytes)
        index[: len(data), 1] = item_bytes
        index_bytes = index.tobytes()
        path = self.chunk_file(split, name, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                _write_all(fd, memoryview(payload).cast("B"))
                _write_all(fd, memoryview(index_bytes + google_crc32c.value(index_bytes).to_bytes(4, "little")))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:  # a torn temporary file would hold space a full disk needs back
            tmp.unlink(missing_ok=True)
            raise

    def read_rows(self, split: str, name: str, indices: np.ndarray) -> np.ndarray:
        return self.array(split, name).oindex[indices]

    def read_column(self, split: str, name: str, num_items: int) -> np.ndarray:
        return self.array(split, name)[:]

    def raw_layout(self, split: str, name: str, num_items: int, shard_size: int) -> RawItems | None:
        """Where each item's bytes sit, read from the shard index at the end of each shard file."""
        array = self.array(split, name)
        if array.compressors:
            return None
        item_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
        index_bytes = 16 * shard_size + 4  # (offset, nbytes) uint64 per inner chunk + crc32c
        shard_offsets: dict[int, np.ndarray] = {}

        def offsets_of(shard: int) -> np.ndarray:
            if shard not in shard_offsets:
                path = self.chunk_file(split, name, shard)
                try:
                    with path.open("rb") as f:
                        f.seek(-index_bytes, os.SEEK_END)
                        index = np.frombuffer(f.read(index_bytes - 4), dtype="<u8").reshape(-1, 2)
                except (FileNotFoundError, OSError) as error:
                    raise StoreError(f"{path}: shard file missing or damaged ({error}); run `tokens verify`") from error
                start, stop = shard * shard_size, min((shard + 1) * shard_size, num_items)
                used = index[: stop - start]
                present = used[:, 0] != MISSING  # an absent inner chunk reads as the fill value, zero
                file_size = path.stat().st_size
                if (used[present, 1] != item_bytes).any() or (used[present].sum(axis=1) > file_size).any():
                    raise StoreError(f"{path}: shard index does not match the file (truncated or damaged); run `tokens verify`")
                shard_offsets[shard] = np.where(present, used[:, 0].astype(np.int64), -1)
            return shard_offsets[shard]

        paths = [str(self.chunk_file(split, name, shard)) for shard in range(-(-num_items // shard_size))]

        def locate(indices: np.ndarray):
            shards, within = np.divmod(indices, shard_size)
            offsets = np.empty(len(indices), dtype=np.int64)
            for shard in np.unique(shards):
                chosen = shards == shard
                offsets[chosen] = offsets_of(int(shard))[within[chosen]]
            return paths, shards, offsets

        return RawItems(locate, item_bytes)

    def close(self):
        self._arrays.clear()
