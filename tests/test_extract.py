"""`tokens extract` end to end with the real CREPE weights: stored tokens equal a direct forward pass,
bad items are recorded, interrupted runs resume to the same store, other configurations are refused."""

import functools
import importlib.metadata
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from tokens.cache import StoreError, open_store
from tokens.cache.verify import verify
from tokens.cli import app
from tokens.extract.audio import load_window
from tokens.extract.backbones import build_backbone
from tokens.extract.run import ExtractionError, extract
from tokens.extract.workers import WORKER_NICENESS

SR = 16000


def tone(path, seconds, freq=440.0, channels=1, rate=SR):
    t = np.arange(round(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    sf.write(path, np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate)


@pytest.fixture
def dataset(tmp_path):
    """Six short clips over three splits, one recording long enough to be cut into windows."""
    data = tmp_path / "data"
    data.mkdir()
    rows = ["path,labels,split"]
    for i, (freq, labels, split) in enumerate([(220, "low", "train"), (880, "high", "train"), (330, "low;mid", "train"),
                                               (660, "high;mid", "valid"), (250, "low", "test")]):
        tone(data / f"c{i}.wav", 1.0, freq, channels=2 if i == 1 else 1, rate=44100 if i == 2 else SR)
        rows.append(f"c{i}.wav,{labels},{split}")
    tone(data / "long.wav", 2.5, 500)  # -> windows at 0, 1, 2 s; the last one half padding
    rows.append("long.wav,mid,train")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    return data / "manifest.csv"


def run(manifest, store, **kw):
    kw = {"layers": "all", "batch_size": 3, "num_workers": 0, "progress": False, "shard_size": 2, **kw}
    return extract(manifest, store, **kw)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_stored_tokens_equal_a_direct_forward_pass(dataset, tmp_path, suffix):
    store_path = tmp_path / f"s{suffix}"
    summary = run(dataset, store_path)  # the format follows the suffix
    assert summary.items_written == 8 and not summary.failed
    model = build_backbone("crepe-tiny")
    with open_store(store_path) as store:
        assert store.format == ("zarr" if suffix == ".zarr" else "hdf5") and store_path.is_file() == (suffix == ".h5")
        assert store.task == "multilabel" and store.classes == ["high", "low", "mid"]
        assert store.layers == [0, 1, 2] and store.meta["grid"] == list(model.grid)
        train = store.split("train")
        ids = list(train.column("ids"))
        assert ids == ["c0.wav", "c1.wav", "c2.wav", "long.wav", "long.wav@1", "long.wav@2"]
        np.testing.assert_array_equal(train.column("offsets"), [0, 0, 0, 0, 1, 2])
        np.testing.assert_array_equal(train.column("labels")[2], [0, 1, 1])
        for index, (name, offset) in enumerate([("c0.wav", 0), ("c1.wav", 0), ("c2.wav", 0), ("long.wav", 0), ("long.wav", 1), ("long.wav", 2)]):
            wave = load_window(dataset.parent / name, offset, 1.0, SR)
            inputs, mask = model.preprocess(wave)
            with torch.inference_mode():
                expected = model(inputs[None], [0, 1, 2], mask[None])
            for layer in (0, 1, 2):
                stored = train.read_tokens(layer, [index])[0]
                np.testing.assert_array_equal(stored, expected[layer][0][0].to(torch.float16).numpy())
            np.testing.assert_array_equal(train.read_mask([index])[0], mask.numpy())
        assert train.read_mask([5])[0].mean() == pytest.approx(0.5, abs=0.05)  # half of the last window is padding


def test_a_run_where_every_item_failed_exits_with_an_error(tmp_path):
    """Images given to an audio backbone: each item is recorded as failed, and the command fails too,
    saying what the backbone reads; a run where some items fail succeeds."""
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(data / name)
    (data / "m.csv").write_text("path,label,split\na.png,x,train\nb.png,y,train\n")
    result = CliRunner().invoke(app, ["extract", str(data / "m.csv"), "--store", str(tmp_path / "s.zarr"), "-q", "--num-workers", "0"])
    assert result.exit_code == 1, result.output
    assert "2 items failed and are recorded" in result.output
    assert f"every item of this run failed: crepe-tiny reads audio; is that what {data / 'm.csv'} holds" in " ".join(result.output.split())
    again = CliRunner().invoke(app, ["extract", str(data / "m.csv"), "--store", str(tmp_path / "s.zarr"), "-q", "--num-workers", "0"])
    assert again.exit_code == 1, again.output  # a retry (a requeued job) does not turn the failure into success
    assert "2 items that an earlier run recorded as failed stay so" in again.output
    assert "every item in the store's shards failed" in " ".join(again.output.split())
    part = CliRunner().invoke(app, ["extract", str(data / "m.csv"), "--store", str(tmp_path / "s.zarr"), "-q", "--part", "1/2"])
    assert part.exit_code == 1 and "every item of part 1/2's shards failed" in " ".join(part.output.split()), part.output
    tone(data / "c.wav", 0.5)
    (data / "m.csv").write_text("path,label,split\na.png,x,train\nc.wav,y,train\n")
    result = CliRunner().invoke(app, ["extract", str(data / "m.csv"), "--store", str(tmp_path / "t.zarr"), "-q", "--num-workers", "0"])
    assert result.exit_code == 0 and "1 item failed and is recorded" in result.output and "every item" not in result.output, result.output


def test_no_audio_file_stays_open_after_a_run_that_read_in_its_own_thread(tmp_path):
    """An MP3 is read forward and kept open for its next window; with --num-workers 0 that is the
    caller's thread, which must not keep the last file open once the run is over (a notebook
    extracting again and again would pile them up)."""
    if "MP3" not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write MP3")
    data = tmp_path / "data"
    data.mkdir()
    sf.write(data / "a.mp3", 0.1 * np.random.default_rng(0).standard_normal(3 * SR), SR, format="MP3", subtype="MPEG_LAYER_III")
    (data / "m.csv").write_text("path,labels,split,end\na.mp3,x,train,2\n")  # the last window ends before the file

    def open_here():
        return [name for name in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{name}") == str((data / "a.mp3").resolve())]

    summary = run(data / "m.csv", tmp_path / "s.zarr", batch_size=1)
    assert summary.items_written == 2 and not summary.failed
    assert open_here() == []


def test_a_clip_shorter_than_an_fbank_frame_is_a_failed_item(tmp_path):
    """10 ms fill no 25 ms fbank frame: no token would hold audio, so the item fails with the reason
    rather than being stored as a good item of padding (which `tokens verify` would call damaged)."""
    from tokens.extract.backbones.audiomae import AudioMAE

    torch.manual_seed(0)
    torch.save({"model": AudioMAE(dim=64, depth=2, num_heads=4).state_dict()}, tmp_path / "am.pth")
    data = tmp_path / "data"
    data.mkdir()
    tone(data / "blip.wav", 0.01)
    tone(data / "short.wav", 0.03)  # one frame: the first token holds audio
    (data / "m.csv").write_text("path,label,split\nblip.wav,x,train\nshort.wav,x,train\n")
    summary = run(data / "m.csv", tmp_path / "s.zarr", backbone="audiomae", checkpoint=str(tmp_path / "am.pth"),
                  backbone_options={"dim": 64, "depth": 2, "num_heads": 4}, layers=[-1])
    assert summary.failed == [("blip.wav", "too short: 10 ms of audio gives no token")]
    with open_store(tmp_path / "s.zarr") as store:
        assert store.split("train").read_mask([1])[0].sum() == 8  # the first time step: 8 frequency tokens
        assert verify(store, progress=False).ok


def test_bad_items_are_recorded_and_the_run_goes_on(dataset, tmp_path):
    data = dataset.parent
    (data / "empty.wav").write_bytes(b"")
    (data / "text.wav").write_text("this is not audio")
    sf.write(data / "nan.wav", np.full(SR, np.nan, dtype=np.float32), SR, subtype="FLOAT")
    with dataset.open("a") as f:
        f.write("empty.wav,low,train\ntext.wav,low,train\nnan.wav,low,test\n")
    summary = run(dataset, tmp_path / "s.zarr")
    assert sorted(item for item, _ in summary.failed) == ["empty.wav", "nan.wav", "text.wav"]
    with open_store(tmp_path / "s.zarr") as store:
        train = store.split("train")
        errors = dict(zip(train.column("ids"), train.column("errors")))
        assert errors["c0.wav"] == "" and "decode" in errors["text.wav"]
        bad = list(train.column("ids")).index("text.wav")
        assert not train.read_tokens(2, [bad]).any() and not train.read_mask([bad]).any()
        assert "NaN" in store.split("test").column("errors")[1]
    listed = CliRunner().invoke(app, ["info", str(tmp_path / "s.zarr"), "--failed"])
    assert listed.exit_code == 0, listed.output
    reasons = dict(summary.failed)  # what the run said, against what the store kept
    assert [line.split("\t") for line in listed.output.splitlines()] == [
        [split, item, reasons[item]] for split, item in [("train", "empty.wav"), ("train", "text.wav"), ("test", "nan.wav")]]
    with pytest.raises(ExtractionError, match="--strict") as raised:
        run(dataset, tmp_path / "strict.zarr", strict=True, num_workers=2)
    assert multiprocessing.active_children() == [], raised.traceback  # the workers stopped with the run
    with open_store(tmp_path / "strict.zarr") as store:  # the batches before the bad item are kept
        assert store.split("train").complete_mask().tolist() == [True, True, True, False]


def test_failed_items_stay_failed_on_resume_and_retry_failed_extracts_them_once_fixed(dataset, tmp_path):
    """A resume keeps complete shards as they are, failed items included, and says so; --retry-failed
    writes again the shards that hold failed items, and a fixed file is then stored like any other."""
    data = dataset.parent
    good = np.sin(2 * np.pi * 300 * np.arange(SR) / SR).astype(np.float32)
    sf.write(data / "nan.wav", np.where(np.arange(SR) == 5, np.nan, good).astype(np.float32), SR, subtype="FLOAT")
    with dataset.open("a") as f:
        f.write("nan.wav,low,test\n")
    store_path = tmp_path / "s.zarr"
    assert [item for item, _ in run(dataset, store_path).failed] == ["nan.wav"]
    sf.write(data / "nan.wav", good, SR, subtype="FLOAT")  # fixed, the same length
    args = ["extract", str(dataset), "--store", str(store_path), "-q", "--num-workers", "0", "--shard-size", "2", "-l", "all"]
    kept = CliRunner().invoke(app, args)
    assert kept.exit_code == 0 and "1 item that an earlier run recorded as failed stays so" in kept.output, kept.output
    would = run(dataset, store_path, retry_failed=True, dry_run=True)
    assert len(would.units) - would.complete == 1  # the dry run counts the shard that the retry writes again
    retried = run(dataset, store_path, retry_failed=True)
    assert retried.retried == 1 and retried.failed == [] and retried.shards_written == 1 and retried.failed_before == 0
    with open_store(store_path) as store:
        test = store.split("test")
        row = list(test.column("ids")).index("nan.wav")
        assert test.column("errors")[row] == "" and test.read_mask([row])[0].all()
        assert verify(store, progress=False).ok
    with open_store(store_path) as store, open_store(run(dataset, tmp_path / "fresh.zarr").store) as fresh:
        for layer in store.layers:  # the same tokens as a store extracted from the fixed files at once
            np.testing.assert_array_equal(store.split("test").read_tokens(layer, [row]), fresh.split("test").read_tokens(layer, [row]))


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_an_unreadable_file_fixed_is_extracted_by_retry_failed(dataset, tmp_path, suffix):
    """A file that could not be read had no known length when the store was made: fixed, it has one,
    and its dataset another fingerprint, which the store takes since all it holds is still right.
    A fix that makes more windows changes the split's size: refused, naming it."""
    data = dataset.parent
    (data / "bad.wav").write_text("this is not a recording\n" * 20)
    with dataset.open("a") as f:
        f.write("bad.wav,low,test\n")
    store_path = tmp_path / f"s{suffix}"
    assert [item for item, _ in run(dataset, store_path).failed] == ["bad.wav"]
    with open_store(store_path) as store:
        key = store.meta["cache_key"]
    tone(data / "bad.wav", 1.0, 300)  # fixed: one window long
    retried = run(dataset, store_path, retry_failed=True)
    assert retried.retried == 1 and retried.failed == [] and retried.shards_written == 1
    again = run(dataset, store_path)  # the new fingerprint is the store's now: a plain resume
    assert again.items_written == 0 and again.failed_before == 0
    with open_store(store_path) as store, open_store(run(dataset, tmp_path / f"fresh{suffix}").store) as fresh:
        assert store.meta["dataset_fingerprint"] == fresh.meta["dataset_fingerprint"] and store.meta["cache_key"] != key
        assert store.meta["cache_key"] == fresh.meta["cache_key"]
        row = list(store.split("test").column("ids")).index("bad.wav")
        assert store.split("test").column("errors")[row] == "" and verify(store, progress=False).ok
        for layer in store.layers:
            np.testing.assert_array_equal(store.split("test").read_tokens(layer, [row]), fresh.split("test").read_tokens(layer, [row]))
    tone(data / "bad.wav", 2.5, 300)  # three windows: the store cannot grow
    with pytest.raises(StoreError, match="the dataset differs: test has 2 items in the store, 4 now"):
        run(dataset, store_path, retry_failed=True)


def test_a_task_that_opened_the_store_before_another_retried_its_failed_items_goes_on(dataset, tmp_path):
    """Tasks of a job array resubmitted with --retry-failed start together: one opens the store, another
    takes the new dataset and writes its failed items again before the first compares. What the first
    read then describes neither dataset, and it was refused; the store's own record now says it is this one."""
    from tokens.cache.store import TokenStore
    from tokens.extract.run import holds_only_this_dataset, plan

    data = dataset.parent
    (data / "bad.wav").write_text("this is not a recording\n" * 20)
    with dataset.open("a") as f:
        f.write("bad.wav,low,test\n")
    store_path = tmp_path / "s.zarr"
    run(dataset, store_path)
    tone(data / "bad.wav", 1.0, 300)
    work = plan(dataset, store_path, build_backbone("crepe-tiny"), layers="all", dtype="float16", fmt="zarr", codec=None,
                shard_size=2, part=(1, 1))
    with TokenStore(store_path, mode="a") as slow:
        assert run(dataset, store_path, retry_failed=True).retried == 1  # the other task, meanwhile
        slow.check_compatible(work.spec, holds_dataset=functools.partial(holds_only_this_dataset, dataset=work.dataset))
        assert slow.meta["dataset_fingerprint"] == work.spec.dataset_fingerprint


def test_unreadable_files_fixed_one_at_a_time_are_retried_whatever_ran_between(dataset, tmp_path):
    """A run between two fixes that does not write the first fixed file's shard again (a plain
    resume) records the dataset as it is then: the store still holds that file as unknown."""
    data = dataset.parent
    with dataset.open("a") as f:
        for name in ("badA.wav", "badB.wav"):
            (data / name).write_text("this is not a recording\n" * 20)
            f.write(f"{name},low,test\n")
    store_path = tmp_path / "s.zarr"
    assert sorted(item for item, _ in run(dataset, store_path).failed) == ["badA.wav", "badB.wav"]
    tone(data / "badA.wav", 1.0, 300)
    assert run(dataset, store_path).failed_before == 2  # taken, not retried
    tone(data / "badB.wav", 1.0, 600)
    retried = run(dataset, store_path, retry_failed=True)
    assert retried.retried == 2 and retried.failed == []
    with open_store(store_path) as store, open_store(run(dataset, tmp_path / "fresh.zarr").store) as fresh:
        assert store.meta["cache_key"] == fresh.meta["cache_key"]
        for layer in store.layers:
            np.testing.assert_array_equal(store.split("test").read_tokens(layer, slice(None)), fresh.split("test").read_tokens(layer, slice(None)))


def test_a_dataset_changed_where_nothing_is_written_yet_is_still_refused(dataset, tmp_path):
    """Another task of the job array may still be writing those shards from the manifest as it was:
    taking the new dataset's fingerprint would store its old labels under the new key."""
    store_path = tmp_path / "s.zarr"
    run(dataset, store_path, part=(1, 2))
    with open_store(store_path) as store:
        train = store.split("train")
        written = set(train.column("ids", np.flatnonzero(train.complete_items())))
    relabelled = next(row for row in dataset.read_text().splitlines() if row.endswith(",train") and row.split(",")[0] not in written)
    dataset.write_text(dataset.read_text().replace(relabelled, relabelled.replace(",train", ";high,train")))
    with pytest.raises(StoreError, match=r"another configuration: dataset_fingerprint .*\(the dataset's items, windows or labels differ\)"):
        run(dataset, store_path, part=(2, 2))


def test_a_part_resumes_whatever_damage_the_other_parts_shards_hold(dataset, tmp_path):
    """A resume reads the failed-item records of its own part's shards only: another task's damaged
    shard is that task's (and verify's) to report, not a reason for every part to stop."""
    store_path = tmp_path / "s.zarr"
    for part in ((1, 2), (2, 2)):
        run(dataset, store_path, part=part)
    os.remove(store_path / "train" / "errors" / "c" / "0")  # train's shard 0 is part 1's
    again = run(dataset, store_path, part=(2, 2))
    assert again.items_written == 0 and again.shards_skipped > 0 and again.good_before > 0


@pytest.mark.parametrize("count,batch_size,workers,sizes", [
    (1000, 128, 31, [16] * 32 + [128] * 3 + [104]),  # 4 batches in 8 parts: one for each of 31 workers
    (100, 128, 31, [16] * 6 + [4]),
    (300, 100, 3, [34, 33, 33, 100, 100]),  # no more parts than workers, as even as they come
    (1000, 32, 2, [16, 16] + [32] * 30 + [8]),
    (1000, 32, 0, [32] * 31 + [8]),  # no workers: nothing to share out
    (1000, 128, 1, [128] * 7 + [104]),
    (5, 128, 4, [5]),
])
def test_the_first_batches_are_decoded_in_parts_one_per_worker(count, batch_size, workers, sizes):
    from tokens.extract.run import loader_batches

    batches = loader_batches(count, batch_size, workers)
    assert [len(batch) for batch in batches] == sizes
    assert [i for batch in batches for i in batch] == list(range(count))  # every item once, in order


def test_batches_joined_from_parts_equal_batches_collated_whole():
    """The parts of a batch, failed items and a part where every item failed included, join into
    what collate() makes of all the batch's items at once."""
    from tokens.extract.run import collate, joined_batches

    rng = np.random.default_rng(0)
    rows = [(i, None, None, "unreadable") if i in (2, 3, 7) else
            (i, torch.from_numpy(rng.normal(size=(4, 5)).astype(np.float32)), torch.from_numpy(rng.random(4) < 0.5), "")
            for i in range(10)]
    parts = [collate(rows[a:b]) for a, b in [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]]  # (2, 4): every item failed
    joined = list(joined_batches(parts[:3] + [collate(rows[6:10])], 6))
    for got, expected in zip(joined, [collate(rows[0:6]), collate(rows[6:10])]):
        assert got[0].tolist() == expected[0].tolist() and got[3] == expected[3]
        assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])
    assert len(joined) == 2
    failed = list(joined_batches([collate(rows[2:4])] * 2, 4))[0]
    assert failed[1] is None and failed[3] == ["unreadable"] * 4


def test_an_extraction_whose_first_batches_come_in_parts_stores_the_same_tokens(dataset, tmp_path, monkeypatch):
    import tokens.extract.run as run_module

    data = dataset.parent
    (data / "empty.wav").write_bytes(b"")  # bad items among the parts: a part of only bad items, too
    (data / "text.wav").write_text("this is not audio")
    rows = dataset.read_text().splitlines()
    dataset.write_text("\n".join(rows[:2] + ["empty.wav,low,train", "text.wav,low,train"] + rows[2:]) + "\n")
    monkeypatch.setattr(run_module, "SMALLEST_PART", 1)  # a small dataset: batches of 4 in parts of 2
    assert [len(b) for b in run_module.loader_batches(10, 4, 2)] == [2, 2, 4, 2]
    summary = run(dataset, tmp_path / "parts.zarr", batch_size=4, num_workers=2)
    assert sorted(item for item, _ in summary.failed) == ["empty.wav", "text.wav"]
    run(dataset, tmp_path / "whole.zarr", batch_size=4, num_workers=0)
    with open_store(tmp_path / "parts.zarr") as parts, open_store(tmp_path / "whole.zarr") as whole:
        for name in ("train", "valid", "test"):
            everything = np.arange(parts.split(name).num_items)
            for layer in (0, 1, 2):
                assert parts.split(name).read_tokens(layer, everything).tobytes() == whole.split(name).read_tokens(layer, everything).tobytes()
            np.testing.assert_array_equal(parts.split(name).read_mask(everything), whole.split(name).read_mask(everything))
            assert list(parts.split(name).column("ids")) == list(whole.split(name).column("ids"))
            assert list(parts.split(name).column("errors")) == list(whole.split(name).column("errors"))


def test_the_decoding_workers_run_at_a_lower_priority_than_the_run(dataset, tmp_path, monkeypatch):
    """They take idle cores but give way to the main process and the kernel's disk writes."""
    import tokens.extract.run as run_module

    if os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICENESS > 19:
        pytest.skip("this process runs too nice for its workers to be any nicer")

    seen = tmp_path / "niceness"
    seen.mkdir()
    load = run_module.load_window

    def recorded(*args, **kwargs):  # runs in a worker process: it leaves its niceness in a file
        (seen / str(os.getpid())).write_text(str(os.getpriority(os.PRIO_PROCESS, 0)))
        return load(*args, **kwargs)

    monkeypatch.setattr(run_module, "load_window", recorded)
    run(dataset, tmp_path / "s.zarr", num_workers=2)
    workers = {int(f.name): int(f.read_text()) for f in seen.iterdir()}
    assert workers and os.getpid() not in workers
    assert set(workers.values()) == {os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICENESS}


@pytest.mark.parametrize("backbone, cores, ranks, workers", [
    ("audiomae", 32, 1, 8), ("eat", 32, 1, 8), ("beats", 32, 1, 8), ("crepe", 32, 1, 8),  # only decoding: 8 are enough
    ("audiomae", 6, 1, 5), ("audiomae", 32, 8, 3),  # fewer cores, or cores shared among torchrun ranks
    ("ast", 32, 1, 31), ("timm", 32, 1, 31), ("timm", 64, 1, 32),  # fbank or image transforms on the CPU: every core
])
def test_decoding_workers_default_to_the_cores_unless_the_backbone_needs_fewer(backbone, cores, ranks, workers, monkeypatch):
    import tokens.extract.run as run_module
    from tokens.extract.backbones import ast, audiomae, beats, crepe, eat, timm_vit

    classes = {"audiomae": audiomae.AudioMAE, "eat": eat.EAT, "beats": beats.BEATs, "crepe": crepe.Crepe,
               "ast": ast.AST, "timm": timm_vit.TimmViT}
    monkeypatch.setattr(run_module, "usable_cores", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert run_module.default_workers(classes[backbone]) == workers


def test_the_store_records_the_forward_passs_precision_and_a_store_from_before_still_resumes(dataset, tmp_path):
    """bf16 asked for on a CPU runs (and is recorded) in fp32. A store made before the precision was
    recorded resumes: nothing says how it was made, so nothing is refused."""
    import zarr

    store_path = tmp_path / "s.zarr"
    run(dataset, store_path, precision="bf16", device="cpu")
    with open_store(store_path) as store:
        assert store.meta["precision"] == "fp32"
    attrs = zarr.open_group(store_path, mode="r+").attrs  # as if made on a GPU (its record of the key fields too)
    attrs.update(precision="bf16", key_fields=attrs["key_fields"] | {"precision": "bf16"})
    with pytest.raises(StoreError, match=re.escape('precision is "bf16" in the store but "fp32" now (bf16 is autocast on a GPU')):
        run(dataset, store_path)
    assert run(dataset, store_path, dry_run=True).complete == 5  # the job it plans may run on a GPU
    attrs = zarr.open_group(store_path, mode="r+").attrs  # as a store of an earlier version: recorded nowhere
    attrs.update(key_fields={k: v for k, v in attrs["key_fields"].items() if k != "precision"})
    del attrs["precision"]
    again = run(dataset, store_path)
    assert again.items_written == 0 and again.shards_skipped == 5


def test_the_final_norm_is_an_option_of_the_run_not_of_the_backbone(dataset, tmp_path):
    """-o final_norm=... would collide with --final-norm: it is refused, pointing to it."""
    result = CliRunner().invoke(app, ["extract", str(dataset), "--store", str(tmp_path / "s.zarr"), "-o", "final_norm=1", "--dry-run"])
    assert result.exit_code == 2 and "--backbone-option final_norm: use --final-norm" in result.output, result.output


@pytest.mark.parametrize("store", ["tokens.zarr", "train/tokens.h5"])
def test_a_store_kept_inside_its_class_folders_resumes(tmp_path, store):
    root = tmp_path / "folders"
    for name, freq in (("train/low/a.wav", 220), ("train/high/b.wav", 880), ("test/low/c.wav", 250)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        tone(root / name, 0.5, freq)
    first = run(root, root / store)
    again = run(root, root / store)
    assert first.items_written == 3 and again.items_written == 0 and again.shards_skipped == first.shards_written


def test_files_of_other_kinds_in_class_folders_are_left_out_with_a_note(tmp_path):
    root = tmp_path / "folders"
    (root / "train/low").mkdir(parents=True)
    tone(root / "train/low/a.wav", 0.5, 220)
    for name in ("notes.txt", "labels.txt", "list.csv"):
        (root / "train/low" / name).write_text("not audio")
    result = CliRunner().invoke(app, ["extract", str(root), "--store", str(tmp_path / "s.zarr"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert ("note: 3 files in the class folders are of other kinds than those read here and are left out (2 .txt, 1 .csv; "
            "e.g. train/low/labels.txt)") in " ".join(result.output.split())
    assert re.search(r"train\s+1 items", result.output), result.output


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_shards_verify_finds_damaged_are_written_again_once_unmarked(dataset, tmp_path, suffix):
    """A deleted token file (zarr) or NaN written over tokens (HDF5): verify names the shard and how to
    redo it; --unmark-damaged marks it not complete, and the same extraction writes it again, giving
    the store an undamaged run made, and nothing else is rewritten."""
    reference, store_path = tmp_path / f"reference{suffix}", tmp_path / f"s{suffix}"
    run(dataset, reference)
    run(dataset, store_path)
    if suffix == ".zarr":
        with open_store(store_path) as store:
            store.split("train")._h.chunk_file("train", "tokens/2", 1).unlink()
    else:
        import h5py

        with h5py.File(store_path, "r+") as f:
            f["train/tokens/2"][2] = np.nan  # an item of shard 1
    found = CliRunner().invoke(app, ["verify", str(store_path)])
    assert found.exit_code == 1 and "to write the 1 damaged shard (train 1) again" in " ".join(found.output.split()), found.output
    assert ("NaN or Inf that the model itself gives come back" in found.output) == (suffix == ".h5")
    unmarked = CliRunner().invoke(app, ["verify", str(store_path), "--unmark-damaged"])
    assert unmarked.exit_code == 1 and "marked 1 damaged shard not complete (train 1)" in " ".join(unmarked.output.split())
    with open_store(store_path) as store:
        assert store.split("train").missing_shards() == [1]
    again = run(dataset, store_path)
    assert again.items_written == 2 and again.shards_skipped == 4
    assert CliRunner().invoke(app, ["verify", str(store_path)]).exit_code == 0
    with open_store(store_path) as store, open_store(reference) as want:
        for layer in store.meta["layers"]:
            np.testing.assert_array_equal(store.split("train").load(layer), want.split("train").load(layer))


def test_a_store_under_a_file_is_refused_before_any_work(dataset, tmp_path):
    result = CliRunner().invoke(app, ["extract", str(dataset), "--store", str(dataset / "sub" / "s.zarr")])
    assert result.exit_code == 2 and f"{dataset} is a file, not a folder" in result.output, result.output
    assert "shards already complete are kept" not in result.output


def test_another_configuration_is_refused_and_the_same_one_resumes(dataset, tmp_path):
    store_path = tmp_path / "s.zarr"
    run(dataset, store_path)
    with pytest.raises(StoreError, match="layers"):
        run(dataset, store_path, layers=[-1])
    with pytest.raises(StoreError, match="backbone"):
        run(dataset, store_path, backbone="crepe-full")
    again = run(dataset, store_path)
    assert again.items_written == 0 and again.shards_skipped == 5
    with pytest.raises(StoreError, match="shard_size is 2 in the store but 3 now"):
        run(dataset, store_path, shard_size=3)
    default = run(dataset, store_path, shard_size=0)  # left out: the store's, not the size the default gives
    assert default.items_written == 0 and default.shards_skipped == 5
    # Another backbone over a dataset of other labels: the store's backbone is named, not every row's labels.
    relabelled = dataset.with_name("relabelled.csv")
    relabelled.write_text(dataset.read_text().replace("low", "bass"))
    with pytest.raises(StoreError, match='backbone is "crepe-tiny" in the store but "crepe-full" now'):
        run(relabelled, store_path, backbone="crepe-full")


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_changed_dataset_is_refused_naming_the_first_difference(dataset, tmp_path, suffix):
    """The fingerprint only tells that the dataset differs; the refusal says where, as a user would look
    (in HDF5 too, whose strings once came back as bytes and made every item look moved)."""
    store_path = tmp_path / f"s{suffix}"
    run(dataset, store_path)
    rows = dataset.read_text().splitlines()
    tone(dataset.parent / "c5.wav", 1.0)
    changes = {
        "added": (rows + ["c5.wav,low,test"], "test has 1 items in the store, 2 now"),
        "reordered": ([rows[0], rows[2], rows[1], *rows[3:]], "train item 0 is 'c0.wav' in the store but 'c1.wav' now "
                      "(the same items in another order: were the manifest's rows reordered?)"),
        "relabelled": ([rows[0], "c0.wav,high,train", *rows[2:]], "train item 0 (c0.wav) is labelled low in the store but high now"),
        "a split dropped": ([row for row in rows if not row.endswith(",valid")], "valid has 1 items in the store, 0 now"),
    }
    for name, (lines, said) in changes.items():
        manifest = dataset.parent / f"{name}.csv"
        manifest.write_text("\n".join(lines) + "\n")
        with pytest.raises(StoreError) as refused:
            run(manifest, store_path)
        assert f"the dataset differs: {said}" in str(refused.value), (name, str(refused.value))
    tone(dataset.parent / "c1.wav", 2.5, 880)  # a file that grew: its windows shift every item after it
    with pytest.raises(StoreError) as refused:
        run(dataset, store_path)
    assert ("the dataset differs: train has 6 items in the store, 8 now; the first to differ: train item 2 is 'c2.wav' in the "
            "store but 'c1.wav@1' now") in str(refused.value), str(refused.value)
    assert "another order" not in str(refused.value)


def test_sigterm_stops_as_ctrl_c_does(dataset, tmp_path, monkeypatch, capsys):
    """SLURM sends SIGTERM at a job's time limit: the log says what is kept instead of just ending."""
    import tokens.cache.store as store_module
    from tokens.__main__ import main

    store_path = tmp_path / "s.zarr"
    written = store_module.Split.write_shard

    def terminated_at_the_second(self, shard, **kw):
        if self.name == "train" and shard == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        written(self, shard, **kw)

    monkeypatch.setattr(store_module.Split, "write_shard", terminated_at_the_second)
    monkeypatch.setattr(sys, "argv", ["tokens", "extract", str(dataset), "--store", str(store_path), "-q",
                                      "--num-workers", "0", "--shard-size", "2"])
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stopped:
            main()
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stopped.value.code == 130
    said = " ".join(capsys.readouterr().err.split())
    assert re.search(rf"interrupted: [1-5] of 5 shards are complete in {re.escape(str(store_path))} and kept; run the same command again to go on", said)  # the shards in hand are written too
    monkeypatch.setattr(store_module.Split, "write_shard", written)
    again = CliRunner().invoke(app, sys.argv[1:])
    assert again.exit_code == 0 and "already complete)" in again.output, again.output


def test_a_resume_under_other_library_versions_says_so(dataset, tmp_path):
    """They are not in the cache key (an upgrade may resume), but the shards written now are made
    another way than those the store records the versions of."""
    store_path = tmp_path / "s.zarr"
    run(dataset, store_path)

    def unfinished():  # a shard left to write
        with open_store(store_path, "a") as store:
            store.split("train").mark_incomplete(0)

    record = json.loads((store_path / "zarr.json").read_text())
    record["attributes"]["extra"]["versions"]["torch"] = "2.10.0"
    (store_path / "zarr.json").write_text(json.dumps(record))
    said = []
    unfinished()
    run(dataset, store_path, log=said.append)
    assert any(line.startswith("note: the store was begun under torch 2.10.0 (") for line in said), said
    said.clear()
    run(dataset, store_path, log=said.append)  # finished: no shard will be made another way
    assert said and not any("begun under" in line for line in said), said
    record["attributes"]["extra"]["versions"].pop("torch")
    record["attributes"]["extra"].pop("versions")  # a store made before versions were recorded: nothing to say
    (store_path / "zarr.json").write_text(json.dumps(record))
    said.clear()
    unfinished()
    run(dataset, store_path, log=said.append)
    assert said and not any("begun under" in line for line in said), said


def test_ctrl_c_while_the_command_imports_torch_says_so(dataset, tmp_path, monkeypatch):
    """The first seconds of `tokens extract` go to importing torch: an interrupt then said nothing.
    Another failure of that import comes out as itself."""
    import importlib.abc

    class Interrupted(importlib.abc.MetaPathFinder):
        error = KeyboardInterrupt()

        def find_spec(self, name, path, target=None):
            if name == "tokens.extract.run":
                raise self.error

    monkeypatch.delitem(sys.modules, "tokens.extract.run")
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    result = CliRunner().invoke(app, ["extract", str(dataset), "--store", str(tmp_path / "s.zarr"), "-q"])
    assert result.exit_code == 130 and "interrupted: run the same command again to go on" in result.output, result.output
    Interrupted.error = ImportError("broken torch")
    result = CliRunner().invoke(app, ["extract", str(dataset), "--store", str(tmp_path / "s.zarr"), "-q"])
    assert isinstance(result.exception, ImportError) and "broken torch" in str(result.exception)  # itself, not a NameError


@pytest.mark.parametrize("stop", ["raise KeyboardInterrupt", "os.kill(os.getpid(), signal.SIGTERM)"])
def test_a_stop_while_the_command_itself_starts_says_so(stop):
    """Before `tokens` reaches a verb it imports the stages, and torch with them: Ctrl-C then gave
    torch's traceback, and SIGTERM (SLURM's, or the requeueing script's) ended the process without a
    word; each says that nothing was done."""
    script = textwrap.dedent(f"""
        import importlib.abc, os, signal, sys
        class Interrupted(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "tokens.train.commands":
                    {stop}
        sys.meta_path.insert(0, Interrupted())
        sys.argv = ["tokens", "--help"]
        from tokens.__main__ import main
        main()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and done.stderr == "interrupted while tokens was starting: nothing was done\n", done.stderr


def test_ctrl_c_says_what_is_kept_and_the_same_command_finishes(dataset, tmp_path, monkeypatch):
    import tokens.cache.store as store_module

    store_path = tmp_path / "s.zarr"
    command = ["extract", str(dataset), "--store", str(store_path), "-q", "--num-workers", "0", "--shard-size", "2", "-l", "all"]
    written = store_module.Split.write_shard

    def stopped_at_the_second(self, shard, **kw):
        if self.name == "train" and shard == 1:
            raise KeyboardInterrupt
        written(self, shard, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(store_module.Split, "write_shard", stopped_at_the_second)
        result = CliRunner().invoke(app, command)
    assert result.exit_code == 130, result.output
    assert f"interrupted: 1 of 5 shards are complete in {store_path} and kept; run the same command again to go on" in " ".join(result.output.split())
    with open_store(store_path) as store:
        assert store.split("train").complete_mask().tolist()[:2] == [True, False]
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0 and "(1 already complete)" in again.output, again.output


def test_a_changed_file_window_or_class_of_an_item_is_named(tmp_path):
    """Ids given in the manifest stay when an item's file, window or (multi-class) label changes."""
    data = tmp_path / "data"
    data.mkdir()
    for name, freq in (("a.wav", 220), ("b.wav", 440)):
        tone(data / name, 1.0, freq)
    rows = {"first": "a.wav,x,train,one,\nb.wav,y,train,two,",
            "swapped": ("b.wav,x,train,one,\na.wav,y,train,two,", "train item 0 (one) is read from a.wav in the store but b.wav now"),
            "later": ("a.wav,x,train,one,0.5\nb.wav,y,train,two,", "train item 0 (one) is 1 s from 0 s in the store, 0.5 s from 0.5 s now"),
            "renamed": ("a.wav,x,train,one,\nb.wav,x,train,two,", "train item 1 (two) is labelled y in the store but x now")}
    header = "path,label,split,id,start\n"
    (data / "first.csv").write_text(header + rows.pop("first") + "\n")
    run(data / "first.csv", tmp_path / "s.zarr")
    for name, (text, said) in rows.items():
        (data / f"{name}.csv").write_text(header + text + "\n")
        with pytest.raises(StoreError, match=re.escape(f"the dataset differs: {said}")):
            run(data / f"{name}.csv", tmp_path / "s.zarr")


KILLED_RUN = """
import sys, time
import tokens.cache.store as store
original = store.Split.write_shard
def slow(self, shard, **kw):  # give the test time to kill us between shards
    original(self, shard, **kw)
    print("wrote", self.name, shard, flush=True)
    time.sleep(0.5)
store.Split.write_shard = slow
from tokens.extract.run import extract
extract(sys.argv[1], sys.argv[2], layers="all", batch_size=1, num_workers=0, progress=False, shard_size=2)
"""


def test_a_killed_extraction_resumes_to_the_same_store(dataset, tmp_path):
    reference = tmp_path / "reference.zarr"
    run(dataset, reference)
    store_path = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(dataset), str(store_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("wrote")  # one shard done, more to come
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open_store(store_path) as store:
        assert not all(split.is_complete for split in store.splits.values())
    resumed = run(dataset, store_path)
    assert resumed.shards_skipped >= 1
    with open_store(reference) as a, open_store(store_path) as b:
        for name, split in a.splits.items():
            every = np.arange(split.num_items)
            for layer in split.layers:
                np.testing.assert_array_equal(split.read_tokens(layer, every), b.split(name).read_tokens(layer, every))
            for column in ("ids", "labels", "offsets", "errors"):
                np.testing.assert_array_equal(split.column(column), b.split(name).column(column))


def test_cli_dry_run_and_info(dataset, tmp_path):
    store_path = tmp_path / "s.zarr"
    result = CliRunner().invoke(app, ["extract", str(dataset), "--store", str(store_path), "--layers", "all", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "8 items" in result.output and "101x4" in result.output and not store_path.exists()
    result = CliRunner().invoke(app, ["extract", str(dataset), "--store", str(store_path), "-q", "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    assert re.search(r"wrote 8 items in \d+ shards .* s to the first batch, then [\d.]+ items/s\)", result.output), result.output
    info = CliRunner().invoke(app, ["info", str(store_path)])
    assert "crepe-tiny" in info.output and "complete" in info.output
    assert f"from       {dataset} on " in info.output and "command    " in info.output, info.output  # provenance
    assert f"versions   torch {importlib.metadata.version('torch')}, torchaudio " in info.output and "torchcrepe " in info.output, info.output
    inside = CliRunner().invoke(app, ["info", str(store_path / "train")])
    assert inside.exit_code == 2 and f"it lies inside the store {store_path}: give that path" in inside.output, inside.output
    bad = CliRunner().invoke(app, ["extract", str(dataset), "--store", str(store_path), "--layers", "x"])
    assert bad.exit_code != 0 and "--layers" in bad.output


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_a_dry_runs_size_is_the_size_of_the_store_it_plans(dataset, tmp_path, fmt):
    """Small datasets included: a zarr store pads each split's per-item columns to whole shards,
    more than the tokens themselves here (8 items, shards of 2 595)."""
    store_path = tmp_path / f"s.{'zarr' if fmt == 'zarr' else 'h5'}"
    planned = extract(dataset, store_path, fmt=fmt, layers="all", dry_run=True, progress=False).disk_bytes()
    extract(dataset, store_path, fmt=fmt, layers="all", num_workers=0, progress=False)
    with open_store(store_path) as store:
        written = store.disk_bytes()
    assert planned == pytest.approx(written, rel=0.05)  # less the metadata files


def test_a_dry_run_says_what_the_existing_store_holds_or_refuses(dataset, tmp_path):
    """The dry run comes before the real one: it must not promise a run that will be refused, nor
    bytes that are already written."""
    store_path = tmp_path / "s.zarr"
    run(dataset, store_path)
    shards = -(-6 // 2) + 1 + 1  # train 6 items (3 shards of 2), valid 1, test 1
    again = CliRunner().invoke(app, ["extract", str(dataset), "--store", str(store_path), "--layers", "all",
                                     "--shard-size", "2", "--dry-run"])
    assert again.exit_code == 0 and f"{shards} of these {shards} shards are already complete" in again.output, again.output
    other = CliRunner().invoke(app, ["extract", str(dataset), "--store", str(store_path), "--layers", "0",
                                     "--shard-size", "2", "--dry-run"])
    assert other.exit_code == 2 and "layers" in other.output and "another configuration" in other.output, other.output


@pytest.mark.parametrize("options, message", [({"dtype": "float64"}, "--dtype 'float64'"), ({"precision": "fp16"}, "--precision 'fp16'"),
                                             ({"fmt": "parquet"}, "--format 'parquet'"), ({"layers": [7]}, "--layers: 7")])
def test_bad_options_of_the_python_api_are_refused_before_the_dataset_is_read(tmp_path, options, message):
    """The same clear errors as the command line's, before minutes of checking a large dataset."""
    with pytest.raises(ExtractionError, match=re.escape(message)):
        extract(tmp_path / "no-such-manifest.csv", tmp_path / "s.zarr", dry_run=True, **options)


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size 0: use 1 or more"),
    (["--num-workers", "-1"], "--num-workers -1: use 0 or more"),
    (["--shard-size", "-1"], "--shard-size -1: use 0 or more"),
    (["-o", "window_seconds=abc"], "crepe-tiny option window_seconds='abc' is not a number"),
    (["--codec", "bogus", "--dry-run"], "codec 'bogus' is not available for zarr stores"),
    (["--layers", ""], "'' is not 'all' or a comma-separated list of integers"),
    (["-o", "window_seconds=0"], "crepe-tiny option window_seconds=0 must be positive"),
    (["-o", "window_seconds=1", "-o", "window_seconds=2"], "window_seconds given twice (1 and 2): give it once"),
])
def test_bad_numbers_are_refused_by_name_and_leave_no_store(dataset, tmp_path, args, message):
    """A store left behind by a refused run would make the corrected rerun look like another configuration."""
    store_path = tmp_path / "s.zarr"
    result = CliRunner().invoke(app, ["extract", str(dataset), "--store", str(store_path), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not store_path.exists()


@pytest.mark.parametrize("device, message", [
    ("tpu", "use auto, cpu, cuda or cuda:N"),
    ("cuda:99", "CUDA device(s) are visible here" if torch.cuda.is_available() else "--device cuda:99: no CUDA device is visible"),
])
def test_an_unusable_device_is_refused_before_any_work(dataset, tmp_path, device, message):
    store_path = tmp_path / "s.zarr"
    result = CliRunner().invoke(app, ["extract", str(dataset), "--store", str(store_path), "--device", device])
    assert result.exit_code == 2 and "--device" in result.output and message in result.output, result.output
    assert not store_path.exists()


def test_the_warm_up_runs_a_blank_batch_and_reports_its_error_to_the_caller():
    """WarmUp (on GPU runs, beside the dataset check) puts the model on its device and runs one
    batch of the run's shapes; an error in its thread is raised by finish(), not lost."""
    from tokens.extract.forward import Forward
    from tokens.extract.run import WarmUp

    model = build_backbone("crepe-tiny")
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(tuple(args[0].shape)))
    WarmUp(Forward(model, torch.device("cpu"), [-1], "float16", "bf16", batch_size=3)).finish()
    inputs, _ = model.preprocess(np.zeros(model.window_samples, np.float32))
    assert seen == [(3, *inputs.shape)]

    broken = build_backbone("crepe-tiny")
    broken.block_outputs = lambda inputs, mask: (_ for _ in ()).throw(RuntimeError("out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        WarmUp(Forward(broken, torch.device("cpu"), [-1], "float16", "fp32", batch_size=2)).finish()


class FailingWarmUp:
    """Stands in for the GPU warm-up and fails as it would when CUDA runs out of memory."""

    def __init__(self, *args):
        pass

    def join(self):
        pass

    def finish(self):
        raise RuntimeError("CUDA out of memory in the warm-up")


@pytest.fixture
def failing_warm_up(monkeypatch):
    """A run that believes it is on a GPU whose warm-up fails."""
    import tokens.extract.run as run_module

    monkeypatch.setattr(run_module, "pick_device", lambda name: torch.device("cuda") if name == "auto" else torch.device(name))
    monkeypatch.setattr(run_module, "WarmUp", FailingWarmUp)


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")  # CUDA is pretended here
def test_on_a_gpu_run_the_datasets_problems_are_reported_even_if_the_warm_up_failed(dataset, tmp_path, failing_warm_up):
    """The warm-up runs beside the dataset check: a bad manifest is the error the user sees, and
    with a good one the warm-up's own error is raised before any work."""
    from tokens.extract.manifest import ManifestError

    bad = dataset.parent / "bad.csv"
    bad.write_text("path,labels,split\nmissing.wav,low,train\n")
    with pytest.raises(ManifestError, match="missing.wav"):
        run(bad, tmp_path / "bad.zarr")
    with pytest.raises(RuntimeError, match="warm-up"):
        run(dataset, tmp_path / "s.zarr")
    with open_store(tmp_path / "s.zarr") as store:  # created before the workers start; nothing written
        assert not any(store.split(name).complete_mask().any() for name in store.splits)


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")  # CUDA is pretended here
def test_a_failed_warm_up_stops_the_workers_started_beside_it(dataset, tmp_path, failing_warm_up):
    """The DataLoader workers start decoding before the GPU warm-up is joined: when the warm-up
    fails, its error is the one raised and no worker outlives the call."""
    with pytest.raises(RuntimeError, match="warm-up") as raised:
        run(dataset, tmp_path / "s.zarr", num_workers=2)
    assert multiprocessing.active_children() == [], raised.traceback  # the traceback (and its frames) still held


def test_an_error_raised_by_the_data_loader_stops_its_workers(dataset, tmp_path, monkeypatch):
    """A worker's own failure comes back through the loader's iterator, whose frame the error's
    traceback keeps: the workers are stopped explicitly, not when the error is let go."""
    import tokens.extract.run as run_module

    def broken(rows):
        raise RuntimeError("collate broke")

    monkeypatch.setattr(run_module, "collate", broken)
    with pytest.raises(RuntimeError, match="collate broke") as raised:
        run(dataset, tmp_path / "s.zarr", num_workers=2)
    assert multiprocessing.active_children() == [], raised.traceback


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")  # CUDA is pretended here
def test_a_failed_warm_up_closes_the_store_it_resumes(dataset, tmp_path, monkeypatch, failing_warm_up):
    """A store being resumed is opened before the GPU's warm-up is done: if the warm-up fails,
    the store is closed again (an HDF5 store would otherwise stay locked)."""
    import tokens.cache.store as store_module

    run(dataset, tmp_path / "s.h5", layers=[0], device="cpu")
    with open_store(tmp_path / "s.h5", mode="a") as store:  # make the run resume a shard
        store._handle.file["train/complete"][0] = 0
    opened, closed = [], []
    init, close = store_module.TokenStore.__init__, store_module.TokenStore.close
    monkeypatch.setattr(store_module.TokenStore, "__init__", lambda self, *a, **k: (opened.append(a[0]), init(self, *a, **k))[1])
    monkeypatch.setattr(store_module.TokenStore, "close", lambda self: (closed.append(self.path), close(self)))

    with pytest.raises(RuntimeError, match="warm-up"):
        run(dataset, tmp_path / "s.h5", layers=[0], precision="fp32")  # as the CPU run that made it
    assert len(opened) >= 2 and closed == opened  # the dataset check's look at the classes, then the resumed store


def test_the_first_shards_buffers_are_allocated_ahead_and_reused():
    """ArrayPool.reserve fills the free list that take() draws from; a failed reservation (out of
    memory) leaves take() to allocate, and raise, on its own."""
    from tokens.cache import StoreSpec
    from tokens.extract.run import ArrayPool

    spec = StoreSpec(backbone="b", backbone_config={}, checkpoint_sha256=None, frontend={}, layers=[0, 2], final_norm=False,
                     dtype="float16", grid=(2, 3), dim=4, num_prefix=1, task="multiclass", classes=["a"],
                     splits={"train": 10}, dataset_fingerprint="f", shard_size=4)
    pool = ArrayPool(spec)
    pool.reserve([4, 4, 2]).join()  # the last shard of a split can be shorter
    reserved = [id(arrays) for arrays in pool.free[4]]
    assert len(reserved) == 2 and len(pool.free[2]) == 1
    targets, tokens, prefix, mask = taken = pool.take(4)
    assert id(taken) in reserved and len(pool.free[4]) == 1
    assert tokens[2].shape == (4, 6, 4) and prefix[0].shape == (4, 1, 4) and mask.shape == (4, 6)
    assert pool.take(3)[1][0].shape == (3, 6, 4)  # a size not reserved: allocated on demand
    for arrays in (taken, pool.take(3)):  # the store writes token shards from page-aligned memory around the page cache
        for layer in spec.layers:
            assert arrays[1][layer].ctypes.data % 4096 == 0 and arrays[2][layer].ctypes.data % 4096 == 0
            assert arrays[0][layer][0].data_ptr() == arrays[1][layer].ctypes.data  # the same memory as the numpy views

    def out_of_memory(n, touch=False):
        raise RuntimeError("CUDA error: out of memory")

    empty = ArrayPool(spec)
    empty._allocate = out_of_memory
    empty.reserve([4, 4]).join()
    assert not empty.free.get(4)


def test_take_waits_for_a_reservation_under_way_rather_than_allocating_beside_it():
    """Pinned memory is slow to allocate: the main thread takes what the reserving thread makes."""
    from tokens.cache import StoreSpec
    from tokens.extract.run import ArrayPool

    spec = StoreSpec(backbone="b", backbone_config={}, checkpoint_sha256=None, frontend={}, layers=[0], final_norm=False,
                     dtype="float16", grid=(2, 3), dim=4, num_prefix=0, task="multiclass", classes=["a"],
                     splits={"train": 8}, dataset_fingerprint="f", shard_size=4)
    pool = ArrayPool(spec)
    allocate, allowed, made = pool._allocate, threading.Semaphore(0), []

    def slow_allocate(n, touch=False):
        allowed.acquire()
        made.append(allocate(n, touch))
        return made[-1]

    pool._allocate = slow_allocate
    reserving = pool.reserve([4, 4])
    taken = []
    taking = threading.Thread(target=lambda: taken.append(pool.take(4)))
    taking.start()
    taking.join(0.2)
    assert taking.is_alive()  # nothing is free yet: take() waits instead of allocating a third buffer
    allowed.release()
    taking.join(5)
    assert taken and taken[0] is made[0]
    allowed.release()
    reserving.join(5)
    assert not reserving.is_alive() and len(made) == 2 and pool.free[4] == [made[1]]
    allowed.release()
    assert pool.take(2)[1][0].shape == (2, 6, 4) and len(made) == 3  # no reservation of this size: allocated at once


def test_the_command_line_loads_neither_scikit_learn_nor_matplotlib():
    """Every `tokens extract` process (array task, torchrun rank) would pay a second or more for them."""
    code = "import sys, tokens.cli; print(sorted(m for m in ('sklearn', 'matplotlib', 'scipy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_readmes_python_example_runs_and_reads_the_stored_values(dataset, tmp_path, dtype):
    """The README's "From Python" block, run as written: the tokens that reach the head are the
    activations (a float32 store of the same data, rounded to the dtype), not a bfloat16 store's bits."""
    store_path, exact_path = tmp_path / "s.zarr", tmp_path / "exact.zarr"
    run(dataset, store_path, dtype=dtype)
    run(dataset, exact_path, dtype="float32")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = block.replace('"as20k-eat.zarr"', repr(str(store_path))).replace("read_tokens(11,", "read_tokens(2,").replace("[0, 5, 7]", "[0, 2, 5]")
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    with open_store(exact_path) as exact:
        expected = torch.from_numpy(exact.split("train").read_tokens(2, [0, 2, 5])).to(getattr(torch, dtype)).float()
    torch.testing.assert_close(scope["as_tensor"](scope["tokens"], dtype).float(), expected, rtol=0, atol=0)
    assert scope["logits"].shape == (3, 3)


def test_an_empty_directory_made_beforehand_becomes_the_store(dataset, tmp_path):
    store_path = tmp_path / "out.zarr"
    store_path.mkdir()
    args = ["extract", str(dataset), "--store", str(store_path), "-q", "--num-workers", "0", "--shard-size", "2"]
    planned = CliRunner().invoke(app, [*args, "--dry-run"])
    assert planned.exit_code == 0 and "already complete" not in planned.output, planned.output
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0 and "wrote 8 items" in first.output, first.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "wrote 0 items" in again.output, again.output


def test_a_raw_store_records_the_final_norm_and_probes_apply_it_as_extraction_would(dataset, tmp_path):
    """backbones.md: caching the raw block outputs and the final norm's weights lets either be had at
    probe time. Oracle: the tokens of a store extracted with --final-norm (float32 both, so the norm's
    input is the same numbers)."""
    timm = pytest.importorskip("timm")
    from tokens.cache.commands import describe, render
    from tokens.train.data import FinalNorm, Source, usable_items

    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=(1024, 128), patch_size=16, in_chans=1, embed_dim=64, depth=2, num_heads=4, num_classes=0)
    with torch.no_grad():  # a norm of its own, not the identity LayerNorm starts as
        vit.norm.weight.uniform_(0.5, 2.0)
        vit.norm.bias.normal_()
    checkpoint = tmp_path / "audiomae.pth"
    torch.save({"model": vit.state_dict()}, checkpoint)
    options = dict(backbone="audiomae", checkpoint=str(checkpoint), backbone_options=dict(dim=64, depth=2, num_heads=4),
                   dtype="float32", precision="fp32", device="cpu")
    run(dataset, tmp_path / "raw.zarr", **options)
    run(dataset, tmp_path / "normed.zarr", final_norm=True, **options)
    cpu = torch.device("cpu")
    with open_store(tmp_path / "raw.zarr") as raw, open_store(tmp_path / "normed.zarr") as normed:
        recorded = raw.meta["final_norm_params"]
        assert np.array(recorded["weight"], np.float32).tobytes() == vit.norm.weight.detach().numpy().tobytes()
        assert np.array(recorded["bias"], np.float32).tobytes() == vit.norm.bias.detach().numpy().tobytes()
        assert recorded["eps"] == vit.norm.eps and normed.meta["final_norm_params"] is None
        assert "final norm not applied (recorded: tokens probe --final-norm applies it)" in render(describe(raw))
        assert "final norm applied" in render(describe(normed))
        # the front-end, in a line of its own: AudioMAE's published normalisation and 128-mel fbank
        (line,) = [line for line in render(describe(raw)).splitlines() if line.startswith("input      ")]
        assert "mean=-4.2677393, std=4.5689974, num_mel_bins=128" in line and "target_frames=1024" in line, line
        with pytest.raises(ValueError, match="normed already"):
            FinalNorm.recorded(normed.meta, cpu)
        for name in raw.splits:
            items = usable_items(raw.split(name))
            ours = Source(raw.split(name), [0, 1], True, "stream", cpu, norm=FinalNorm.recorded(raw.meta, cpu))
            theirs = Source(normed.split(name), [0, 1], True, "stream", cpu)
            ours, theirs = ours.to_batch(ours.read(items)), theirs.to_batch(theirs.read(items))
            for layer in (0, 1):
                torch.testing.assert_close(ours.tokens[layer], theirs.tokens[layer], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(ours.cls[layer], theirs.cls[layer], rtol=1e-4, atol=1e-5)
            plain = Source(raw.split(name), [1], False, "stream", cpu)  # raw tokens: not what the norm gives
            assert not torch.allclose(ours.tokens[1], plain.to_batch(plain.read(items)).tokens[1], atol=1e-2)


def test_a_slow_rate_is_not_shown_as_zero():
    """crepe-full on a CPU makes under one item a second: the summary said 'then 0 items/s'."""
    from tokens.extract.commands import _rate

    assert [_rate(r) for r in (2447.4, 56.2, 9.87, 0.4234)] == ["2447", "56", "9.9", "0.42"]
