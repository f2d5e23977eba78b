"""HDF5 file stores: one file, contiguous token datasets when uncompressed.

A contiguous dataset is fixed-size items back to back, so reads go straight to byte offsets.
HDF5 takes one writer at a time (two writers on one file corrupt it silently without locking):
use zarr stores for job arrays.

A full disk: HDF5 drops the error of a buffered write when the dataset handle that made it closes
(shards were marked complete whose data never reached the disk), and once a write has failed it
cannot close the file cleanly (the process may crash). So a shard is written only if the disk has
room for it (and `ulimit -f` allows it); else a StoreError names the file before HDF5 writes a
byte. Should the disk fill in between (another process), datasets are allocated at creation (no
metadata changes while shards are written), handles stay open and each shard's writes and flush
happen under one lock, so the error reaches the shard that caused it, which is not marked complete.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import threading
from pathlib import Path

import h5py
import numpy as np

from tokens.cache.store import (STORAGE_DTYPE, STRING_COLUMNS, DamagedShard, RawItems, StoreError, StoreSpec, build_aside,
                                column_layout, shard_count, write_error)

CODECS = {"gzip": {"compression": "gzip", "compression_opts": 1}, "lzf": {"compression": "lzf"}}
STRING = h5py.string_dtype()


def create(path: Path, spec: StoreSpec):
    """Write the empty file aside, then link it into place: a racing creator finds it whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = build_aside(path)
    storage = STORAGE_DTYPE[spec.dtype]
    S = spec.shard_size
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["meta"] = json.dumps(spec.to_meta())
            for split, n in spec.splits.items():
                _create_split(f.create_group(split), n, spec, storage, S)
        os.link(tmp, path)
    except FileExistsError:
        pass
    except FileNotFoundError:  # its build taken for a gone writer's (see store.writer_gone) while another made the store
        if not path.exists():
            raise
    except RuntimeError as error:  # h5py's word for a failed write (a full disk)
        raise _os_error(error) from error
    finally:
        tmp.unlink(missing_ok=True)


def _create_split(group: h5py.Group, n: int, spec: StoreSpec, storage, S: int):
    item_arrays = [(f"tokens/{layer}", spec.num_tokens) for layer in spec.layers]
    if spec.num_prefix:
        item_arrays += [(f"prefix/{layer}", spec.num_prefix) for layer in spec.layers]
    for name, count in item_arrays:
        if spec.codec:
            group.create_dataset(name, shape=(n, count, spec.dim), dtype=storage, chunks=(1, count, spec.dim), **CODECS[spec.codec])
        else:  # allocated now, never filled: the file is sparse until written
            group.create_dataset(name, shape=(n, count, spec.dim), dtype=storage, dcpl=_early(), fill_time="never")
    columns = column_layout(n, spec.task, len(spec.classes))
    if spec.masked:
        columns["mask"] = ((n, spec.num_tokens), np.bool_)
    for name in STRING_COLUMNS:
        columns[name] = ((n,), STRING)
    columns["complete"] = ((shard_count(n, S),), np.uint8)
    for name, (shape, dtype) in columns.items():
        group.create_dataset(name, shape=shape, dtype=dtype, dcpl=_early())


def _damaged(path: Path, key: str, error: Exception) -> StoreError:
    reason = error.args[0] if isinstance(error, KeyError) and error.args else error  # str(KeyError) quotes it
    return StoreError(f"{path}: {key} cannot be read ({reason}): the file is damaged; extract into a new store")


REMADE = ".remade"  # a string column being made again (see HDF5Handle.discard_partial)


def _readable(data: h5py.Dataset, start: int, stop: int) -> bool:
    try:
        data[start:stop]
    except (OSError, RuntimeError):  # "bad heap index": a row that points at a record never written
        return False
    return True


ROOM_MARGIN = 4 * 2**20  # for HDF5's own growth (string heaps, metadata) beside a shard's bytes


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _early() -> h5py.h5p.PropDCID:
    """Allocate a dataset's space when it is created, not at its first write."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def _os_error(error: Exception) -> OSError:
    """h5py reports a failed write as a RuntimeError whose text holds the errno: make it an OSError."""
    if isinstance(error, OSError) and error.errno:
        return error
    found = re.search(r"errno = (\d+)", str(error))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else OSError(None, str(error))


def open(path: Path, mode: str) -> "HDF5Handle":  # noqa: A001 - the backend's verb
    return HDF5Handle(path, mode)


def is_store(path: Path) -> bool:
    """Whether the HDF5 file at `path` holds a tokens store's metadata (our schema version)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return "schema_version" in json.loads(f.attrs.get("meta", "{}"))
    except (OSError, ValueError, TypeError):
        return False


class HDF5Handle:
    def __init__(self, path: Path, mode: str):
        self.path = path
        try:
            # Readers do not lock, so `tokens info` works while an extraction writes.
            self.file = h5py.File(path, "r", locking=False) if mode == "r" else h5py.File(path, "r+")
        except BlockingIOError as error:
            raise StoreError(
                f"{path} is open for writing by another process; an HDF5 store takes one writer "
                "(use a zarr store for job arrays). Just after a killed run, its DataLoader workers may "
                "hold the file for a few seconds more: try again then"
            ) from error
        except OSError as error:
            if "locking flag values don't match" in str(error) or "already open for read-only" in str(error):
                raise StoreError(f"{path} is already open in this process in another mode (for reading, or for writing): "
                                 "close that store first") from error
            raise StoreError(f"{path}: cannot open as HDF5 ({error}); the file may be truncated or not a store") from error
        self._datasets: dict[str, h5py.Dataset] = {}
        self._lock = threading.Lock()
        self._failed = False
        # A reader sees the file as it was when it opened: HDF5 caches what it has read, so the
        # strings of shards completed later may lie past the end of the file it knows. Their
        # completion marks, read now, keep it to the shards it can read.
        self._complete_at_open, self._shard_size = {}, None
        if mode == "r":
            try:
                meta = self.meta()
                splits, self._shard_size = meta.get("splits") or {}, meta.get("shard_size")
            except (StoreError, AttributeError):  # damaged metadata: TokenStore names it
                splits = {}
            for split in splits:
                try:
                    if f"{split}/complete" in self.file:
                        self._complete_at_open[split] = self.file[f"{split}/complete"][:].astype(bool)
                except (OSError, RuntimeError, KeyError) as error:
                    self.file.close()
                    raise _damaged(path, f"{split}/complete", error) from error

    def meta(self, latest: bool = False) -> dict:
        """The store's metadata; {} for an HDF5 file that tokens did not write (TokenStore says so).
        `latest` changes nothing: an HDF5 store has one writer, so no other task changes it meanwhile."""
        try:
            if "meta" not in self.file.attrs:
                return {}
            return json.loads(self.file.attrs["meta"])
        except (TypeError, ValueError) as error:
            raise StoreError(f"{self.path}: its metadata is not readable JSON ({error}): the file is damaged, "
                             "or not a store tokens wrote") from None
        except (OSError, RuntimeError) as error:  # libhdf5's own structures around it are damaged
            raise StoreError(f"{self.path}: its metadata cannot be read ({error}): the file is damaged there; "
                             "extract the store again, or restore it from a copy") from None

    def set_meta(self, meta: dict):
        with self._lock:
            self.file.attrs["meta"] = json.dumps(meta)
            self.file.flush()

    def dataset(self, split: str, name: str) -> h5py.Dataset:
        key = f"{split}/{name}"
        if key not in self._datasets:
            try:
                if key not in self.file and f"{key}{REMADE}" in self.file:  # remade, killed before its rename (see _remake_strings)
                    if self.file.mode != "r+":
                        self._datasets[key] = self.file[f"{key}{REMADE}"]
                        return self._datasets[key]
                    self.file.move(f"{key}{REMADE}", key)
                    self.file.flush()
                self._datasets[key] = self.file[key]
            except KeyError as error:
                if "doesn't exist" in str(error):
                    raise StoreError(f"{self.path}: dataset {key} is missing") from error
                raise _damaged(self.path, key, error) from error
            except (OSError, RuntimeError) as error:  # HDF5's own structures damaged
                raise _damaged(self.path, key, error) from error
        return self._datasets[key]

    def complete(self, split: str, num_shards: int) -> np.ndarray:
        if split in self._complete_at_open:
            return self._complete_at_open[split].copy()
        return self.dataset(split, "complete")[:].astype(bool)

    def mark_incomplete(self, split: str, shard: int):
        with self._lock:
            self.dataset(split, "complete")[shard] = 0
            self.file.flush()

    def discard_partial(self, split: str, shards: set[int]):
        """Shards are written in place, and an incomplete one is simply written again; but a writer
        killed (SIGKILL) while it wrote a shard can leave string rows that point into HDF5's string
        heap at records that never reached the disk. Reading or overwriting such a row fails, at every
        resume. A string column with such rows among these shards is made again without them."""
        size = self.meta()["shard_size"]
        with self._lock:
            for name in STRING_COLUMNS:
                data, group = self.dataset(split, name), self.file[split]
                if f"{name}{REMADE}" in group:  # a copy whose making was killed: the column itself is whole
                    del group[f"{name}{REMADE}"]
                    self.file.flush()
                if not all(_readable(data, shard * size, (shard + 1) * size) for shard in shards):
                    self._remake_strings(split, name, size)

    def _remake_strings(self, split: str, name: str, size: int):
        """A copy of a string column holding the rows of its complete shards (the others are written
        again), then put in its place. Killed while copying, the next resume copies again; killed
        between the removal and the rename, the copy is taken (see dataset). Each change to the
        group is flushed before the next: HDF5 keeps them in its cache, and a kill while the long copy
        pushes some of them to the disk and not others damaged the group, and with it the store."""
        group, old = self.file[split], self.dataset(split, name)
        new = group.create_dataset(f"{name}{REMADE}", shape=old.shape, dtype=STRING, dcpl=_early())
        self.file.flush()
        for shard in np.flatnonzero(self.dataset(split, "complete")[:]):
            start, stop = shard * size, min((shard + 1) * size, old.shape[0])
            new[start:stop] = old[start:stop]
        self.file.flush()
        del group[name]
        group.move(f"{name}{REMADE}", name)
        self._datasets.pop(f"{split}/{name}")
        self.file.flush()

    def write_shard(self, split: str, shard: int, start: int, arrays: dict):
        """The shard's data, flushed and fsync'd, then its complete flag (see the module docstring)."""
        where = f"{self.path}:{split} items {start}-{start + len(next(iter(arrays.values()))) - 1} (shard {shard})"
        try:
            with self._lock:
                self._check_room(split, arrays)
                for name, data in arrays.items():
                    self.dataset(split, name)[start:start + len(data)] = data
                self.file.flush()
            os.fsync(self.file.id.get_vfd_handle())
            with self._lock:
                self.dataset(split, "complete")[shard] = 1
                self.file.flush()
        except (OSError, RuntimeError) as error:
            self._failed = True
            raise write_error(where, _os_error(error)) from error

    def _check_room(self, split: str, arrays: dict):
        """Raise ENOSPC or EFBIG before writing a shard that the disk or `ulimit -f` has no room for.

        The disk must hold every byte (the early-allocated file is sparse until written); the file
        only grows by what is not pre-allocated: strings (in the heap) and compressed chunks.
        """
        sizes = {name: sum(len(str(v)) + 16 for v in data) if data.dtype == object else data.nbytes
                 for name, data in arrays.items()}
        needed = ROOM_MARGIN + sum(sizes.values())
        disk = os.statvfs(self.path)
        if disk.f_bavail * disk.f_frsize < needed:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {_mib(disk.f_bavail * disk.f_frsize)} free, a shard needs "
                                        f"{_mib(needed - ROOM_MARGIN)} and HDF5 {_mib(ROOM_MARGIN)} more for its own records")
        growth = ROOM_MARGIN + sum(size for name, size in sizes.items()
                                   if arrays[name].dtype == object or self.dataset(split, name).chunks is not None)
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and limit < os.path.getsize(self.path) + growth:
            raise OSError(errno.EFBIG, f"{os.strerror(errno.EFBIG)}: the file size limit (ulimit -f, {_mib(limit)}) leaves no room for the next shard")

    def read_rows(self, split: str, name: str, indices: np.ndarray) -> np.ndarray:
        order = np.argsort(indices, kind="stable")
        sorted_indices = indices[order]
        unique, inverse = np.unique(sorted_indices, return_inverse=True)
        data = self.dataset(split, name)
        try:
            rows = (data.asstr() if data.dtype == STRING else data)[unique][inverse]  # str, as zarr gives, not bytes
        except (OSError, RuntimeError) as error:  # a damaged chunk, heap or index
            raise self._unreadable(split, name, unique, error) from error
        out = np.empty_like(rows)
        out[order] = rows
        return out

    def read_column(self, split: str, name: str, num_items: int) -> np.ndarray:
        data = self.dataset(split, name)
        read = data.asstr() if data.dtype == STRING else data
        done = self._complete_at_open.get(split)
        try:
            if done is None or done.all():
                return read[:]
            # Only the shards complete when this reader opened: the strings of later ones may lie past
            # the end of the file it knows. The others read as unwritten rows do.
            out = np.full(data.shape, "", dtype=object) if data.dtype == STRING else np.zeros(data.shape, dtype=data.dtype)
            for shard in np.flatnonzero(done):
                start, stop = shard * self._shard_size, min((shard + 1) * self._shard_size, num_items)
                out[start:stop] = read[start:stop]
            return out
        except (OSError, RuntimeError) as error:  # a damaged chunk, heap or index
            raise self._unreadable(split, name, np.arange(num_items), error) from error

    def _unreadable(self, split: str, name: str, indices: np.ndarray, error: Exception) -> DamagedShard:
        """The error for a read that HDF5 failed, naming the first shard among `indices` that fails alone."""
        size = self._shard_size or self.meta()["shard_size"]
        data = self.dataset(split, name)
        for shard in np.unique(indices // size):
            if not _readable(data, shard * size, (shard + 1) * size):
                start, stop = shard * size, min((shard + 1) * size, data.shape[0])
                return DamagedShard(f"{self.path}:{split}/{name} items {start}-{stop - 1} (shard {shard})",
                                    f"cannot be read ({error}): the file is damaged")
        return DamagedShard(f"{self.path}:{split}/{name}", f"cannot be read ({error}): the file is damaged")

    def raw_layout(self, split: str, name: str, num_items: int, shard_size: int) -> RawItems | None:
        data = self.dataset(split, name)
        offset = data.id.get_offset()
        if data.chunks is not None or offset is None:  # compressed, or nothing written yet
            return None
        item_bytes = int(np.prod(data.shape[1:])) * data.dtype.itemsize
        paths = [str(self.path)]

        def locate(indices: np.ndarray):
            return paths, np.zeros(len(indices), dtype=np.int64), offset + indices.astype(np.int64) * item_bytes

        # the file h5py has open, whatever is at its path now (another store may have replaced it)
        return RawItems(locate, item_bytes, opened={paths[0]: os.dup(self.file.id.get_vfd_handle())})

    def close(self):
        try:
            self.file.close()
        except (OSError, RuntimeError) as error:
            if not self._failed:  # after a failed write, that failure is the one reported
                raise write_error(self.path, _os_error(error)) from error
        finally:
            self._datasets.clear()
