"""The probe stage on small synthetic stores: sweeps, predict, resume, parts, data modes, refusals."""

import csv
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from sklearn.metrics import accuracy_score, average_precision_score, balanced_accuracy_score, roc_auc_score
from typer.testing import CliRunner

from tokens.cache import StoreSpec, create_or_open, open_store
from tokens.train import commands, heads
from tokens.train import probe as recipe
from tokens.train.metrics import compute_metrics
from tokens.train import report as report_module
from tokens.train import sweep as sweeps
from tokens.train.data import BLOCK_ITEMS, RUN_ITEMS, as_tensor, epoch_order, hold_out, usable_items
from tokens.train.heads import build_head

T, F, D = 4, 4, 96
CLASSES = ["bird", "car", "rain"]
SIZES = {"train": 150, "valid": 48, "test": 48}
FAST = ["--epochs", "4", "--batch-size", "16", "--warmup-epochs", "1", "--device", "cpu"]
SWEEP = ["--heads", "linear,ep,protobin", "--option", "ep.num_queries=4", "--option", "protobin.prototypes_per_class=4", "--seeds", "0,1"]

app = typer.Typer()
app.command()(commands.probe)
app.command()(commands.report)
app.command()(commands.predict)


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def said(result) -> str:
    """The output with rich's error box and line wrapping taken out."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def make_store(path, task="multilabel", dtype="float16", splits=SIZES, written=None, failed=(5,), normed_by=None, dim=D, **spec_changes):
    """Tokens with each item's classes written into a few of its tokens; the tail tokens of some
    items are padding (masked, filled with garbage); the `failed` train items failed extraction.
    `normed_by`: a final norm's parameters, applied to the tokens (float32) before they are written."""
    spec = StoreSpec(
        backbone="synthetic", backbone_config={}, checkpoint_sha256=None, frontend={}, layers=[3, 6],
        final_norm=False, dtype=dtype, grid=(T, F), dim=dim, num_prefix=1, task=task, classes=CLASSES,
        splits=dict(splits), dataset_fingerprint=path.name, masked=True, shard_size=32,
    )
    spec = dataclasses.replace(spec, **spec_changes)
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(len(CLASSES), dim)) * 1.5
    with create_or_open(path, spec) as store:
        for name, n in splits.items():
            if task == "multilabel":
                labels = (rng.random((n, len(CLASSES))) < 0.35).astype(np.uint8)
                present = labels.astype(bool)
            else:
                labels = rng.integers(0, len(CLASSES), n)
                present = np.eye(len(CLASSES), dtype=bool)[labels]
            tokens = {}
            for layer, strength in zip(spec.layers, (0.5, 1.0)):
                x = rng.normal(size=(n, T * F, dim))
                for i in range(n):
                    for c in np.flatnonzero(present[i]):
                        x[i, rng.choice(T * F - 4, 2, replace=False)] += strength * directions[c]
                tokens[layer] = x
            prefix = {layer: x[:, None].mean(2) for layer, x in tokens.items()}
            mask = np.ones((n, T * F), bool)
            mask[::3, -4:] = False
            for x in tokens.values():
                x[~mask] = 50.0
            errors = ["" for _ in range(n)]
            if name == "train":
                for i in failed:
                    errors[i] = "unreadable: test"
            split = store.split(name)
            cast = functools.partial(_cast, dtype=dtype) if normed_by is None else functools.partial(_normed, params=normed_by)
            for shard in range(split.num_shards) if written is None else written:
                a, b = split.shard_range(shard)
                split.write_shard(
                    shard, tokens={k: cast(v[a:b]) for k, v in tokens.items()},
                    prefix={k: cast(v[a:b]) for k, v in prefix.items()}, mask=mask[a:b],
                    labels=labels[a:b], ids=[f"{name}-{i}" for i in range(a, b)], sources=[f"{name}-{i // 2}.wav" for i in range(a, b)],
                    offsets=np.zeros(b - a), durations=np.ones(b - a), errors=errors[a:b],
                )
    return path


def _cast(x, dtype):
    if dtype == "bfloat16":
        return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return x.astype(dtype)


def _normed(x, params):
    """float32 tokens through a LayerNorm, as torch computes it."""
    weight, bias = (torch.tensor(params[k], dtype=torch.float32) for k in ("weight", "bias"))
    return torch.nn.functional.layer_norm(torch.from_numpy(x.astype(np.float32)), (D,), weight, bias, params["eps"]).numpy()


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def leaderboard(run):
    return {row["config"]: row for row in read_csv(run / "leaderboard.csv")}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "ml.zarr")


@pytest.fixture(scope="module")
def run(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    ok("probe", store, *SWEEP, *FAST, "--data", "stream", "--out", out)
    return out


def test_sweep_writes_every_result_and_predict_agrees_with_sklearn(store, run, tmp_path):
    rows = read_csv(run / "leaderboard.csv")
    assert len(rows) == 6
    for column in ("head", "config", "params", "best_epoch", "layer", "lr", "wd", "seed",
                   "val_map", "val_roc_auc", "test_map", "test_roc_auc"):
        assert column in rows[0]
    assert [float(r["val_map"]) for r in rows] == sorted((float(r["val_map"]) for r in rows), reverse=True)
    ids = {r["config"] for r in rows}
    assert "ep[num_queries=4]/lr=0.001/wd=0.0001/layer=6/seed=1" in ids
    assert "protobin[prototypes_per_class=4]/lr=0.02/wd=0.0001/layer=6/seed=0" in ids
    best_ep = max((r for r in rows if r["head"] == "ep"), key=lambda r: float(r["val_map"]))
    assert float(best_ep["test_map"]) > 0.6  # the evidence is learnable

    config = json.loads((run / "config.json").read_text())
    assert config["data_mode"] == "stream" and config["validation"].startswith("valid split")
    assert len(config["configs"]) == 6 and config["store_key"] == open_store(store).meta["cache_key"]
    for row in rows:
        record = json.loads((run / "heads" / f"{sweeps.sanitise(row['config'])}.json").read_text())
        assert set(record["per_class_ap"]) == set(CLASSES) and len(record["val_curve"]) == 4
    assert (run / "params_vs_metric.png").stat().st_size and (run / "val_curves.png").stat().st_size
    saved = torch.load(run / "best" / "ep.pt", weights_only=True)
    assert saved["config"] == best_ep["config"]

    scores_path = tmp_path / "scores.csv"
    ok("predict", store, "--head", run / "best" / "ep.pt", "--split", "test", "--out", scores_path,
       "--batch-size", "16", "--device", "cpu")
    scores = read_csv(scores_path)
    assert list(scores[0]) == ["id", "source", "offset", *CLASSES]
    split = open_store(store).split("test")
    labels = split.column("labels")[usable_items(split)]
    assert [s["id"] for s in scores] == [f"test-{i}" for i in usable_items(split)]
    assert [(s["source"], s["offset"]) for s in scores] == [(f"test-{i // 2}.wav", "0") for i in usable_items(split)]
    s = np.array([[float(row[c]) for c in CLASSES] for row in scores])
    expected_map = np.mean([average_precision_score(labels[:, c], s[:, c]) for c in range(3)])
    expected_auc = np.mean([roc_auc_score(labels[:, c], s[:, c]) for c in range(3)])
    assert float(best_ep["test_map"]) == pytest.approx(expected_map, abs=1e-9)
    assert float(best_ep["test_roc_auc"]) == pytest.approx(expected_auc, abs=1e-9)


def _final_states(run):
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    return dict(zip(state["plan"]["configs"], state["probes"]))


def test_a_head_in_a_sweep_ends_as_it_would_alone(store, run, tmp_path):
    alone = tmp_path / "alone"
    ok("probe", store, "--heads", "ep", "--option", "ep.num_queries=4", "--seeds", "1", *FAST, "--data", "stream", "--out", alone)
    (config,) = _final_states(alone)
    mine, theirs = _final_states(alone)[config], _final_states(run)[config]
    for key in ("head", "best_state"):
        for name, tensor in mine[key].items():
            torch.testing.assert_close(tensor, theirs[key][name], rtol=0, atol=1e-6)
    assert leaderboard(alone)[config] == leaderboard(run)[config]


def test_an_interrupted_sweep_resumes_to_the_same_results(store, run, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(recipe, "run", functools.partial(recipe.run, stop_after=2))
        ok("probe", store, *SWEEP, *FAST, "--data", "stream", "--out", out)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert not (out / "leaderboard.csv").exists()
    reordered = ["--heads", "protobin,linear,ep", *SWEEP[2:]]  # the same sweep, listed in another order
    result = ok("probe", store, *reordered, *FAST, "--data", "stream", "--out", out)
    assert "resuming" in result.output
    assert leaderboard(out) == leaderboard(run)
    other = invoke("probe", store, *SWEEP, *FAST[:-4], "--batch-size", "8", "--device", "cpu", "--out", out)
    assert other.exit_code == 2 and "--out" in said(other) and "batch_size" in said(other)
    other = invoke("probe", store, *SWEEP, *FAST, "--optimizer", "lars", "--out", out)
    assert other.exit_code == 2 and "optimizer 'adamw' there, 'lars' here" in said(other), said(other)
    assert json.loads((out / "config.json").read_text())["training"]["batch_size"] == 16


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]])
def test_a_sweep_stopped_mid_epoch_resumes_from_the_step_to_the_same_results(store, run, tmp_path, monkeypatch, signals):
    """SIGTERM (a SLURM requeue's) or Ctrl-C mid-epoch saves the step in hand, where the epoch was
    lost; a second signal stops at once, from the last save. Either way the resumed sweep ends as
    the uninterrupted one."""
    out, calls = tmp_path / "stopped", []

    def signalled(*args, **kwargs):  # the 4th step of the 2nd epoch (9 a epoch): a signal in its middle
        calls.append(1)
        if len(calls) == 13:
            for number in signals:
                os.kill(os.getpid(), number)
        return factor(*args, **kwargs)

    factor = recipe.lr_factor
    with monkeypatch.context() as patch:
        patch.setattr(recipe, "lr_factor", signalled)
        result = invoke("probe", store, *SWEEP, *FAST, "--data", "stream", "--out", out)
    assert result.exit_code == 130 and "resume from where" in said(result), result.output
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    if len(signals) == 1:
        assert (saved["epoch"], saved["step"]) == (1, 4) and "stopped at step 4 of 9 of epoch 2" in result.output
    else:
        assert (saved["epoch"], saved["step"]) == (1, 0)  # the second signal did not wait: the first epoch's end
    result = ok("probe", store, *SWEEP, *FAST, "--data", "stream", "--out", out)
    assert ("and 4 of the next one's 9 steps" in result.output) == (len(signals) == 1), result.output
    assert leaderboard(out) == leaderboard(run)
    for config, state in _final_states(out).items():
        for name, tensor in state["best_state"].items():
            assert torch.equal(tensor, _final_states(run)[config]["best_state"][name]), (config, name)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_sweep_checkpointed_on_a_gpu_resumes_on_a_cpu(store, tmp_path, monkeypatch):
    """A job resubmitted to another kind of node: the heads' random states (a GPU's generator keeps 16
    bytes, a CPU's 5 056) cannot go on there. Dropout goes on from new ones, with a note; the rest of
    the sweep is as it was. (tests/test_gpu.py does it with a real GPU's checkpoint, both ways.)"""
    out = tmp_path / "moved"
    sweep = ["--heads", "mlp", "--option", "mlp.dropout=0.5", "--lr", "0.01", "--seeds", "0,1"]
    with monkeypatch.context() as patch:
        patch.setattr(recipe, "run", functools.partial(recipe.run, stop_after=2))
        ok("probe", store, *sweep, *FAST, "--out", out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    for probe in state["probes"]:
        probe["rng"] = torch.zeros(16, dtype=torch.uint8)  # the size of a GPU's state
    torch.save(state, out / "checkpoint.pt")
    result = ok("probe", store, *sweep, *FAST, "--out", out)
    assert "resuming" in result.output and "saved on another kind of device than cpu" in result.output, result.output
    assert len(leaderboard(out)) == 2


def test_ctrl_c_says_how_to_resume_and_a_run_stopped_while_plotting_is_not_taken_as_finished(store, run, tmp_path, monkeypatch):
    """Ctrl-C while the last results are written (the plots) leaves no leaderboard, the mark of a
    finished run that `tokens report` goes by; the rerun writes everything."""
    out = tmp_path / "stopped"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(report_module, "plot_val_curves", interrupted)
        result = invoke("probe", store, *SWEEP, *FAST, "--data", "stream", "--out", out)
    assert result.exit_code == 130 and "run the same command again to resume" in said(result), said(result)
    assert not (out / "leaderboard.csv").exists()
    assert "no leaderboard.csv yet" in ok("report", run, out, "--out", tmp_path / "r").output
    ok("probe", store, *SWEEP, *FAST, "--data", "stream", "--out", out)
    assert leaderboard(out) == leaderboard(run) and (out / "val_curves.png").stat().st_size


def test_quiet_leaves_progress_bars_out_of_a_log(store, tmp_path):
    loud = ok("probe", store, "--heads", "linear", *FAST, "--out", tmp_path / "loud")
    quiet = ok("probe", store, "--heads", "linear", *FAST, "--quiet", "--out", tmp_path / "quiet")
    assert "epochs:" in loud.output and "\r" in loud.output
    assert "epochs:" not in quiet.output and "\r" not in quiet.output and "results in" in quiet.output
    assert read_csv(tmp_path / "quiet" / "leaderboard.csv") == read_csv(tmp_path / "loud" / "leaderboard.csv")


def test_damaged_labels_are_refused_before_any_training(store, tmp_path):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store, damaged)
    with open_store(damaged) as opened:
        labels = opened.split("test")._h.chunk_file("test", "labels", 0)
    labels.write_bytes(b"\xfe" + labels.read_bytes()[1:])  # item 0's first class: 254
    result = invoke("probe", damaged, "--heads", "linear", *FAST, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "test item 0 has labels outside 0/1" in said(result), said(result)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_lars_with_a_constant_rate_trains_and_is_recorded(store, tmp_path):
    out = tmp_path / "lars"
    ok("probe", store, "--heads", "linear,ep", "--option", "ep.num_queries=4", "--lr", "2", "--optimizer", "lars",
       "--schedule", "constant", *FAST, "--out", out)
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["optimizer"] == "lars" and training["schedule"] == "constant"
    rows = leaderboard(out)
    assert len(rows) == 2 and all(0.5 < float(row["val_roc_auc"]) <= 1 for row in rows.values())


def test_a_checkpoint_from_an_older_version_is_refused(store, run, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    for saved in state["probes"]:
        del saved["val_metrics"]
    torch.save(state, out / "checkpoint.pt")
    result = invoke("probe", store, *SWEEP, *FAST, "--out", out)
    assert result.exit_code == 2 and "older version" in said(result) and "--out" in said(result)


def test_parts_merged_by_report_equal_the_whole_sweep(store, run, tmp_path):
    parts = tmp_path / "parts"
    first = ok("probe", store, *SWEEP, *FAST, "--part", "1/2", "--out", parts)
    assert f"part 1/2 (from --part): 4 of 6 configurations, results in {parts / 'part-1-of-2'}" in said(first), said(first)
    assert len(read_csv(parts / "part-1-of-2" / "leaderboard.csv")) == 4  # linear and protobin, both seeds of each
    assert "part 2 of 2 not finished" in said(ok("report", parts, "--out", tmp_path / "half"))
    assert (tmp_path / "half" / "report.md").read_text().startswith(f"## Selected by validation\n\n**Unfinished:** {parts}: part 2 of 2")
    ok("probe", store, *SWEEP, *FAST, "--part", "2/2", "--out", parts)
    ok("report", parts, "--out", tmp_path / "from_parts")
    assert "Unfinished" not in (tmp_path / "from_parts" / "report.md").read_text()
    result = ok("report", run, "--out", tmp_path / "from_run")
    merged = read_csv(tmp_path / "from_parts" / "leaderboard.csv")
    assert {row.pop("run") for row in merged} == {str((parts / f"part-{i}-of-2").resolve()) for i in (1, 2)}  # where each row came from
    assert merged == read_csv(run / "leaderboard.csv")
    from_parts, summary = read_csv(tmp_path / "from_parts" / "report.csv"), read_csv(tmp_path / "from_run" / "report.csv")
    # A report of the report's leaderboard finds the same stores and saved heads through that column.
    ok("report", tmp_path / "from_parts" / "leaderboard.csv", "--out", tmp_path / "again")
    twice = ok("report", tmp_path / "from_parts" / "leaderboard.csv", parts, "--out", tmp_path / "twice")  # the note names the files given
    assert f"appear in {tmp_path / 'from_parts' / 'leaderboard.csv'} and {parts / 'part-1-of-2' / 'leaderboard.csv'}: kept the first" in said(twice)
    assert read_csv(tmp_path / "again" / "report.csv") == [
        row | {"saved_head": str(Path(row["saved_head"]).resolve()) if row["saved_head"] else ""} for row in from_parts]
    saved = {row["head"]: (row.pop("saved_head"), other.pop("saved_head")) for row, other in zip(from_parts, summary)}
    assert from_parts == summary
    # The file of each selected configuration's best seed: the run's best/HEAD.pt, or the part's that holds the same head.
    for head, (in_parts, in_run) in saved.items():
        assert in_run == str(run / "best" / f"{head}.pt") and in_parts.startswith(str(parts / "part-")), saved
        assert torch.load(in_parts, weights_only=True)["config"] == torch.load(in_run, weights_only=True)["config"]
    Path(saved["ep"][0]).unlink()  # a part that lost its best ep: the report says so
    lines = ok("report", parts, "--out", tmp_path / "unsaved").output
    assert re.search(r"ep: ep\[num_queries=4\]/lr=0.001/wd=0.0001/layer=6/seed=\d with --data-seed 0 is in no best/ folder", lines), lines
    assert len(summary) == 3 and all(row["seeds"] == "2" for row in summary)
    assert "ep[num_queries=4]/lr=0.001/wd=0.0001/layer=6" in {row["config"] for row in summary}
    assert "±" in (tmp_path / "from_run" / "report.md").read_text() and "±" in result.output
    assert (tmp_path / "from_run" / "report.png").stat().st_size

    # A part resubmitted after the sweep was edited is refused, not ranked beside the others.
    edited = tmp_path / "edited"
    shutil.copytree(parts, edited)
    record = json.loads((edited / "part-2-of-2" / "config.json").read_text())
    record["training"]["epochs"] = 2
    (edited / "part-2-of-2" / "config.json").write_text(json.dumps(record))
    refused = invoke("report", edited, "--out", tmp_path / "mixed")
    assert refused.exit_code == 2 and "differs from part-1-of-2 (epochs 4 in part-1-of-2, 2 in part-2-of-2)" in said(refused), said(refused)

    # Such a part is refused before any work: the same heads in another order split into other
    # parts (merged, half the sweep would be missing), other training, or another split of the sweep.
    reordered = tmp_path / "reordered"
    shutil.copytree(parts / "part-1-of-2", reordered / "part-1-of-2")
    for args, why in [(["--heads", "protobin,ep,linear", *SWEEP[2:], *FAST, "--part", "2/2"], "ran another sweep (the same configurations in another order"),
                      ([*SWEEP, *FAST, "--epochs", "2", "--part", "2/2"], "ran another sweep (epochs 4 there, 2 here)"),
                      ([*SWEEP, *FAST, "--part", "2/3"], "holds parts of a sweep split another way (part-1-of-2)")]:
        refused = invoke("probe", store, *args, "--out", reordered)
        assert refused.exit_code == 2 and why in said(refused) and "--out" in said(refused), said(refused)
    assert sorted(p.name for p in reordered.iterdir()) == ["part-1-of-2"]

    # Not refused: a part written by an earlier version (no optimizer or schedule in its record), and
    # a part that stopped before its first epoch (its config.json alone), whatever it was asked.
    for name, edit in [("older", lambda training: [training.pop("optimizer"), training.pop("schedule")]),
                       ("barely-started", lambda training: training.update(epochs=2))]:
        run_dir = tmp_path / name
        shutil.copytree(parts / "part-1-of-2", run_dir / "part-1-of-2")
        record = json.loads((run_dir / "part-1-of-2" / "config.json").read_text())
        edit(record["training"])
        (run_dir / "part-1-of-2" / "config.json").write_text(json.dumps(record))
        if name == "barely-started":  # everything but its config.json
            for result in (run_dir / "part-1-of-2").iterdir():
                if result.is_dir():
                    shutil.rmtree(result)
                elif result.name != "config.json":
                    result.unlink()
        ok("probe", store, *SWEEP, *FAST, "--part", "2/2", "--out", run_dir)


def test_ram_gives_the_results_of_stream(store, run, tmp_path):
    out = tmp_path / "ram"
    result = ok("probe", store, *SWEEP, *FAST, "--data", "ram", "--out", out)
    assert "data: ram" in result.output
    assert leaderboard(out) == leaderboard(run)


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_epochs_of_equal_validation_metric_are_told_apart_by_log_loss(store, tmp_path, monkeypatch, task):
    """A small validation split saturates (an mAP of 1.0 at every epoch): the best epoch was then the
    first, and the head was tested after one epoch of warm-up. An equal metric now goes to the epoch
    of lowest validation log loss, the loss each epoch's scores give (recorded here as computed)."""
    if task == "multiclass":
        store = make_store(tmp_path / "mc.zarr", task="multiclass")
    metric = "map" if task == "multilabel" else "acc"
    losses, computed = [], recipe.log_loss
    monkeypatch.setattr(recipe, "compute_metrics", lambda t, scores, labels: {**compute_metrics(t, scores, labels), metric: 1.0})
    monkeypatch.setattr(recipe, "log_loss", lambda *args: losses.append(computed(*args)) or losses[-1])
    ok("probe", store, "--heads", "mean", "--lr", "3e-3", *FAST, "--epochs", "6", "--out", tmp_path / "run")
    (row,) = read_csv(tmp_path / "run" / "leaderboard.csv")
    assert len(losses) == 6 and int(np.argmin(losses)) > 0, losses  # the loss fell: the first epoch is not the best
    assert int(row["best_epoch"]) == int(np.argmin(losses)) + 1 and float(row[f"val_{metric}"]) == 1.0, (row, losses)


def test_a_validation_split_without_some_classes_is_said_before_training(store, tmp_path):
    """Two validation items cannot hold three classes: the heads would be chosen without the others,
    which the run says (naming them) before it trains; a validation split of every class says nothing."""
    small = make_store(tmp_path / "mc.zarr", task="multiclass", splits={"train": 60, "valid": 2, "test": 20})
    with open_store(small) as opened:
        held = {CLASSES[i] for i in opened.split("valid").column("labels")}
    missing = [c for c in CLASSES if c not in held]
    result = ok("probe", small, "--heads", "mean", *FAST, "--epochs", "1", "--out", tmp_path / "run")
    assert f"note: the 2 validation items hold no item of {len(missing)} of the 3 classes that train holds ({', '.join(missing)}): " \
           "epochs and configurations are chosen without them\n" in result.output, result.output
    result = ok("probe", store, "--heads", "mean", *FAST, "--epochs", "1", "--out", tmp_path / "full")
    assert "hold no item of" not in result.output


def test_multiclass_store_without_valid_split(tmp_path):
    store = make_store(tmp_path / "mc.h5", task="multiclass", dtype="bfloat16", splits={"train": 150, "test": 48})
    out = tmp_path / "run"
    ok("probe", store, "--heads", "mean,mhca,cgp", "--option", "cgp.num_prototypes=16", *FAST, "--out", out)
    rows = read_csv(out / "leaderboard.csv")
    assert {"val_acc", "val_balanced_acc", "test_acc", "test_balanced_acc"} <= set(rows[0])
    assert {r["layer"] for r in rows} == {"6", "all"}
    validation = json.loads((out / "config.json").read_text())["validation"]
    assert re.fullmatch(r"no valid split: 16 of 149 train items \(11%, 8 files, data seed 0\) held out, every window .*", validation)
    mhca = next(r for r in rows if r["head"] == "mhca")
    assert float(mhca["test_acc"]) > 0.6
    record = json.loads((out / "heads" / f"{sweeps.sanitise(mhca['config'])}.json").read_text())
    assert set(record["per_class_acc"]) == set(CLASSES)

    ok("predict", store, "--head", out / "best" / "mhca.pt", "--out", tmp_path / "s.csv", "--batch-size", "16", "--device", "cpu")
    scores = read_csv(tmp_path / "s.csv")
    predicted = np.array([[float(row[c]) for c in CLASSES] for row in scores]).argmax(1)
    split = open_store(store).split("test")
    labels = split.column("labels")[usable_items(split)]
    assert float(mhca["test_acc"]) == pytest.approx(accuracy_score(labels, predicted))
    assert float(mhca["test_balanced_acc"]) == pytest.approx(balanced_accuracy_score(labels, predicted))

    # a checkpoint of a version that held out files at random: resumed, it would train on items it had validated on
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["plan"]["held_out"]
    torch.save(state, out / "checkpoint.pt")
    result = invoke("probe", store, "--heads", "mean,mhca,cgp", "--option", "cgp.num_prototypes=16", *FAST, "--out", out)
    assert result.exit_code == 2 and "it held out other files for validation, as an earlier version did" in said(result), result.output

    # The same dim and classes but a multi-label store: softmax scores would be meaningless there.
    multilabel = make_store(tmp_path / "ml.zarr", splits={"train": 16, "test": 16})
    refused = invoke("predict", multilabel, "--head", out / "best" / "mhca.pt", "--out", tmp_path / "ml.csv", "--device", "cpu")
    assert refused.exit_code == 2 and "was trained for a multiclass task" in said(refused) and "is multilabel" in said(refused)
    assert not (tmp_path / "ml.csv").exists()


def test_values_that_would_name_one_configuration_are_refused(store, tmp_path):
    """Configurations are known by their ids, which write numbers to 6 significant digits: two
    learning rates (or option values) equal that far would train and report as one, silently."""
    result = invoke("probe", store, "--heads", "linear", "--lr", "0.00012345671,0.00012345674", *FAST, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "--lr: 0.00012345671 and 0.00012345674 agree to 6 significant digits" in said(result)
    result = invoke("probe", store, "--heads", "mlp", "--option", "mlp.dropout=0.1000001,0.1000002", *FAST, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "--option mlp.dropout: 0.1000001 and 0.1000002 agree" in said(result), said(result)
    assert not (tmp_path / "r").exists()


def test_a_sweep_file_expands_like_the_command_line(store, tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(
        "lr = [1e-3, 3e-3]\nseeds = [0, 1]\n\n[heads.linear]\n\n[heads.ep]\nnum_queries = [16, 32]\n\n"
        "[heads.protobin]\nprototypes_per_class = 10\nlr = [2e-2]\n"
    )
    with open_store(store) as opened:
        configs, spec = commands.build_sweep(opened, None, None, None, None, None, None, path)
        same, _ = commands.build_sweep(
            opened, "linear,ep,protobin", ["ep.num_queries=16,32", "protobin.prototypes_per_class=10", "protobin.lr=2e-2"],
            "1e-3,3e-3", None, None, "0,1", None,
        )
    assert [c.id for c in configs] == [c.id for c in same]
    assert len(configs) == 2 * 2 + 2 * 2 * 2 + 2
    assert configs[0].id == "linear/lr=0.001/wd=0.0001/layer=6/seed=0"
    assert configs[-1].id == "protobin[prototypes_per_class=10]/lr=0.02/wd=0.0001/layer=6/seed=1"
    groups = list(dict.fromkeys(c.group for c in configs))  # 7 configurations of 2 seeds each
    assert [c.group for c in sweeps.take_part(configs, 1, 3)] == [g for g in groups[0::3] for _ in range(2)]
    assert [c.id for c in sweeps.take_part(configs, 1, 8)] == [c.id for c in configs[0::8]]  # more parts: seeds dealt too
    assert sorted(c.id for i in (1, 2, 3) for c in sweeps.take_part(configs, i, 3)) == sorted(c.id for c in configs)


def test_part_comes_from_the_job_array(store, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    ok("probe", store, "--heads", "mean", "--seeds", "0,1", "--epochs", "1", "--device", "cpu", "--out", tmp_path)
    assert [r["seed"] for r in read_csv(tmp_path / "part-2-of-2" / "leaderboard.csv")] == ["1"]


def test_epoch_order_depends_only_on_seed_and_epoch():
    items = np.delete(np.arange(300), [5, 77])
    a, b = epoch_order(items, 32, seed=0, epoch=1), epoch_order(items, 32, seed=0, epoch=1)
    assert (a == b).all() and sorted(a) == list(items)
    assert not (a == epoch_order(items, 32, seed=0, epoch=2)).all()


def test_a_sweep_of_class_token_heads_reads_no_token_maps(store, run, tmp_path, monkeypatch):
    """linear and mlp on a store with class tokens read nothing else: reading the maps anyway cost a
    hundred times their bytes. The linear head comes out as in a sweep that reads them."""
    from tokens.cache.store import Split

    def refused(*args, **kwargs):
        raise AssertionError("token maps read")

    monkeypatch.setattr(Split, "read_tokens", refused)
    monkeypatch.setattr(Split, "read_mask", refused)
    for data in ("stream", "ram"):
        out = tmp_path / data
        ok("probe", store, "--heads", "linear,mlp", "--seeds", "0,1", *FAST, "--data", data, "--out", out)
        ours = {config: row for config, row in leaderboard(out).items() if row["head"] == "linear"}
        assert ours and all(ours[c]["test_map"] == leaderboard(run)[c]["test_map"] for c in ours)


def test_a_store_whose_prefix_tokens_are_registers_gives_class_token_heads_the_token_mean(tmp_path, monkeypatch):
    """A ViT with registers and no class token (timm's *_reg4_gap_*) stores its registers as prefix
    tokens: `linear` then trains on the masked token mean, as `mean` does, and reads no prefix."""
    from tokens.cache.store import Split

    from tokens.cache.commands import describe, render

    path = make_store(tmp_path / "registers.zarr", class_token=False)
    assert "1 prefix tokens (no class token)" in render(describe(open_store(path)))

    def refused(*args, **kwargs):
        raise AssertionError("prefix tokens read")

    monkeypatch.setattr(Split, "read_prefix", refused)
    out = tmp_path / "run"
    ok("probe", path, "--heads", "linear,mean", "--layers", "6", *FAST, "--data", "stream", "--out", out)
    rows = {row["head"]: row for row in leaderboard(out).values()}
    assert rows["linear"]["test_map"] == rows["mean"]["test_map"]  # one architecture on the same inputs, same seed
    record = json.loads((out / "heads" / f"{sweeps.sanitise(rows['linear']['config'])}.json").read_text())
    assert record["fell_back_to_mean"] is True


def test_an_out_that_reads_as_a_head_option_is_refused(store, tmp_path, monkeypatch):
    """`-o ep.num_queries=16` (extract's -o takes backbone options) trained the default sweep into a
    folder of that name."""
    monkeypatch.chdir(tmp_path)
    result = invoke("probe", store, "--heads", "ep", "-o", "ep.num_queries=16", *FAST)
    assert result.exit_code == 2 and "reads as a head option, not a run directory" in said(result), result.output
    assert not (tmp_path / "ep.num_queries=16").exists()
    ok("probe", store, "--heads", "mean", *FAST, "-o", "runs/lr=1e-3")  # a folder name with = but no head option


def test_a_metric_the_labels_leave_undefined_is_said_before_training(tmp_path):
    """The one validation item here has no label: neither mAP nor ROC-AUC is defined there, and the
    leaderboard's NaN is explained up front rather than left bare."""
    path = make_store(tmp_path / "one.zarr", splits={"train": 150, "valid": 1, "test": 48})
    assert not open_store(path).split("valid").column("labels").any()
    result = ok("probe", path, "--heads", "linear", *FAST, "--out", tmp_path / "r")
    assert "note: map and roc_auc cannot be computed on the 1 validation items (no item has a label)" in result.output
    assert "test items" not in result.output, result.output
    (row,) = leaderboard(tmp_path / "r").values()
    assert row["val_roc_auc"] == "nan" and row["test_roc_auc"] != "nan"


def test_info_failed_says_so_on_stderr_when_nothing_failed(tmp_path):
    from tokens.cli import app as tokens_app

    path = make_store(tmp_path / "clean.zarr", failed=())
    result = CliRunner().invoke(tokens_app, ["info", str(path), "--failed"])
    assert result.exit_code == 0 and result.stdout == ""
    assert "no item failed in the shards complete so far" in result.stderr
    info = CliRunner().invoke(tokens_app, ["info", str(path)])  # a store of no checkpoint says so whole
    assert "backbone   synthetic  checkpoint sha256 none (built-in weights)\n" in info.stdout, info.stdout


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_ram_rows_equal_the_store_rows(tmp_path, dtype):
    """RAM mode gathers rows through numpy (bfloat16 as its bits): the same tensors as reads from disk."""
    from tokens.train.data import Source

    with open_store(make_store(tmp_path / f"{dtype}.zarr", dtype=dtype)) as opened:
        split = opened.split("train")
        index = np.array([40, 3, 17, 3])
        rows = [Source(split, [3, 6], True, mode, torch.device("cpu")).read(index) for mode in ("ram", "stream")]
    assert rows[0].keys() == rows[1].keys()
    for key in rows[0]:
        assert rows[0][key].dtype == rows[1][key].dtype and torch.equal(rows[0][key], rows[1][key]), key


def test_hold_out_keeps_every_window_of_a_file_on_one_side():
    """Windows of one recording are near-duplicates: selecting heads on windows of recordings they
    trained on would flatter them."""
    items = np.arange(1000)
    recordings = np.array([f"r{i // 7}.wav" for i in items])  # long recordings of 7 windows
    labels = (items // 7) % 4  # a class per recording
    kept, held = hold_out(items, recordings, labels, 0.1, seed=3)
    assert not set(recordings[kept]) & set(recordings[held])
    assert sorted(np.concatenate([kept, held])) == list(items)
    assert abs(len(held) - 100) <= 3.5  # the number of whole files nearest a tenth
    assert (held == hold_out(items, recordings, labels, 0.1, seed=3)[1]).all()
    assert set(held) != set(hold_out(items, recordings, labels, 0.1, seed=4)[1])
    few = np.repeat(["a.wav", "b.wav", "c.wav"], [300, 300, 20])  # one file nears 62 items better than two
    assert all(len(set(few[hold_out(np.arange(620), few, np.zeros(620, int), 0.1, seed)[1]])) == 1 for seed in range(6))


@pytest.mark.parametrize("seed", [*range(5), 12, 23, 36])  # 12, 23 and 36 held a.wav out below, before
def test_hold_out_takes_each_class_in_proportion(seed):
    """A random draw of files held out each class near a tenth only on average (here up to 4 files
    from it); every class of several files is held out within a file of a tenth of them, and a class
    of one file, which would then not be trained on, only where nothing else is left."""
    files = {"dog": 200, "cat": 95, "owl": 40, "bee": 12, "elk": 1, "emu": 1}
    recordings = np.array([f"{name}{i}.wav" for name, n in files.items() for i in range(n) for _ in range(2)])  # 2 windows a file
    names = list(files)
    labels = np.array([names.index(r.rstrip("0123456789.wav")) for r in recordings])
    items = np.arange(len(recordings))
    kept, held = hold_out(items, recordings, labels, 0.1, seed)
    assert abs(len(held) - 0.1 * len(items)) <= 2 and not set(recordings[kept]) & set(recordings[held])
    for name, n in files.items():
        held_files = len(set(recordings[held][labels[held] == names.index(name)]))
        assert abs(held_files - 0.1 * n) <= 1, (name, held_files)
    assert {"elk", "emu"} <= {names[c] for c in labels[kept]}
    multi = np.zeros((len(items), 3), np.uint8)  # multi-label: a file counts for its rarest class
    multi[:, 0] = 1  # every item holds the common class
    multi[labels == 2, 1] = 1  # owl's 40 files also hold a second class; bee's 12 a third
    multi[labels == 3, 2] = 1
    kept, held = hold_out(items, recordings, multi, 0.1, seed)
    for column, n in ((1, 40), (2, 12)):
        assert abs(len(set(recordings[held][multi[held, column] == 1])) - 0.1 * n) <= 1
    # a file alone with a class, though another class of it is rarer by items, stays in train
    lonely = np.array(["a.wav"] * 10 + ["b.wav"] + [f"z{i}.wav" for i in range(200)])
    classes = np.zeros((len(lonely), 3), np.uint8)
    classes[:10, 0] = 1  # x: only in a.wav
    classes[9:11, 1] = 1  # y: once in a.wav, once in b.wav, rarer than x by items
    classes[11:, 2] = 1
    kept, held = hold_out(np.arange(len(lonely)), lonely, classes, 0.1, seed)
    assert "a.wav" not in set(lonely[held])


def test_a_store_of_too_few_files_to_hold_out_asks_for_a_valid_split(tmp_path):
    """Two items of one file: holding out a file would take all of train, not a tenth."""
    store = make_store(tmp_path / "tiny.zarr", splits={"train": 2, "test": 8}, failed=())
    result = invoke("probe", store, "--heads", "linear", *FAST, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "Invalid value for STORE" in said(result), result.output
    assert "train's 1 file is too few to hold out 10% of its items as whole files (2 of 2 would go): add a valid split" in said(result)
    assert not (tmp_path / "x").exists()


def test_batches_mix_classes_of_a_store_written_class_by_class():
    """A class-folder dataset is stored class by class: shuffling whole shards gave batches of a few
    classes (about 7 of 20 here), which biased training; runs from all over the split mix them."""
    classes = np.repeat(np.arange(20), 300)  # 6 000 items, 300 of each class in turn, shards of 300
    order = epoch_order(np.arange(len(classes)), 300, seed=0, epoch=0)
    assert sorted(order) == list(range(len(classes)))
    per_batch = [len(set(classes[order[i : i + 128]])) for i in range(0, len(order) - 127, 128)]
    assert np.mean(per_batch) > 19
    for start in range(0, len(order), BLOCK_ITEMS):  # yet each block reads runs of consecutive items
        block = np.sort(order[start : start + BLOCK_ITEMS])
        stretches = 1 + np.count_nonzero(np.diff(block) != 1)
        assert stretches <= BLOCK_ITEMS // RUN_ITEMS + 2


@pytest.mark.parametrize("args,option", [
    (["--heads", "linear,nope"], "--heads"),
    (["--heads", "ep", "--option", "ep.queries=4"], "--option"),
    (["--heads", "ep", "--option", "linear.dropout=0.1"], "--option"),
    (["--heads", "ep", "--option", "ep.num_queries=5"], "--option"),
    (["--part", "3/2"], "--part"),
    (["--layers", "7"], "--layers"),
    (["--lr", "fast"], "--lr"),
    (["--loss", "ce"], "--loss"),
    (["--data", "disk"], "--data"),
    (["--optimizer", "adam"], "--optimizer"),
    (["--schedule", "step"], "--schedule"),
    (["--optimizer", "sgd"], "--lr"),  # no default rate of its own
])
def test_mistakes_name_the_option_at_fault(store, tmp_path, args, option, monkeypatch):
    """...the same in `tokens probe` and, before it writes a script, in `tokens slurm probe`."""
    result = invoke("probe", store, *args, "--device", "cpu", "--out", tmp_path / "x")
    assert result.exit_code == 2 and option in said(result), result.output
    if option != "--part":  # the tasks of an array take their parts themselves
        monkeypatch.chdir(tmp_path)
        from tokens.cli import app as tokens_app

        result = CliRunner().invoke(tokens_app, [str(a) for a in ("slurm", "probe", store, *args, "--out", tmp_path / "x",
                                                                 "--array", "1", "--script", "job.sbatch")])
        assert result.exit_code == 2 and option in said(result) and not (tmp_path / "job.sbatch").exists(), result.output


def test_missing_and_incomplete_splits_are_refused(tmp_path, monkeypatch):
    no_test = make_store(tmp_path / "a.zarr", splits={"train": 40})
    result = invoke("probe", no_test, "--device", "cpu", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "no split 'test'" in said(result)
    partial = make_store(tmp_path / "b.zarr", splits={"train": 96, "test": 40}, written=[0, 1])
    result = invoke("probe", partial, "--device", "cpu", "--out", tmp_path / "y")
    assert result.exit_code == 2 and "--allow-incomplete" in said(result)
    result = ok("probe", partial, "--heads", "mean", "--allow-incomplete", *FAST[:2], "--batch-size", "16", "--device", "cpu",
                "--out", tmp_path / "y")
    assert "warning: unfinished store, only the shards written so far are used (train 2 of 3 shards)" in result.output
    with open_store(partial) as opened:
        config = json.loads((tmp_path / "y" / "config.json").read_text())
    assert "train items" in config["validation"] and opened.split("train").num_items == 96
    assert config["training"]["unfinished"] == {"train": [2, 3]}
    (row,) = read_csv(tmp_path / "y" / "leaderboard.csv")
    assert row["training"].endswith("/unfinished=train:2of3")
    # The finished store's run of the same configuration is another row of a report, not a duplicate.
    finished = make_store(tmp_path / "c.zarr", splits={"train": 96, "test": 40}, dataset_fingerprint="b.zarr")
    ok("probe", finished, "--heads", "mean", *FAST[:2], "--batch-size", "16", "--device", "cpu", "--out", tmp_path / "z")
    assert read_csv(tmp_path / "z" / "leaderboard.csv")[0]["store_key"] == row["store_key"]
    figures, plot = [], report_module.plot_params_vs_metric
    monkeypatch.setattr(report_module, "plot_params_vs_metric", lambda *a, **k: figures.append(plot(*a, **k)))
    result = ok("report", tmp_path / "y", tmp_path / "z", "--out", tmp_path / "r")
    assert "appears in" not in result.output and len(read_csv(tmp_path / "r" / "leaderboard.csv")) == 2
    titles = sorted(ax.get_title().replace("\n", "") for ax in figures[-1].axes if ax.get_visible())
    finished_training = report_module.replicates(row["training"]).removesuffix("/unfinished=train:2of3")
    assert titles == sorted(["unfinished=train:2of3", finished_training]), titles
    # The store finished since: the run's checkpoint is of another sweep, and the refusal says how.
    make_store(partial, splits={"train": 96, "test": 40})
    result = invoke("probe", partial, "--heads", "mean", "--allow-incomplete", *FAST[:2], "--batch-size", "16",
                    "--device", "cpu", "--out", tmp_path / "y")
    assert result.exit_code == 2 and ("belongs to another sweep (it was trained on the store unfinished (train 2 of 3 "
                                      "shards), which is finished now)") in said(result), said(result)


def test_a_diverged_head_does_not_stop_the_sweep(store, tmp_path, monkeypatch):
    """A head whose scores turn NaN (say, a learning rate far too high) gets NaN metrics and the
    lowest rank; the other heads of the sweep finish as usual."""
    def build_head(name, **kw):
        head = heads.build_head(name, **kw)
        if name == "linear":
            forward = head.forward
            head.forward = lambda *a, **k: forward(*a, **k) * float("nan")
        return head

    monkeypatch.setattr(recipe, "build_head", build_head)
    out = tmp_path / "diverged"
    result = ok("probe", store, "--heads", "linear,ep", "--option", "ep.num_queries=4", *FAST, "--out", out)
    assert "1 of 2 heads gave NaN or Inf scores (ranked last): linear/" in result.output
    rows = read_csv(out / "leaderboard.csv")
    assert [r["head"] for r in rows] == ["ep", "linear"]
    assert float(rows[0]["test_map"]) > 0.6 and rows[1]["val_map"] == rows[1]["test_map"] == "nan"
    assert (out / "best" / "ep.pt").exists() and (out / "val_curves.png").stat().st_size
    # Nothing of the diverged head is saved or reported as its best.
    assert not (out / "best" / "linear.pt").exists() and "no best/{HEAD}.pt for linear" in said(result)
    (out / "best" / "linear.pt").write_bytes(b"left by an earlier run of this sweep")
    ok("probe", store, "--heads", "linear,ep", "--option", "ep.num_queries=4", *FAST, "--out", out)  # the same sweep again
    assert not (out / "best" / "linear.pt").exists()
    ok("report", out, "--out", tmp_path / "report")
    reported = {row["head"]: row for row in read_csv(tmp_path / "report" / "report.csv")}
    assert reported["ep"]["selected"] == "1" and reported["linear"]["selected"] == "0"
    # When no head gives a number, the run says so and fails (its files are still written).
    result = invoke("probe", store, "--heads", "linear", *FAST, "--out", tmp_path / "all")
    assert result.exit_code == 1 and "error: every head gave NaN or Inf scores" in said(result) and "tokens verify" in said(result)
    assert "Invalid value" not in said(result)
    assert (tmp_path / "all" / "leaderboard.csv").exists()


def write_leaderboard(folder: Path, rows: list[dict]):
    """A run folder holding `rows` (as read_csv gives them) as its leaderboard.csv."""
    folder.mkdir()
    with open(folder / "leaderboard.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_report_says_which_configurations_lost_a_seed_to_divergence(run, tmp_path):
    """One diverged seed makes a configuration's mean NaN, which keeps it from being selected: the
    report says so rather than let it drop out without a word."""
    rows = read_csv(run / "leaderboard.csv")
    victim = next(r for r in rows if r["head"] == "ep" and r["seed"] == "1")
    victim["val_map"] = victim["test_map"] = ""
    write_leaderboard(tmp_path / "run", rows)
    result = ok("report", tmp_path / "run", "--out", tmp_path / "report")
    config = victim["config"].rsplit("/seed=", 1)[0]
    assert f"note: {config}: 1 of 2 seeds diverged (NaN validation map), so its mean is NaN and it is not selected" in said(result)
    assert sum("seeds diverged" in line for line in result.output.splitlines()) == 1  # the others lost none
    assert f"**Note:** {config}: 1 of 2 seeds diverged" in (tmp_path / "report" / "report.md").read_text()  # in the file too
    other = [r | {"store_key": "0" * 16} for r in rows]  # the same on a second store: each note says which
    write_leaderboard(tmp_path / "other", other)
    result = ok("report", tmp_path / "run", tmp_path / "other", "--out", tmp_path / "both")
    notes = [line for line in result.output.splitlines() if "seeds diverged" in line]
    assert len(notes) == 2 and len(set(notes)) == 2 and any(" on 00000000: 1 of 2" in n for n in notes), notes


def test_a_report_says_when_the_selected_configuration_only_ties_with_others(run, tmp_path):
    """Configurations of equal mean validation metric are ranked by name: the report says the one it
    selects was not better, in the terminal and in report.md; a head without ties gets no such note."""
    rows, head = read_csv(run / "leaderboard.csv"), "linear"
    rows += [r | {"config": r["config"].replace("lr=0.001", "lr=0.003"), "lr": "0.003"} for r in rows if r["head"] == head]
    for row in rows:
        if row["head"] == head:
            row["val_map"] = "0.5"
    write_leaderboard(tmp_path / "run", rows)
    result = ok("report", tmp_path / "run", "--out", tmp_path / "report")
    configs = sorted({r["config"].rsplit("/seed=", 1)[0] for r in rows if r["head"] == head})
    note = (f"{head}: {len(configs)} configurations tie at a mean validation map of 0.5000; {configs[0]} is selected as the "
            f"first by name, not as better than {configs[1]}")
    assert f"note: {note}" in said(result) and f"**Note:** {note}" in (tmp_path / "report" / "report.md").read_text()
    assert said(result).count("configurations tie") == 1, said(result)

    # Means of the same seeds' figures listed in another order tie exactly, as the figures do.
    figures = [35 / 37, 1.0, 36 / 37]
    ordered = [dict(r, val_map=str(v)) for r, v in zip((r for r in rows if r["head"] == head and "lr=0.001" in r["config"]), figures[:2])]
    ordered += [dict(ordered[0], config=ordered[0]["config"].replace("seed=0", "seed=2"), seed="2", val_map=str(figures[2]))]
    shuffled = [dict(r, config=r["config"].replace("lr=0.001", "lr=0.003"), lr="0.003") for r in ordered]
    shuffled = [dict(r, val_map=str(v)) for r, v in zip(shuffled, figures[::-1])]
    write_leaderboard(tmp_path / "ordered", ordered + shuffled)
    assert "2 configurations tie at a mean validation map" in said(ok("report", tmp_path / "ordered", "--out", tmp_path / "r2"))

    # One configuration in two trainings ties with itself but for the training, which the note names.
    longer = [dict(r, training=r["training"].replace("epochs=4", "epochs=8")) for r in ordered]
    write_leaderboard(tmp_path / "trainings", ordered + longer)
    said_there = said(ok("report", tmp_path / "trainings", "--out", tmp_path / "r3"))
    config = ordered[0]["config"].rsplit("/seed=", 1)[0]
    short, long = (report_module.replicates(r["training"]) for r in (ordered[0], longer[0]))  # less the data seed
    assert f"{config} ({short}) is selected as the first by name, not as better than {config} ({long})" in said_there, said_there


def test_a_validation_metric_the_labels_leave_undefined_is_not_called_divergence(run, tmp_path):
    """A head that diverged scores NaN on every split; NaN validation beside finite test figures is a
    validation split without a class of both positives and negatives. Nothing can be selected then,
    and the terminal and report.md say so rather than show an empty table."""
    rows = read_csv(run / "leaderboard.csv")
    for row in rows:
        row["val_map"] = row["val_roc_auc"] = ""
    write_leaderboard(tmp_path / "run", rows)
    result = ok("report", tmp_path / "run", "--out", tmp_path / "report")
    assert "diverged" not in said(result)
    assert "2 of 2 seeds have a validation map that their validation items leave undefined (NaN, while the test map is finite)" in said(result)
    assert "no configuration is selected: every one's mean validation map is NaN" in said(result)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "No configuration is selected: every one's mean validation map is NaN." in text and "leave undefined" in text
    assert "Saved weights" not in text and "saved weights" not in result.output  # no heading over an empty list


def test_a_leaderboard_cut_short_is_refused_by_report_and_written_anew_by_its_run(store, run, tmp_path):
    """A leaderboard.csv marks a run as finished: one cut short (copied in part, a full disk) passed for
    a run of fewer configurations, with a half row competing in the selection. It is written aside
    and renamed now, and one found cut is named, and written again by rerunning its sweep."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    whole = (copy / "leaderboard.csv").read_bytes()
    for cut, why in ((len(whole) - 5, "its last line is cut short"), (whole.index(b"\n", 200) - 20, "its last line is cut short")):
        (copy / "leaderboard.csv").write_bytes(whole[:cut])
        result = invoke("report", copy, "--out", tmp_path / "report")
        assert result.exit_code != 0 and f"is damaged: {why}" in said(result), said(result)  # the path itself wraps
    lines = whole.decode().splitlines(keepends=True)
    (copy / "leaderboard.csv").write_text(lines[0] + lines[1].rsplit(",", 3)[0] + "\r\n" + "".join(lines[2:]))
    result = invoke("report", copy, "--out", tmp_path / "report")
    assert "is damaged: row 2 has fewer fields than the header" in said(result), said(result)
    (copy / "leaderboard.csv").write_text("".join(lines[:-2]))  # cut at a line's end: whole rows, too few
    result = invoke("report", copy, "--out", tmp_path / "report")
    assert f"is damaged: it lacks 2 of the {len(lines) - 1} configurations its run trained (config.json)" in said(result), said(result)
    ok("probe", store, *SWEEP, *FAST, "--data", "stream", "--out", copy)  # from its checkpoint
    assert (copy / "leaderboard.csv").read_bytes() == whole
    assert not [p.name for p in copy.iterdir() if p.name.endswith(".tmp")]
    (copy / "checkpoint.pt").unlink()  # nothing left to write it again from: said, not a loop of the same advice
    (copy / "leaderboard.csv").write_bytes(whole[:-5])
    result = invoke("probe", store, *SWEEP, *FAST, "--data", "stream", "--out", copy)
    assert result.exit_code == 2 and "No checkpoint.pt is left here to score it from: delete" in said(result), said(result)
    (tmp_path / "notes.csv").write_text("path,labels,split\na.wav,x,train")  # another CSV, without a last newline
    result = invoke("report", tmp_path / "notes.csv", "--out", tmp_path / "report")
    assert "is not a leaderboard.csv written by `tokens probe`" in said(result) and "damaged" not in said(result), said(result)


def test_a_report_of_a_sweep_not_finished_says_how_to_finish_it(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"progress")
    result = invoke("report", tmp_path / "run", "--out", tmp_path / "report")
    assert result.exit_code != 0, said(result)
    assert "holds a sweep not finished (checkpoint.pt); run the same `tokens probe` command again to finish" in said(result), said(result)


def test_validation_curves_of_one_epoch_are_drawn(tmp_path):
    """A line through one point draws nothing: a run of --epochs 1 gave an empty val_curves.png."""
    import matplotlib.colors
    import matplotlib.image

    def drawn(records):
        report_module.plot_val_curves(records, "map", tmp_path / "curves.png")
        image = matplotlib.image.imread(tmp_path / "curves.png")[..., :3]
        curve_colour = 0.6 * np.array(matplotlib.colors.to_rgb("C0")) + 0.4  # drawn at alpha 0.6 on white; the legend's swatch is not
        return int((np.abs(image - curve_colour).max(axis=-1) < 0.1).sum())

    nothing = drawn([{"head": "ep", "val_curve": [None]}])  # a few pixels at the legend swatch's smoothed edges
    assert drawn([{"head": "ep", "val_curve": [0.5]}, {"head": "ep", "val_curve": [0.7]}]) > nothing + 20
    assert drawn([{"head": "ep", "val_curve": [None, 0.5, None, 0.6]}]) > nothing + 20  # points between NaNs


def test_tf32_is_on_while_heads_train_and_as_it_was_afterwards(store, tmp_path, monkeypatch):
    """TF32 matrix products speed up a sweep's training on a GPU; validation and test are scored in
    full float32, as `tokens predict` scores; the process's setting comes back after it, so that a
    later extraction in the same process (a notebook) is not run in TF32 unasked."""
    seen = []

    def build_head(name, **kw):
        head = heads.build_head(name, **kw)
        forward = head.forward
        head.forward = lambda *a, **k: seen.append((head.training, torch.backends.cuda.matmul.fp32_precision)) or forward(*a, **k)
        return head

    monkeypatch.setattr(recipe, "build_head", build_head)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the user's own choice, through the older API
    try:
        ok("probe", store, "--heads", "linear", *FAST, "--out", tmp_path / "run")
        assert set(seen) == {(True, "tf32"), (False, "ieee")}
        assert torch.get_float32_matmul_precision() == "highest" and torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("args,option,message", [
    (["--heads", "ep", "--option", "ep.num_queries=0"], "--option", "ep: num_queries must be a positive integer, got 0"),
    (["--heads", "ep", "--option", "ep.num_queries=abc"], "--option", "ep: num_queries must be a positive integer, got 'abc'"),
    (["--heads", "protobin", "--option", "protobin.prototypes_per_class=0"], "--option",
     "protobin: prototypes_per_class must be a positive integer, got 0"),
    (["--heads", "protofloat", "--option", "protofloat.num_prototypes=-3"], "--option",
     "protofloat: num_prototypes must be a positive integer, got -3"),
    (["--heads", "cgp", "--option", "cgp.num_layers=5"], "--option", "so num_layers must be 2 (or left out), got 5"),
    (["--heads", "ep", "--option", "ep.dropout=2"], "--option", "ep: dropout must be a number from 0 to 1, got 2"),
    (["--heads", "ep", "--option", "ep.lr=abc"], "--option", "ep.lr: 'abc' is not a number"),
    (["--heads", "ep", "--option", "ep.lr=-1e-3"], "--option", "ep.lr must be positive and finite, got -0.001"),
    (["--heads", "ep", "--option", "ep.wd=-1"], "--option", "ep.wd must be zero or more and finite, got -1"),
    (["--heads", "ep", "--lr", "nan"], "--lr", "--lr must be positive and finite, got nan"),
    (["--heads", "ep", "--lr", "1e-3,inf"], "--lr", "--lr must be positive and finite, got inf"),
    (["--heads", "ep", "--wd", "nan"], "--wd", "--wd must be zero or more and finite, got nan"),
    (["--batch-size", "1"], "--batch-size", "greater than or equal to 2"),  # BatchNorm cannot train on one item
    (["--heads", "ep", "--seeds", "0,-1"], "--seeds", "--seeds: -1 is not a seed from 0 to 4294967295"),  # numpy's would fail mid-run
    (["--heads", "ep", "--seeds", str(2**64)], "--seeds", f"--seeds: {2**64} is not a seed from 0 to 4294967295"),  # torch's too
    (["--heads", "ep", "--data-seed=-1"], "--data-seed", "should be greater than or equal to 0"),
])
def test_bad_values_are_refused_before_any_file_is_written(store, tmp_path, args, option, message):
    result = invoke("probe", store, *args, *FAST[:2], "--device", "cpu", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "Invalid value for" in said(result) and option in said(result), result.output
    assert message in said(result), result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("text,message", [
    ('lr = "abc"\n[heads.ep]\n', "lr: 'abc' is not a number"),
    ("lr = -1\n[heads.ep]\n", "lr must be positive and finite, got -1"),
    ("wd = [inf]\n[heads.ep]\n", "wd must be zero or more and finite, got inf"),
    ('seeds = [0, "one"]\n[heads.ep]\n', "seeds: 'one' is not an integer"),
    ("seeds = []\n[heads.ep]\n", "seeds is an empty list"),
    ("seeds = [3, -2]\n[heads.ep]\n", "seeds: -2 is not a seed from 0 to 4294967295"),
    ("[heads.ep]\nnum_queries = []\n", "heads.ep.num_queries is an empty list"),
    ('[heads.protobin]\nlr = ["fast"]\n', "heads.protobin.lr: 'fast' is not a number"),
    ("[heads]\nep = 3\n", "heads.ep must be a table"),
    ("[heads.maen]\n", "unknown head 'maen'; choose from"),
    ("[heads.ep]\nnum_querys = [2]\n", "head 'ep' has no option num_querys; it takes:"),
    ("[heads.mean]\nlr = [-1.0]\n", "mean.lr must be positive and finite, got -1.0"),
    ('[heads.ep]\nnum_queries = "x"\n', "ep[num_queries=x]/lr=0.001/wd=0.0001/layer=6: ep: num_queries must be a positive integer"),
])
def test_sweep_file_mistakes_name_the_file_and_key(store, tmp_path, text, message):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    result = invoke("probe", store, "--sweep", path, "--device", "cpu", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "Invalid value for --sweep" in said(result), result.output
    assert f"{path}: {message}" in said(result), result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("given", [["--heads", "ep"], ["--option", "ep.num_queries=2"]])
def test_heads_or_options_beside_a_sweep_file_are_refused_naming_the_option_given(store, tmp_path, given):
    path = tmp_path / "sweep.toml"
    path.write_text("[heads.ep]\n")
    result = invoke("probe", store, "--sweep", path, *given, "--device", "cpu", "--out", tmp_path / "x")
    assert result.exit_code == 2 and f"Invalid value for {given[0]}: {given[0]} with --sweep" in said(result), said(result)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("splits,failed,why", [
    ({"train": 6, "valid": 8, "test": 8}, range(1, 6), "train has 1 usable item;"),
])
def test_a_train_split_of_one_usable_item_is_refused(tmp_path, splits, failed, why):
    store = make_store(tmp_path / "tiny.zarr", splits=splits, failed=failed)
    result = invoke("probe", store, "--heads", "linear", *FAST, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "Invalid value for STORE" in said(result), result.output
    assert why in said(result) and "a probe needs at least 2" in said(result), result.output
    assert not (tmp_path / "x").exists()


def test_predict_writes_every_digit_and_log_scores_rank_confident_items_as_their_logits(store, run, tmp_path):
    """A confident head (logits of tens to hundreds): probabilities round to 1 and tie, whatever the digits
    written; --log-scores ranks items as the logits do (scikit-learn on the logits is the oracle)."""
    saved = torch.load(run / "best" / "ep.pt", weights_only=True)
    for name in ("classifier.2.weight", "classifier.2.bias"):
        saved["state_dict"][name] = saved["state_dict"][name] * 20
    confident = tmp_path / "confident.pt"
    torch.save(saved, confident)
    for flag, path in (("--log-scores", tmp_path / "log.csv"), (None, tmp_path / "p.csv")):
        ok("predict", store, "--head", confident, "--out", path, "--device", "cpu", *[flag] * bool(flag))
    log_scores = np.array([[float(row[c]) for c in CLASSES] for row in read_csv(tmp_path / "log.csv")])
    probabilities = np.array([[float(row[c]) for c in CLASSES] for row in read_csv(tmp_path / "p.csv")])
    np.testing.assert_array_equal(probabilities, np.exp(log_scores))  # every digit written, both ways
    assert (probabilities == 1.0).sum() > 3 and (log_scores < 0).all()

    head = build_head(**saved["build"])
    head.load_state_dict(saved["state_dict"])
    head.eval()
    with open_store(store) as opened:
        split = opened.split("test")
        items = usable_items(split)
        labels = split.column("labels")[items]
        with torch.no_grad():
            logits = head(as_tensor(split.read_tokens(saved["layer"], items), split.dtype).float(),
                          torch.from_numpy(split.read_mask(items))).double().numpy()
    for c in range(len(CLASSES)):
        assert average_precision_score(labels[:, c], log_scores[:, c]) == pytest.approx(
            average_precision_score(labels[:, c], logits[:, c]), abs=1e-12)


def test_predict_refuses_what_is_not_a_saved_head(store, run, tmp_path):
    result = invoke("predict", store, "--head", run / "checkpoint.pt", "--device", "cpu", "--out", tmp_path / "s.csv")
    assert result.exit_code == 2 and "Invalid value for --head" in said(result), result.output
    assert f"{run / 'checkpoint.pt'} is a run checkpoint, not a saved head; use {run / 'best'}/HEAD.pt" in said(result)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    result = invoke("predict", store, "--head", tmp_path / "other.pt", "--device", "cpu", "--out", tmp_path / "s.csv")
    assert result.exit_code == 2 and "is not a head saved by `tokens probe`" in said(result), result.output
    saved = torch.load(run / "best" / "ep.pt", weights_only=True)  # a head edited, or damaged: a traceback from torch
    reshaped = saved | {"state_dict": saved["state_dict"] | {"queries": saved["state_dict"]["queries"][:, :3]}}
    unbuilt = saved | {"build": {k: v for k, v in saved["build"].items() if k != "dim"}}
    for name, edited in (("reshaped", reshaped), ("unbuilt", unbuilt)):
        torch.save(edited, tmp_path / f"{name}.pt")
        result = invoke("predict", store, "--head", tmp_path / f"{name}.pt", "--device", "cpu", "--out", tmp_path / "s.csv")
        assert result.exit_code == 2 and f"{tmp_path / name}.pt is damaged: its weights do not make the head it names (" in said(result)
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "s.csv").exists()


def test_predict_refuses_tokens_made_another_way_and_notes_another_dataset(run, tmp_path):
    """A head trained on final-normed tokens scores nonsense on tokens without the norm (or of
    another checkpoint): refused, naming the difference. Another dataset of the same encoder is
    what predict is for: a note, and scores."""
    head = run / "best" / "ep.pt"
    for normed in (make_store(tmp_path / "normed.zarr", final_norm=True),
                   # also recorded as a backbone option, as `tokens extract` records it: said once
                   make_store(tmp_path / "normed-2.zarr", final_norm=True, backbone_config={"final_norm": True})):
        result = invoke("predict", normed, "--head", head, "--device", "cpu", "--out", tmp_path / "s.csv")
        assert result.exit_code == 2 and "--head" in said(result), said(result)
        assert "was trained on raw tokens, and" in said(result), said(result)
        assert "were normed at extraction: score a store extracted without --final-norm" in said(result), said(result)
    other_checkpoint = make_store(tmp_path / "other-checkpoint.zarr", checkpoint_sha256="ab" * 32)
    result = invoke("predict", other_checkpoint, "--head", head, "--device", "cpu", "--out", tmp_path / "s.csv")
    assert result.exit_code == 2 and "made another way (checkpoint_sha256 null there, " in said(result), said(result)
    # New data need not hold the head's classes: its scores are the head's, in the head's columns, as on its own classes.
    reference = tmp_path / "reference.csv"
    ok("predict", make_store(tmp_path / "same-classes.zarr"), "--head", head, "--device", "cpu", "--out", reference)
    renamed = make_store(tmp_path / "renamed.zarr", classes=["bird", "car", "snow"])
    result = ok("predict", renamed, "--head", head, "--device", "cpu", "--out", tmp_path / "renamed.csv")
    assert (f"labels its items with the classes {json.dumps(['bird', 'car', 'snow'])}, the head scores its own "
            f"{json.dumps(CLASSES)}: the columns are the head's; [\"snow\"] it was not trained on") in said(result), said(result)
    assert (tmp_path / "renamed.csv").read_text() == reference.read_text()
    wider = make_store(tmp_path / "wider.zarr", dim=2 * D, backbone="synthetic-wide")
    result = invoke("predict", wider, "--head", head, "--device", "cpu", "--out", tmp_path / "s.csv")
    assert result.exit_code == 2 and f"was trained on tokens of {D} dims; {wider}'s have {2 * D} (synthetic there, " \
           "synthetic-wide here): score a store of the head's encoder" in said(result), said(result)
    other = make_store(tmp_path / "other-dataset.zarr")
    result = ok("predict", other, "--head", head, "--device", "cpu", "--out", tmp_path / "s.csv")
    assert "trained on another store" in result.output and (tmp_path / "s.csv").exists()


def test_predict_refuses_a_multi_layer_head_on_other_layers_and_a_split_with_nothing_to_score(store, run, tmp_path):
    """cgp weighs each layer it was trained on: two other layers are not them, though as many. A
    split of an unfinished store with no shard written has nothing to score: said, naming it."""
    out = tmp_path / "cgp"
    ok("probe", store, "--heads", "cgp", "--option", "cgp.num_prototypes=8", *FAST, "--out", out)
    other_layers = make_store(tmp_path / "layers-4-6.zarr", layers=[4, 6])
    result = invoke("predict", other_layers, "--head", out / "best" / "cgp.pt", "--device", "cpu", "--out", tmp_path / "s.csv")
    assert result.exit_code == 2 and "--head" in said(result), said(result)
    assert "reads the layers [3, 6];" in said(result) and "caches [4, 6]" in said(result), said(result)
    ok("predict", make_store(tmp_path / "same-layers.zarr"), "--head", out / "best" / "cgp.pt", "--device", "cpu",
       "--out", tmp_path / "s.csv")
    unwritten = make_store(tmp_path / "unwritten.zarr", written=())
    result = invoke("predict", unwritten, "--head", run / "best" / "ep.pt", "--allow-incomplete", "--device", "cpu",
                    "--out", tmp_path / "new" / "t.csv")
    assert result.exit_code == 2 and "--split" in said(result) and not (tmp_path / "new").exists(), said(result)
    assert "has no usable test items (all failed or in unwritten shards)" in said(result), said(result)


def test_predict_checks_its_output_path_before_scoring(store, run, tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "score", lambda *a, **k: pytest.fail("scored before --out was checked"))
    result = invoke("predict", store, "--head", run / "best" / "ep.pt", "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 2 and "Invalid value for --out" in said(result) and "is a folder" in said(result)
    (tmp_path / "file").write_text("")
    result = invoke("predict", store, "--head", run / "best" / "ep.pt", "--device", "cpu", "--out", tmp_path / "file" / "s.csv")
    assert result.exit_code == 2 and "Invalid value for --out" in said(result) and "cannot make the folder" in said(result)
    result = invoke("predict", store, "--head", run / "best" / "ep.pt", "--device", "cpu", "--out", "/proc/tokens-scores.csv")
    assert result.exit_code == 2 and "/proc takes no new folders" in said(result), said(result)
    monkeypatch.undo()
    ok("predict", store, "--head", run / "best" / "ep.pt", "--device", "cpu", "--out", tmp_path / "new" / "dir" / "s.csv")
    assert len(read_csv(tmp_path / "new" / "dir" / "s.csv")) == SIZES["test"]


def test_predict_never_writes_its_scores_over_the_store_the_head_or_another_file(store, run, tmp_path):
    """--out mistyped as the HDF5 store being scored, the head, or a manifest would lose them to a
    CSV: refused, each left as it was. An earlier scores file is replaced whole."""
    shutil.copy(run / "best" / "ep.pt", tmp_path / "ep.pt")
    h5 = make_store(tmp_path / "s.h5")
    manifest, with_ids = tmp_path / "m.csv", tmp_path / "ids.csv"
    manifest.write_text("path,labels,split\na.wav,bird,test\n")
    with_ids.write_text("id,path,labels,split\nx,a.wav,bird,test\n")  # a manifest may begin with its id column
    for target, what in [(tmp_path / "ep.pt", "--head"), (h5, "STORE"), (manifest, "manifest"), (with_ids, "manifest")]:
        before = target.read_bytes()
        scored = h5 if what == "STORE" else store
        result = invoke("predict", scored, "--head", tmp_path / "ep.pt", "--device", "cpu", "--out", target)
        assert result.exit_code == 2 and "is not a scores file" in said(result), (what, said(result))
        assert target.read_bytes() == before, what
    earlier = tmp_path / "scores.csv"
    earlier.write_text(f"id,source,offset,{','.join(CLASSES)}\nold,a.wav,0,0.1,0.2,0.3\n")
    (tmp_path / "linked.csv").symlink_to(earlier)
    ok("predict", store, "--head", tmp_path / "ep.pt", "--device", "cpu", "--out", tmp_path / "linked.csv")
    assert len(read_csv(earlier)) == SIZES["test"] and (tmp_path / "linked.csv").is_symlink()  # written through the link
    older = tmp_path / "older.csv"  # scores of an earlier version, without source and offset: scores all the same
    older.write_text(f"id,{','.join(CLASSES)}\nold,0.1,0.2,0.3\n")
    ok("predict", store, "--head", tmp_path / "ep.pt", "--device", "cpu", "--out", older)
    assert list(read_csv(older)[0])[:3] == ["id", "source", "offset"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_report_refuses_a_csv_that_is_not_a_leaderboard(tmp_path):
    other = tmp_path / "scores.csv"
    other.write_text("id,bird,car,rain\ntest-0,0.1,0.2,0.3\n")
    result = invoke("report", other, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "Invalid value for RUN:" in said(result), result.output
    assert f"{other} is not a leaderboard.csv written by `tokens probe`" in said(result)
    assert not (tmp_path / "r").exists()


def test_a_leaderboard_without_the_metric_selection_maximises_is_refused(run, tmp_path):
    """Its val_map column deleted, a report selected by ROC-AUC without a word."""
    rows = read_csv(run / "leaderboard.csv")
    (tmp_path / "edited").mkdir()
    report_module.write_csv(tmp_path / "edited" / "leaderboard.csv", rows, [c for c in rows[0] if c != "val_map"])
    result = invoke("report", tmp_path / "edited", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "it has no column val_map" in said(result), result.output
    shuffled = list(rows[0])  # its columns in another order: the same selection
    shuffled.insert(0, shuffled.pop(shuffled.index("val_roc_auc")))
    report_module.write_csv(tmp_path / "edited" / "leaderboard.csv", rows, shuffled)
    ok("report", tmp_path / "edited", "--out", tmp_path / "r")
    ok("report", run, "--out", tmp_path / "r0")
    def selected(folder):
        return {row["head"]: row["config"] for row in read_csv(folder / "report.csv") if row["selected"] == "1"}
    assert selected(tmp_path / "r") == selected(tmp_path / "r0")


def test_a_report_names_the_runs_it_cannot_use(run, tmp_path):
    """Among several runs, a mistyped folder is refused by name and an unfinished run (no
    leaderboard yet) is named in a note, rather than a report quietly made of fewer runs."""
    result = invoke("report", run, tmp_path / "typo", "--out", tmp_path / "r")
    assert result.exit_code == 2 and f"{tmp_path / 'typo'}: no such run directory" in said(result), said(result)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    result = ok("report", run, unfinished, "--out", tmp_path / "r")
    assert f"{unfinished}: no leaderboard.csv yet (not finished)" in result.output, result.output


def test_results_are_not_written_among_other_files(store, run, tmp_path):
    """`--out data` wrote heads/, best/ and a checkpoint into the dataset (whose next extraction then
    failed on best/ as a split folder), and `--out S.zarr` into a store: a folder holding anything
    but this command's own results is refused, naming what it holds, and left as it was."""
    dataset = tmp_path / "data"
    (dataset / "train" / "bird").mkdir(parents=True)
    (dataset / "manifest.csv").write_text("path,labels,split\n")
    for out in (dataset, store):
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        for command in (["probe", store, "--heads", "mean", *FAST], ["report", run]):
            result = invoke(*command, "--out", out)
            assert result.exit_code == 2 and f"{out} holds files this command does not write (" in said(result), said(result)
            assert "give a new or empty folder" in said(result)
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert "holds files this command does not write (manifest.csv, train)" in said(invoke("report", run, "--out", dataset))
    # A run folder that holds a report kept inside it is still the run: run again, it resumes.
    kept = tmp_path / "kept"
    shutil.copytree(run, kept)
    ok("report", kept, "--out", kept / "merged")
    again = ok("probe", store, *SWEEP, *FAST, "--data", "stream", "--out", kept)
    assert f"resuming from {kept / 'checkpoint.pt'} after epoch 4 of 4" in said(again), said(again)


def test_a_report_never_replaces_a_runs_leaderboard_nor_reads_one_kept_inside_a_run(store, run, tmp_path):
    """A report's leaderboard.csv in a run's folder would pass for the run's own (its heads/ and best/
    no longer matching); a report kept inside a run is not one of the run's parts."""
    other = tmp_path / "other"
    ok("probe", store, "--heads", "mean", *FAST, "--batch-size", "16", "--device", "cpu", "--out", other)
    before = (other / "leaderboard.csv").read_bytes()
    split_sweep = tmp_path / "split"
    (split_sweep / "part-1-of-2").mkdir(parents=True)
    for out in (other, split_sweep):
        result = invoke("report", run, other, "--out", out)
        assert result.exit_code == 2 and "--out" in said(result) and "is a probe run" in said(result), said(result)
    copied = tmp_path / "copied"
    copied.mkdir()
    (copied / "leaderboard.csv").write_bytes(before)
    result = invoke("report", copied / "leaderboard.csv", run, "--out", copied)
    assert result.exit_code == 2 and "holds" in said(result) and "would replace" in said(result), said(result)
    assert (other / "leaderboard.csv").read_bytes() == before == (copied / "leaderboard.csv").read_bytes()
    ok("report", other, run, "--out", other / "merged")
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "leaderboard.csv").write_bytes((run / "leaderboard.csv").read_bytes())
    merged = ok("report", run, tmp_path / "again", "--out", tmp_path / "twice")  # the same rows twice: one note, not one a row
    notes = [line for line in merged.output.splitlines() if "appear" in line]
    count = len(read_csv(run / "leaderboard.csv"))
    assert len(notes) == 1 and f"note: {count} configurations (e.g. " in notes[0] and notes[0].endswith(": kept the first")
    result = ok("report", other, "--out", tmp_path / "alone")
    assert "appears in" not in result.output
    assert read_csv(tmp_path / "alone" / "leaderboard.csv") == [row | {"run": str(other.resolve())} for row in read_csv(other / "leaderboard.csv")]


def test_an_out_path_that_cannot_be_a_folder_and_a_missing_split_name_their_option(store, run, tmp_path):
    a_file = tmp_path / "notes.csv"
    a_file.write_text("x\n")
    for command in (["report", run], ["probe", store, "--heads", "linear", *FAST]):
        result = invoke(*command, "--out", a_file)
        assert result.exit_code == 2 and "--out" in said(result) and f"{a_file} is a file" in said(result), said(result)
    under_a_file = a_file / "report"
    for command in (["report", run], ["probe", store, "--heads", "linear", *FAST]):
        result = invoke(*command, "--out", under_a_file)
        assert result.exit_code == 2 and "--out" in said(result) and "cannot make the folder" in said(result), said(result)
        result = invoke(*command, "--out", "/proc/tokens-run")  # a place that takes no writes, even as root
        assert result.exit_code == 2 and "--out" in said(result) and "/proc takes no new folders" in said(result), said(result)
    result = invoke("predict", store, "--head", run / "best" / "ep.pt", "--split", "val", "--out", tmp_path / "s.csv")
    assert result.exit_code == 2 and "--split" in said(result) and "no split 'val'; it has train, valid, test" in said(result)


def test_a_report_over_two_stores_names_the_store_of_each_row(store, tmp_path, monkeypatch):
    """In the tables, and in report.png as one panel per store: two encoders' points are never drawn
    as one another's."""
    other = make_store(tmp_path / "other.zarr", splits={"train": 40, "valid": 16, "test": 16})
    for name, path in (("a", store), ("b", other)):
        ok("probe", path, "--heads", "mean", *FAST[:2], "--batch-size", "16", "--device", "cpu", "--out", tmp_path / name)
    figures, plot = [], report_module.plot_params_vs_metric
    monkeypatch.setattr(report_module, "plot_params_vs_metric", lambda *a, **k: figures.append(plot(*a, **k)))
    result = ok("report", tmp_path / "a", "--out", tmp_path / "one")
    assert "| store |" not in (tmp_path / "one" / "report.md").read_text()
    assert [ax.get_title() for ax in figures[-1].axes if ax.get_visible()] == [""]
    result = ok("report", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "two")
    md = (tmp_path / "two" / "report.md").read_text().split("## All configurations")[1].strip().splitlines()
    assert md[0].startswith("| head | config | store | params |")
    rows = {line.split(" | ")[2] for line in md[2:]}
    assert rows == {"ml.zarr", "other.zarr"}
    assert "ml.zarr" in result.output and "other.zarr" in result.output
    panels = {ax.get_title(): ax for ax in figures[-1].axes if ax.get_visible()}
    assert sorted(panels) == ["ml.zarr", "other.zarr"]
    for name, run in (("ml.zarr", "a"), ("other.zarr", "b")):
        drawn = [y for bars in panels[name].containers if bars.get_label() == "mean" for y in bars.lines[0].get_ydata()]
        assert drawn == pytest.approx([float(r["test_map"]) for r in read_csv(tmp_path / run / "leaderboard.csv")])
    # The encoders side by side: the selected configuration's test figure, head by store; report.csv names stores too.
    summary = read_csv(tmp_path / "two" / "report.csv")
    assert {row["store"] for row in summary} == {"ml.zarr", "other.zarr"}
    text = (tmp_path / "two" / "report.md").read_text()
    assert "| head | ml.zarr | other.zarr |" in text
    cells = {row["store"]: row for row in summary if row["selected"] == "1"}
    side = next(line for line in text.splitlines() if line.startswith("| mean |"))
    assert side == f"| mean | {float(cells['ml.zarr']['test_map_mean']):.4f} | {float(cells['other.zarr']['test_map_mean']):.4f} |"


def test_a_pipe_or_newline_in_a_markdown_cell_stays_in_its_cell():
    """A store named pi|pe.zarr put its name in two columns, moving every cell after it one header over."""
    text = report_module.table([{"head": "ep", "store": "pi|pe.zarr", "training": "two\nlines"}], ["head", "store", "training"], markdown=True)
    lines = text.splitlines()
    assert len(lines) == 3 and [len(re.split(r"(?<!\\)\|", line)) for line in lines] == [5, 5, 5], text
    assert "pi\\|pe.zarr" in lines[2] and "two lines" in lines[2]


def test_the_report_selects_each_heads_configuration_by_validation_alone(tmp_path, monkeypatch):
    """Per head, the configuration with the best validation mean over seeds, whatever the test
    figures say; computed here from the leaderboard's rows directly."""
    rng = np.random.default_rng(0)
    rows = []
    for head in ("linear", "ep"):
        for lr in (0.001, 0.003, 0.01):
            for seed in (0, 1, 2):
                rows.append({"head": head, "config": f"{head}/lr={lr}/wd=0.0001/layer=6/seed={seed}", "params": 10, "best_epoch": 3,
                             "val_map": rng.random(), "test_map": rng.random(), "layer": 6, "lr": lr, "wd": 0.0001,
                             "seed": seed, "options": "{}", "store_key": "k" * 16})
    (tmp_path / "run").mkdir()
    report_module.write_csv(tmp_path / "run" / "leaderboard.csv", rows, list(rows[0]))
    figures, plot = [], report_module.plot_params_vs_metric
    monkeypatch.setattr(report_module, "plot_params_vs_metric", lambda *a, **k: figures.append(plot(*a, **k)))
    result = ok("report", tmp_path / "run", "--out", tmp_path / "r")
    expected, by_test = {}, {}
    for head in ("linear", "ep"):
        def best(column):
            means = {lr: np.mean([r[column] for r in rows if r["head"] == head and r["lr"] == lr]) for lr in (0.001, 0.003, 0.01)}
            return f"{head}/lr={max(means, key=means.get)}/wd=0.0001/layer=6"
        expected[head], by_test[head] = best("val_map"), best("test_map")
    assert by_test != expected  # these figures tell selection by validation from selection by test
    summary = read_csv(tmp_path / "r" / "report.csv")
    assert {row["head"]: row["config"] for row in summary if row["selected"] == "1"} == expected
    assert sum(row["selected"] == "1" for row in summary) == 2
    selected_md = (tmp_path / "r" / "report.md").read_text().split("## All configurations")[0]
    assert all(config in selected_md for config in expected.values()) and selected_md.count("| linear |") == 1
    assert "selected by validation map" in result.output
    rings = [c for c in figures[0].axes[0].collections if c.get_label() == "selected on validation"]
    ringed = rings[0].get_offsets().tolist()
    assert sorted(y for _, y in ringed) == sorted(float(row["test_map_mean"]) for row in summary if row["selected"] == "1")
    assert all(abs(x / 10 - 1) < 0.05 for x, _ in ringed)  # both heads have 10 parameters: set a little apart


def test_a_sweep_over_layers_reports_each_heads_best_at_each_layer(tmp_path, monkeypatch):
    """Where in the encoder a head finds what it needs: at each layer, the configuration of best mean
    validation over seeds (its own learning rate), its test mean in a table and a plot; a multi-layer
    head, trained once on them all, a level line. Computed here from the rows directly."""
    rng = np.random.default_rng(2)
    rows = []
    for head, layers in (("linear", (4, 8, 12)), ("ep", (4, 8, 12)), ("cgp", ("all",))):
        for layer in layers:
            for lr in (0.001, 0.01):
                for seed in (0, 1):
                    rows.append({"head": head, "config": f"{head}/lr={lr}/wd=0.0001/layer={layer}/seed={seed}", "params": 10,
                                 "best_epoch": 3, "val_map": rng.random(), "test_map": rng.random(), "layer": layer, "lr": lr,
                                 "wd": 0.0001, "seed": seed, "options": "{}", "store_key": "k" * 16})
    (tmp_path / "run").mkdir()
    report_module.write_csv(tmp_path / "run" / "leaderboard.csv", rows, list(rows[0]))
    figures, plot = [], report_module.plot_layers
    monkeypatch.setattr(report_module, "plot_layers", lambda *a, **k: figures.append(plot(*a, **k)))
    result = ok("report", tmp_path / "run", "--out", tmp_path / "r")

    def expected(head, layer):
        mine = [r for r in rows if r["head"] == head and r["layer"] == layer]
        val = {lr: np.mean([r["val_map"] for r in mine if r["lr"] == lr]) for lr in (0.001, 0.01)}
        test = [r["test_map"] for r in mine if r["lr"] == max(val, key=val.get)]
        return np.mean(test), np.std(test, ddof=1)

    section = (tmp_path / "r" / "report.md").read_text().split("## By layer")[1].split("## All configurations")[0]
    lines = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in section.splitlines() if line.startswith("| ")}
    assert lines["head"] == ["layer 4", "layer 8", "layer 12", "all layers"]
    for head in ("linear", "ep"):
        assert lines[head] == [f"{expected(head, layer)[0]:.4f} ± {expected(head, layer)[1]:.4f}" for layer in (4, 8, 12)] + [""]
    assert lines["cgp"] == ["", "", "", "{:.4f} ± {:.4f}".format(*expected("cgp", "all"))]
    assert "best on validation at each layer, test map (layers.png)" in result.output
    assert (tmp_path / "r" / "layers.png").exists()
    ax = figures[0].axes[0]
    drawn = {bars.get_label(): bars.lines[0] for bars in ax.containers} | {line.get_label(): line for line in ax.get_lines()}
    for head in ("linear", "ep"):
        assert list(drawn[head].get_xdata()) == [4, 8, 12]
        assert np.allclose(drawn[head].get_ydata(), [expected(head, layer)[0] for layer in (4, 8, 12)])
    assert np.allclose(drawn["cgp (all layers)"].get_ydata(), expected("cgp", "all")[0])  # a level line across the layers

    one_layer = [r for r in rows if r["layer"] in (8, "all")]  # a sweep of one layer: nothing to set side by side
    (tmp_path / "run8").mkdir()
    report_module.write_csv(tmp_path / "run8" / "leaderboard.csv", one_layer, list(rows[0]))
    ok("report", tmp_path / "run8", "--out", tmp_path / "r")
    assert "## By layer" not in (tmp_path / "r" / "report.md").read_text()
    assert not (tmp_path / "r" / "layers.png").exists()  # the earlier report's plot would pass for this one's


def test_a_run_over_layers_plots_each_heads_best_at_each_layer(store, tmp_path):
    """A run sweeping two layers draws layers.png; one of a single layer does not."""
    result = ok("probe", store, "--heads", "linear,ep", "--option", "ep.num_queries=4", "--layers", "all", "--seeds", "0",
                *FAST, "--out", tmp_path / "both")
    assert (tmp_path / "both" / "layers.png").exists() and "layers.png" in result.output
    result = ok("probe", store, "--heads", "linear", "--seeds", "0", *FAST, "--out", tmp_path / "one")
    assert not (tmp_path / "one" / "layers.png").exists() and "layers.png" not in result.output


def test_data_seeds_are_pooled_and_an_unfinished_store_is_selected_apart(tmp_path):
    """Runs that differ only in --data-seed are replicates (selecting the best batch order would be a
    maximum over noise); a run on an unfinished store validated on other items, so it must not win
    over the finished store's, nor pass for it."""
    rng = np.random.default_rng(1)
    base = "adamw/cosine/epochs=4/batch=16/warmup=1/loss=bce"
    runs = {"d0": f"{base}/data_seed=0", "d1": f"{base}/data_seed=1", "partial": f"{base}/data_seed=0/unfinished=train:1of2"}
    rows = {}
    for run, training in runs.items():
        rows[run] = [{"head": "ep", "config": f"ep/lr={lr}/wd=0.0001/layer=6/seed={seed}", "params": 10, "best_epoch": 3,
                      "val_map": rng.random() + (2 if run == "partial" else 0), "test_map": rng.random(), "layer": 6, "lr": lr,
                      "wd": 0.0001, "seed": seed, "options": "{}", "store_key": "k" * 16, "training": training}
                     for lr in (0.001, 0.01) for seed in (0, 1)]
        (tmp_path / run).mkdir()
        report_module.write_csv(tmp_path / run / "leaderboard.csv", rows[run], list(rows[run][0]))
    result = ok("report", *(tmp_path / run for run in runs), "--out", tmp_path / "r")
    summary = read_csv(tmp_path / "r" / "report.csv")
    finished = {row["config"]: row for row in summary if "unfinished" not in row["training"]}
    for lr in (0.001, 0.01):
        pooled = [r["val_map"] for run in ("d0", "d1") for r in rows[run] if r["lr"] == lr]
        row = finished[f"ep/lr={lr}/wd=0.0001/layer=6"]
        assert row["seeds"] == "4" and float(row["val_map_mean"]) == pytest.approx(np.mean(pooled))
        assert float(row["val_map_sd"]) == pytest.approx(np.std(pooled, ddof=1))
    selected = [row for row in summary if row["selected"] == "1"]
    assert sorted("unfinished" in row["training"] for row in selected) == [False, True]
    assert "**Unfinished store:**" in (tmp_path / "r" / "report.md").read_text()
    assert "note: rows whose training says unfinished=" in result.output


def test_a_report_over_data_seeds_points_at_a_saved_seed_of_its_selection(tmp_path):
    """Each data-seed run saves the best of its own configurations: where the pooled selection's best
    seed was saved by no run, another of its seeds that one saved is named, and said to be so."""
    base = "adamw/cosine/epochs=4/batch=16/warmup=1/loss=bce"
    values = {("d0", 0.001): (0.9, 0.1), ("d0", 0.01): (0.6, 0.6), ("d1", 0.001): (0.8, 0.8), ("d1", 0.01): (0.1, 0.1)}
    for run in ("d0", "d1"):
        rows = [{"head": "linear", "config": f"linear/lr={lr}/wd=0.0001/layer=6/seed={seed}", "params": 10, "best_epoch": 3,
                 "val_map": values[run, lr][seed], "test_map": 0.5, "layer": 6, "lr": lr, "wd": 0.0001, "seed": seed,
                 "options": "{}", "store_key": "k" * 16, "training": f"{base}/data_seed={run[1]}"}
                for lr in (0.001, 0.01) for seed in (0, 1)]
        (tmp_path / run / "best").mkdir(parents=True)
        report_module.write_csv(tmp_path / run / "leaderboard.csv", rows, list(rows[0]))
        own = report_module.selected_rows(rows)["linear"]  # what the run itself saved as best/linear.pt
        torch.save({"store_key": own["store_key"], "config": own["config"]}, tmp_path / run / "best" / "linear.pt")
    result = ok("report", tmp_path / "d0", tmp_path / "d1", "--out", tmp_path / "r")
    (row,) = [r for r in read_csv(tmp_path / "r" / "report.csv") if r["selected"] == "1"]
    assert (row["config"], row["seeds"], row["data_seeds"]) == ("linear/lr=0.001/wd=0.0001/layer=6", "4", "0,1")
    assert row["saved_head"] == str(tmp_path / "d1" / "best" / "linear.pt")
    assert ("(linear/lr=0.001/wd=0.0001/layer=6/seed=0 with --data-seed 1; its best seed, "
            "linear/lr=0.001/wd=0.0001/layer=6/seed=0 with --data-seed 0, was saved by no run)") in result.output


def test_parameter_ticks_are_labelled_however_narrow_their_span(tmp_path):
    """Within a decade no major tick may be in view: the minor ones are labelled instead."""
    for params in ((6000, 9000), (2100, 2900), (120_000_000, 340_000_000), (300, 10_000)):
        rows = [{"head": "ep", "params": n, "test_map": 0.5} for n in params]
        figure = report_module.plot_params_vs_metric(rows, "test_map", tmp_path / "p.png")
        figure.canvas.draw()
        axis = figure.axes[0].xaxis
        labels = [t.get_text() for t in axis.get_majorticklabels() + axis.get_minorticklabels() if t.get_text()]
        low, high = figure.axes[0].get_xlim()
        shown = [t for t in axis.get_majorticklocs().tolist() + axis.get_minorticklocs().tolist() if low <= t <= high]
        assert len(labels) >= 2 and shown, (params, labels)


def test_heads_of_one_parameter_count_are_drawn_apart_and_their_rings_on_them(tmp_path):
    """linear and mean have as many parameters and often close figures: one hid the other."""
    rows = [{"head": head, "params": 291, "test_map": 0.61} for head in ("linear", "mean")] + [
        {"head": "ep", "params": 5000, "test_map": 0.7}]
    figure = report_module.plot_params_vs_metric(rows, "test_map", tmp_path / "p.png", chosen=rows[1:2])
    ax = figure.axes[0]
    drawn = {bars.get_label(): bars.lines[0].get_xdata()[0] for bars in ax.containers}
    assert drawn["linear"] < 291 < drawn["mean"] and drawn["mean"] / drawn["linear"] < 1.1 and drawn["ep"] == 5000
    (ring,) = [c for c in ax.collections if c.get_label() == "selected on validation"]
    assert ring.get_offsets()[0][0] == drawn["mean"]


def test_a_runs_best_head_is_the_best_seed_of_the_configuration_its_report_selects():
    """One lucky seed does not make a configuration: lr=0.01 has the best single seed (0.9) but the
    worse mean (0.5 against 0.55), so best/linear.pt holds lr=0.003's better seed."""
    rows = [{"head": "linear", "config": f"linear/lr={lr}/wd=0.0001/layer=6/seed={seed}", "params": 10, "val_map": val,
             "test_map": 0.5, "layer": 6, "store_key": "k" * 16, "training": "adamw/cosine"}
            for lr, seed, val in ((0.01, 0, 0.9), (0.01, 1, 0.1), (0.003, 0, 0.5), (0.003, 1, 0.6))]
    assert report_module.selected_rows(rows)["linear"]["config"] == "linear/lr=0.003/wd=0.0001/layer=6/seed=1"
    summary = report_module.summarize(rows)
    report_module.mark_selected(summary, "map")
    assert [row["config"] for row in summary if row["selected"]] == ["linear/lr=0.003/wd=0.0001/layer=6"]


def test_on_a_tie_the_run_and_its_report_select_the_same_configuration(store, tmp_path, monkeypatch):
    """Every configuration given the same validation mAP: best/HEAD.pt and the report's selected row
    are both the first by configuration, not the first of the sweep (lr=0.01 here)."""
    real = recipe.compute_metrics
    monkeypatch.setattr(recipe, "compute_metrics", lambda task, scores, labels: real(task, scores, labels) | {"map": 0.5})
    ok("probe", store, "--heads", "linear", "--lr", "0.01,0.003", *FAST, "--out", tmp_path / "tie")
    best = torch.load(tmp_path / "tie" / "best" / "linear.pt", weights_only=True)["config"]
    ok("report", tmp_path / "tie", "--out", tmp_path / "r")
    selected = [row["config"] for row in read_csv(tmp_path / "r" / "report.csv") if row["selected"] == "1"]
    assert selected == [report_module.group_id(best)] == ["linear/lr=0.003/wd=0.0001/layer=6"]


def test_runs_that_differ_only_in_training_are_both_reported(store, tmp_path, monkeypatch):
    """In report.png too, one panel each, titled by what their training does not share."""
    for optimizer, epochs in (("adamw", "4"), ("sgd", "3")):
        ok("probe", store, "--heads", "linear", "--lr", "0.01", "--optimizer", optimizer, *FAST, "--epochs", epochs,
           "--out", tmp_path / optimizer)
    figures, plot = [], report_module.plot_params_vs_metric
    monkeypatch.setattr(report_module, "plot_params_vs_metric", lambda *a, **k: figures.append(plot(*a, **k)))
    result = ok("report", tmp_path / "adamw", tmp_path / "sgd", "--out", tmp_path / "r")
    assert sorted(ax.get_title() for ax in figures[-1].axes if ax.get_visible()) == ["adamw, epochs=4", "sgd, epochs=3"]
    summary = read_csv(tmp_path / "r" / "report.csv")
    assert sorted(row["training"].split("/")[0] for row in summary) == ["adamw", "sgd"]
    assert sum(row["selected"] == "1" for row in summary) == 1 and "appears in" not in result.output
    assert "| training |" in (tmp_path / "r" / "report.md").read_text()


def test_a_checkpoint_from_before_the_optimizer_or_the_resolved_loss_resumes(store, run, tmp_path):
    out = tmp_path / "before"
    out.mkdir()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["plan"]["optimizer"], state["plan"]["schedule"]
    state["plan"]["loss"] = ""  # as versions before the resolved loss saved the default
    torch.save(state, out / "checkpoint.pt")
    assert "resuming" in ok("probe", store, *SWEEP, *FAST, "--data", "stream", "--out", out).output
    assert leaderboard(out) == leaderboard(run)


def test_a_checkpoint_of_an_earlier_batch_order_is_not_resumed(store, run, tmp_path):
    """Its first epochs drew other batches and, without a valid split, other held-out items: resumed,
    it would train on items it had validated on."""
    out = tmp_path / "earlier"
    out.mkdir()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["plan"]["sampling"]
    torch.save(state, out / "checkpoint.pt")
    result = invoke("probe", store, *SWEEP, *FAST, "--data", "stream", "--out", out)
    assert result.exit_code == 2 and "it drew its batches and held-out items as an earlier version did" in said(result), result.output


def test_stores_sharing_a_name_are_told_apart_by_key(tmp_path):
    paths = []
    for name, key in (("a", "aaaaaaaa11111111"), ("b", "bbbbbbbb22222222"), ("c", "cccccccc33333333")):
        (tmp_path / name).mkdir()
        if name != "c":  # c is a merged leaderboard: no config.json beside it
            (tmp_path / name / "config.json").write_text(json.dumps({"store": f"/{name}/s.zarr", "store_key": key + "ffff"}))
        paths.append(tmp_path / name / "leaderboard.csv")
    labels = report_module.store_labels(paths, ["aaaaaaaa11111111", "bbbbbbbb22222222", "cccccccc33333333"])
    assert labels == {"aaaaaaaa11111111": "s.zarr:aaaaaaaa", "bbbbbbbb22222222": "s.zarr:bbbbbbbb", "cccccccc33333333": "cccccccc"}


def test_scores_keep_the_order_of_confident_logits():
    """Logits of 17 and more all give a float32 sigmoid of exactly 1, and of 37 and more a float64 one:
    the ranking metrics would see ties. Log-probabilities keep them apart."""
    from sklearn.metrics import average_precision_score

    class Logits(torch.nn.Module):  # a head whose logits are its input's first token
        multi_layer = uses_cls = False

        def forward(self, tokens, mask=None, cls=None):
            return tokens[:, 0]

    logits = torch.tensor([[17.0], [18.0], [37.0], [40.0], [45.0], [50.0]])
    labels = np.array([[0], [1], [0], [1], [1], [1]])

    class Source:
        def batches(self, items, batch_size):
            yield type("Batch", (), {"tokens": {0: logits[items][:, None]}, "mask": None, "cls": {}})

    (scores,) = recipe.score([(Logits(), 0)], Source(), np.arange(6), 6, "multilabel")
    assert len(np.unique(scores)) == 6
    assert compute_metrics("multilabel", scores, labels)["map"] == pytest.approx(average_precision_score(labels[:, 0], logits[:, 0].numpy()))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lars"])
@pytest.mark.parametrize("head", ["protobin", "cgp", "ep", "mhca"])
def test_weight_decay_spares_prototypes_and_one_dimensional_parameters(head, optimizer):
    """One step with zero gradients: only decay moves the parameters. AdamW's and SGD's first step
    shrink a weight matrix by 1 - lr * wd; LARS scales the decay to TRUST * |w| / |wd * w|, so by
    1 - lr * TRUST. Biases, norms and prototypes do not move."""
    from tokens.train.heads import build_head
    from tokens.train.optim import TRUST, make_optimizer

    options = {"cgp": {"num_layers": 2, "num_prototypes": 6}, "mhca": {"num_heads": 4}}.get(head, {})
    module = build_head(head, dim=32, num_classes=3, **options)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    step = make_optimizer(optimizer, module, lr=0.1, wd=0.5)
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    step.step()
    shrink = 1 - 0.1 * (TRUST if optimizer == "lars" else 0.5)
    for name, p in module.named_parameters():
        spared = p.ndim <= 1 or name.endswith("prototypes")
        expected = before[name] if spared else before[name] * shrink
        torch.testing.assert_close(p.detach(), expected, msg=name)
    assert any(name.endswith("prototypes") for name in before) == (head in ("protobin", "cgp"))
    if optimizer == "lars":  # every matrix is scaled, as in MAE; prototypes without decay
        for group in step.param_groups:
            assert all(p.ndim > 1 for p in group["params"]) if group["adapt"] else all(p.ndim <= 1 for p in group["params"])


def test_heads_without_a_rate_take_the_optimizers_default(store):
    """AdamW's per-head defaults would barely move LARS (it scales steps by 0.001): LARS heads
    without a rate take MAE's rule, 0.1 x batch / 256; rates given anywhere still win."""
    from tokens.train.optim import default_lr

    with open_store(store) as opened:
        def rates(optimizer, option=None, lr=None):
            configs, _ = commands.build_sweep(opened, "linear,protobin", option, lr, None, None, None, None, default_lr(optimizer, 128))
            return {c.head: c.lr for c in configs}

        assert rates("adamw") == {"linear": sweeps.FALLBACK_LR, "protobin": sweeps.DEFAULT_LR["protobin"]}
        assert rates("lars") == {"linear": 0.05, "protobin": 0.05}
        assert rates("lars", ["protobin.lr=0.3"]) == {"linear": 0.05, "protobin": 0.3}
        assert rates("lars", lr="2") == {"linear": 2.0, "protobin": 2.0}


def test_lars_follows_its_formula_and_leaves_vectors_to_plain_momentum():
    """Against LARS as You et al. (2017) write it and MAE runs it, over three steps of random
    gradients: d = g + wd * w, scaled by TRUST * |w| / |d|; momentum 0.9 on the scaled d. A 1-D
    parameter takes torch's own SGD with momentum 0.9 and no decay; a zero matrix, unscaled steps."""
    from tokens.train.optim import LARS, MOMENTUM, TRUST

    torch.manual_seed(0)
    matrix, vector, zero = torch.randn(5, 4, requires_grad=True), torch.randn(4, requires_grad=True), torch.zeros(3, 3, requires_grad=True)
    twin = vector.detach().clone().requires_grad_()
    lars = LARS([{"params": [matrix, zero], "weight_decay": 0.05, "adapt": True}, {"params": [vector], "weight_decay": 0.0, "adapt": False}], lr=0.5)
    sgd = torch.optim.SGD([twin], lr=0.5, momentum=0.9)
    w, z, w_momentum, z_momentum = matrix.detach().clone(), zero.detach().clone(), torch.zeros(5, 4), torch.zeros(3, 3)
    for _ in range(3):
        grads = torch.randn(5, 4), torch.randn(4), torch.randn(3, 3)
        matrix.grad, vector.grad, zero.grad = grads[0].clone(), grads[1].clone(), grads[2].clone()
        twin.grad = grads[1].clone()
        lars.step()
        sgd.step()
        d = grads[0] + 0.05 * w
        w_momentum = MOMENTUM * w_momentum + TRUST * w.norm() / d.norm() * d
        w = w - 0.5 * w_momentum
        d = grads[2] + 0.05 * z
        z_momentum = MOMENTUM * z_momentum + (TRUST * z.norm() / d.norm() * d if z.norm() > 0 else d)
        z = z - 0.5 * z_momentum
        torch.testing.assert_close(matrix.detach(), w)
        torch.testing.assert_close(zero.detach(), z)
        torch.testing.assert_close(vector.detach(), twin.detach())


def test_the_learning_rate_warms_up_then_decays_or_holds():
    from tokens.train.optim import lr_factor

    assert [lr_factor("cosine", step, 10, 4) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [round(lr_factor("cosine", step, 10, 4), 6) for step in (4, 7, 10)] == [1.0, 0.5, 0.0]
    assert [lr_factor("constant", step, 10, 4) for step in (0, 4, 9)] == [0.25, 1.0, 1.0]
    assert lr_factor("cosine", 0, 10, 0) == 1.0  # no warm-up


def test_a_job_array_larger_than_the_sweep_is_refused(store, tmp_path, monkeypatch):
    """The tasks beyond the sweep's configurations would each fail, and the report then call their parts missing."""
    from tokens.cli import app as tokens_app

    monkeypatch.chdir(tmp_path)  # where the script's slurm-logs/ goes
    def slurm(*args):
        return CliRunner().invoke(tokens_app, ["slurm", "probe", str(store), "--out", str(tmp_path / "r"), "--script", str(script), *map(str, args)])

    script = tmp_path / "job.sbatch"
    refused = slurm(*SWEEP, "--array", "7")
    assert refused.exit_code == 2 and "7 tasks for a sweep of 6 configurations" in said(refused), said(refused)
    bad = slurm("--heads", "ep", "--option", "ep.num_queries=0", "--array", "2")
    assert bad.exit_code == 2 and "num_queries must be a positive integer" in said(bad), said(bad)
    assert not script.exists()
    assert slurm(*SWEEP, "--array", "6").exit_code == 0 and "#SBATCH --array=1-6" in script.read_text()


def test_a_run_directory_is_not_shared_by_two_sweeps(store, tmp_path):
    """Another sweep in the same --out is refused, by its checkpoint or, once that is deleted, by
    the results left there (whose best/ heads would sit among the new sweep's); the same sweep
    started again is not."""
    out = tmp_path / "run"
    ok("probe", store, "--heads", "ep,protobin", *FAST, "--out", out)
    refused = invoke("probe", store, "--heads", "linear", *FAST, "--out", out)
    assert refused.exit_code == 2 and "belongs to another sweep (its configurations)" in said(refused), said(refused)
    assert f"delete {out} to start over" in said(refused)
    refused = invoke("probe", store, "--heads", "ep,protobin", *FAST, "--loss", "asl", "--out", out)
    assert "belongs to another sweep (loss 'bce' there, 'asl' here)" in said(refused), said(refused)
    ok("probe", store, "--heads", "ep,protobin", *FAST, "--loss", "bce", "--out", out)  # the default, given: the same sweep
    other_store = make_store(tmp_path / "other.zarr")  # as a store extracted again (--retry-failed) has another key
    refused = invoke("probe", other_store, "--heads", "ep,protobin", *FAST, "--out", out)
    assert "belongs to another sweep (it was trained on another store, or on this one before it changed (extracted again into, " in said(refused)
    (out / "checkpoint.pt").unlink()
    refused = invoke("probe", store, "--heads", "linear", *FAST, "--out", out)
    assert refused.exit_code == 2 and f"{out} holds the results of another sweep" in said(refused), said(refused)
    assert sorted(path.name for path in (out / "best").iterdir()) == ["ep.pt", "protobin.pt"]
    ok("probe", store, "--heads", "ep,protobin", *FAST, "--out", out)


class _StoreOfDim32:
    """What build_sweep reads of a store: dim, classes, layers."""
    meta, classes, layers = {"dim": 32}, ["a", "b"], [3, 6]

    def resolve_layer(self, value):
        from tokens.cache.store import StoreError

        if value not in (-1, 3, 6):
            raise StoreError(f"layer {value} is not cached")
        return 6 if value == -1 else value


def test_sweep_mistakes_name_what_the_user_gave(tmp_path):
    """A default option that does not fit the store names --heads, not an --option never given; the
    layers of a sweep file name the file; one option given twice is refused, not half dropped."""
    def refused(*args) -> sweeps.SweepError:
        with pytest.raises(sweeps.SweepError) as raised:
            commands.build_sweep(_StoreOfDim32(), *args)
        return raised.value

    with pytest.raises(sweeps.SweepError) as raised:
        commands.build_sweep(type("StoreOfDim48", (_StoreOfDim32,), {"meta": {"dim": 48}})(), "ep", None, None, None, None, None, None)
    assert raised.value.option == "--heads"
    assert "with its default options, ep: D_o = dim / d_out = 48/1 must be an integer divisible by num_queries = 32" in str(raised.value)
    assert "--option ep.NAME=VALUE" in str(raised.value)
    error = refused("mhca", ["mhca.num_heads=5"], None, None, None, None, None)
    assert error.option == "--option" and "num_heads 5" in str(error)
    (tmp_path / "s.toml").write_text("layers = [7]\n[heads.linear]\n")
    error = refused(None, None, None, None, None, None, tmp_path / "s.toml")
    assert error.option == "--sweep" and str(error).startswith(f"{tmp_path / 's.toml'}: layers: layer 7 is not cached")
    error = refused(None, None, None, None, "7", None, tmp_path / "s.toml")
    assert error.option == "--layers"
    error = refused("ep", ["ep.num_queries=2", "ep.num_queries=4"], None, None, None, None, None)
    assert error.option == "--option" and "--option ep.num_queries is given twice" in str(error)


def test_a_run_directory_holds_a_whole_sweep_or_its_parts_not_both(store, tmp_path):
    """Merged by `tokens report`, a whole sweep and the parts of another would pass for one sweep."""
    ok("probe", store, "--heads", "linear", *FAST, "--out", tmp_path / "whole")
    refused = invoke("probe", store, "--heads", "ep", *FAST, "--part", "1/2", "--out", tmp_path / "whole")
    assert refused.exit_code == 2 and "holds a whole sweep: its parts go to another --out" in said(refused), said(refused)
    ok("probe", store, "--heads", "linear", "--seeds", "0,1", *FAST, "--part", "1/2", "--out", tmp_path / "parts")
    refused = invoke("probe", store, "--heads", "ep", *FAST, "--out", tmp_path / "parts")
    assert refused.exit_code == 2 and "holds parts of a sweep (part-1-of-2)" in said(refused), said(refused)


def test_a_finished_run_without_its_checkpoint_is_left_as_it_is(store, run, tmp_path):
    """The checkpoint may be deleted once a run is finished: running the command again (a job array
    resubmitted for one failed part) trains nothing and rewrites nothing."""
    out = tmp_path / "finished"
    shutil.copytree(run, out)
    (out / "checkpoint.pt").unlink()
    def written():  # but the lock's record of who holds it, which every run rewrites
        return {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.name != recipe.LOCK}

    before = written()
    for listed in ("linear,ep,protobin", "protobin,linear,ep"):  # the same sweep listed in another order too
        again = ok("probe", store, "--heads", listed, *SWEEP[2:], *FAST, "--data", "stream", "--out", out)
        assert "holds this sweep's results already" in said(again) and "nothing to do" in said(again), said(again)
    assert written() == before
    other = invoke("probe", store, *SWEEP, *FAST[:-4], "--batch-size", "8", "--device", "cpu", "--out", out)
    assert other.exit_code == 2 and "holds the results of another sweep" in said(other), said(other)


def test_a_run_that_stopped_before_any_result_may_be_started_again_otherwise(store, tmp_path):
    """Only config.json there (the run died before its first epoch): a changed command may start afresh."""
    out = tmp_path / "run"
    ok("probe", store, "--heads", "linear", *FAST, "--out", out)
    for name in ("checkpoint.pt", "leaderboard.csv"):
        (out / name).unlink()
    shutil.rmtree(out / "best")
    shutil.rmtree(out / "heads")
    ok("probe", store, "--heads", "linear", *FAST, "--batch-size", "8", "--out", out)


def test_a_run_folder_that_another_probe_is_training_is_refused(store, tmp_path):
    """Two sweeps into one --out at once both trained and wrote there: the leaderboard and checkpoint
    of one beside best heads of the other. The second is refused, naming the first; the lock goes
    with its holder, and a folder the refused run made is not left behind."""
    out = tmp_path / "busy"
    with recipe.run_folder_lock(out):  # another run, as far as the lock can tell (its own open file)
        result = invoke("probe", store, "--heads", "linear", "--seeds", "0", *FAST, "--out", out)
        assert result.exit_code == 2 and f"{out} is being trained by another `tokens probe` (pid {os.getpid()} on" in said(result)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    ok("probe", store, "--heads", "linear", "--seeds", "0", *FAST, "--out", out)  # its holder gone, the folder is free
    assert (out / "leaderboard.csv").exists()
    tiny = make_store(tmp_path / "tiny.zarr", splits={"train": 2, "test": 8}, failed=())  # refused once the lock is taken
    result = invoke("probe", tiny, "--heads", "linear", *FAST, "--out", tmp_path / "refused")
    assert result.exit_code == 2 and "too few to hold out" in said(result) and not (tmp_path / "refused").exists()


FILE_SIZE_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.argv = ["tokens", *sys.argv[2:]]
from tokens.__main__ import main
main()
"""


def test_a_sweep_that_cannot_write_its_checkpoint_says_so_and_resumes_once_it_can(store, run, tmp_path):
    """A full disk (here a file-size limit: writes past it fail as on a full disk) while a sweep saves
    its checkpoint was a 40-line traceback ending in torch's 'unexpected pos'. Now named, with what to
    do; nothing half-written is left, and the same command then finishes as an uninterrupted run."""
    out = tmp_path / "full"
    limit = 64 * 1024  # more than config.json, less than the checkpoint
    assert (run / "config.json").stat().st_size < limit < (run / "checkpoint.pt").stat().st_size
    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMITED, str(limit), "probe", str(store), *SWEEP, *FAST, "--data", "stream",
                           "--quiet", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"error: cannot write {out / 'checkpoint.pt'} (" in done.stderr and "free space and run the same command again" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json"]  # no half-written checkpoint, nor its temporary file
    ok("probe", store, *SWEEP, *FAST, "--data", "stream", "--out", out)
    assert leaderboard(out) == leaderboard(run)


def test_two_copies_of_a_part_save_their_checkpoints_side_by_side(tmp_path):
    """A part resubmitted while its old task still runs: both save after every epoch, into one folder.
    Neither may fail on the other's temporary file, and what is left is a whole checkpoint."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "checkpoint.pt"
    weights = torch.nn.Linear(256, 256)
    probe = recipe.Probe(config=None, head=weights, build={}, optimizer=torch.optim.AdamW(weights.parameters()),
                         rng=torch.get_rng_state(), val_metrics={})

    def save(copy):
        for epoch in range(30):
            recipe.save_checkpoint(path, {"copy": copy}, epoch, [probe])

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(save, range(2)))
    assert torch.load(path, weights_only=True)["epoch"] == 29
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_run_killed_while_it_saves_a_best_head_leaves_the_old_one_whole(store, run, tmp_path, monkeypatch):
    """A finished run scored again (its checkpoint kept) rewrites best/HEAD.pt: aside, then renamed."""
    out = tmp_path / "again"
    shutil.copytree(run, out)
    before = {p.name: p.read_bytes() for p in (out / "best").iterdir()}
    save = torch.save

    def killed_half_way(obj, path, *args, **kwargs):
        if "best" in str(path):
            Path(path).write_bytes(b"half a head")
            raise KeyboardInterrupt
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", killed_half_way)
    assert invoke("probe", store, *SWEEP, *FAST, "--data", "stream", "--out", out).exit_code == 130
    assert {p.name: p.read_bytes() for p in (out / "best").iterdir()} == before  # no half-written head, no temporary file


def test_layers_all_sweeps_every_cached_layer_and_a_bad_layer_is_named_once(store, tmp_path):
    """`--layers all` reads as extract's: each cached layer, one configuration each."""
    ok("probe", store, "--heads", "linear", "--layers", "all", "--seeds", "0", *FAST, "--out", tmp_path / "all")
    assert sorted(row["layer"] for row in leaderboard(tmp_path / "all").values()) == ["3", "6"]
    result = invoke("probe", store, "--layers", "all,-1", *FAST, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "Invalid value for --layers: 'all,-1': 'all' goes alone" in said(result), said(result)
    result = invoke("probe", store, "--layers", "x", *FAST, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "Invalid value for --layers: 'x' is not an integer" in said(result), said(result)
    result = invoke("probe", store, "--layers", "3, all", *FAST, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "'all' goes alone" in said(result), said(result)
    (tmp_path / "lr.toml").write_text('lr = "all"\nseeds = [0]\n[heads.linear]\n')  # only layers take "all"
    result = invoke("probe", store, "--sweep", tmp_path / "lr.toml", *FAST, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "lr: 'all' is not a number" in said(result), said(result)
    (tmp_path / "sweep.toml").write_text('layers = "all"\nseeds = [0]\n[heads.linear]\n')  # in a sweep file too
    ok("probe", store, "--sweep", tmp_path / "sweep.toml", *FAST, "--out", tmp_path / "file")
    assert sorted(row["layer"] for row in leaderboard(tmp_path / "file").values()) == ["3", "6"]


def test_parts_that_differ_are_told_what_differs():
    """Not "another sweep" alone: the values there and here, and a changed store said to be one (the
    same arguments, after `extract --retry-failed`, are not the fix)."""
    part = {"store_key": "k1", "sweep": {"heads": {"ep": {}}, "lrs": [0.001], "configs": ["a", "b"]},
            "training": {"epochs": 4, "store_key": "k1"}}
    other_lr = part | {"sweep": {"heads": {"ep": {}}, "lrs": [0.003], "configs": ["c", "d"]}}
    assert report_module.part_differences(part, other_lr) == ("lrs [0.001] there, [0.003] here", False)
    reordered = part | {"sweep": part["sweep"] | {"configs": ["b", "a"]}}
    assert report_module.part_differences(part, reordered)[0].startswith("the same configurations in another order")
    fewer = part | {"sweep": part["sweep"] | {"configs": ["a"]}}
    assert report_module.part_differences(part, fewer, "in 1", "in 2")[0] == "2 configurations in 1, 1 in 2 (one not in both: b)"
    new_store = part | {"store_key": "k2", "training": {"epochs": 4, "store_key": "k2"}}
    words, store = report_module.part_differences(part, new_store)
    assert store and words == "the store (another one, or the same path changed since, e.g. by --retry-failed)"


def test_a_job_array_into_a_run_of_another_sweep_or_training_is_refused_at_submission(store, run, tmp_path, monkeypatch):
    """Every task would refuse the run directory when it starts, hours later in the queue."""
    from tokens.cli import app as cli

    monkeypatch.chdir(tmp_path)
    def slurm(*args):
        return CliRunner().invoke(cli, ["slurm", "probe", str(store), *map(str, args), "--gpus", "0", "--script", "job.sbatch"])

    same = [*SWEEP, *FAST, "--data", "stream"]
    other_epochs = [*SWEEP, *FAST, "--epochs", "5"]
    result = slurm(*other_epochs, "--out", run, "--array", "1")
    assert result.exit_code == 2 and f"{run} holds another sweep (epochs 4 there, 5 here): every task would refuse it" in said(result), said(result)
    assert not (tmp_path / "job.sbatch").exists()
    result = slurm(*same, "--out", run, "--array", "1")  # the same sweep: its tasks resume it
    assert result.exit_code == 0 and (tmp_path / "job.sbatch").exists(), result.output
    result = slurm(*same, "--wd", "1e-4", "--out", run, "--array", "1")  # the default weight decay, written out
    assert result.exit_code == 0, result.output
    parts = tmp_path / "parts"
    ok("probe", store, "--heads", "linear", "--seeds", "0,1", *FAST, "--out", parts, "--part", "1/2")
    result = slurm("--heads", "linear,mean", "--seeds", "0,1", *FAST, "--out", parts, "--array", "2")
    assert result.exit_code == 2 and f"{parts / 'part-1-of-2'} holds another sweep (heads {{'linear': {{}}}} there, {{'linear': {{}}, 'mean': {{}}}} here)" in said(result), said(result)


def test_a_part_past_the_sweeps_end_notes_it_and_the_report_is_complete(store, tmp_path):
    """A job array larger than the sweep, written before its store existed: the idle tasks succeed,
    and the report does not wait for parts that have nothing to train."""
    out = tmp_path / "run"
    for part in ("1/3", "2/3"):
        ok("probe", store, "--heads", "linear", "--seeds", "0,1", *FAST, "--out", out, "--part", part)
    result = ok("probe", store, "--heads", "linear", "--seeds", "0,1", *FAST, "--out", out, "--part", "3/3")
    assert "note: part 3/3 has no configuration to train: the sweep has 2" in said(result)
    result = ok("report", out, "--out", tmp_path / "report")
    assert "not finished" not in said(result) and len(read_csv(tmp_path / "report" / "leaderboard.csv")) == 2


def test_a_job_array_on_an_unfinished_store_says_what_its_tasks_need(tmp_path, monkeypatch):
    from tokens.cli import app as cli

    monkeypatch.chdir(tmp_path)
    partial = make_store(tmp_path / "b.zarr", splits={"train": 96, "test": 40}, written=[0, 1])
    result = CliRunner().invoke(cli, ["slurm", "probe", str(partial), "--heads", "linear", "--out", "r", "--array", "1",
                                      "--gpus", "0", "--script", "job.sbatch"])
    assert result.exit_code == 0 and (f"note: {partial} is unfinished; the tasks refuse it unless its extraction is done "
                                      "when they start (--after JOBID waits for that job)") in said(result), said(result)
    # A run trained on it unfinished resumes only with --allow-incomplete on the same shards.
    ok("probe", partial, "--heads", "linear", *FAST, "--out", tmp_path / "inc", "--allow-incomplete")

    def slurm(*args):
        return CliRunner().invoke(cli, ["slurm", "probe", str(partial), "--heads", "linear", *FAST, "--out", str(tmp_path / "inc"),
                                        "--array", "1", "--gpus", "0", "--script", "job.sbatch", *args])

    assert slurm("--allow-incomplete").exit_code == 0
    result = slurm()
    assert result.exit_code == 2 and "was trained on the store unfinished, which needs --allow-incomplete: every task would refuse it" in said(result), said(result)
    make_store(partial, splits={"train": 96, "test": 40})  # the extraction finished since
    result = slurm("--allow-incomplete")
    assert result.exit_code == 2 and "was trained on train 2 of 3 shards, which the store no longer is: every task would refuse it" in said(result), said(result)


def test_a_sweep_behind_the_recorded_final_norm_trains_as_on_tokens_extracted_normed(tmp_path):
    """`probe --final-norm` on raw tokens gives the heads, leaderboard and predictions of the same sweep
    on a store whose tokens went through that norm when written; predict applies the head's norm."""
    rng = np.random.default_rng(1)
    params = {"kind": "layer_norm", "eps": 1e-6, "weight": rng.uniform(0.5, 2, D).astype(np.float32).tolist(),
              "bias": rng.normal(size=D).astype(np.float32).tolist()}
    raw = make_store(tmp_path / "raw.zarr", dtype="float32", final_norm_params=params)
    normed = make_store(tmp_path / "normed.zarr", dtype="float32", final_norm=True, normed_by=params)
    sweep = ["--heads", "linear,ep", "--option", "ep.num_queries=4", *FAST]
    ok("probe", raw, *sweep, "--final-norm", "--out", tmp_path / "behind")
    ok("probe", normed, *sweep, "--out", tmp_path / "stored")
    behind, stored = leaderboard(tmp_path / "behind"), leaderboard(tmp_path / "stored")
    metrics = [k for k in next(iter(stored.values())) if k.startswith(("val_", "test_"))]
    assert {c: [r[k] for k in metrics] for c, r in behind.items()} == {c: [r[k] for k in metrics] for c, r in stored.items()}
    assert all(r["training"].endswith("/final_norm") for r in behind.values())
    assert json.loads((tmp_path / "behind" / "config.json").read_text())["training"]["final_norm"] is True
    ok("predict", raw, "--head", tmp_path / "behind" / "best" / "ep.pt", "--device", "cpu", "--out", tmp_path / "behind.csv")
    ok("predict", normed, "--head", tmp_path / "stored" / "best" / "ep.pt", "--device", "cpu", "--out", tmp_path / "stored.csv")
    assert read_csv(tmp_path / "behind.csv") == read_csv(tmp_path / "stored.csv")
    # without --final-norm the same raw store trains other heads: the norm was applied, not only recorded
    ok("probe", raw, *sweep, "--out", tmp_path / "plain")
    assert [r["test_map"] for r in leaderboard(tmp_path / "plain").values()] != [r["test_map"] for r in behind.values()]


def test_final_norm_is_refused_where_there_is_none_to_apply(store, tmp_path):
    """Named before any training: a store normed already, one with no norm recorded (an encoder without
    one, or an older store), and a checkpoint of the sweep without the norm is not resumed with it."""
    normed = make_store(tmp_path / "normed.zarr", final_norm=True)
    for path, why in ((normed, "normed already (extracted with --final-norm)"), (store, "records no final norm to apply")):
        result = invoke("probe", path, "--heads", "linear", *FAST, "--final-norm", "--out", tmp_path / "run")
        assert result.exit_code == 2 and "--final-norm" in said(result) and why in said(result), said(result)
        assert not (tmp_path / "run").exists()


def test_a_sweep_stopped_without_the_final_norm_is_not_resumed_behind_it(tmp_path, monkeypatch):
    raw = make_store(tmp_path / "raw.zarr", final_norm_params={"kind": "layer_norm", "eps": 1e-5, "weight": None, "bias": None})
    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(recipe, "run", functools.partial(recipe.run, stop_after=1))
        ok("probe", raw, "--heads", "linear", *FAST, "--out", out)
    result = invoke("probe", raw, "--heads", "linear", *FAST, "--final-norm", "--out", out)
    assert result.exit_code == 2 and "final_norm False there, True here" in said(result), said(result)


@pytest.mark.parametrize("change, why", [
    ({"weight": [1.0] * 5}, "its weight is not 96 finite numbers"),
    ({"eps": None}, "eps is None, not a small positive number"),
    ({"kind": "rms_norm"}, "a final norm of kind 'rms_norm', which this version of tokens cannot apply"),
])
def test_a_damaged_final_norm_record_is_named_before_any_training(tmp_path, change, why):
    params = {"kind": "layer_norm", "eps": 1e-6, "weight": [1.0] * D, "bias": None} | change
    raw = make_store(tmp_path / "raw.zarr", final_norm_params=params)
    result = invoke("probe", raw, "--heads", "linear", *FAST, "--final-norm", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "--final-norm" in said(result) and f"final_norm_params: {why}" in said(result), said(result)
    assert not (tmp_path / "run").exists()


def test_predict_says_which_side_of_the_final_norm_a_head_and_a_store_are(tmp_path):
    params = {"kind": "layer_norm", "eps": 1e-6, "weight": None, "bias": None}
    raw = make_store(tmp_path / "raw.zarr", splits={"train": 40, "valid": 16, "test": 16}, final_norm_params=params)
    normed = make_store(tmp_path / "normed.zarr", splits={"train": 40, "valid": 16, "test": 16}, final_norm=True)
    ok("probe", raw, "--heads", "linear", *FAST, "--final-norm", "--out", tmp_path / "behind")
    ok("probe", normed, "--heads", "linear", *FAST, "--out", tmp_path / "on-normed")
    for head, store, why in (
        ("behind", normed, "applies the encoder's final norm itself (trained with tokens probe --final-norm): give it a store of raw tokens"),
        ("on-normed", raw, "was trained on tokens normed at extraction (--final-norm), and"),
    ):
        result = invoke("predict", store, "--head", tmp_path / head / "best" / "linear.pt", "--device", "cpu", "--out", tmp_path / "s.csv")
        assert result.exit_code == 2 and why in said(result), said(result)
    assert report_module._named({"config": "linear/x", "training": "adamw/cosine/data_seed=0/final_norm"}).endswith(" with --final-norm")
    unfinished = "adamw/cosine/data_seed=0/final_norm/unfinished=test:2of7"  # as probe.run writes it on an unfinished store
    assert report_module._named({"config": "linear/x", "training": unfinished}).endswith(" with --final-norm")
