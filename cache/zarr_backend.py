"""Zarr v3 directory stores: one-item chunks inside shards of `shard_size` items.

Chunk = one item so random access reads only what it needs; the sharding codec keeps a
2-million-item store from being 2 million files. Every per-item array is chunked (or sharded)
along the item axis at the same `shard_size`, so a writer that owns a shard owns whole files and
several processes can fill disjoint shards of one store at once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
import zarr.codecs

from tokens.cache.store import (STORAGE_DTYPE, STRING_COLUMNS, DamagedShard, NotAStore, RawItems, StoreError, StoreSpec,
                                build_aside, column_layout, folder_clock, shard_count, store_exists, write_error, writer,
                                writer_gone)

CODECS = {
    "zstd": lambda: [zarr.codecs.ZstdCodec(level=1)],
    "gzip": lambda: [zarr.codecs.GzipCodec(level=1)],
    "blosc-lz4": lambda: [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
}
MISSING = np.uint64(2**64 - 1)
PARTIAL = ".partial"  # shard files being written (see ZarrHandle._partial)
FAST_WRITES = {"write_empty_chunks": True}  # every chunk written, none checked for being all fill value


def create(path: Path, spec: StoreSpec):
    """Build the store aside and rename it into place, so racing creators cannot half-make it.

    The rename also replaces an empty directory made ready for the store (POSIX renames over an
    empty directory, never a full one); a symlink is followed, so the store lands where it points.
    """
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = build_aside(path)
    try:
        with _prompt_hand_offs():
            _build(tmp, spec)
    except BaseException:  # a full disk: leave nothing half-made behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, path)
    except OSError:  # another task created it first (or a file is in the way: open() will say)
        shutil.rmtree(tmp, ignore_errors=True)
        if not store_exists(path):  # nothing there still, or the empty directory (a mount point, say)
            raise


@contextmanager
def _prompt_hand_offs():
    """A short GIL switch interval while zarr creates a store.

    zarr creates each array through its event-loop thread. When another thread of the process is
    busy (the extractor's GPU warm-up thread, say), every hand-off waits up to the switch interval
    (5 ms) for the GIL. Beside a busy thread, creating a store took 1.05-1.15 s before this and the
    raw per-item columns (commit 7b89ff3), and 0.11-0.16 s after, on the 2-core machine
    (benchmarks/gil_contention.py).
    """
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 2e-4))
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


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
        columns = column_layout(n, spec.task, len(spec.classes))
        if spec.masked:
            columns["mask"] = ((n, spec.num_tokens), np.bool_)
        # Per-item columns are small next to the tokens and stay uncompressed, so that a shard's
        # writer writes their files directly (see ZarrHandle._write_array).
        for name, (shape, dtype) in columns.items():
            group.create_array(name, shape=shape, chunks=(S, *shape[1:]), dtype=dtype, fill_value=0, compressors=None)
        for name in STRING_COLUMNS:
            group.create_array(name, shape=(n,), chunks=(S,), dtype=str, fill_value="", compressors=None)
        group.create_array("complete", shape=(shard_count(n, S),), chunks=(1,), dtype=np.uint8, fill_value=0, compressors=None)


def _shard_file(data: np.ndarray, shard_size: int) -> list:
    """An uncompressed shard as zarr's sharding codec lays it out: items back to back, then the
    index ((offset, nbytes) little-endian uint64 per inner chunk, all-ones for absent ones) and its
    CRC32C."""
    payload = np.ascontiguousarray(data).view(np.uint8).reshape(len(data), -1)
    item_bytes = payload.shape[1]
    index = np.full((shard_size, 2), MISSING, dtype="<u8")
    index[: len(data), 0] = np.arange(len(data), dtype=np.uint64) * np.uint64(item_bytes)
    index[: len(data), 1] = item_bytes
    index_bytes = index.tobytes()
    return [memoryview(payload).cast("B"), index_bytes + google_crc32c.value(index_bytes).to_bytes(4, "little")]


def _chunk_file(data, array: zarr.Array) -> list:
    """One uncompressed chunk as zarr encodes it: padded to the chunk's shape with the fill value;
    numbers little-endian, strings as vlen-utf8 (a uint32 count, then each one's uint32 length and
    UTF-8 bytes)."""
    rows = array.chunks[0]
    if isinstance(array.serializer, zarr.codecs.VLenUTF8Codec):  # (numpy 2 gives them StringDType, numpy 1 object)
        encoded = [str(value).encode() for value in data] + [str(array.fill_value).encode()] * (rows - len(data))
        return [len(encoded).to_bytes(4, "little") + b"".join(len(e).to_bytes(4, "little") + e for e in encoded)]
    padded = np.full((rows, *array.chunks[1:]), array.fill_value, dtype=array.dtype.newbyteorder("<"))
    padded[: len(data)] = data
    return [padded.tobytes()]


def _write_file(path: Path, tmp: Path, parts: list, direct: bool = False):
    """Write a file aside (at `tmp`), fsync it and rename it into place: it appears whole or not at
    all, and a torn temporary file does not keep space that a full disk needs back. `direct`: try
    to write its large first part around the page cache (see _write_direct)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            if direct:
                parts = _write_direct(fd, parts)
            for part in parts:
                _write_all(fd, memoryview(part))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# What zarr and numcodecs raise on a chunk they cannot decode (truncated, damaged): not memory or I/O errors.
DECODING_ERRORS = (ValueError, RuntimeError, TypeError, IndexError)


# Direct writes were measured on ext4 (a cloud VM's local disk), and xfs takes them the same way.
# Network and FUSE filesystems (NFS, Lustre, GPFS, CIFS) each treat O_DIRECT their own way (NFS
# sends such writes to the server uncached and synchronously): shards there go through the page cache.
DIRECT_FILESYSTEMS = {"ext4", "xfs"}


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the filesystem that holds `path` (an existing path), from the mount table
    (/proc/self/mounts, or `mounts` given as its text); "" where there is none (not Linux)."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return ""
    target = os.path.realpath(path)
    found, longest = "", -1
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])  # \040 is a space
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= longest:  # the deepest mount; of equal ones, the last mounted
            found, longest = fields[2], len(point)
    return found


PAGE = 4096  # O_DIRECT's alignment of memory, file offsets and lengths on Linux disks (at most one page)
DIRECT_BYTES = 2**20  # smaller files go through the page cache: the direct write's setup would not pay


def _write_direct(fd: int, parts: list) -> list:
    """Write the page-aligned body of a large first part around the page cache (O_DIRECT); return
    what is left to write (the body's unaligned tail, the other parts), or all the parts when the
    body cannot go direct (small, unaligned memory, a filesystem that refuses it).

    Why: on the two-GPU H200 host, while 31 DataLoader workers decoded, 128-item shard files of one
    ViT-B layer were written at 1.66-1.76 GB/s this way, against 1.40-1.44 GB/s through the page
    cache (idle: 2.05-2.26 against 1.97-2.05), in interleaved passes of 8 GB. Through the page cache,
    every byte is copied once more and then written back by kernel threads that compete with the
    workers for the cores.
    """
    direct = getattr(os, "O_DIRECT", 0)  # Linux only
    first = memoryview(parts[0]).cast("B")
    body = len(first) - len(first) % PAGE
    if not direct or body < DIRECT_BYTES or np.frombuffer(first, np.uint8).ctypes.data % PAGE:
        return parts
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | direct)
        _write_all(fd, first[:body])
    except OSError as error:
        if error.errno != errno.EINVAL:  # EINVAL: the filesystem does not take direct writes
            raise
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        return parts
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return [first[body:], *parts[1:]]


def _write_all(fd: int, data: memoryview):
    """os.write may write less than asked (a signal, a full disk): go on until all is written."""
    while data:
        data = data[os.write(fd, data):]


def open(path: Path, mode: str) -> "ZarrHandle":  # noqa: A001 - the backend's verb
    return ZarrHandle(path, mode)


def damaged_metadata(folder: Path, error: Exception) -> StoreError:
    return StoreError(f"{folder / 'zarr.json'}: damaged metadata, not zarr's JSON ({error}); "
                      "the store cannot be read as it is: restore the file, or extract again into a new store")


class ZarrHandle:
    def __init__(self, path: Path, mode: str):
        self.path = path
        try:
            self.root = zarr.open_group(path, mode="r" if mode == "r" else "r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
            advice = ("give the folder of a store made by `tokens extract`, the one that holds its zarr.json" if mode == "r"
                      else "a new store needs a path that does not exist yet, or an empty directory")
            raise NotAStore(f"{path} is a directory but not a zarr store ({error}); {advice}") from error
        except (ValueError, TypeError, KeyError) as error:  # zarr.json is not JSON, or not zarr's metadata
            raise damaged_metadata(path, error) from error
        if mode != "r":
            (path / PARTIAL).mkdir(exist_ok=True)  # see _partial
        self.direct = mode != "r" and filesystem_type(path) in DIRECT_FILESYSTEMS  # see _write_direct
        self._arrays = {}
        self._found: dict[str, set[int]] = {}  # array -> shards whose file was seen (see _check_files)

    def meta(self, latest: bool = False) -> dict:
        """The store's metadata as opened, or `latest`: as on disk now (another task may have changed it)."""
        if latest:
            try:
                return json.loads((self.path / "zarr.json").read_text()).get("attributes", {})
            except (OSError, ValueError, AttributeError):
                return {}
        return dict(self.root.attrs)

    def set_meta(self, meta: dict):
        self.root.attrs.put(meta)  # zarr writes zarr.json aside and renames it into place

    def array(self, split: str, name: str) -> zarr.Array:
        key = f"{split}/{name}"
        if key not in self._arrays:
            try:
                # The config is not stored with the array: without it, a compressed shard of failed
                # items (all zeros, the fill value) would be skipped, and then found missing.
                self._arrays[key] = self.root[key].with_config(FAST_WRITES)
            except KeyError as error:
                if (self.path / key / "zarr.json").exists():  # there, but without a field zarr needs
                    raise damaged_metadata(self.path / key, error) from error
                raise StoreError(f"{self.path}: array {key} is missing") from error
            except (ValueError, TypeError) as error:
                raise damaged_metadata(self.path / key, error) from error
        return self._arrays[key]

    def _partial(self, split: str, name: str, shard: int) -> Path:
        """Where a shard's file is written before it is renamed into place: one folder for the whole
        store, so that what a killed writer left there is found without listing every chunk folder.
        The name says which process writes it (see discard_partial)."""
        return self.path / PARTIAL / f"{shard}.{split}.{name.replace('/', '.')}.{writer()}.{uuid.uuid4().hex}.tmp"

    def discard_partial(self, split: str, shards: set[int]):
        """Delete what killed writers left half-written, of any shard: a file is deleted only when its
        writer is gone (a process of this host that no longer runs) or, when that cannot be told
        (another host), when it has not changed for STALE_SECONDS (see store.writer_gone). Not only
        the shards this run writes again: a task resubmitted while the old one still ran wrote the
        shard itself, and what the old one left of it would otherwise stay for good."""
        try:
            entries = list(os.scandir(self.path / PARTIAL))
        except FileNotFoundError:
            return
        clock = folder_clock(self.path / PARTIAL)
        for entry in entries:
            fields = entry.name.split(".")  # <shard>.<split>.<array...>.<host>-<pid>.<uuid>.tmp
            if len(fields) >= 6 and fields[-1] == "tmp" and writer_gone(fields[-3], Path(entry.path), clock):
                Path(entry.path).unlink(missing_ok=True)

    def chunk_file(self, split: str, name: str, shard: int) -> Path:
        ndim = self.array(split, name).ndim
        return self.path / split / name / "c" / "/".join([str(shard)] + ["0"] * (ndim - 1))

    def complete(self, split: str, num_shards: int) -> np.ndarray:
        try:
            return self.array(split, "complete")[:].astype(bool)
        except DECODING_ERRORS as error:  # a flag file emptied or overwritten: named, as other files are
            raise self._undecodable(split, "complete", range(num_shards), error) from error

    def mark_incomplete(self, split: str, shard: int):
        """Its complete flag is a file of its own: without it the flag reads as zarr's fill value, 0."""
        self.chunk_file(split, "complete", shard).unlink(missing_ok=True)

    def write_shard(self, split: str, shard: int, start: int, arrays: dict):
        """Every array's file of the shard, then its complete flag. A failed write (full disk,
        read-only directory) raises a StoreError naming the file; the shard stays incomplete and
        no temporary file is left behind (every file is written aside and renamed into place)."""
        for name, data in [*arrays.items(), ("complete", np.ones(1, np.uint8))]:
            try:
                self._write_array(split, name, shard, start if name != "complete" else shard, data)
            except OSError as error:
                raise write_error(self.chunk_file(split, name, shard), error) from error

    def _write_array(self, split: str, name: str, shard: int, start: int, data: np.ndarray):
        """Write the shard's file of one array, durably, before the shard is called complete.

        Uncompressed arrays are written as zarr's codecs lay them out, in one go: no encoding
        through zarr's event loop, whose many thread hand-offs each wait for the GIL while the
        main thread feeds the GPU. Compressed ones (tokens under --codec, and the columns of
        stores made before they were stored raw) go through zarr.
        """
        array = self.array(split, name)
        path = self.chunk_file(split, name, shard)
        if not array.compressors and not array.filters:
            parts = _shard_file(data, array.shards[0]) if array.shards else _chunk_file(data, array)
            _write_file(path, self._partial(split, name, shard), parts, direct=self.direct)
            return
        array[start:start + len(data)] = data
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def read_rows(self, split: str, name: str, indices: np.ndarray) -> np.ndarray:
        array = self.array(split, name)
        shards = np.unique(indices // (array.shards or array.chunks)[0]).tolist()
        self._check_files(split, name, shards)
        try:
            return array.oindex[indices]
        except DECODING_ERRORS as error:
            raise self._undecodable(split, name, shards, error) from error

    def read_column(self, split: str, name: str, num_items: int) -> np.ndarray:
        array = self.array(split, name)
        shards = range(shard_count(num_items, (array.shards or array.chunks)[0]))
        self._check_files(split, name, shards)
        try:
            return array[:]
        except DECODING_ERRORS as error:
            raise self._undecodable(split, name, shards, error) from error

    def _undecodable(self, split: str, name: str, shards, error: Exception) -> DamagedShard:
        """The error for a read that zarr could not decode, naming the first file of `shards` that fails alone."""
        array = self.array(split, name)
        rows = (array.shards or array.chunks)[0]
        for shard in shards:
            try:
                array[shard * rows:(shard + 1) * rows]
            except DECODING_ERRORS:
                return DamagedShard(self.chunk_file(split, name, shard), f"cannot be decoded (truncated or damaged: {error})")
        return DamagedShard(self.chunk_file(split, name, shards[0]), f"cannot be decoded ({error})")

    def _check_files(self, split: str, name: str, shards):
        """Refuse to read a complete shard whose file of `name` is missing: zarr would give its
        items the fill value (zero labels, an empty mask) without a word, and training would use them.

        One stat per shard file, once per open store (files are only ever added); the complete
        flags are read only when a file is missing, as it is for shards not yet written.
        """
        found = self._found.setdefault(f"{split}/{name}", set())
        missing = []
        for shard in map(int, shards):
            if shard not in found:
                if self.chunk_file(split, name, shard).exists():
                    found.add(shard)
                else:
                    missing.append(shard)
        if not missing:
            return
        complete = self.array(split, "complete")[:]
        # looked at again: a shard that another process completed since has its files before its flag
        lost = [shard for shard in missing if complete[shard] and not self.chunk_file(split, name, shard).exists()]
        if lost:
            more = f" (and the files of {len(lost) - 1} more complete shards)" if len(lost) > 1 else ""
            raise DamagedShard(
                self.chunk_file(split, name, lost[0]),
                f"file missing, though shard {lost[0]} of {split} is complete: its items' {name} would "
                f"read as zarr's fill value (zero, or an empty string){more}",
            )

    def raw_layout(self, split: str, name: str, num_items: int, shard_size: int) -> RawItems | None:
        """Where each item's bytes sit, read from the shard index at the end of each shard file."""
        array = self.array(split, name)
        if array.compressors:
            return None
        item_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
        index_bytes = 16 * shard_size + 4  # (offset, nbytes) uint64 per inner chunk + crc32c
        shard_offsets: dict[int, tuple[tuple[int, int], np.ndarray]] = {}

        def offsets_of(shard: int) -> np.ndarray:
            path = self.chunk_file(split, name, shard)
            try:
                found = os.stat(path)
            except OSError as error:
                raise DamagedShard(path, f"shard file missing or damaged ({error})") from error
            # A shard written again (--retry-failed, or after verify --unmark-damaged) is a new file
            # renamed over the old one: its index is read again, not taken from the old file's.
            identity = (found.st_ino, found.st_mtime_ns)
            if shard in shard_offsets and shard_offsets[shard][0] == identity:
                return shard_offsets[shard][1]
            if found.st_size < index_bytes:
                raise DamagedShard(path, f"shard file truncated ({found.st_size} bytes, shorter than its index of {index_bytes})")
            try:
                with path.open("rb") as f:
                    f.seek(-index_bytes, os.SEEK_END)
                    raw = f.read(index_bytes)
            except OSError as error:
                raise DamagedShard(path, f"shard file missing or damaged ({error})") from error
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
            start, stop = shard * shard_size, min((shard + 1) * shard_size, num_items)
            used = index[: stop - start]
            present = used[:, 0] != MISSING  # an absent inner chunk reads as the fill value, zero
            if (used[present, 1] != item_bytes).any() or (used[present].sum(axis=1) > found.st_size).any():
                raise DamagedShard(path, "shard index does not match the file (truncated or damaged)")
            if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):  # as zarr itself checks
                raise DamagedShard(path, "shard index checksum does not match (damaged)")
            shard_offsets[shard] = identity, np.where(present, used[:, 0].astype(np.int64), -1)
            return shard_offsets[shard][1]

        paths = [str(self.chunk_file(split, name, shard)) for shard in range(shard_count(num_items, shard_size))]

        def locate(indices: np.ndarray):
            shards, within = np.divmod(indices, shard_size)
            offsets = np.empty(len(indices), dtype=np.int64)
            for shard in np.unique(shards):
                chosen = shards == shard
                offsets[chosen] = offsets_of(int(shard))[within[chosen]]
            return paths, shards, offsets

        return RawItems(locate, item_bytes, files_replaced=True)

    def close(self):
        self._arrays.clear()
