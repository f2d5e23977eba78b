"""The token store: one extraction (one backbone, one checkpoint, one front-end, one dataset).

A store holds, per split, the patch tokens of every cached layer (N, L, D), the prefix tokens
(class token, registers) per layer (N, P, D), an optional validity mask (N, L), labels, item ids
and where each item came from. The stages talk to `TokenStore` and `Split`; whether zarr or HDF5
lies underneath is the backend's business (`cache/zarr_backend.py`, `cache/hdf5_backend.py`).

Items are written a shard at a time (a fixed run of `shard_size` items). A shard is marked
complete only after all its data is written and flushed, so a killed writer loses at most the
shard in flight and a restarted one skips what is done.
"""

from __future__ import annotations

import errno
import functools
import glob
import hashlib
import json
import operator
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tokens import __version__

SCHEMA_VERSION = 1
DTYPES = ("float16", "bfloat16", "float32")
# bfloat16 has no numpy dtype: it is stored as its raw 16 bits (exact round trip).
STORAGE_DTYPE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
# Fields whose change changes the cached tokens; their hash is the cache key.
KEY_FIELDS = (
    "backbone", "backbone_config", "checkpoint_sha256", "frontend", "layers", "final_norm",
    "precision", "dtype", "dataset_fingerprint", "task", "classes",
)
# Key fields that stores made by earlier versions do not record: not compared with those stores.
LATER_KEY_FIELDS = ("precision",)
# Fields that fix the on-disk layout; a resume must agree on them too.
LAYOUT_FIELDS = ("grid", "dim", "num_prefix", "masked", "shard_size", "codec", "splits")
# A shard (the unit of writing and resuming) holds about 128 MiB of each cached layer, and at least
# 384 MiB in all: each shard also writes a few small per-item files, fsync'd, and with one ViT-B layer
# shards of 512 items streamed 10% faster than shards of 170 on the H200 host's disk (4 interleaved
# pairs of 65 536-clip commands: 2 299, 2 475, 2 003, 2 190 against 2 098, 2 026, 1 976, 2 046 clips/s).
TARGET_SHARD_BYTES = 128 * 2**20
TARGET_SHARD_TOTAL_BYTES = 384 * 2**20
STRING_COLUMNS = ("ids", "sources", "errors")
COLUMNS = ("labels", "offsets", "durations", *STRING_COLUMNS)  # what Split.column reads


def failed(errors) -> np.ndarray:
    """Which items failed at extraction (bool per item), from their `errors` column: a reason, or ""."""
    return np.fromiter((bool(error) for error in errors), bool, len(errors))


def column_layout(n: int, task: str, num_classes: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """Shape and dtype of the numeric per-item columns of `n` items (the string ones are 1-D)."""
    return {"labels": ((n, num_classes), np.uint8) if task == "multilabel" else ((n,), np.int64),
            "offsets": ((n,), np.float64), "durations": ((n,), np.float64)}


class StoreError(Exception):
    """A store cannot be created, opened or written as asked; the message says why."""


class NotAStore(StoreError):
    """Nothing at the path is a tokens store (a mistyped path, a manifest given as the store), as
    against a store that is there but damaged."""


class DamagedShard(StoreError):
    """A file of a complete shard is missing or damaged. Kept apart from the advice to run
    `tokens verify`, so that verify itself reports the problem without that advice."""

    def __init__(self, path, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}; run `tokens verify` to list every damaged shard")


FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota, file-size limit (ulimit -f)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_error(where, error: OSError, creating: bool = False) -> StoreError:
    """The StoreError for a write that failed on `where` (a file, or a dataset of an HDF5 file), saying
    what to do: a full disk loses only the shards in flight, so freeing space and rerunning resumes.
    `creating`: the store was being made, so there are no shards to keep."""
    reason = error.strerror or str(error)
    if creating and error.errno not in FULL_DISK:
        return StoreError(f"{where}: cannot create the store here ({reason}): use another --store")
    if error.errno in FULL_DISK:
        advice = ("the disk is full (or a quota or file-size limit is reached). Shards already complete are kept: "
                  "free space and rerun the same command to resume")
    elif error.errno in NOT_WRITABLE:
        advice = "the store is not writable here. Make it writable, or extract into another --store"
    else:
        advice = "shards already complete are kept; rerun the same command to resume once this is fixed"
    return StoreError(f"{where}: cannot write ({reason}): {advice}")


# Files and folders are written aside and renamed into place. The name of what is written aside
# says who writes it (host and process id), so that what a killed writer left is told from what a
# live one (another task of a job array, on this host or another) is still writing.
def _host() -> str:
    """This host, as told apart in the names of what is written aside: its name, and the pid namespace
    (containers may share a host's name but not its process ids, which would make live writers look gone)."""
    name = socket.gethostname().replace(".", "_").replace("-", "_")
    try:
        return f"{name}_ns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc: the name alone
        return name


HOST = _host()
STALE_SECONDS = 600  # something of another host's writer, unchanged this long, has lost its writer


def writer() -> str:
    """This process, as named in what it writes aside (a function: forked workers have their own pid)."""
    return f"{HOST}-{os.getpid()}"


def writer_gone(name: str, path: Path, clock: Callable[[], float]) -> bool:
    """Whether the writer called `name` (see writer()) of `path` is gone: a process of this host that
    no longer runs or, when that cannot be told (another host), a path unchanged for STALE_SECONDS
    by the `clock` of its folder (see folder_clock)."""
    host, _, pid = name.rpartition("-")
    if host == HOST and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's process
            return False
        return False
    try:
        return clock() - path.stat().st_mtime > STALE_SECONDS
    except FileNotFoundError:  # renamed into place meanwhile
        return False


def folder_clock(folder: Path) -> Callable[[], float]:
    """The time by the clock that stamps files in `folder`, read once, when first asked (a scan that
    finds only this host's writers touches nothing). Read by touching the folder, as adding a file
    to it would: on NFS the server's, which may be minutes off this host's. File systems that stamp
    with each client's clock (Lustre, GPFS) give this host's; so does a folder not writable here."""
    @functools.cache
    def now() -> float:
        try:
            os.utime(folder)
            return os.stat(folder).st_mtime
        except OSError:
            return time.time()
    return now


def build_aside(path: Path) -> Path:
    """Where a new store at `path` is built before it is renamed into place, beside it and hidden.

    What killed builders left there for the same path (SIGKILL, a lost node) is deleted first, so
    that their hidden leftovers do not pile up unseen.
    """
    discard_builds(path)
    return path.parent / f".{path.name}.{writer()}.{uuid.uuid4().hex}.tmp"


def discard_builds(path: Path):
    """Delete what killed builders left beside `path` (see build_aside); also once the store is
    there, since tasks of a job array create it at once, and one killed then is not the one that made it."""
    built = re.compile(rf"\.{re.escape(path.name)}\.(?:([^.]+)\.)?[0-9a-f]{{32}}\.tmp")  # no writer: made before it was named
    clock = folder_clock(path.parent)
    for entry in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        found = built.fullmatch(entry.name)
        if found and writer_gone(found[1] or "", entry, clock):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def check_writable(path: str | Path):
    """Refuse, naming the path, a store that cannot be written: before any work, not at the first shard.

    Looks at the store file, or at the directories of a zarr store except those under chunk
    directories `c` (one per shard: too many to visit); a deeper read-only directory still gives a
    clear error at its first write. For a store yet to be made (an empty directory included: the
    store is built beside it and renamed over it), at the directory it will be made in.
    Root passes permission bits, so only a read-only mount stops it.
    """
    path = Path(path)
    if store_exists(path):
        places, doing = [path] if path.is_file() else _store_dirs(path), f"writes its shards into the store {path}"
    else:
        places, doing = [next(p for p in path.resolve().parents if p.exists())], f"creates the store {path} there"
        if not places[0].is_dir():
            raise StoreError(f"{places[0]} is a file, not a folder: `tokens extract` cannot create the store {path} under it; "
                             "use another --store")
    for place in places:
        if not os.access(place, os.W_OK | (0 if place.is_file() else os.X_OK)):
            read_only_fs = bool(os.statvfs(place).f_flag & os.ST_RDONLY)
            reason = "read-only file system" if read_only_fs else "permission denied"
            raise StoreError(
                f"{place} is not writable ({reason}): `tokens extract` {doing}. Reading a store (tokens info, "
                "verify, probe) works as it is; to extract, make it writable or use another --store."
            )


def _store_dirs(path: Path):
    for directory, subdirs, _ in os.walk(path):
        yield Path(directory)
        if os.path.basename(directory) == "c":
            subdirs.clear()


@dataclass
class StoreSpec:
    """Everything needed to create a store; the extraction stage fills it from the backbone and dataset."""

    backbone: str
    backbone_config: dict
    checkpoint_sha256: str | None
    frontend: dict
    layers: list[int]
    final_norm: bool
    dtype: str
    grid: tuple[int, int]
    dim: int
    num_prefix: int
    task: str  # "multilabel" or "multiclass"
    classes: list[str]
    splits: dict[str, int]  # split name -> number of items
    dataset_fingerprint: str
    masked: bool = True
    precision: str = "fp32"  # of the forward pass: "bf16" (autocast, on a GPU) or "fp32"; it changes the tokens
    shard_size: int = 0  # 0: chosen from TARGET_SHARD_BYTES and TARGET_SHARD_TOTAL_BYTES
    codec: str | None = None  # None, or one of the format's CODECS (check_codec)
    extra: dict = field(default_factory=dict)  # provenance that does not change tokens
    class_token: bool | None = None  # the first prefix token is a class token (None: whenever there is one); a ViT with registers alone has none
    final_norm_params: dict | None = None  # raw tokens: the encoder's final LayerNorm, for `tokens probe --final-norm`

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise StoreError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.task not in ("multilabel", "multiclass"):
            raise StoreError(f"task must be 'multilabel' or 'multiclass', not {self.task!r}")
        self.grid = tuple(int(g) for g in self.grid)
        self.layers = [int(layer) for layer in self.layers]
        if self.class_token is None:
            self.class_token = self.num_prefix > 0
        if not self.shard_size:
            item_bytes = max(self.grid[0] * self.grid[1] * self.dim * np.dtype(STORAGE_DTYPE[self.dtype]).itemsize, 1)
            items = max(TARGET_SHARD_BYTES // item_bytes, TARGET_SHARD_TOTAL_BYTES // (item_bytes * len(self.layers)))
            self.shard_size = int(np.clip(items, 16, 4096))

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def cache_key(self) -> str:
        return cache_key({name: getattr(self, name) for name in KEY_FIELDS})

    def to_meta(self) -> dict:
        meta = asdict(self)
        meta["grid"] = list(self.grid)
        meta.update(
            schema_version=SCHEMA_VERSION,
            tool_version=__version__,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            cache_key=self.cache_key(),
            key_fields={name: meta[name] for name in KEY_FIELDS},
        )
        return meta


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def store_exists(path: Path) -> bool:
    """Whether something is at `path` to open as a store: an empty directory is not one, but a
    place made ready for a new zarr store (`mkdir out.zarr`)."""
    path = Path(path)
    if not path.is_dir():
        return path.exists()
    with os.scandir(path) as entries:
        return next(entries, None) is not None


SUFFIX_FORMATS = {".zarr": "zarr", ".h5": "hdf5", ".hdf5": "hdf5"}  # what a store's name says of its format


def detect_format(path: Path, default: str | None = None) -> str:
    """The format of the store at `path`, told by what is there, since `--format` lets a store have
    any name: a directory is zarr, a file that starts with HDF5's signature is hdf5. Only a path with
    nothing there yet is told by its suffix (.zarr, .h5/.hdf5), else `default`, else an error."""
    if path.is_dir():
        return "zarr"
    if path.exists():
        try:
            with open(path, "rb") as f:
                head = f.read(len(HDF5_SIGNATURE))
        except OSError as error:
            raise StoreError(f"{path}: cannot read it to tell its store format ({error.strerror or error})") from error
        if head == HDF5_SIGNATURE:
            return "hdf5"
        raise NotAStore(f"{path} is not a store: neither a zarr directory nor an HDF5 file")
    if named := SUFFIX_FORMATS.get(path.suffix.lower()):  # out.H5 is an HDF5 file, as extraction's --format check reads it
        return named
    if default:
        return default
    raise StoreError(f"{path}: cannot tell the store format; use a .zarr directory or a .h5 file")


def check_codec(fmt: str, codec: str | None):
    """Refuse a codec the format does not offer, before a dry run promises it or a store is made."""
    codecs = _backend(fmt).CODECS
    if codec is not None and codec not in codecs:
        raise StoreError(f"codec {codec!r} is not available for {fmt} stores: use one of {', '.join(codecs)}")


def _backend(fmt: str):
    if fmt == "zarr":
        from tokens.cache import zarr_backend

        return zarr_backend
    if fmt == "hdf5":
        from tokens.cache import hdf5_backend

        return hdf5_backend
    raise StoreError(f"unknown store format {fmt!r}: use 'zarr' or 'hdf5'")


def create_or_open(path: str | Path, spec: StoreSpec, fmt: str | None = None,
                   dataset_change: Callable[["TokenStore"], str] | None = None,
                   holds_dataset: Callable[["TokenStore"], bool] | None = None) -> "TokenStore":
    """Open `path` for writing, creating it if needed (an empty directory counts as not there yet);
    refuse a store made with another config (see check_compatible), or of another format than `fmt`.

    Creation is atomic (built aside, then renamed into place), so many tasks of a job array may
    call this at once: one wins, the others open what it made and check the cache key.
    """
    path = Path(path)
    new = not store_exists(path)
    if not path.exists():
        fmt = fmt or detect_format(path)
    else:  # what is there decides: opening it as the other format would fail, or worse
        found = detect_format(path)
        if fmt and fmt != found:
            what = "an empty directory (a zarr store's place)" if new else f"a {found} store"
            raise StoreError(f"{path} is {what}, but {fmt} was asked for: give another path, or leave the format out")
        fmt = found
    backend = _backend(fmt)
    if new:
        check_codec(fmt, spec.codec)
        try:
            backend.create(path, spec)
        except OSError as error:  # a full disk or a read-only parent directory
            raise write_error(path, error, creating=True) from error
    else:
        check_writable(path)
        for where in {path, path.resolve()}:  # zarr builds beside where a link leads, HDF5 beside the path
            discard_builds(where)
    store = TokenStore(path, fmt=fmt, mode="a")
    try:
        store.check_compatible(spec, dataset_change=dataset_change, holds_dataset=holds_dataset)
    except BaseException:  # an HDF5 file left open could not be opened again in this process
        store.close()
        raise
    return store


def open_store(path: str | Path, mode: str = "r") -> "TokenStore":
    path = Path(path)
    if not store_exists(path):
        raise NotAStore(f"{path}: no such store" + (" (an empty directory)" if path.exists() else ""))
    return TokenStore(path, mode=mode)


def is_token_store(path: str | Path) -> bool:
    """Whether a store tokens made is at `path`, a zarr folder or an HDF5 file (its metadata has our
    schema version); quick for anything else: a folder without zarr.json, a file that is not HDF5."""
    path = Path(path)
    if path.is_dir():
        return _zarr_store_at(path)
    try:
        return path.is_file() and detect_format(path) == "hdf5" and _backend("hdf5").is_store(path)
    except StoreError:  # unreadable, or not HDF5
        return False


def _zarr_store_at(path: Path) -> bool:
    """Whether `path` is the root of a zarr tokens store (its group metadata has our schema version)."""
    try:
        return "schema_version" in json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False


# What every store's metadata holds, and of what type: a field missing or mistyped (a hand edit) is
# named at opening, not met as a KeyError wherever it is first read.
META_TYPES = {"backbone": str, "backbone_config": dict, "frontend": dict, "layers": list, "final_norm": bool,
              "dtype": str, "grid": list, "dim": int, "num_prefix": int, "task": str, "classes": list,
              "splits": dict, "masked": bool, "shard_size": int, "cache_key": str, "dataset_fingerprint": str}


TYPE_WORDS = {str: "text", dict: "a mapping", list: "a list", int: "a whole number", bool: "true or false"}


def check_meta(meta: dict):
    """Raise StoreError saying which field of a store's metadata is missing, mistyped or impossible."""
    for name, kind in META_TYPES.items():
        if name not in meta:
            raise StoreError(f"has no {name!r}")
        value = meta[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise StoreError(f"gives {name!r} as {value!r}, not {TYPE_WORDS[kind]}")
    problems = [f"'dtype' {meta['dtype']!r} is none of {', '.join(DTYPES)}"] * (meta["dtype"] not in DTYPES)
    problems += [f"'task' {meta['task']!r} is neither multilabel nor multiclass"] * (meta["task"] not in ("multilabel", "multiclass"))
    problems += ["'grid' is not two positive numbers"] * (len(meta["grid"]) != 2 or not all(isinstance(g, int) and g > 0 for g in meta["grid"]))
    problems += [f"'{name}' is {meta[name]} (it must be positive)" for name in ("dim", "shard_size") if meta[name] < 1]
    problems += ["'splits' does not give each split's number of items"] * (
        not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in meta["splits"].values()))
    # what the tokens and labels were made under, recorded beside the fields (stores of early versions have no record)
    made = meta.get("key_fields") if isinstance(meta.get("key_fields"), dict) else {}
    problems += [f"gives {name!r} as {short(meta.get(name))}, but its tokens and labels were made with {short(made[name])} "
                 "(its record 'key_fields')" for name in made if _json(meta.get(name)) != _json(made[name])]
    if problems:
        raise StoreError("; ".join(problems))


class TokenStore:
    """An open store: store-level metadata and its splits."""

    def __init__(self, path: Path, fmt: str | None = None, mode: str = "r"):
        self.path = Path(path)
        self.format = fmt or detect_format(self.path)
        self.mode = mode
        self._handle = _backend(self.format).open(self.path, mode)
        self.meta = self._handle.meta()
        if self.meta.get("schema_version") != SCHEMA_VERSION:
            self._handle.close()
            if "schema_version" not in self.meta:  # not a store of ours: perhaps a folder inside one
                inside = next((parent for parent in self.path.parents if _zarr_store_at(parent)), None)
                raise NotAStore(f"{self.path} is not a tokens store (no schema version in its metadata)"
                                 + (f"; it lies inside the store {inside}: give that path" if inside else ""))
            raise StoreError(
                f"{self.path}: schema version {self.meta.get('schema_version')!r} is not "
                f"{SCHEMA_VERSION}; this store was written by another version of tokens"
            )
        try:
            check_meta(self.meta)
        except StoreError as error:
            self._handle.close()
            where = self.path / "zarr.json" if self.format == "zarr" else f"{self.path} (its 'meta' attribute)"
            raise StoreError(f"{where}: the store's metadata {error}: it was edited or damaged; restore it, or "
                             "extract the store again") from None
        # stores made before it was recorded: a class token whenever there is a prefix
        self.class_token = bool(self.meta.get("class_token", self.meta["num_prefix"] > 0))
        self.splits = {name: Split(self, name, n) for name, n in self.meta["splits"].items()}
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        """Sent to another process (a spawn or forkserver DataLoader worker), a store opened for
        reading is opened again there by its path: file handles and threads do not travel."""
        if self.closed or self.mode != "r":
            state = "closed" if self.closed else "open for writing"
            raise TypeError(f"{self.path} is {state}: only a store open for reading can be sent to another process "
                            "(a DataLoader worker); or open it by its path there")
        return TokenStore, (self.path.resolve(), self.format, "r")

    def close(self):
        """Close the files, and the raw readers' descriptors and threads; reads after it are refused."""
        for split in self.splits.values():
            split.close_readers()
        self._handle.close()
        self.closed = True

    def split(self, name: str) -> "Split":
        if name not in self.splits:
            raise StoreError(f"{self.path}: no split {name!r}; it has {', '.join(self.splits)}")
        return self.splits[name]

    @property
    def layers(self) -> list[int]:
        return self.meta["layers"]

    def resolve_layer(self, layer: int) -> int:
        """A cached layer as stored; a negative one counts the cached layers from the end (-1: the
        last). Any other is refused, naming the cached layers."""
        try:
            index = None if isinstance(layer, (bool, np.bool_)) else operator.index(layer)  # numpy's integers too
        except TypeError:
            index = None
        if index in self.layers:
            return index
        if index is not None and -len(self.layers) <= index < 0:
            return self.layers[index]
        raise StoreError(
            f"{self.path}: layer {layer!r} is not cached in this store; it caches layers "
            f"{', '.join(map(str, self.layers))} (or -1 for the last)"
        )

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def check_compatible(self, spec: StoreSpec, unknown: tuple[str, ...] = (),
                         dataset_change: Callable[["TokenStore"], str] | None = None,
                         holds_dataset: Callable[["TokenStore"], bool] | None = None):
        """Refuse to write tokens of another configuration into this store, naming what differs;
        `unknown`: fields this caller cannot know yet (not compared); `dataset_change`: says what
        differs in the dataset, given this store, when that is the first difference (the fingerprint
        alone says only that it does); `holds_dataset`: whether all the store holds is what the
        dataset gives now, when the fingerprint is the only difference: then the store takes the
        new fingerprint (recorded, when it is open for writing) rather than refuse.

        The field nearest the cause is named first, down to the differing entry (e.g. frontend.hop):
        backbone_config repeats the checkpoint hash and the front-end, and the window it holds also
        changes how recordings are cut, so the dataset's fingerprint comes after it.
        """
        new = spec.to_meta()
        unknown = {*unknown, *(name for name in LATER_KEY_FIELDS if name not in self.meta)}
        late = ("backbone_config", "dataset_fingerprint")
        order = [name for name in KEY_FIELDS if name not in late] + [*late, *LAYOUT_FIELDS]

        def differing_in(meta: dict) -> list[str]:
            return [name for name in order if name not in unknown and _json(meta.get(name)) != _json(new[name])]

        differing = differing_in(self.meta)
        if differing == ["dataset_fingerprint"] and holds_dataset is not None and holds_dataset(self):
            if self.mode != "r":
                self._record_dataset(new["dataset_fingerprint"])
            return
        if differing == ["dataset_fingerprint"] and (latest := self._handle.meta(latest=True)):
            # another task of the job array may have taken this dataset since the store was opened here
            # (--retry-failed: its shards may be written again meanwhile, so what this one read no longer
            # describes the store): compared again, in full, with the store's metadata as it is now
            if not differing_in(latest):
                self.meta = latest
                return
        if differing:
            entries = differences(differing[0], self.meta.get(differing[0]), new[differing[0]])
            what = ", ".join(f"{where} is {short(old)} in the store but {short(now)} now" for where, old, now in entries[:3])
            what += f" and {len(entries) - 3} more entries of {differing[0]}" if len(entries) > 3 else ""
            change = dataset_change(self) if differing[0] == "dataset_fingerprint" and dataset_change else ""
            if change:
                what = f"the dataset differs: {change}"
            hint = {"dataset_fingerprint": "" if change else " (the dataset's items, windows or labels differ)",
                    "precision": " (bf16 is autocast on a GPU; a run on a CPU is always fp32)"}.get(differing[0], "")
            also = f" (also different: {', '.join(differing[1:])})" if len(differing) > 1 else ""
            raise StoreError(
                f"{self.path} was made with another configuration: {what}{hint}{also}. "
                "Use a new store path, or rerun with the store's settings."
            )

    def _record_dataset(self, fingerprint: str):
        """The dataset's new fingerprint, and so a new cache key: the tokens of its items may change.
        The earlier ones are kept: shards not written again since still hold what they described."""
        meta = dict(self.meta)
        meta["earlier_dataset_fingerprints"] = [*meta.get("earlier_dataset_fingerprints", []), meta["dataset_fingerprint"]]
        meta["key_fields"] = {**meta.get("key_fields", {}), "dataset_fingerprint": fingerprint}
        meta.update(dataset_fingerprint=fingerprint, cache_key=cache_key(meta["key_fields"]))
        self._handle.set_meta(meta)
        self.meta = meta

    def disk_bytes(self) -> int:
        if self.path.is_file():  # an HDF5 file is sparse until its shards are written: count what is allocated
            stat = self.path.stat()
            return min(stat.st_size, stat.st_blocks * 512)
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def differences(where: str, old, new) -> list[tuple[str, object, object]]:
    """The entries that differ, descending into dicts: [('frontend.hop', 160, 320)]; [] if none."""
    if _json(old) == _json(new):
        return []
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [(where, old, new)]
    keys = [k for k in sorted(set(old) | set(new)) if _json(old.get(k)) != _json(new.get(k))]
    return [entry for k in keys for entry in differences(f"{where}.{k}", old.get(k), new.get(k))]


def ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' so a long list of missing shards stays readable."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def labels_outside(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Which items (bool per row) hold labels no writer stores: other than 0/1 in multi-hot rows
    (N, C), or class indices outside 0..C-1 (N,). A damaged labels file shows this way."""
    if labels.ndim == 2:
        return (labels > 1).any(axis=1)
    return (labels < 0) | (labels >= num_classes)


def shard_count(items: int, shard_size: int) -> int:
    """How many shards hold `items` items, the last one possibly short."""
    return -(-items // shard_size)


def listed(names: list[str], most: int = 12) -> str:
    """The first `most` names, and how many more: a message names a few, not thousands."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


class Split:
    """One split of a store: items addressed by index, written and tracked shard by shard."""

    def __init__(self, store: TokenStore, name: str, num_items: int):
        self.store, self.name, self.num_items = store, name, int(num_items)
        meta = store.meta
        self.shard_size = int(meta["shard_size"])
        self.num_shards = shard_count(self.num_items, self.shard_size)
        self.grid = tuple(meta["grid"])
        self.num_tokens = self.grid[0] * self.grid[1]
        self.dim = int(meta["dim"])
        self.num_prefix = int(meta["num_prefix"])
        self.class_token = store.class_token
        self.layers = list(meta["layers"])
        self.dtype = meta["dtype"]
        self.masked = bool(meta["masked"])
        self._raw = {}
        self._complete = None  # completion marks as last read (another process only adds to them; an HDF5 reader keeps those of its opening)

    def __reduce__(self):
        """A split travels as its store does (see TokenStore.__reduce__), opened again by path."""
        return TokenStore.split, (self.store, self.name)

    def _check_open(self):
        if self.store.closed:
            raise StoreError(f"{self.store.path} is closed")

    def close_readers(self):
        for raw in self._raw.values():
            if raw is not None:
                raw.close()
        self._raw.clear()

    def __len__(self):
        return self.num_items

    @property
    def _h(self):
        return self.store._handle

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_items)

    # -- progress ---------------------------------------------------------------------------
    def complete_mask(self) -> np.ndarray:
        """One bool per shard: true once the shard is fully written."""
        self._check_open()
        done = self._h.complete(self.name, self.num_shards)
        if done.shape != (self.num_shards,):  # shard_size or the split's size edited: flags would mark the wrong items
            raise StoreError(f"{self.store.path}: {self.name} has {len(done)} shard flags, but {self.num_items} items in shards of "
                             f"{self.shard_size} make {self.num_shards}: the store's metadata was changed; run `tokens verify`")
        return done

    def complete_items(self, shards_done: np.ndarray | None = None) -> np.ndarray:
        """One bool per item: true where its shard is complete (the only items whose columns hold values);
        `shards_done`: the complete_mask() a caller already read, so that both describe one moment."""
        done = self.complete_mask() if shards_done is None else shards_done
        return np.repeat(done, self.shard_size)[:self.num_items]

    def missing_shards(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(~self.complete_mask())]

    @property
    def is_complete(self) -> bool:
        return bool(self.complete_mask().all())

    # -- writing ----------------------------------------------------------------------------
    def mark_incomplete(self, shard: int):
        """Call a complete shard incomplete (one `tokens verify` found damaged): the next extraction
        into the store writes it again."""
        self._h.mark_incomplete(self.name, shard)
        self._complete = None

    def discard_partial_writes(self, shards):
        """Delete what killed writers left half-written of these shards, which are about to be written again."""
        self._h.discard_partial(self.name, set(shards))
        self._complete = None

    def write_shard(
        self,
        shard: int,
        *,
        tokens: dict[int, np.ndarray],
        labels: np.ndarray,
        ids: list[str],
        sources: list[str],
        offsets: np.ndarray,
        durations: np.ndarray,
        prefix: dict[int, np.ndarray] | None = None,
        mask: np.ndarray | None = None,
        errors: list[str] | None = None,
    ):
        """Write all items of one shard, then mark it complete. Arrays hold exactly the shard's items."""
        if self.store.mode == "r":
            raise StoreError(f"{self.store.path} is open read-only")
        start, stop = self.shard_range(shard)
        n = stop - start
        storage = STORAGE_DTYPE[self.dtype]
        arrays = {}
        for layer in self.layers:
            if layer not in tokens:
                raise StoreError(f"shard {shard} of {self.name}: no tokens for layer {layer}")
            arrays[f"tokens/{layer}"] = self._checked(tokens[layer], (n, self.num_tokens, self.dim), storage, f"tokens of layer {layer}")
            if self.num_prefix:
                if prefix is None or layer not in prefix:
                    raise StoreError(f"shard {shard} of {self.name}: no prefix tokens for layer {layer}")
                arrays[f"prefix/{layer}"] = self._checked(prefix[layer], (n, self.num_prefix, self.dim), storage, f"prefix tokens of layer {layer}")
        if self.masked:
            if mask is None:
                raise StoreError(f"shard {shard} of {self.name}: this store keeps a token mask; none was given")
            arrays["mask"] = self._checked(mask, (n, self.num_tokens), np.bool_, "mask")
        arrays["labels"] = self._checked(labels, *column_layout(n, self.store.task, len(self.store.classes))["labels"], "labels")
        arrays["offsets"] = self._checked(offsets, (n,), np.float64, "offsets")
        arrays["durations"] = self._checked(durations, (n,), np.float64, "durations")
        for name, values in (("ids", ids), ("sources", sources), ("errors", errors or [""] * n)):
            if len(values) != n:
                raise StoreError(f"shard {shard} of {self.name}: {len(values)} {name} for {n} items")
            arrays[name] = np.asarray(values, dtype=object)
        self._h.write_shard(self.name, shard, start, arrays)

    def _checked(self, array, shape, dtype, what) -> np.ndarray:
        array = np.asarray(array)
        if array.shape != tuple(shape):
            raise StoreError(f"{self.name}: {what} has shape {array.shape}, expected {tuple(shape)}")
        if dtype is np.uint16 and array.dtype != np.uint16:
            raise StoreError(f"{self.name}: bfloat16 {what} must be given as their uint16 bit pattern")
        return np.ascontiguousarray(array, dtype=dtype)

    # -- reading ----------------------------------------------------------------------------
    def read_tokens(self, layer: int, indices) -> np.ndarray:
        """Tokens (B, L, D) of items `indices`, in storage dtype (uint16 bits for bfloat16)."""
        return self._read(f"tokens/{self.store.resolve_layer(layer)}", indices, (self.num_tokens, self.dim))

    def read_prefix(self, layer: int, indices) -> np.ndarray | None:
        """Prefix tokens (B, P, D) of items `indices` (class, distillation, register tokens), or None
        for a backbone without them (CREPE, BEATs)."""
        layer = self.store.resolve_layer(layer)
        if not self.num_prefix:
            return None
        return self._read(f"prefix/{layer}", indices, (self.num_prefix, self.dim))

    def read_mask(self, indices) -> np.ndarray | None:
        """Token validity (B, L) bool of items `indices`, or None for a store without a mask (images)."""
        if not self.masked:
            return None
        indices = self._indices(indices)
        if not indices.size:
            return np.zeros((0, self.num_tokens), dtype=np.bool_)
        return self._h.read_rows(self.name, "mask", indices)

    def _indices(self, indices) -> np.ndarray:
        """Item indices as int64, from a list, an integer array, a slice or a boolean mask over the
        split; refused when out of range, or in a shard not written yet (which would read as zeros)."""
        self._check_open()
        if isinstance(indices, slice):
            indices = np.arange(self.num_items)[indices]
        indices = np.asarray(indices)
        if indices.ndim != 1:
            raise TypeError(f"{self.name}: give item indices as a list, a 1-D array or a slice (e.g. [3] for item 3), "
                            f"not an array of shape {indices.shape}")
        if indices.dtype == np.bool_:
            if len(indices) != self.num_items:
                raise IndexError(f"{self.name}: a boolean selection needs one value per item ({self.num_items}), not {len(indices)}")
            indices = np.flatnonzero(indices)
        elif indices.size and not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"{self.name}: item indices must be integers, not {indices.dtype} ({indices[0]!r}, ...)")
        indices = indices.astype(np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_items):
            raise IndexError(f"{self.name}: item index out of range 0..{self.num_items - 1}")
        shards = indices // self.shard_size
        if self._complete is None or not self._complete[shards].all():
            self._complete = self.complete_mask()
            if unwritten := np.unique(shards[~self._complete[shards]]).tolist():
                raise StoreError(f"{self.store.path}: {self.name} items {indices[~self._complete[shards]][:3].tolist()}"
                                 f"{' ...' if (~self._complete[shards]).sum() > 3 else ''} are in shards not written yet "
                                 f"(shard{'s' * (len(unwritten) > 1)} {ranges(unwritten)}; {int(self._complete.sum())} of {self.num_shards} complete): "
                                 "finish the extraction, or read complete_items() only")
        return indices

    def _read(self, name: str, indices, item_shape) -> np.ndarray:
        indices = self._indices(indices)
        out = np.empty((len(indices), *item_shape), dtype=STORAGE_DTYPE[self.dtype])
        if not indices.size:  # the backends' reads assume at least one item
            return out
        if name not in self._raw:
            self._check_array(name, (self.num_items, *item_shape), out.dtype)
            self._raw[name] = self._h.raw_layout(self.name, name, self.num_items, self.shard_size)
        raw = self._raw[name]
        if raw is None:  # compressed: let the library decode
            order = np.argsort(indices, kind="stable")
            out[order] = self._h.read_rows(self.name, name, indices[order])
        else:
            raw.read_into(indices, out)
        return out

    def array(self, name: str):
        """The backend's array of `name` (a zarr Array or an h5py Dataset): its shape and dtype."""
        return self._h.array(self.name, name) if self.store.format == "zarr" else self._h.dataset(self.name, name)

    def _check_array(self, name: str, shape: tuple, dtype: np.dtype):
        """Refuse an array that the metadata describes otherwise (a hand edit of either): its bytes
        would be read as another dtype or shape without a sign."""
        array = self.array(name)
        if tuple(array.shape) != shape or np.dtype(array.dtype) != dtype:
            raise StoreError(f"{self.store.path}: {self.name}/{name} holds {tuple(array.shape)} {np.dtype(array.dtype)}, the "
                             f"store's metadata says {shape} {np.dtype(dtype)}: one of them was changed; run `tokens verify`")

    def column(self, name: str, indices=None) -> np.ndarray:
        """A per-item column (labels, ids, sources, offsets, durations or errors), whole (unwritten
        shards read as empty) or at `indices`, taken as read_tokens takes them (only their shards are read).

        Strings (ids, sources, errors) come as object arrays of str whatever the backend and numpy:
        zarr gives numpy 2's StringDType, HDF5 and numpy 1 object arrays. Labels no writer stores
        (a damaged file) are refused: they would train on nonsense targets without a sign."""
        if name not in COLUMNS:
            raise StoreError(f"{self.name}: no column {name!r}; the columns are {', '.join(COLUMNS)} "
                             "(tokens, prefix tokens and the mask have their own read_ methods)")
        if indices is None:
            self._check_open()
            indices = np.arange(self.num_items)
            data = self._h.read_column(self.name, name, self.num_items)
        elif not (indices := self._indices(indices)).size:  # nothing read, not even a damaged shard's files
            data = np.zeros(*column_layout(0, self.store.task, len(self.store.classes)).get(name, ((0,), object)))
        else:
            order = np.argsort(indices, kind="stable")  # the backends read increasing indices
            rows = self._h.read_rows(self.name, name, indices[order])
            data = np.empty_like(rows)
            data[order] = rows
        if name == "labels":
            expected = column_layout(len(data), self.store.task, len(self.store.classes))["labels"][0]
            if data.shape != expected:
                held = f"{data.shape[1]} classes an item" if data.ndim == 2 else "one class index an item"
                raise StoreError(f"{self.store.path}: {self.name}'s labels hold {held}, the store's metadata says "
                                 f"{self.store.task} over {len(self.store.classes)} classes: one of them was changed; run `tokens verify`")
        if name == "labels" and (outside := labels_outside(data, len(self.store.classes))).any():
            allowed = "0/1" if data.ndim == 2 else f"0..{len(self.store.classes) - 1}"
            raise StoreError(f"{self.store.path}: {self.name} item {int(indices[np.flatnonzero(outside)[0]])} has labels "
                             f"outside {allowed} (a damaged file?): run `tokens verify`")
        return np.asarray(data, dtype=object) if name in STRING_COLUMNS else data

    def load(self, layer: int) -> np.ndarray:
        """The whole split's tokens of one layer in RAM, read shard by shard."""
        out = np.empty((self.num_items, self.num_tokens, self.dim), dtype=STORAGE_DTYPE[self.dtype])
        for shard in range(self.num_shards):
            start, stop = self.shard_range(shard)
            out[start:stop] = self.read_tokens(layer, np.arange(start, stop))
        return out


class RawItems:
    """Positioned reads of fixed-size uncompressed items: the cost is the bytes, not the library.

    `locate(indices)` gives the files, and per item the index of its file in that list and the
    byte offset where its bytes start (an uncompressed zarr shard with one-item inner chunks, or a
    contiguous HDF5 dataset); offset -1 means the item was never stored and reads as zeros,
    zarr's fill value.
    """

    def __init__(self, locate, item_bytes: int, threads: int = 4, files_replaced: bool = False,
                 opened: dict[str, int] | None = None):
        """`files_replaced`: a file may be replaced by a new one at its path (a zarr shard written
        again), which is then read. `opened`: descriptors of files already open, read whatever is
        at their paths now (an HDF5 file, which h5py keeps open); closed with the rest."""
        self.locate = locate
        self.item_bytes = item_bytes
        self._threads = threads
        self._files_replaced = files_replaced
        self._pool, self._pool_pid = None, None
        self._fds: dict[str, tuple[int, int]] = {path: (fd, os.fstat(fd).st_ino) for path, fd in (opened or {}).items()}
        self._replaced: list[int] = []
        self._fds_lock, self._lock_pid = threading.Lock(), os.getpid()

    def _reading_threads(self) -> ThreadPoolExecutor | None:
        """This process's pool: one made before a fork (DataLoader workers) names threads that do
        not exist in the child, and reads handed to it would wait forever."""
        if self._pool_pid != os.getpid() and self._threads > 1:
            self._pool, self._pool_pid = ThreadPoolExecutor(self._threads), os.getpid()
        return self._pool

    def _lock(self) -> threading.Lock:
        """The lock over the descriptors; a new one in a forked child, where the copied one may have
        been held by a thread that was not copied."""
        if self._lock_pid != os.getpid():
            self._fds_lock, self._lock_pid = threading.Lock(), os.getpid()
        return self._fds_lock

    def close(self):
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown()
        self._pool = None
        with self._lock():
            for fd in self._all_fds():
                os.close(fd)
            self._fds.clear()
            self._replaced.clear()

    def _fd(self, path: str) -> int:
        """This file's descriptor, opened again if the file at `path` was replaced since (a zarr shard
        written again is a new file renamed over the old one, which the old descriptor still reads)."""
        with self._lock():  # threads reading one split
            fd, inode = self._fds.get(path, (None, None))
            if fd is not None and not self._files_replaced:
                return fd
            try:
                now = os.stat(path).st_ino
            except OSError as error:
                raise DamagedShard(path, f"file missing or unreadable ({error.strerror or error})") from error
            if fd is None or inode != now:
                if fd is not None:  # closed with the rest: another thread may be reading through it now
                    self._replaced.append(fd)
                fd = os.open(path, os.O_RDONLY)
                self._fds[path] = fd, os.fstat(fd).st_ino
            return fd

    def _all_fds(self) -> list[int]:
        return [fd for fd, _ in self._fds.values()] + self._replaced

    def __del__(self):
        for fd in self._all_fds():
            os.close(fd)

    def read_into(self, indices: np.ndarray, out: np.ndarray):
        flat = out.reshape(len(indices), -1).view(np.uint8)
        paths, which, offsets = self.locate(indices)
        fds = {int(f): self._fd(paths[f]) for f in np.unique(which)}

        def read(rows):
            for row in rows:
                if offsets[row] < 0:
                    flat[row] = 0
                    continue
                got = os.preadv(fds[int(which[row])], [flat[row]], int(offsets[row]))
                if got != self.item_bytes:
                    raise StoreError(f"{paths[which[row]]}: short read at byte {offsets[row]} (file damaged?)")

        rows = np.lexsort((offsets, which))  # file by file, in offset order: helps readahead
        pool = self._reading_threads() if len(rows) >= 32 else None
        if pool is None:
            read(rows)
        else:
            list(pool.map(read, np.array_split(rows, self._threads)))
