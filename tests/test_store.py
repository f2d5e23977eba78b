"""The store: bit-exact round trips, resumable and concurrent writes, refusals, damage detection."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from tokens.cache import StoreError, StoreSpec, create_or_open, open_store
from tokens.cache.store import TokenStore, detect_format
from tokens.cache.verify import verify
from tokens.cli import app

N_TRAIN, N_TEST, T, F, D, P = 37, 10, 4, 2, 6, 1
CLASSES = ["a", "b", "c"]


def make_spec(**changes) -> StoreSpec:
    fields = dict(
        backbone="fake", backbone_config={"depth": 2}, checkpoint_sha256="0" * 64, frontend={"mel": 8},
        layers=[0, 1], final_norm=False, dtype="float16", grid=(T, F), dim=D, num_prefix=P,
        task="multilabel", classes=CLASSES, splits={"train": N_TRAIN, "test": N_TEST},
        dataset_fingerprint="f" * 64, masked=True, shard_size=8,
    )
    fields.update(changes)
    return StoreSpec(**fields)


def make_items(spec: StoreSpec, split: str, seed: int = 0) -> dict:
    """Deterministic content for every item of a split, as the writer would get it."""
    n = spec.splits[split]
    rng = np.random.default_rng(seed + len(split))
    storage = {"float16": np.float16, "float32": np.float32}
    def tokens(shape):
        x = rng.normal(size=shape).astype(np.float32)
        if spec.dtype == "bfloat16":
            return (x.view(np.uint32) >> 16).astype(np.uint16)
        return x.astype(storage[spec.dtype])
    labels = (rng.random((n, len(spec.classes))) < 0.4).astype(np.uint8) if spec.task == "multilabel" else rng.integers(0, len(spec.classes), n)
    return {
        "tokens": {layer: tokens((n, T * F, D)) for layer in spec.layers},
        "prefix": {layer: tokens((n, P, D)) for layer in spec.layers},
        "mask": rng.random((n, T * F)) < 0.9,
        "labels": labels,
        "ids": [f"{split}-{i}" for i in range(n)],
        "sources": [f"clips/{i}.wav" for i in range(n)],
        "offsets": rng.random(n) * 10,
        "durations": np.full(n, 10.0),
        "errors": ["" if i % 7 else "unreadable: test" for i in range(n)],
    }


def write_shards(store, split_name, items, shards):
    split = store.split(split_name)
    for shard in shards:
        a, b = split.shard_range(shard)
        split.write_shard(
            shard,
            tokens={k: v[a:b] for k, v in items["tokens"].items()},
            prefix={k: v[a:b] for k, v in items["prefix"].items()},
            mask=items["mask"][a:b], labels=items["labels"][a:b], ids=items["ids"][a:b],
            sources=items["sources"][a:b], offsets=items["offsets"][a:b], durations=items["durations"][a:b],
            errors=items["errors"][a:b],
        )


def fill(path, spec, fmt=None):
    with create_or_open(path, spec, fmt) as store:
        for split_name in spec.splits:
            write_shards(store, split_name, make_items(spec, split_name), range(store.split(split_name).num_shards))


def assert_same_content(path_a, path_b):
    with open_store(path_a) as a, open_store(path_b) as b:
        assert a.meta["cache_key"] == b.meta["cache_key"]
        for name, split in a.splits.items():
            other = b.split(name)
            everything = np.arange(split.num_items)
            for layer in split.layers:
                np.testing.assert_array_equal(split.read_tokens(layer, everything), other.read_tokens(layer, everything))
                np.testing.assert_array_equal(split.read_prefix(layer, everything), other.read_prefix(layer, everything))
            np.testing.assert_array_equal(split.read_mask(everything), other.read_mask(everything))
            for column in ("labels", "ids", "sources", "offsets", "durations", "errors"):
                np.testing.assert_array_equal(split.column(column), other.column(column))
            assert split.is_complete and other.is_complete


@pytest.mark.parametrize("fmt,suffix", [("zarr", ".zarr"), ("hdf5", ".h5")])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_is_bit_exact(tmp_path, fmt, suffix, dtype):
    spec = make_spec(dtype=dtype)
    path = tmp_path / f"s{suffix}"
    fill(path, spec, fmt)
    with open_store(path) as store:
        assert store.format == fmt
        for split_name in spec.splits:
            expected = make_items(spec, split_name)
            split = store.split(split_name)
            shuffled = np.random.default_rng(1).permutation(split.num_items)
            for layer in spec.layers:
                got = split.read_tokens(layer, shuffled)
                assert got.dtype == expected["tokens"][layer].dtype
                assert got.tobytes() == expected["tokens"][layer][shuffled].tobytes()
                assert split.read_prefix(layer, shuffled).tobytes() == expected["prefix"][layer][shuffled].tobytes()
            np.testing.assert_array_equal(split.read_mask(shuffled), expected["mask"][shuffled])
            np.testing.assert_array_equal(split.column("labels"), expected["labels"])
            assert list(split.column("ids")) == expected["ids"]
            assert list(split.column("errors")) == expected["errors"]
            np.testing.assert_array_equal(split.column("offsets"), expected["offsets"])
            assert split.is_complete
            assert split.load(1).tobytes() == expected["tokens"][1].tobytes()
            if fmt == "zarr":  # shards we write ourselves read back through zarr's own codec pipeline
                group = zarr.open_group(path, mode="r")
                assert group[f"{split_name}/tokens/0"][:].tobytes() == expected["tokens"][0].tobytes()
                assert group[f"{split_name}/prefix/1"][:].tobytes() == expected["prefix"][1].tobytes()


def test_shard_files_are_byte_for_byte_what_zarr_writes(tmp_path):
    """The writer lays out uncompressed shard and chunk files itself (no trip through zarr's event
    loop): every file must be exactly what zarr's own encoders write for the same values, the
    last, partial shard padded, non-ASCII strings included."""
    spec = make_spec()
    items = make_items(spec, "train")
    items["ids"][-1] = "ünïcode-ид"
    ours, zarrs = tmp_path / "ours.zarr", tmp_path / "zarr.zarr"
    with create_or_open(ours, spec) as store:
        write_shards(store, "train", items, range(store.split("train").num_shards))
    create_or_open(zarrs, spec).close()
    group = zarr.open_group(zarrs / "train", mode="r+")
    for layer in spec.layers:
        group[f"tokens/{layer}"][:] = items["tokens"][layer]
        group[f"prefix/{layer}"][:] = items["prefix"][layer]
    for name in ("mask", "labels", "offsets", "durations"):
        group[name][:] = items[name]
    for name in ("ids", "sources", "errors"):
        group[name][:] = np.array(items[name], dtype=object)
    group["complete"][:] = 1
    files = sorted(p.relative_to(ours) for p in (ours / "train").rglob("*") if p.is_file() and p.name != "zarr.json")
    assert len(files) == (2 * 2 + 7 + 1) * 5  # tokens and prefix of 2 layers, 7 columns, complete: 5 shards each
    for file in files:
        assert (ours / file).read_bytes() == (zarrs / file).read_bytes(), file


def _page_aligned(array: np.ndarray) -> np.ndarray:
    raw = np.empty(array.nbytes + 4096, np.uint8)
    start = -raw.ctypes.data % 4096
    aligned = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    aligned[...] = array
    return aligned


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")
@pytest.mark.parametrize("case", ["aligned", "unaligned memory", "filesystem refuses", "filesystem refuses halfway", "network filesystem"])
def test_large_token_shards_go_around_the_page_cache_and_read_back_exactly(tmp_path, monkeypatch, case):
    """Shard files of a MiB or more from page-aligned memory are written with O_DIRECT on a local
    disk's filesystem; unaligned memory, small files, a filesystem that refuses direct writes (at
    once, or halfway through a file) and a network filesystem get buffered writes of the whole
    file. Every way, the store reads back exactly what was written."""
    import fcntl

    from tokens.cache import zarr_backend

    monkeypatch.setattr(zarr_backend, "filesystem_type", lambda path: "nfs4" if case == "network filesystem" else "ext4")

    if case in ("aligned", "network filesystem"):  # the second shows nothing where nothing could go direct
        probe = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
        try:
            os.write(probe, _page_aligned(np.ones(4096, np.uint8)))
        except OSError:
            pytest.skip("this filesystem takes no direct writes")
        finally:
            os.close(probe)
    if case == "filesystem refuses":  # as some FUSE filesystems and older tmpfs do, when the flag is set
        set_flags = fcntl.fcntl

        def refusing(fd, command, *args):
            if command == fcntl.F_SETFL and args[0] & os.O_DIRECT:
                raise OSError(22, "Invalid argument")
            return set_flags(fd, command, *args)

        monkeypatch.setattr(zarr_backend.fcntl, "fcntl", refusing)
    spec = make_spec(grid=(16, 8), dim=512, num_prefix=0, layers=[0], splits={"train": 13}, shard_size=8)
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(13, 128, 512)).astype(np.float16)  # 128 KiB an item: a 1 MiB shard, then 5 items
    stored = _page_aligned(tokens) if case != "unaligned memory" else np.frombuffer(
        np.empty(tokens.nbytes + 64, np.uint8)[32:32 + tokens.nbytes], np.float16).reshape(tokens.shape)
    stored[...] = tokens
    writes = []  # (bytes, written directly)
    write_all = zarr_backend._write_all

    def watched(fd, data):
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        if direct and case == "filesystem refuses halfway":
            os.write(fd, data[:4096])  # a first page lands, then the filesystem says no
            raise OSError(22, "Invalid argument")
        writes.append((len(data), direct))
        write_all(fd, data)

    monkeypatch.setattr(zarr_backend, "_write_all", watched)
    path = tmp_path / "s.zarr"
    items = {"labels": np.zeros((13, 3), np.uint8), "mask": np.ones((13, 128), bool), "ids": [str(i) for i in range(13)]}
    with create_or_open(path, spec) as store:
        split = store.split("train")
        for shard in range(2):
            a, b = split.shard_range(shard)
            split.write_shard(shard, tokens={0: stored[a:b]}, labels=items["labels"][a:b], mask=items["mask"][a:b],
                              ids=items["ids"][a:b], sources=items["ids"][a:b], offsets=np.zeros(b - a), durations=np.zeros(b - a))
    direct = [size for size, was_direct in writes if was_direct]
    assert direct == ([8 * 128 * 512 * 2] if case == "aligned" else [])  # the full shard's body only
    with open_store(path) as store:
        assert store.split("train").read_tokens(0, np.arange(13)).tobytes() == tokens.tobytes()
    assert zarr.open_group(path / "train", mode="r")["tokens/0"][:].tobytes() == tokens.tobytes()


def test_creating_a_store_leaves_the_interpreters_switch_interval_as_it_was(tmp_path, monkeypatch):
    """Creation shortens the GIL switch interval while zarr makes the arrays; failed or not, the
    process gets its own interval back."""
    import tokens.cache.zarr_backend as zarr_backend

    before = sys.getswitchinterval()
    seen = []
    build = zarr_backend._build
    monkeypatch.setattr(zarr_backend, "_build", lambda *args: (seen.append(sys.getswitchinterval()), build(*args)))
    create_or_open(tmp_path / "a.zarr", make_spec()).close()
    assert seen[0] < before and sys.getswitchinterval() == before

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zarr_backend, "_build", full_disk)
    with pytest.raises(StoreError, match="No space left"):
        create_or_open(tmp_path / "b.zarr", make_spec())
    assert sys.getswitchinterval() == before and not (tmp_path / "b.zarr").exists()


def dead_pid() -> int:
    """The process id of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.mark.parametrize("fmt, name", [("zarr", "s.zarr"), ("hdf5", "s.h5")])
def test_what_killed_store_builders_left_is_cleared_by_the_next_creation(tmp_path, fmt, name):
    """A store is built aside and renamed into place; a builder killed before the rename (SIGKILL,
    a lost node) leaves its hidden build behind. Creating the store again deletes the builds of
    gone writers for that path, and nothing else: not a live builder's, not another store's."""
    from tokens.cache import store as store_module

    old = time.time() - store_module.STALE_SECONDS - 60
    gone = [f".{name}.{store_module.HOST}-{dead_pid()}.{'a' * 32}.tmp",
            f".{name}.elsewhere-7.{'b' * 32}.tmp",  # another host's, silent for longer than STALE_SECONDS
            f".{name}.{'c' * 32}.tmp"]  # named before builders were: a host that cannot be told
    kept = [f".{name}.{store_module.writer()}.{'d' * 32}.tmp",  # this process: still building
            f".{name}.elsewhere-8.{'e' * 32}.tmp",  # another host's, recent
            f".{name}.x.{store_module.HOST}-{dead_pid()}.{'f' * 32}.tmp",  # the store s.zarr.x's
            f".{name}.notes.tmp"]
    for number, entry in enumerate(gone + kept):
        (tmp_path / entry).mkdir() if number % 2 else (tmp_path / entry).write_bytes(b"torn")
        if entry in gone[1:] or "notes" in entry or "x." in entry:
            os.utime(tmp_path / entry, (old, old))
    with create_or_open(tmp_path / name, make_spec(), fmt) as store:
        assert store.split("train").complete_mask().tolist() == [False] * 5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [name])
    # a task of the job array killed while another made the store: its build is cleared by the next opening
    late = f".{name}.{store_module.HOST}-{dead_pid()}.{'9' * 32}.tmp"
    (tmp_path / late).mkdir()
    create_or_open(tmp_path / name, make_spec(), fmt).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [name])


def test_an_hdf5_store_whose_writer_was_killed_amid_its_strings_resumes(tmp_path):
    """SIGKILL can land after HDF5 wrote a shard's string rows and before it flushed the string heap
    they point into: the rows then point at records that never reached the disk, and reading or
    overwriting them failed at every resume. The resume makes such a column again from its complete
    shards, and the store ends as an uninterrupted one."""
    spec, path = make_spec(), tmp_path / "s.h5"
    items = make_items(spec, "train")
    with create_or_open(path, spec, "hdf5") as store:
        write_shards(store, "train", items, [0, 1, 2])
        write_shards(store, "test", make_items(spec, "test"), range(store.split("test").num_shards))
        store.split("train").mark_incomplete(1)  # killed before its flag
        row = store.split("train").shard_range(1)[0] + 3
    dangle_a_string(path, "train/ids", row, N_TRAIN)
    with h5py.File(path, "r") as f, pytest.raises(OSError, match="bad heap index"):
        f["train/ids"][row]
    for _ in range(2):  # the first resume remakes the column; the second finds nothing to do
        with create_or_open(path, spec, "hdf5") as store:
            split = store.split("train")
            todo = split.missing_shards()
            split.discard_partial_writes(todo)
            write_shards(store, "train", items, todo)
    with open_store(path) as store:
        assert store.split("train").column("ids").tolist() == items["ids"]
        assert store.split("train").column("errors").tolist() == items["errors"]
        assert verify(store, progress=False).ok
    with h5py.File(path, "r") as f:
        assert sorted(f["train"]) == sorted(set(f["test"]))  # no copy left beside the column


def dangle_a_string(path, column: str, row: int, rows: int):
    """Point one row of an HDF5 string column at a heap record that was never written, as a writer
    killed between the rows and the string heap's flush leaves it."""
    import struct

    with h5py.File(path, "r") as f:
        offset, width = f[column].id.get_offset(), f[column].id.get_storage_size() // rows
    fd = os.open(path, os.O_RDWR)
    try:  # a row's heap id: length, the heap collection's address, the record's index there
        length, collection, index = struct.unpack("<IQI", os.pread(fd, 16, offset + row * width))
        os.pwrite(fd, struct.pack("<IQI", length, collection, index + 1000), offset + row * width)
    finally:
        os.close(fd)


def test_an_hdf5_string_column_remade_and_killed_midway_leaves_the_store_whole(tmp_path):
    """Remaking a column changes the split's group in HDF5's cache; a kill while the long copy
    pushed part of those changes to the disk damaged the group, and every shard with it, before each
    change was flushed in turn. Killed at its 60th write, the next resume remakes it and finishes."""
    spec, path = make_spec(splits={"train": 40_000, "test": 10}, shard_size=400), tmp_path / "s.h5"
    with create_or_open(path, spec, "hdf5") as store:
        write_shards(store, "train", make_items(spec, "train"), range(store.split("train").num_shards))
        write_shards(store, "test", make_items(spec, "test"), [0])
        store.split("train").mark_incomplete(1)
    dangle_a_string(path, "train/ids", 403, 40_000)
    child = textwrap.dedent(f"""
        import os, signal, h5py
        from tokens.cache.store import TokenStore
        written, real = [0], h5py.Dataset.__setitem__
        def counted(self, key, value):
            if self.name.endswith(".remade"):
                written[0] += 1
                if written[0] == 60:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(self, key, value)
        h5py.Dataset.__setitem__ = counted
        store = TokenStore({str(path)!r}, fmt="hdf5", mode="a")
        split = store.split("train")
        split.discard_partial_writes(split.missing_shards())
    """)
    killed = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    items = make_items(spec, "train")
    with create_or_open(path, spec, "hdf5") as store:
        split = store.split("train")
        split.discard_partial_writes(split.missing_shards())
        write_shards(store, "train", items, split.missing_shards())
    with open_store(path) as store:
        assert store.split("train").column("ids").tolist() == items["ids"] and verify(store, progress=False).ok


def test_a_string_column_remade_but_not_yet_renamed_is_read_and_renamed(tmp_path):
    """A kill between the removal of the old column and the rename of its copy: readers (info,
    verify, probe) read the copy, and the next writer puts it in place."""
    spec, path = make_spec(), tmp_path / "s.h5"
    fill(path, spec, "hdf5")
    with h5py.File(path, "r+") as f:
        f.copy(f["train/ids"], f["train"], name="ids.remade")
        del f["train/ids"]
    with open_store(path) as store:
        assert store.split("train").column("ids").tolist() == make_items(spec, "train")["ids"]
        assert verify(store, progress=False).ok
    with create_or_open(path, spec, "hdf5") as store:
        assert store.split("train").column("ids").tolist() == make_items(spec, "train")["ids"]
    with h5py.File(path, "r") as f:
        assert "ids" in f["train"] and "ids.remade" not in f["train"]


def test_a_store_taken_by_another_task_meanwhile_is_compared_again_in_full(tmp_path):
    """A task's view of the store may be older than the store (another task took the dataset since):
    it goes on when the store as it is now matches it in every field, not in its fingerprint alone."""
    spec, path = make_spec(), tmp_path / "s.zarr"
    fill(path, spec)
    taken = dataclasses.replace(spec, dataset_fingerprint="e" * 64)
    with TokenStore(path, mode="a") as slow:
        edit_meta(path, "zarr", lambda meta: meta.update(dataset_fingerprint="e" * 64,  # the other task's record
                                                          key_fields=meta["key_fields"] | {"dataset_fingerprint": "e" * 64}))
        slow.check_compatible(taken)
        assert slow.meta["dataset_fingerprint"] == "e" * 64
    with TokenStore(path, mode="a") as slow:
        edit_meta(path, "zarr", lambda meta: meta.update(dataset_fingerprint="d" * 64, dim=D + 1))  # a store of other tokens now
        with pytest.raises(StoreError, match="another configuration"):
            slow.check_compatible(dataclasses.replace(spec, dataset_fingerprint="d" * 64))


def test_half_written_files_of_gone_writers_are_discarded_whatever_their_shard(tmp_path):
    """A resumed writer clears what killed writers left, of any shard or split: a task resubmitted
    while the old one still ran wrote the shard itself, and the old one's file, killed later, would
    otherwise stay for good. What a writer still running writes is kept (this host's by its pid,
    another host's, or another pid namespace's of this host, while it changed within STALE_SECONDS)."""
    from tokens.cache import store as store_module

    me, gone = store_module.writer(), f"{store_module.HOST}-{dead_pid()}"
    path = tmp_path / "s.zarr"
    with create_or_open(path, make_spec()) as store:
        write_shards(store, "train", make_items(make_spec(), "train"), [0])
        partial = path / ".partial"
        doomed = [f"1.train.tokens.0.{gone}.a1.tmp", "1.train.labels.elsewhere-7.b2.tmp", f"0.train.mask.{gone}.e5.tmp",
                  f"1.test.ids.{gone}.f6.tmp"]
        other_namespace = f"{store_module.HOST.rpartition('_ns')[0]}_ns1-{dead_pid()}"  # a container sharing the host's name
        kept = [f"1.train.mask.{me}.c3.tmp", "1.train.ids.elsewhere-8.d4.tmp", f"2.train.ids.{other_namespace}.a7.tmp", "notes"]
        for name in doomed + kept:
            (partial / name).write_bytes(b"torn")
        old = time.time() - store_module.STALE_SECONDS - 60
        os.utime(partial / doomed[1], (old, old))  # another host's writer, silent for longer than STALE_SECONDS
        store.split("train").discard_partial_writes([1])
        assert sorted(p.name for p in partial.iterdir()) == sorted(kept)
        assert store.split("train").complete_mask().tolist() == [True, False, False, False, False]


@pytest.mark.parametrize("skew", [-3600, 3600])
def test_another_hosts_writer_is_judged_by_the_file_systems_clock_not_this_hosts(tmp_path, monkeypatch, skew):
    """On a network file system a file's mtime is the server's time: a host whose clock runs an hour
    ahead must not take a live writer's fresh file for a gone one's (and delete it under it), nor
    one an hour behind keep a gone writer's file for good."""
    from tokens.cache import store as store_module

    path = tmp_path / "s.zarr"
    with create_or_open(path, make_spec()) as store:
        partial = path / ".partial"
        live, gone = "1.train.ids.elsewhere-8.d4.tmp", "1.train.labels.elsewhere-7.b2.tmp"
        for name in (live, gone):
            (partial / name).write_bytes(b"torn")
        old = time.time() - store_module.STALE_SECONDS - 60
        os.utime(partial / gone, (old, old))
        real_time = time.time
        monkeypatch.setattr(store_module.time, "time", lambda: real_time() + skew)
        store.split("train").discard_partial_writes([1])
        assert sorted(p.name for p in partial.iterdir()) == [live]


def test_multiclass_labels_and_compressed_store_round_trip(tmp_path):
    for fmt, suffix, codec in [("zarr", ".zarr", "zstd"), ("hdf5", ".h5", "gzip")]:
        spec = make_spec(task="multiclass", codec=codec, num_prefix=0, masked=False)
        path = tmp_path / f"c{suffix}"
        with create_or_open(path, spec, fmt) as store:
            items = make_items(spec, "train")
            split = store.split("train")
            for shard in range(split.num_shards):
                a, b = split.shard_range(shard)
                split.write_shard(shard, tokens={k: v[a:b] for k, v in items["tokens"].items()}, labels=items["labels"][a:b],
                                  ids=items["ids"][a:b], sources=items["sources"][a:b], offsets=items["offsets"][a:b],
                                  durations=items["durations"][a:b])
        with open_store(path) as store:
            split = store.split("train")
            idx = np.array([5, 0, 36, 17, 5])
            assert split.read_tokens(0, idx).tobytes() == items["tokens"][0][idx].tobytes()
            assert split.column("labels").dtype == np.int64
            np.testing.assert_array_equal(split.column("labels"), items["labels"])
            assert split.read_mask(idx) is None and split.read_prefix(0, idx) is None


def test_wrong_cache_key_is_refused_naming_the_field(tmp_path):
    path = tmp_path / "s.zarr"
    create_or_open(path, make_spec()).close()
    with pytest.raises(StoreError, match="checkpoint_sha256"):
        create_or_open(path, make_spec(checkpoint_sha256="1" * 64))
    with pytest.raises(StoreError, match="layers"):
        create_or_open(path, make_spec(layers=[1]))
    with pytest.raises(StoreError, match="dtype"):
        create_or_open(path, make_spec(dtype="float32"))
    create_or_open(path, make_spec()).close()  # the same config opens again


WRITER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    from test_store import make_spec, make_items, write_shards
    from tokens.cache import create_or_open
    path, shards, die_in = sys.argv[1], [int(s) for s in sys.argv[2].split(',')], int(sys.argv[3])
    spec = make_spec()
    store = create_or_open(path, spec)
    if die_in >= 0:  # die after writing part of shard `die_in`, before it is marked complete
        split = store.split('train')
        original = split._h.write_shard
        def dying(split_name, shard, start, arrays):
            if shard == die_in:
                for name, data in list(arrays.items())[:2]:
                    split._h.array(split_name, name)[start:start + len(data)] = data
                os.kill(os.getpid(), signal.SIGKILL)
            original(split_name, shard, start, arrays)
        split._h.write_shard = dying
    items = make_items(spec, 'train')
    done = set(np.flatnonzero(store.split('train').complete_mask()))
    write_shards(store, 'train', items, [s for s in shards if s not in done])
""")


def run_writer(tmp_path, store_path, shards, die_in=-1):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=os.path.dirname(__file__)))
    return subprocess.Popen([sys.executable, str(script), str(store_path), ",".join(map(str, shards)), str(die_in)])


def test_killed_writer_resumes_to_the_same_store(tmp_path):
    reference = tmp_path / "reference.zarr"
    spec = make_spec(splits={"train": N_TRAIN})
    fill(reference, spec)
    path = tmp_path / "resumed.zarr"
    all_shards = list(range(5))
    assert run_writer(tmp_path, path, all_shards, die_in=2).wait() == -signal.SIGKILL
    with open_store(path) as store:
        assert store.split("train").missing_shards() == [2, 3, 4]
        assert not verify(store, progress=False).ok
    assert run_writer(tmp_path, path, all_shards).wait() == 0
    assert_same_content(reference, path)


def test_two_processes_on_disjoint_shards_equal_one(tmp_path):
    reference = tmp_path / "reference.zarr"
    fill(reference, make_spec(splits={"train": N_TRAIN}))
    path = tmp_path / "parallel.zarr"
    writers = [run_writer(tmp_path, path, [0, 2, 4]), run_writer(tmp_path, path, [1, 3])]
    assert [w.wait() for w in writers] == [0, 0]
    assert_same_content(reference, path)


def test_verify_names_truncated_and_deleted_chunks(tmp_path):
    path = tmp_path / "s.zarr"
    fill(path, make_spec())
    with open_store(path) as store:
        assert verify(store, progress=False).ok
        truncated = store.split("train")._h.chunk_file("train", "tokens/0", 1)
        deleted = store.split("test")._h.chunk_file("test", "tokens/1", 0)
        short = store.split("train")._h.chunk_file("train", "tokens/0", 2)
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    with open(short, "r+b") as f:  # shorter than the index at its end: once a bare "[Errno 22] Invalid argument"
        f.truncate(10)
    os.remove(deleted)
    result = CliRunner().invoke(app, ["verify", str(path), "--quiet"])
    assert result.exit_code == 1 and "verify train" not in result.output  # no progress bar
    assert f"{deleted}: file missing" in result.output and f"{truncated}: shard index does not match" in result.output
    assert f"{short}: shard file truncated (10 bytes, shorter than its index of 132)" in result.output, result.output
    assert result.output.count(str(deleted)) == result.output.count(str(truncated)) == 1  # each named once
    assert "run `tokens verify`" not in result.output  # the advice it gives elsewhere, not to its own user
    with open_store(path) as store:  # undamaged shards stay readable
        assert store.split("train").read_tokens(0, np.arange(8)).shape == (8, T * F, D)


def test_a_complete_shards_missing_column_file_is_reported_and_never_read_as_zeros(tmp_path):
    """zarr reads a missing file as the fill value: zero labels and offsets, no errors, an empty
    mask, all of which a writer may store. verify names every such file, and reading the column
    (as training does) refuses instead of handing those values on."""
    path = tmp_path / "s.zarr"
    fill(path, make_spec())
    with open_store(path) as store:
        h = store.split("train")._h
        deleted = {(split, name): h.chunk_file(split, name, shard)
                   for split, name, shard in [("train", "labels", 2), ("train", "errors", 2), ("test", "offsets", 0),
                                              ("train", "mask", 1)]}
    for file in deleted.values():
        os.remove(file)
    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code == 1
    assert result.output.count("file missing") == len(deleted)
    for file in deleted.values():
        assert f"{file}: file missing" in result.output
    with open_store(path) as store:
        train = store.split("train")
        for split, name in deleted:
            if name != "mask":
                with pytest.raises(StoreError, match=re.escape(f"{deleted[split, name]}: file missing") + ".*run `tokens verify`"):
                    store.split(split).column(name)
        with pytest.raises(StoreError, match=re.escape(str(deleted["train", "mask"]))):
            train.read_mask([3, 9])
        assert train.read_mask([3, 17]).shape == (2, T * F)  # other shards' masks still read
        assert list(train.column("ids")) == make_items(make_spec(), "train")["ids"]


@pytest.mark.parametrize("where, text", [("zarr.json", "{"), ("zarr.json", "[]"), ("train/tokens/1/zarr.json", "{"),
                                         ("train/tokens/1/zarr.json", '{"zarr_format": 3, "node_type": "array"}')])
def test_damaged_zarr_metadata_is_named_not_a_traceback(tmp_path, where, text):
    path = tmp_path / "s.zarr"
    fill(path, make_spec())
    (path / where).write_text(text)
    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code == 1 and f"{path / where}: damaged metadata" in result.output, result.output
    assert not isinstance(result.exception, ValueError)
    with pytest.raises(StoreError, match=re.escape(f"{path / where}: damaged metadata")):
        with open_store(path) as store:
            store.split("train").read_tokens(1, [0])


def edit_meta(path, fmt: str, change):
    """Apply `change` to the store's metadata dict in place, as a hand edit would."""
    if fmt == "zarr":
        record = json.loads((path / "zarr.json").read_text())
        change(record["attributes"])
        (path / "zarr.json").write_text(json.dumps(record))
    else:
        with h5py.File(path, "r+") as f:
            meta = json.loads(f.attrs["meta"])
            change(meta)
            f.attrs["meta"] = json.dumps(meta)


@pytest.mark.parametrize("fmt, suffix", [("zarr", ".zarr"), ("hdf5", ".h5")])
@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("shard_size"), "has no 'shard_size'"),
    (lambda m: m.update(splits=["train", "test"]), "gives 'splits' as ['train', 'test'], not a mapping"),
    (lambda m: m.update(dim=True), "gives 'dim' as True, not a whole number"),
    (lambda m: m.update(dtype="int8"), "'dtype' 'int8' is none of float16, bfloat16, float32"),
    (lambda m: m.pop("dataset_fingerprint"), "has no 'dataset_fingerprint'"),  # resuming reads it
])
def test_store_metadata_edited_by_hand_is_named_at_opening(tmp_path, fmt, suffix, change, message):
    """A missing or mistyped field was a KeyError or AttributeError wherever it was first read."""
    path = tmp_path / f"s{suffix}"
    fill(path, make_spec(), fmt)
    edit_meta(path, fmt, change)
    where = path / "zarr.json" if fmt == "zarr" else f"{path} (its 'meta' attribute)"
    with pytest.raises(StoreError, match=re.escape(f"{where}: the store's metadata {message}")):
        open_store(path)
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code != 0 and message in " ".join(result.output.split()), result.output


@pytest.mark.parametrize("fmt, suffix", [("zarr", ".zarr"), ("hdf5", ".h5")])
def test_metadata_that_disagrees_with_the_arrays_is_refused_before_a_read(tmp_path, fmt, suffix):
    """Other classes or task than the labels hold, or another dtype than the tokens', would train on
    the wrong targets or read float16 bits as bfloat16 without a sign."""
    path = tmp_path / f"s{suffix}"
    fill(path, make_spec(), fmt)
    edit_meta(path, fmt, lambda m: m.pop("key_fields"))  # as a store of an early version, which kept no record of them
    edit_meta(path, fmt, lambda m: m.update(classes=["a", "b"]))
    with open_store(path) as store:
        assert "train/labels: shape (37, 3) uint8, expected (37, 2) uint8 (multilabel over 2 classes)" in verify(store, progress=False).problems
    with open_store(path) as store, pytest.raises(StoreError, match="train's labels hold 3 classes an item, the store's "
                                                                     "metadata says multilabel over 2 classes"):
        store.split("train").column("labels")
    edit_meta(path, fmt, lambda m: m.update(classes=CLASSES, task="multiclass"))
    with open_store(path) as store, pytest.raises(StoreError, match="says multiclass over 3 classes"):
        store.split("train").column("labels", [0, 1])
    edit_meta(path, fmt, lambda m: m.update(task="multilabel", dtype="bfloat16"))
    with open_store(path) as store, pytest.raises(StoreError, match=r"train/tokens/1 holds \(37, 8, 6\) float16, the store's "
                                                                     r"metadata says \(37, 8, 6\) uint16"):
        store.split("train").read_tokens(1, [0])


def test_an_emptied_completion_flag_is_named(tmp_path):
    path = tmp_path / "s.zarr"
    fill(path, make_spec())
    with open_store(path) as store:
        flag = store.split("train")._h.chunk_file("train", "complete", 3)
    flag.write_bytes(b"")
    with pytest.raises(StoreError, match=re.escape(str(flag))):
        with open_store(path) as store:
            store.split("train").complete_mask()


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_labels_no_writer_stores_are_named_by_verify_and_refused_by_training(tmp_path, task):
    path = tmp_path / "s.zarr"
    fill(path, make_spec(task=task))
    with open_store(path) as store:
        labels = store.split("train")._h.chunk_file("train", "labels", 1)
    data = bytearray(labels.read_bytes())
    data[:8] = (254).to_bytes(8, "little")  # the first item: 254 as a multi-hot value or as a class index
    labels.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code == 1 and f"{labels}: 1 items hold labels other than" in result.output, result.output
    with open_store(path) as store:
        with pytest.raises(StoreError, match="train item 8 has labels outside .*run `tokens verify`"):
            store.split("train").column("labels")
        with pytest.raises(StoreError, match="train item 8 has labels outside"):  # read at indices, the item's own index
            store.split("train").column("labels", [9, 8])
        assert len(store.split("train").column("labels", [0, 9])) == 2  # other items of the shard still read


def test_a_shard_index_that_fails_its_checksum_is_named_and_not_read(tmp_path):
    """The trailing entries of a last, short shard's index are unused: damage there changes no
    offset we read, but zarr refuses the file, so verify and our reader refuse it too."""
    path = tmp_path / "s.zarr"
    fill(path, make_spec())
    with open_store(path) as store:
        shard = store.split("test")._h.chunk_file("test", "tokens/0", 1)  # items 8-9 of a shard of 8
    data = bytearray(shard.read_bytes())
    data[-12:-4] = bytes(8)  # within the last (unused) index entry
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code == 1 and f"{shard}: shard index checksum does not match" in result.output, result.output
    with open_store(path) as store, pytest.raises(StoreError, match="checksum does not match"):
        store.split("test").read_tokens(0, [8])


def test_item_indices_must_be_a_list_and_in_range(tmp_path):
    path = tmp_path / "s.zarr"
    fill(path, make_spec())
    with open_store(path) as store:
        train = store.split("train")
        assert train.read_tokens(0, [3]).shape == (1, T * F, D)
        with pytest.raises(TypeError, match=r"as a list, a 1-D array or a slice \(e\.g\. \[3\] for item 3\)"):
            train.read_tokens(0, 3)
        with pytest.raises(IndexError, match="out of range 0..36"):
            train.read_mask([37])


@pytest.mark.parametrize("fmt,suffix", [("zarr", ".zarr"), ("hdf5", ".h5")])
def test_items_are_read_by_slice_or_boolean_selection_and_layers_by_numpy_integers(tmp_path, fmt, suffix):
    """A boolean selection is a selection, never the indices 0 and 1; a fraction is not an index."""
    spec = make_spec()
    fill(tmp_path / f"s{suffix}", spec, fmt)
    items = make_items(spec, "train")
    with open_store(tmp_path / f"s{suffix}") as store:
        train = store.split("train")
        chosen = items["labels"][:, 0] == 1
        np.testing.assert_array_equal(train.read_tokens(1, chosen), items["tokens"][1][chosen])
        np.testing.assert_array_equal(train.read_mask(chosen), items["mask"][chosen])
        np.testing.assert_array_equal(train.read_tokens(np.int64(-1), slice(30, None, 2)), items["tokens"][1][30::2])
        with pytest.raises(IndexError, match="one value per item"):
            train.read_tokens(0, [True, False])
        with pytest.raises(TypeError, match="item indices must be integers, not float64"):
            train.read_tokens(0, [1.7])
        with pytest.raises(StoreError, match="layer True is not cached"):
            train.read_tokens(True, [0])


@pytest.mark.parametrize("fmt,suffix", [("zarr", ".zarr"), ("hdf5", ".h5")])
def test_items_of_unwritten_shards_and_reads_of_a_closed_store_are_refused(tmp_path, fmt, suffix):
    """Unwritten shards read as zeros (HDF5) or as missing files (zarr): neither is what the items hold."""
    spec = make_spec()
    path = tmp_path / f"s{suffix}"
    items = make_items(spec, "train")
    with create_or_open(path, spec, fmt) as store:
        write_shards(store, "train", items, [0, 2])
    with open_store(path) as store:
        train = store.split("train")
        np.testing.assert_array_equal(train.read_tokens(0, [1, 17]), items["tokens"][0][[1, 17]])
        for read in (lambda: train.read_tokens(0, [2, 9, 10]), lambda: train.read_mask([8]), lambda: train.read_prefix(1, [12])):
            with pytest.raises(StoreError, match=r"train items \[(9, 10|8|12)\] are in shards not written yet \(shard 1; 2 of 5 complete\)"):
                read()
        with pytest.raises(StoreError, match=r"items \[9, 25, 26\] ... are in shards not written yet \(shards 1, 3-4; 2 of 5"):
            train.read_tokens(0, [9, 25, 26, 33])
        assert train.read_tokens(0, np.flatnonzero(train.complete_items())).shape[0] == 16
    with pytest.raises(StoreError, match="is closed"):
        train.read_tokens(0, [1])


def test_verify_catches_nan_and_a_truncated_hdf5_file(tmp_path):
    """And advises what fits the store's dtype: float16 overflows, bfloat16's NaN are the model's own."""
    for dtype, cure in (("bfloat16", "try --precision fp32"), ("float16", "store --dtype bfloat16 or float32")):
        spec = make_spec(dtype=dtype)
        path = tmp_path / f"{dtype}.h5"
        with create_or_open(path, spec) as store:
            items = make_items(spec, "train")
            items["tokens"][0][9, 3, 2] = 0x7FC0 if dtype == "bfloat16" else np.nan  # bfloat16's NaN bits
            write_shards(store, "train", items, range(store.split("train").num_shards))
        result = CliRunner().invoke(app, ["verify", str(path)])
        assert result.exit_code == 1 and "items 8-15" in result.output and "NaN" in result.output
        assert cure in " ".join(result.output.split()), result.output
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code == 1


def test_info_json_reports_splits_and_completeness(tmp_path):
    path = tmp_path / "s.zarr"
    spec = make_spec()
    with create_or_open(path, spec) as store:
        write_shards(store, "train", make_items(spec, "train"), [0, 1])
    result = CliRunner().invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["backbone"] == "fake" and info["dim"] == D and info["grid"] == [T, F]
    assert info["layers"] == [0, 1] and info["task"] == "multilabel" and info["classes"] == CLASSES
    assert info["splits"]["train"] == {"items": N_TRAIN, "complete": False, "shards": 5, "shards_complete": 2, "failed_items": 3}
    assert info["splits"]["test"]["complete"] is False
    text = CliRunner().invoke(app, ["info", str(path)]).output
    assert "INCOMPLETE (2/5 shards)" in text and "compressed" not in text
    compressed = tmp_path / "c.zarr"
    create_or_open(compressed, make_spec(codec="zstd")).close()
    assert ", compressed with zstd" in CliRunner().invoke(app, ["info", str(compressed)]).output


@pytest.mark.parametrize("fmt, suffix", [("zarr", ".zarr"), ("hdf5", ".h5")])
def test_info_shows_a_store_whose_record_of_its_making_was_edited_away(tmp_path, fmt, suffix):
    """The codec, creation time, tool version and checkpoint hash are told, not needed: a KeyError
    traceback in tokens info was all a store that lost one got."""
    path = tmp_path / f"s{suffix}"
    fill(path, make_spec(), fmt)
    edit_meta(path, fmt, lambda m: [m.pop(name) for name in ("codec", "created", "tool_version")])
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "created    at an unrecorded time by tokens (version unrecorded)" in result.output and "compressed" not in result.output
    assert json.loads(CliRunner().invoke(app, ["info", str(path), "--json"]).output)["codec"] is None


@pytest.mark.parametrize("fmt, suffix", [("zarr", ".zarr"), ("hdf5", ".h5")])
def test_a_key_field_edited_by_hand_is_refused_at_opening(tmp_path, fmt, suffix):
    """Classes put in another order passed verify, and a probe reported each class's figures under
    another's name: the store's record of what made its tokens and labels tells."""
    path = tmp_path / f"s{suffix}"
    fill(path, make_spec(), fmt)
    edit_meta(path, fmt, lambda m: m.update(classes=CLASSES[::-1]))
    with pytest.raises(StoreError, match=re.escape(f"""gives 'classes' as ["c", "b", "a"], but its tokens and labels were made with """
                                                   f"""["a", "b", "c"] (its record 'key_fields')""")):
        open_store(path)
    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code != 0 and "gives 'classes' as" in " ".join(result.output.split()), result.output
    edit_meta(path, fmt, lambda m: m.update(classes=CLASSES) or m.pop("checkpoint_sha256"))  # a key field edited away
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code != 0 and "gives 'checkpoint_sha256' as null, but its tokens and labels were made with" in " ".join(result.output.split())


def test_an_hdf5_store_damaged_where_it_keeps_its_metadata_is_named(tmp_path):
    """libhdf5's 'bad global heap collection signature', alone, named no file and said nothing to do."""
    path = tmp_path / "s.h5"
    fill(path, make_spec(), "hdf5")
    data = bytearray(path.read_bytes())
    heap = data.find(b"GCOL")  # the global heap that holds the metadata's string
    data[heap:heap + 4] = b"\0" * 4
    path.write_bytes(bytes(data))
    for command in ("info", "verify"):
        result = CliRunner().invoke(app, [command, str(path)])
        assert result.exit_code != 0 and f"{path}: its metadata cannot be read (" in result.output, result.output
        assert "extract the store again, or restore it from a copy" in " ".join(result.output.split())


def test_a_store_named_in_capitals_is_of_the_format_its_suffix_says(tmp_path):
    """out.H5 made a zarr directory, while extraction's --format check took it for HDF5."""
    assert detect_format(tmp_path / "out.H5") == "hdf5" and detect_format(tmp_path / "out.HDF5") == "hdf5"
    assert detect_format(tmp_path / "out.Zarr") == "zarr"
    create_or_open(tmp_path / "made.H5", make_spec()).close()
    assert (tmp_path / "made.H5").is_file() and h5py.is_hdf5(tmp_path / "made.H5")


SIZE_LIMITED_WRITER = """
import os, resource, signal, sys
import numpy as np
from tokens.cache import open_store
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = sys.argv[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 10 * 2**20, resource.RLIM_INFINITY))
with open_store(path, mode="a") as store:
    split = store.split("train")
    for shard in range(split.num_shards):
        a, b = split.shard_range(shard)
        n = b - a
        split.write_shard(shard, tokens={0: np.full((n, 512, 768), shard, np.float16)}, prefix=None, mask=None,
                          labels=np.zeros((n, 3), np.uint8), ids=[f"i{i}" for i in range(a, b)], sources=["x.wav"] * n,
                          offsets=np.zeros(n), durations=np.ones(n), errors=[""] * n)
"""


def test_a_file_size_limit_counts_only_what_an_hdf5_store_still_grows_by(tmp_path):
    """An HDF5 store's token arrays are allocated when it is made, so its file does not grow by a
    shard's tokens: under a `ulimit -f` 10 MiB above the new file's size, shards of 6 MiB all fit."""
    path = tmp_path / "s.h5"
    spec = make_spec(grid=(32, 16), dim=768, num_prefix=0, masked=False, layers=[0], splits={"train": 32}, shard_size=8)
    create_or_open(path, spec).close()
    proc = subprocess.run([sys.executable, "-c", SIZE_LIMITED_WRITER, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with open_store(path) as store:
        split = store.split("train")
        assert split.is_complete and split.read_tokens(0, [31])[0, 0, 0] == 3


def snapshot(path) -> dict:
    """Every file under `path` (or the file itself) with its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): f.read_bytes() for f in files}


@pytest.mark.parametrize("name,fmt", [("mystore", "hdf5"), ("store.hdf", "hdf5"), ("x.zarr", "hdf5"), ("x.h5", "zarr")])
def test_a_store_is_told_by_what_is_there_whatever_its_name(tmp_path, name, fmt):
    """A store made with an explicit format under any name opens, resumes and shows in `tokens
    info` afterwards; asking for the other format on it is refused and changes nothing."""
    spec = make_spec()
    path = tmp_path / name
    fill(path, spec, fmt)
    with open_store(path) as store:
        assert store.format == fmt and store.split("train").is_complete
    info = CliRunner().invoke(app, ["info", str(path)])
    assert info.exit_code == 0 and f"({fmt}," in info.output, info.output
    with create_or_open(path, spec) as store:  # a resume that does not repeat the format
        assert store.format == fmt and store.split("train").is_complete
    before = snapshot(path)
    other = "zarr" if fmt == "hdf5" else "hdf5"
    with pytest.raises(StoreError, match=re.escape(f"{path} is a {fmt} store, but {other} was asked for")):
        create_or_open(path, spec, other)
    assert snapshot(path) == before
    fill(tmp_path / "reference.zarr", spec)
    assert_same_content(tmp_path / "reference.zarr", path)


def test_extract_with_a_format_into_any_name_opens_and_resumes(tmp_path):
    """`tokens extract data.csv -s mystore --format hdf5` (the reviewer's case) end to end."""
    import soundfile as sf

    wave = 0.5 * np.sin(2 * np.pi * 440 * np.arange(4000) / 16000)
    for i in range(3):
        sf.write(tmp_path / f"c{i}.wav", wave, 16000)
    data = tmp_path / "data.csv"
    data.write_text("path,labels,split\nc0.wav,a,train\nc1.wav,b,train\nc2.wav,a,test\n")
    path = tmp_path / "mystore"
    extract = ["extract", str(data), "-s", str(path), "--layers", "0", "-q", "--num-workers", "0"]
    result = CliRunner().invoke(app, [*extract, "--format", "hdf5"])
    assert result.exit_code == 0, result.output
    info = CliRunner().invoke(app, ["info", str(path)])
    assert info.exit_code == 0 and "(hdf5," in info.output and "complete" in info.output, info.output
    again = CliRunner().invoke(app, extract)  # without --format: resumes what is there
    assert again.exit_code == 0 and "wrote 0 items" in again.output, again.output


def test_a_path_that_is_not_a_store_is_refused_and_left_alone(tmp_path):
    """A file that is not HDF5 (a manifest given as the store, say) and a directory with other
    things in it are refused naming the path, in any format asked for, and stay as they were."""
    not_hdf5 = tmp_path / "data.csv"
    not_hdf5.write_text("path,labels,split\n")
    full_dir = tmp_path / "results"
    full_dir.mkdir()
    (full_dir / "notes.txt").write_text("mine")
    foreign = tmp_path / "other.h5"  # HDF5 that another program wrote
    with h5py.File(foreign, "w") as f:
        f["x"] = [1, 2]
    for path, problem in [(not_hdf5, f"{not_hdf5} is not a store"), (full_dir, f"{full_dir} is a directory but not a zarr store"),
                          (foreign, f"{foreign} is not a tokens store")]:
        before = snapshot(path)
        with pytest.raises(StoreError, match=re.escape(problem)) as reading:
            open_store(path)
        assert "a new store needs" not in str(reading.value)  # extract's advice, not a reader's
        for fmt in (None, "zarr", "hdf5"):
            with pytest.raises(StoreError, match=re.escape(str(path))):
                create_or_open(path, make_spec(), fmt)
        info = CliRunner().invoke(app, ["info", str(path)])
        assert info.exit_code == 2 and problem in " ".join(info.output.split())
        verify = CliRunner().invoke(app, ["verify", str(path)])  # 2 as for info, not 1, which says the store is damaged
        assert verify.exit_code == 2 and problem in " ".join(verify.output.split()), verify.output
        assert snapshot(path) == before and sorted(os.listdir(path.parent)) == ["data.csv", "other.h5", "results"]


def test_an_empty_directory_becomes_a_new_zarr_store(tmp_path):
    """`mkdir out.zarr` first, then extract into it: the store is made there (racing writers
    included), and follows a symlink to an empty directory. HDF5 is a file, so asking for it there
    is refused."""
    spec = make_spec(splits={"train": N_TRAIN})
    reference = tmp_path / "reference.zarr"
    fill(reference, spec)
    made = tmp_path / "made.zarr"
    made.mkdir()
    with pytest.raises(StoreError, match=re.escape(f"{made}: no such store (an empty directory)")):
        open_store(made)
    with pytest.raises(StoreError, match=re.escape(f"{made} is an empty directory (a zarr store's place), but hdf5 was asked for")):
        create_or_open(made, spec, "hdf5")
    assert os.listdir(made) == []
    fill(made, spec)
    assert_same_content(reference, made)

    raced = tmp_path / "raced"  # no suffix: a directory is zarr
    raced.mkdir()
    writers = [run_writer(tmp_path, raced, [0, 2, 4]), run_writer(tmp_path, raced, [1, 3])]
    assert [w.wait() for w in writers] == [0, 0]
    assert_same_content(reference, raced)

    target, link = tmp_path / "scratch" / "store", tmp_path / "link.zarr"
    target.mkdir(parents=True)
    link.symlink_to(target)
    fill(link, spec)
    assert link.is_symlink() and (target / "zarr.json").exists()
    assert_same_content(reference, link)
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # nothing left aside


@pytest.mark.parametrize("fmt,suffix,codec", [("zarr", ".zarr", None), ("hdf5", ".h5", None), ("zarr", ".zarr", "zstd")])
def test_layers_count_from_the_end_and_empty_reads_are_empty(tmp_path, fmt, suffix, codec):
    """-1 is the last cached layer (as `tokens probe --layers` takes it); a layer not cached is
    refused naming those that are; no items read as (0, ...) arrays."""
    spec = make_spec(codec=codec)
    path = tmp_path / f"s{suffix}"
    fill(path, spec, fmt)
    with open_store(path) as store:
        split = store.split("train")
        idx = [3, 0, 20]
        np.testing.assert_array_equal(split.read_tokens(-1, idx), split.read_tokens(1, idx))
        np.testing.assert_array_equal(split.read_prefix(-2, idx), split.read_prefix(0, idx))
        for layer in (2, -3):
            for read in (split.read_tokens, split.read_prefix):
                with pytest.raises(StoreError, match=re.escape(f"layer {layer} is not cached in this store; it caches layers 0, 1 (or -1 for the last)")):
                    read(layer, idx)
        for empty in ([], np.array([], dtype=np.int64)):
            tokens, prefix, mask = split.read_tokens(1, empty), split.read_prefix(-1, empty), split.read_mask(empty)
            assert tokens.shape == (0, T * F, D) and tokens.dtype == np.float16
            assert prefix.shape == (0, P, D) and prefix.dtype == np.float16
            assert mask.shape == (0, T * F) and mask.dtype == np.bool_
            for name in ("labels", "offsets", "ids"):  # as a read of one item would give them, less the item
                assert split.column(name, empty).dtype == split.column(name, [0]).dtype
                assert split.column(name, empty).shape == (0, *split.column(name, [0]).shape[1:])
        with pytest.raises(IndexError, match="out of range"):
            split.read_mask([N_TRAIN])
    if fmt == "zarr":  # nothing is read for no items, not even a damaged shard's file
        (path / "train" / "labels" / "c" / "0" / "0").unlink()
        with open_store(path) as store:
            assert store.split("train").column("labels", []).shape == (0, len(CLASSES))


def test_string_columns_are_object_arrays_of_str_in_both_formats(tmp_path):
    spec = make_spec()
    columns = {}
    for fmt, suffix in (("zarr", ".zarr"), ("hdf5", ".h5")):
        fill(tmp_path / f"s{suffix}", spec, fmt)
        with open_store(tmp_path / f"s{suffix}") as store:
            columns[fmt] = {name: store.split("train").column(name) for name in ("ids", "sources", "errors")}
    for name, values in columns["zarr"].items():
        for got in (values, columns["hdf5"][name]):
            assert got.dtype == object and all(type(v) is str for v in got)
            assert list(got) == make_items(spec, "train")[name]


def test_the_filesystem_of_a_path_is_that_of_its_deepest_mount():
    """Which filesystem holds a store decides whether its shards are written around the page cache."""
    from tokens.cache.zarr_backend import filesystem_type

    mounts = "\n".join([
        "/dev/vda / ext4 rw,relatime 0 0",
        "server:/export /no-such-root/home nfs4 rw 0 0",
        "/dev/sdb /no-such-root/home/my\\040data xfs rw 0 0",
        "tmpfs /no-such-root/scratch tmpfs rw 0 0",
        "/dev/sdc /no-such-root/scratch lustre rw 0 0",  # mounted over the tmpfs: it hides it
    ])
    assert filesystem_type("/no-such-root/home/me/s.zarr", mounts) == "nfs4"
    assert filesystem_type("/no-such-root/home/my data/s.zarr", mounts) == "xfs"
    assert filesystem_type("/no-such-root/homework/s.zarr", mounts) == "ext4"  # a name that starts alike is not inside
    assert filesystem_type("/no-such-root/scratch/s.zarr", mounts) == "lustre"
    assert filesystem_type("/no-such-root/home", mounts) == "nfs4"
    assert filesystem_type("/elsewhere", "") == ""


@pytest.mark.parametrize("layers, grid, dim, expected", [
    ([0], (64, 8), 768, 512),  # one ViT-B layer: 384 MiB in all, not 128 MiB (170 items)
    ([0, 1], (64, 8), 768, 256),
    (list(range(12)), (64, 8), 768, 170),  # 128 MiB per layer already passes 384 MiB in all
    ([0], (101, 4), 64, 4096),  # small items: the cap
])
def test_the_default_shard_holds_128_mib_per_layer_and_384_mib_in_all(layers, grid, dim, expected):
    spec = make_spec(layers=layers, grid=grid, dim=dim, shard_size=0)
    assert spec.shard_size == expected


def _read_in_a_forked_child(split, indices, answer):
    answer.put(split.read_tokens(0, indices).sum(dtype=np.float64))


@pytest.mark.parametrize("fmt,suffix", [("zarr", ".zarr"), ("hdf5", ".h5")])
def test_a_store_read_before_a_fork_reads_in_the_child(tmp_path, fmt, suffix):
    """DataLoader workers fork after the parent has read (a sanity check, a first batch): the parent's
    reading threads do not exist in the child, and reads handed to them used to wait forever."""
    import multiprocessing

    spec = make_spec(splits={"train": 96, "test": 8})
    fill(tmp_path / f"s{suffix}", spec, fmt)
    everything = np.arange(96)  # 32 items or more: read by the thread pool
    with open_store(tmp_path / f"s{suffix}") as store:
        train = store.split("train")
        expected = train.read_tokens(0, everything).sum(dtype=np.float64)
        context = multiprocessing.get_context("fork")
        answer = context.Queue()
        child = context.Process(target=_read_in_a_forked_child, args=(train, everything, answer))
        child.start()
        child.join(60)
        if child.is_alive():
            child.kill()
            pytest.fail("the forked child's read did not finish in 60 s")
        assert child.exitcode == 0 and answer.get(timeout=5) == expected


@pytest.mark.parametrize("fmt,suffix", [("zarr", ".zarr"), ("hdf5", ".h5")])
def test_closing_a_store_releases_its_files_and_threads(tmp_path, fmt, suffix):
    import threading

    fill(tmp_path / f"s{suffix}", make_spec(splits={"train": 96, "test": 8}), fmt)
    open_files, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    for _ in range(5):
        with open_store(tmp_path / f"s{suffix}") as store:
            for name, split in store.splits.items():
                for layer in split.layers:
                    split.read_tokens(layer, np.arange(split.num_items))
    assert (len(os.listdir("/proc/self/fd")), threading.active_count()) == (open_files, threads)


def test_a_store_that_cannot_be_made_says_so_without_talking_of_shards_kept():
    """No shard was ever written there: the advice to rerun and resume would mislead."""
    with pytest.raises(StoreError, match=r"/proc/tokens-test.zarr: cannot create the store here \(.*\): use another --store"):
        create_or_open("/proc/tokens-test.zarr", make_spec())


@pytest.mark.parametrize("fmt, codec", [("zarr", "zstd"), ("zarr", None), ("hdf5", "gzip")])
def test_a_shard_of_failed_items_only_is_written_whatever_the_codec(tmp_path, fmt, codec):
    """Failed items' tokens are zeros, zarr's fill value: a compressed zarr array reopened without
    its write config skipped such a shard's file, which verify then called missing, for ever."""
    spec = make_spec(codec=codec)
    items = make_items(spec, "train")
    first, last = 0, spec.shard_size  # shard 0: every item failed
    for layer in spec.layers:
        items["tokens"][layer][first:last] = 0
        items["prefix"][layer][first:last] = 0
    items["mask"][first:last] = False
    items["errors"][first:last] = ["unreadable: test"] * (last - first)
    path = tmp_path / ("s.zarr" if fmt == "zarr" else "s.h5")
    with create_or_open(path, spec, fmt) as store:
        write_shards(store, "train", items, range(store.split("train").num_shards))
        write_shards(store, "test", make_items(spec, "test"), range(store.split("test").num_shards))
    with open_store(path) as store:
        assert verify(store, progress=False).ok
        assert not store.split("train").load(spec.layers[0])[first:last].any()


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_a_column_at_indices_takes_them_as_read_tokens_does(tmp_path, fmt):
    """Unsorted, repeated, boolean and sliced selections give the whole column's rows; bad ones are
    refused as read_tokens refuses them (zarr had blamed a damaged store for -1, HDF5 wrapped it)."""
    path = tmp_path / ("s.zarr" if fmt == "zarr" else "s.h5")
    fill(path, make_spec(), fmt)
    with open_store(path) as store:
        split = store.split("train")
        for name in ("ids", "labels", "offsets", "errors"):
            whole = split.column(name)
            for selection in ([3, 0, 3], np.arange(split.num_items) % 5 == 0, slice(2, 9, 3), np.array([], dtype=np.int32)):
                expected = whole[np.arange(split.num_items)[selection]]
                got = split.column(name, selection)
                np.testing.assert_array_equal(got, expected)
                assert got.dtype == whole.dtype and all(type(a) is type(b) for a, b in zip(got.ravel(), expected.ravel()))
        for bad, error in (([-1], IndexError), ([split.num_items], IndexError), ([0.5], TypeError)):
            with pytest.raises(error):
                split.column("ids", bad)
    with pytest.raises(StoreError, match="is closed"):
        split.column("ids", [0])


def test_a_damaged_hdf5_file_is_named_not_met_with_a_traceback(tmp_path):
    """HDF5's own structures damaged (a group's name heap) fail the opening, and a damaged
    compressed chunk fails its read: each names the file, and the chunk its shard, as zarr's do."""
    spec = make_spec(codec="gzip")
    fill(tmp_path / "s.h5", spec)
    chunked = tmp_path / "chunk.h5"
    shutil.copy(tmp_path / "s.h5", chunked)
    with h5py.File(chunked, "r") as f:
        chunk = f["train/tokens/1"].id.get_chunk_info_by_coord((9, 0, 0))  # item 9: shard 1
    with open(chunked, "r+b") as f:
        f.seek(chunk.byte_offset + 8)
        f.write(b"\xff" * 16)
    with open_store(chunked) as store, pytest.raises(StoreError) as error:
        store.split("train").read_tokens(1, np.arange(12))
    assert f"{chunked}:train/tokens/1 items 8-15 (shard 1): cannot be read" in str(error.value), error.value
    report = verify(open_store(chunked), progress=False)
    assert report.damaged == [("train", 1)] and "shard 1): cannot be read" in report.problems[0], report.problems

    heaps = tmp_path / "heaps.h5"
    data = (tmp_path / "s.h5").read_bytes()
    heaps.write_bytes(data.replace(b"HEAP", b"PAEH"))  # every group's heap of link names
    result = CliRunner().invoke(app, ["info", str(heaps)])
    assert result.exit_code == 2 and not isinstance(result.exception, (KeyError, RuntimeError)), result.output
    assert f"{heaps}: train/complete cannot be read (" in result.output and "the file is damaged" in result.output


@pytest.mark.parametrize("fmt, suffix", [("zarr", ".zarr"), ("hdf5", ".h5")])
def test_what_writing_shards_cannot_mend_is_not_offered_for_unmarking(tmp_path, fmt, suffix):
    """An array removed, or shard flags that no longer fit the metadata's shard size (a hand edit):
    extracting again writes shards into the arrays there, so it cannot mend either. verify names
    them for the split and marks no shard damaged (unmarking would only lose them); reads refuse
    flags that would mark the wrong items complete."""
    spec = make_spec()
    removed, edited = tmp_path / f"removed{suffix}", tmp_path / f"edited{suffix}"
    for path in (removed, edited):
        fill(path, spec, fmt)
    if fmt == "zarr":
        shutil.rmtree(removed / "train" / "mask")
        shutil.rmtree(removed / "train" / "labels")
    else:
        with h5py.File(removed, "r+") as f:
            del f["train/mask"], f["train/labels"]
    edit_meta(edited, fmt, lambda meta: meta.update(shard_size=16))
    with open_store(removed) as store:
        report = verify(store, progress=False)
    assert report.damaged == [] and len(report.problems) == 3, report.problems  # each named once
    assert "train/labels" in report.problems[0] and "train/mask" in report.problems[1] and "missing" in report.problems[1]
    assert "extracting again cannot mend" in report.problems[2]
    with open_store(edited) as store:
        with pytest.raises(StoreError, match="train has 5 shard flags, but 37 items in shards of 16 make 3"):
            store.split("train").read_tokens(0, np.arange(8, 16))
        report = verify(store, progress=False)
    assert report.damaged == [] and "train/complete: 5 shard flags, but 37 items in shards of 16 make 3" in report.problems


def test_an_hdf5_store_open_in_this_process_in_another_mode_says_so(tmp_path):
    """HDF5 refuses a second open of one file with other flags; 'truncated or not a store' misled."""
    path = tmp_path / "s.h5"
    fill(path, make_spec(), "hdf5")
    with open_store(path):
        with pytest.raises(StoreError, match="is already open in this process in another mode"):
            create_or_open(path, make_spec())
    with create_or_open(path, make_spec()):
        with pytest.raises(StoreError, match="is already open in this process in another mode"):
            open_store(path)
    with open_store(path) as store:  # each closed, it opens again
        assert store.split("train").is_complete


def _tokens_in_a_spawned_worker(split, indices):
    """What a DataLoader worker started by spawn or forkserver reads (the split arrives pickled)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_read_tokens_and_ids, (split, indices))


def _read_tokens_and_ids(split, indices):
    return split.read_tokens(0, indices), list(split.column("ids", indices))


@pytest.mark.parametrize("fmt,suffix", [("zarr", ".zarr"), ("hdf5", ".h5")])
def test_a_store_open_for_reading_travels_to_spawned_workers_and_one_open_for_writing_does_not(tmp_path, fmt, suffix):
    """Python 3.14 starts DataLoader workers with forkserver: the Dataset, and the open split in it,
    are pickled. It is opened again there by its path, after the parent has read (threads, descriptors)."""
    import pickle

    path = tmp_path / f"s{suffix}"
    spec = make_spec(splits={"train": 96, "test": 8})
    fill(path, spec, fmt)
    everything = np.arange(96)  # read by the thread pool
    items = make_items(spec, "train")
    with open_store(path) as store:
        train = store.split("train")
        train.read_tokens(0, everything)
        tokens, ids = _tokens_in_a_spawned_worker(train, [5, 90, 3])
        np.testing.assert_array_equal(tokens, items["tokens"][0][[5, 90, 3]])
        assert ids == ["train-5", "train-90", "train-3"]
        copy = pickle.loads(pickle.dumps({"store": store, "train": train}))  # one store, opened once
        assert copy["train"].store is copy["store"] and copy["store"] is not store
        np.testing.assert_array_equal(copy["train"].read_tokens(1, everything), items["tokens"][1])
        copy["store"].close()
    with pytest.raises(TypeError, match="is closed: only a store open for reading"):
        pickle.dumps(train)
    with create_or_open(path, spec, fmt) as writer:
        with pytest.raises(TypeError, match="is open for writing: only a store open for reading .* open it by its path"):
            pickle.dumps(writer.split("train"))


def test_a_zarr_reader_open_while_a_shard_is_written_again_reads_the_new_shard_whole(tmp_path):
    """--retry-failed writes a shard again as a new file renamed over the old one: a reader that had
    read the old one must not keep reading its tokens beside the new file's mask and labels."""
    path = tmp_path / "s.zarr"
    spec = make_spec()
    fill(path, spec)
    new = make_items(spec, "train", seed=1)
    with open_store(path) as reader:
        train = reader.split("train")
        before = train.read_tokens(0, [8, 9])
        with create_or_open(path, spec) as writer:
            writer.split("train").mark_incomplete(1)
            write_shards(writer, "train", new, [1])
        np.testing.assert_array_equal(train.read_tokens(0, [8, 9]), new["tokens"][0][[8, 9]])
        np.testing.assert_array_equal(train.read_mask([8, 9]), new["mask"][[8, 9]])
        assert not np.array_equal(before, new["tokens"][0][[8, 9]])
        np.testing.assert_array_equal(train.read_tokens(0, [0, 1]), make_items(spec, "train")["tokens"][0][[0, 1]])


def test_an_hdf5_reader_sees_the_shards_complete_when_it_opened_and_reads_them_whole(tmp_path):
    """HDF5 caches what a reader has read: the strings of shards completed after it opened may lie
    past the end of the file it knows ('bad heap index'). It keeps to the shards complete at its opening."""
    path = tmp_path / "s.h5"
    spec = make_spec()
    items = make_items(spec, "train")
    with create_or_open(path, spec, "hdf5") as store:
        write_shards(store, "train", items, [0])
    with open_store(path) as reader:
        train = reader.split("train")
        assert run_writer(tmp_path, path, list(range(5))).wait() == 0  # before this reader reads anything
        assert train.complete_mask().tolist() == [True, False, False, False, False]
        assert list(train.column("ids", [0, 7])) == ["train-0", "train-7"]
        for read in (lambda: train.column("ids", [8]), lambda: train.column("ids", [36])):
            with pytest.raises(StoreError, match=r"train items \[(8|36)\] are in shards not written yet"):
                read()
        ids = train.column("ids")  # whole: the rows of later shards read as unwritten, not 'bad heap index'
        assert list(ids[:8]) == items["ids"][:8] and set(ids[8:]) == {""}
        assert (train.column("durations")[8:] == 0).all()
    with open_store(path) as reader:  # opened again: it sees them all
        assert reader.split("train").is_complete
        assert list(reader.split("train").column("ids", [8, 36])) == ["train-8", "train-36"]
        assert list(reader.split("train").column("ids")) == items["ids"]


def test_an_hdf5_reader_keeps_reading_the_file_it_opened_when_another_replaces_it(tmp_path):
    """h5py keeps the file it opened: the tokens must come from that file too, not from a new file
    at the same path (read at the old file's offsets), while its labels and mask come from the old one."""
    path = tmp_path / "s.h5"
    spec = make_spec()
    fill(path, spec, "hdf5")
    old = make_items(spec, "train")
    with open_store(path) as reader:
        train = reader.split("train")
        np.testing.assert_array_equal(train.read_mask([3]), old["mask"][[3]])  # no token read yet
        path.unlink()
        with create_or_open(path, spec, "hdf5") as writer:
            write_shards(writer, "train", make_items(spec, "train", seed=1), range(5))
        np.testing.assert_array_equal(train.read_tokens(0, [3, 30]), old["tokens"][0][[3, 30]])
        np.testing.assert_array_equal(train.read_mask([3, 30]), old["mask"][[3, 30]])


@pytest.mark.parametrize("name, damage", [("mask", "half"), ("labels", "one byte"), ("ids", "half")])
def test_a_truncated_zarr_column_file_is_named(tmp_path, name, damage):
    path = tmp_path / "s.zarr"
    fill(path, make_spec())
    with open_store(path) as store:
        chunk = store.split("train")._h.chunk_file("train", name, 1)
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2] if damage == "half" else data[:-1])
    with open_store(path) as store:
        train = store.split("train")
        read = (lambda: train.read_mask([9])) if name == "mask" else (lambda: train.column(name, [2, 9]))
        with pytest.raises(StoreError, match=re.escape(f"{chunk}: cannot be decoded") + ".*run `tokens verify`"):
            read()
        with pytest.raises(StoreError, match=re.escape(f"{chunk}: cannot be decoded")):
            train.column(name) if name != "mask" else train.read_mask(slice(None))
        assert len(train.column("ids", [0, 1])) == 2  # another shard's items still read


@pytest.mark.parametrize("fmt,suffix", [("zarr", ".zarr"), ("hdf5", ".h5")])
def test_columns_are_named_and_completion_of_a_closed_store_refused(tmp_path, fmt, suffix):
    path = tmp_path / f"s{suffix}"
    fill(path, make_spec(), fmt)
    with open_store(path) as store:
        train = store.split("train")
        for name in ("complete", "mask", "tokens/0"):
            with pytest.raises(StoreError, match=f"no column '{re.escape(name)}'; the columns are labels, offsets"):
                train.column(name)
    for ask in (train.complete_items, train.complete_mask, train.missing_shards):
        with pytest.raises(StoreError, match="is closed"):
            ask()


@pytest.mark.parametrize("name, fmt", [("f.h5", "zarr"), ("s.zarr", "hdf5"), ("s.HDF5", "zarr")])
def test_a_format_its_store_name_contradicts_is_refused_before_any_work(tmp_path, name, fmt):
    """`--store f.h5 --format zarr` made a zarr folder named .h5, which every tool and person meeting
    it reads as HDF5: refused, naming the store as the format would, and nothing is made."""
    from typer.testing import CliRunner
    from tokens.cli import app

    (tmp_path / "data.csv").write_text("path,labels,split\nc0.wav,a,train\n")
    result = CliRunner().invoke(app, ["extract", str(tmp_path / "data.csv"), "-s", str(tmp_path / name), "--format", fmt, "-q"])
    suggested = (tmp_path / name).with_suffix(".zarr" if fmt == "zarr" else ".h5").name
    assert result.exit_code == 2 and f"name the store {suggested}, or leave out --format" in " ".join(result.output.split()), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]
