"""`tokens demo`: the whole pipeline, offline, on a small dataset of sound events localized in time.

Each 1 s clip holds sustained background tones at random pitches plus noise; a class is a short
(0.1 s) tone burst at that class's pitch, present or not. The evidence for a label sits in a few
frames of the token map, which is where global pooling (class token, mean) loses it and heads
that read the whole map (EP's queries, protobin's max over tokens) keep it. The audio is written
as real files with a manifest, so the demo goes through exactly the path a user's data takes.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf
import typer

from tokens.cluster import part_origin, resolve_part

SAMPLE_RATE = 16000
CLIP_SECONDS = 1.0  # one window of the crepe-tiny backbone
EVENT_SECONDS = 0.1
CLASSES = {"beep_262": 261.6, "beep_392": 392.0, "beep_587": 587.3, "beep_880": 880.0, "beep_1319": 1318.5}
SPLIT_SIZES = {"train": 300, "valid": 100, "test": 100}
EVENT_PROBABILITY = 0.35
DEFAULT_EPOCHS = 30


def _tone(freq: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))


def synth_clip(rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Background of sustained random-pitch tones and noise, plus short class bursts at random times."""
    n = round(CLIP_SECONDS * SAMPLE_RATE)
    clip = 0.02 * rng.standard_normal(n)
    for _ in range(rng.integers(1, 4)):  # sustained tones anywhere in the classes' pitch range
        clip += rng.uniform(0.05, 0.25) * _tone(float(np.exp(rng.uniform(np.log(200), np.log(1500)))), CLIP_SECONDS, rng)
    labels = []
    for name, freq in CLASSES.items():
        if rng.random() < EVENT_PROBABILITY:
            burst = _tone(freq, EVENT_SECONDS, rng) * np.hanning(round(EVENT_SECONDS * SAMPLE_RATE)) * rng.uniform(0.5, 0.8)
            start = rng.integers(0, n - len(burst))
            clip[start:start + len(burst)] += burst
            labels.append(name)
    return (clip / max(1.0, np.abs(clip).max())).astype(np.float32), labels


def make_dataset(directory: Path, seed: int = 0) -> Path:
    """Write the clips as .wav files and a manifest.csv; returns the manifest's path."""
    rng = np.random.default_rng(seed)
    audio_dir = directory / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    manifest = directory / "manifest.csv"
    partial = directory / "manifest.csv.partial"  # renamed when complete: an interrupted run leaves no short manifest
    with partial.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "split"])
        for split, count in SPLIT_SIZES.items():
            for i in range(count):
                clip, labels = synth_clip(rng)
                name = f"audio/{split}-{i:04d}.wav"
                sf.write(directory / name, clip, SAMPLE_RATE)
                writer.writerow([name, ";".join(labels), split])
    partial.replace(manifest)
    return manifest


def demo(
    directory: Path = typer.Argument(Path("tokens-demo"), metavar="DIRECTORY", help="Where the dataset, the store and the probe run go."),
    epochs: int = typer.Option(DEFAULT_EPOCHS, "--epochs", min=1, help="Probe training epochs."),
):
    """Run the whole pipeline offline: synthesize localized sound events, extract them with the
    real crepe-tiny weights, train linear, mean, mhca, ep and protobin probes, print the leaderboard.

    One to two minutes on 2 CPU cores. Rerunning reuses the dataset and the finished store; a run with
    other --epochs goes to its own folder (run-N-epochs) rather than resuming the first.
    """
    from tokens.cli import app

    # One process does the whole demo: as a part of a job array or of a launcher's ranks, it would
    # extract a fraction of the store, which its probe step then refuses (and the ranks share a folder).
    try:
        index, count = resolve_part(None)
        if count != 1:
            raise ValueError(f"{part_origin(None)} here make this one part {index} of {count}")
    except ValueError as error:
        typer.echo(f"error: the demo runs in one process ({error}): run it outside the job array or launcher, or unset them", err=True)
        raise typer.Exit(2) from None
    if directory.exists() and not directory.is_dir():
        raise typer.BadParameter(f"{directory} is a file; give a folder for the dataset, the store and the run", param_hint="DIRECTORY")
    manifest = directory / "data" / "manifest.csv"
    if not manifest.exists():
        typer.echo(f"writing {sum(SPLIT_SIZES.values())} clips of {CLIP_SECONDS:g} s to {manifest.parent}")
        make_dataset(manifest.parent)
    store = directory / "crepe-tiny.zarr"
    run = directory / ("run" if epochs == DEFAULT_EPOCHS else f"run-{epochs}-epochs")
    steps = [
        ["extract", str(manifest), "--store", str(store), "--backbone", "crepe-tiny", "--layers", "all", "--final-norm", "--batch-size", "50"],
        ["info", str(store)],
        ["probe", str(store), "--out", str(run), "--heads", "linear,mean,mhca,ep,protobin", "--layers", "-1",
         "--option", "mhca.num_heads=4", "--lr", "3e-3", "--option", "ep.lr=1e-2", "--option", "protobin.lr=2e-2",
         "--batch-size", "16", "--epochs", str(epochs)],
    ]
    for step in steps:
        typer.echo(f"\n$ tokens {' '.join(step)}")
        code = app(step, standalone_mode=False)  # a step's error or Ctrl-C: its message is out, its code ends the demo
        if code == 130:  # the step said to run "the same command" again: the demo's, which goes on from that step
            again = " ".join(["tokens demo", str(directory), *(["--epochs", str(epochs)] if epochs != DEFAULT_EPOCHS else [])])
            typer.echo(f"the demo stopped in `tokens {step[0]}`: run `{again}` again to go on from there", err=True)
        if code:
            raise typer.Exit(code)
    typer.echo(
        f"\nThe events last {EVENT_SECONDS:g} s of each {CLIP_SECONDS:g} s clip: heads that read the token map "
        "(protobin, ep, mhca) find them, pooling the map first (linear, mean) loses them.\n"
        f"Plots: {run / 'params_vs_metric.png'} and {run / 'val_curves.png'}"
    )
