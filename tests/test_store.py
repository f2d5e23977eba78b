"""The store: bit-exact round trips, resumable and concurrent writes, refusals, damage detection."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from tokens.cache import StoreError, StoreSpec, create_or_open, open_store
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


def test_only_the_named_shards_half_written_files_are_discarded(tmp_path):
    """A resumed writer clears what a killed one left of the shards it will write again, and
    nothing of other shards or splits (other job-array tasks may be writing those)."""
    path = tmp_path / "s.zarr"
    with create_or_open(path, make_spec()) as store:
        write_shards(store, "train", make_items(make_spec(), "train"), [0])
        left = ["1.train.tokens.0.dead.tmp", "2.train.mask.live.tmp", "1.test.ids.live.tmp", "notes"]
        for name in left:
            (path / ".partial" / name).write_bytes(b"torn")
        store.split("train").discard_partial_writes([1])
        assert sorted(p.name for p in (path / ".partial").iterdir()) == sorted(left[1:])
        assert store.split("train").complete_mask().tolist() == [True, False, False, False, False]


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
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    os.remove(deleted)
    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code == 1
    assert f"{deleted}: file missing" in result.output and f"{truncated}: shard index does not match" in result.output
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


def test_verify_catches_nan_and_a_truncated_hdf5_file(tmp_path):
    spec = make_spec()
    path = tmp_path / "s.h5"
    with create_or_open(path, spec) as store:
        items = make_items(spec, "train")
        items["tokens"][0][9, 3, 2] = np.nan
        write_shards(store, "train", items, range(store.split("train").num_shards))
    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code == 1 and "items 8-15" in result.output and "NaN" in result.output
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
    assert "INCOMPLETE (2/5 shards)" in text


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
