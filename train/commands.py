"""`tokens probe`, `tokens report` and `tokens predict`: check the request, then hand it to the recipe.

Every check that can fail before training does so here, naming the option at fault, so that a
job never dies an hour in because of a typo.
"""

from __future__ import annotations

import csv
import errno
import inspect
import json
import math
import os
import re
import tempfile
from pathlib import Path

from enum import Enum

import numpy as np
import torch
import typer

from tokens.cache.store import StoreError, TokenStore, differences, listed, open_store, short
from tokens.cluster import part_origin, pick_device, resolve_part
from tokens.extract.checkpoints import CheckpointError, load_tensors
from tokens.train import probe as recipe
from tokens.train import sweep as sweeps
from tokens.train.data import MODES, FinalNorm, Source, usable_items
from tokens.train.heads import HEADS, build_head
from tokens.train.losses import LOSSES
from tokens.train.optim import OPTIMIZERS, SCHEDULES, default_lr, lr_required
from tokens.train.report import OutputError, write_report, written_aside
from tokens.train.sweep import SweepError

# Choices as typer checks them when the arguments are parsed (by `tokens slurm` too, before submitting).
Optimizer = Enum("Optimizer", {name: name for name in OPTIMIZERS}, type=str)
Schedule = Enum("Schedule", {name: name for name in SCHEDULES}, type=str)


def _bad(error: SweepError | StoreError, hint: str | None = None) -> typer.BadParameter:
    return typer.BadParameter(str(error), param_hint=hint or getattr(error, "option", "STORE"))


def device_option(name: str) -> torch.device:
    try:
        return pick_device(name)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--device") from None


def open_checked(path: Path, splits: list[str], allow_incomplete: bool, optional: tuple = ()) -> TokenStore:
    """The store, refused if a needed split is missing or (unless allowed) not fully written.

    `optional` splits are checked for completeness only when the store has them.
    """
    try:
        store = open_store(path)
    except StoreError as error:
        raise _bad(error, "STORE") from error
    try:
        for name in list(splits) + [n for n in optional if n in store.splits]:
            split = store.split(name)
            if not split.is_complete and not allow_incomplete:
                missing = len(split.missing_shards())
                raise StoreError(
                    f"{path}: split {name!r} is incomplete ({missing} of {split.num_shards} shards "
                    "missing); finish `tokens extract`, or pass --allow-incomplete to use the written shards"
                )
    except StoreError as error:
        store.close()
        raise _bad(error, "STORE") from error
    return store


def check_options(head: str, options: dict, where: str):
    """Refuse an option the head's constructor does not take, listing those it does."""
    accepted = set(inspect.signature(HEADS[head].__init__).parameters) - {"self", "dim", "num_classes"}
    unknown = set(options) - accepted - {"lr", "wd"}
    if unknown:
        raise SweepError(
            f"head {head!r} has no option {', '.join(sorted(unknown))}; it takes: {', '.join(sorted(accepted)) or 'none'} (and lr, wd)",
            where,
        )


MAX_SEED = 2**32 - 1  # numpy's seeds are not negative, torch's fit 64 bits: a common range, as numpy's legacy seeds


def check_rates(key: str, values: list, name: str, where: str):
    """Refuse an lr that is not positive or a wd below zero now, not when AdamW is built; nan and inf
    too, which pass those tests and would train every head to NaN."""
    sweeps.check_kind(values, sweeps.KINDS[key], name, where)
    for v in values:
        if not math.isfinite(v) or (v <= 0 if key == "lr" else v < 0):
            raise SweepError(f"{name} must be {'positive' if key == 'lr' else 'zero or more'} and finite, got {v!r}", where)


def resolve_layer(value, store: TokenStore) -> int:
    """The store's rule (TokenStore.resolve_layer), refused as a --layers mistake."""
    try:
        return store.resolve_layer(value)
    except StoreError as error:
        raise SweepError(str(error), "--layers") from None


def read_sweep(heads, option, lr, wd, layers, seeds, sweep_file, require_lr: bool = False) -> tuple[dict, str]:
    """The sweep asked for on the command line or in a --sweep file, checked against the registry
    (head names, their options, learning rates and decays) but not yet against a store; and the
    option to blame for a mistake in its heads. `require_lr`: heads without a learning rate are
    refused (an optimizer without a default rate)."""
    if sweep_file is not None:
        if heads is not None or option:
            given = "--heads" if heads is not None else "--option"
            raise SweepError(f"{given} with --sweep: give heads and their options in the --sweep file or on the command "
                             "line, not both", given)
        spec = sweeps.read_sweep_file(sweep_file)
        where = "--sweep"
    else:
        spec = {"heads": {h: {} for h in sweeps.parse_list(heads, "--heads") or sweeps.DEFAULT_HEADS}}
        for head, opts in sweeps.parse_options(option).items():
            if head not in spec["heads"]:
                raise SweepError(f"--option names head {head!r}, which is not in --heads", "--option")
            spec["heads"][head].update(opts)
        where = "--option"
    for key, text in (("lr", lr), ("wd", wd), ("layers", layers), ("seeds", seeds)):
        if key == "layers" and text is not None and "all" in [value.strip() for value in text.split(",")]:  # as extract's
            if text.strip() != "all":
                raise SweepError(f"{text!r}: 'all' goes alone (every cached layer), or give layer numbers", "--layers")
            spec["layers"] = [sweeps.ALL_LAYERS]
            continue
        values = sweeps.parse_list(text, f"--{key}", sweeps.KINDS[key])
        if values is not None:
            spec[key] = values
            if key in ("lr", "wd"):
                check_rates(key, values, f"--{key}", f"--{key}")
        elif key in ("lr", "wd") and key in spec:
            check_rates(key, spec[key], f"{sweep_file}: {key}", where)
    if bad := [seed for seed in spec.get("seeds", []) if not 0 <= seed <= MAX_SEED]:  # torch's and numpy's seeds
        raise SweepError(f"{'--seeds' if seeds is not None else f'{sweep_file}: seeds'}: {bad[0]} is not a seed from 0 to "
                         f"{MAX_SEED}", "--seeds" if seeds is not None else where)
    in_file = f"{sweep_file}: " if sweep_file is not None else ""  # the file at fault, as for its other keys
    for head, opts in spec["heads"].items():
        if head not in HEADS:
            raise SweepError(f"{in_file}unknown head {head!r}; choose from {', '.join(HEADS)}", "--heads" if where == "--option" else where)
        try:
            check_options(head, opts, where)
            for key in ("lr", "wd"):
                check_rates(key, opts.get(key, []), f"{head}.{key}", where)
        except SweepError as error:
            raise SweepError(f"{in_file}{error}", where) from None
    without_lr = [head for head, opts in spec["heads"].items() if not opts.get("lr")] if not spec.get("lr") else []
    if require_lr and without_lr:
        raise SweepError(f"this optimizer has no default learning rate: give --lr (or {without_lr[0]}.lr for head "
                         f"{without_lr[0]!r})", "--lr")
    return spec, where


def build_sweep(store, heads, option, lr, wd, layers, seeds, sweep_file, default_lr: float | None = None,
                require_lr: bool = False) -> tuple[list, dict]:
    """The configurations asked for, checked against the registry and the store, and the sweep as a
    record. Heads without a learning rate get `default_lr`, or their own default when it is None;
    `require_lr`: they are refused instead (see read_sweep)."""
    spec, where = read_sweep(heads, option, lr, wd, layers, seeds, sweep_file, require_lr)
    try:
        layers_asked = spec.get("layers", sweeps.DEFAULT_LAYERS)
        layers_asked = store.layers if layers_asked == [sweeps.ALL_LAYERS] else layers_asked
        resolved = list(dict.fromkeys(resolve_layer(v, store) for v in layers_asked))
    except SweepError as error:
        if layers is None and sweep_file is not None and "layers" in spec:  # the file's layers, not --layers
            raise SweepError(f"{sweep_file}: layers: {error}", "--sweep") from None
        raise
    configs = sweeps.expand(
        spec["heads"], spec.get("lr"), spec.get("wd", sweeps.DEFAULT_WD), resolved,
        spec.get("seeds", sweeps.DEFAULT_SEEDS), {h for h in HEADS if HEADS[h].multi_layer}, default_lr,
    )
    built = set()
    for config in configs:  # build each head shape once now, so a bad value fails before training
        args = recipe.build_args(config, store.meta["dim"], len(store.classes), len(store.layers))
        if HEADS[config.head].multi_layer and args["num_layers"] != len(store.layers):
            raise SweepError(f"{config.group}: {config.head} reads all {len(store.layers)} cached layers {store.layers}, "
                             f"so num_layers must be {len(store.layers)} (or left out), got {args['num_layers']!r}", where)
        if (key := json.dumps(args, sort_keys=True)) not in built:
            built.add(key)
            try:
                build_head(**args)
            except (TypeError, ValueError) as error:
                if where == "--option" and not any(k not in ("lr", "wd") for k in spec["heads"][config.head]):
                    raise SweepError(f"{config.group}: with its default options, {error}; set them with --option "
                                     f"{config.head}.NAME=VALUE", "--heads") from error
                in_file = f"{sweep_file}: " if where == "--sweep" else ""
                raise SweepError(f"{in_file}{config.group}: {error}", where) from error
    return configs, spec | {"layers_resolved": resolved}


def _check_data(data: str):
    if data not in MODES:
        raise SweepError(f"{data!r}: use {', '.join(MODES)}", "--data")


def check_probe_args(*, heads, option, lr, wd, layers, seeds, sweep, optimizer: str, data: str):
    """The checks of plan_probe that need no store: `tokens slurm probe` runs them while the store
    is still being extracted."""
    _check_data(data)
    read_sweep(heads, option, lr, wd, layers, seeds, sweep, lr_required(optimizer))


def check_whole_or_parts(out: Path, count: int):
    """A run directory holds one whole sweep or the parts of one: `tokens report` would merge a whole
    sweep with parts of another as if they were one."""
    if count > 1 and (out / "config.json").exists():
        raise SweepError(f"{out} holds a whole sweep: its parts go to another --out", "--out")
    parts = sorted(p.name for p in out.glob("part-*-of-*"))
    if count == 1 and parts:
        raise SweepError(f"{out} holds parts of a sweep ({', '.join(parts)}): a whole sweep goes to another --out", "--out")
    if other := [name for name in parts if not name.endswith(f"-of-{count}")]:
        raise SweepError(f"{out} holds parts of a sweep split another way ({', '.join(other)}): "
                         f"a sweep in {count} parts goes to another --out", "--out")


def plan_probe(store, *, heads, option, lr, wd, layers, seeds, sweep, optimizer: str, batch_size: int, loss: str | None,
               data: str, final_norm: bool = False) -> tuple[list, dict]:
    """The configurations `tokens probe` would train on this open store, after every check it makes
    before training; `tokens slurm probe` runs it before it writes a script."""
    _check_data(data)
    if final_norm:
        recipe.recorded_norm(store, torch.device("cpu"))
    if loss is not None and loss not in LOSSES[store.task]:
        raise SweepError(f"{loss!r} does not fit this {store.task} store; use {', '.join(LOSSES[store.task])}", "--loss")
    return build_sweep(store, heads, option, lr, wd, layers, seeds, sweep, default_lr(optimizer, batch_size),
                       lr_required(optimizer))


def run_directory(out: Path) -> Path:
    """Refuse an --out that reads as a head option: `-o ep.num_queries=16`, typed as `tokens extract -o`
    takes backbone options, trained the default sweep into a folder of that name."""
    if re.fullmatch(r"[A-Za-z_]\w*\.\w+=.*", out.name):
        raise typer.BadParameter(f"{str(out)!r} reads as a head option, not a run directory: "
                                 "give head options as --option HEAD.NAME=VALUE (-o here is --out)")
    return out


def probe(
    store: Path = typer.Argument(..., metavar="STORE", help="A token store made by `tokens extract` (.zarr directory or .h5 file)."),
    out: Path = typer.Option(..., "--out", "-o", callback=run_directory, help="Run directory: leaderboard, per-head results, best heads, plots, checkpoint."),
    heads: str = typer.Option(None, "--heads", help=f"Comma-separated heads ({', '.join(HEADS)}). Default: {','.join(sweeps.DEFAULT_HEADS)}."),
    option: list[str] = typer.Option(None, "--option", metavar="HEAD.NAME=V1,V2", help="Sweep a head option: HEAD.NAME=V1,V2 (repeatable), e.g. ep.num_queries=16,32 or protobin.lr=2e-2,4e-2."),
    lr: str = typer.Option(None, "--lr", help="Learning rates, e.g. 1e-3,3e-3. Default per head, for AdamW: 2e-2 for prototype heads, 1e-3 otherwise; with --optimizer lars, 0.1 x batch size / 256 (MAE's rule). --optimizer sgd has no default: give them."),
    wd: str = typer.Option(None, "--wd", help="Weight decays, e.g. 1e-4,5e-4. Default: 1e-4."),
    layers: str = typer.Option(None, "--layers", help="Cached layers, each swept on its own: the store's layer numbers, negative ones counting the layers it caches from its last (-1; on a store of layers 8 and 11, -2 is 8), or 'all'. Default: -1."),
    seeds: str = typer.Option(None, "--seeds", help="Head seeds (init and dropout), e.g. 0,1,2. Default: 0."),
    sweep: Path = typer.Option(None, "--sweep", help="A TOML sweep file instead of --heads/--option (format above). --lr, --wd, --layers and --seeds given with it replace its top-level lists; a head's own lr and wd in the file still win."),
    part: str = typer.Option(None, "--part", help="Train part I of N of the configurations (I/N); default from SLURM_ARRAY_TASK_ID/COUNT or torchrun RANK/WORLD_SIZE. Parts write to RUN/part-I-of-N/."),
    epochs: int = typer.Option(30, "--epochs", min=1, help="Training epochs; each head is tested with its best epoch on validation."),
    batch_size: int = typer.Option(128, "--batch-size", min=2, help="Items per training step, shared by every head of the sweep (BatchNorm needs 2)."),
    warmup_epochs: float = typer.Option(1.0, "--warmup-epochs", min=0.0, help="Epochs of linear warm-up of the learning rate, before the --schedule."),
    optimizer: Optimizer = typer.Option("adamw", "--optimizer",
                                        help="adamw (the protobin recipe), sgd (momentum 0.9), or lars (MAE's linear probing, with large rates)."),
    schedule: Schedule = typer.Option("cosine", "--schedule", help="After the warm-up: cosine decay to zero, or the full --lr to the end."),
    loss: str = typer.Option(None, "--loss", help="bce or asl (multi-label; default bce), ce (multi-class)."),
    data: str = typer.Option("auto", "--data", help="stream (from disk), ram, gpu, or auto (by size against free memory)."),
    device: str = typer.Option("auto", "--device", help="auto (GPU when present), cpu, cuda or cuda:N; under torchrun a bare cuda is the rank's GPU."),
    num_threads: int = typer.Option(None, "--num-threads", min=1, help="CPU threads for torch."),
    data_seed: int = typer.Option(0, "--data-seed", min=0, max=MAX_SEED, help="Seed of the batch order (and of the held-out validation items)."),
    final_norm: bool = typer.Option(False, "--final-norm", help="Apply the encoder's final norm, which a store of raw tokens records, to every token the heads read: the normed tokens without a second extraction."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Train on the written shards of an unfinished store."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars (for the log files of batch jobs)."),
):
    """Train many probe heads on a token store at once: every batch is read once and fed to all heads.

    Example: tokens probe S.zarr --heads linear,ep,protobin --lr 1e-3,3e-3 --seeds 0,1,2
    --option ep.num_queries=16,32 --out runs/s1

    Sweep file (--sweep sweep.toml): top-level lists lr, wd, layers, seeds, and one [heads.NAME]
    table per head whose keys are its options (a list is swept, a scalar fixed) and, optionally,
    its own lr and wd; e.g. `lr = [1e-3, 3e-3]`, `[heads.linear]`, `[heads.ep]`,
    `num_queries = [16, 32]`, `[heads.protobin]`, `lr = [2e-2]`.

    Results: RUN/leaderboard.csv, RUN/heads/*.json, RUN/best/HEAD.pt, RUN/*.png. An interrupted
    run resumes from RUN/checkpoint.pt when started again with the same arguments. Parts of a
    sweep (--part) are merged with `tokens report RUN`.
    """
    compute = device_option(device)
    check_out_folder(out, "leaderboard.csv, heads/, best/, plots", RUN_FILES)
    if data == "gpu" and compute.type != "cuda":
        raise typer.BadParameter("gpu mode needs a CUDA device; use ram or stream", param_hint="--data")
    if num_threads:
        torch.set_num_threads(num_threads)
    opened = open_checked(store, ["train", "test"], allow_incomplete, optional=("valid",))
    try:
        configs, spec = plan_probe(opened, heads=heads, option=option, lr=lr, wd=wd, layers=layers, seeds=seeds, sweep=sweep,
                                   optimizer=optimizer.value, batch_size=batch_size, loss=loss, data=data, final_norm=final_norm)
        try:
            index, count = resolve_part(part)
        except ValueError as error:
            raise SweepError(str(error), "--part") from error
        mine = sweeps.take_part(configs, index, count)
        if not mine:  # a task of an array larger than the sweep (its store was not there to count at submission)
            typer.echo(f"note: part {index}/{count} has no configuration to train: the sweep has {len(configs)}")
            return
        check_whole_or_parts(out, count)
        if count > 1:
            out = out / f"part-{index}-of-{count}"
            typer.echo(f"part {index}/{count} (from {part_origin(part)}): {len(mine)} of {len(configs)} configuration{'s' * (len(configs) != 1)}, results in {out}")
        typer.echo(f"{len(mine)} configuration{'s' * (len(mine) != 1)} on {compute}")
        with recipe.run_folder_lock(out):
            recipe.run(
                # The sweep's whole list of configurations, in order: parts take every count-th, so parts
                # of one sweep must agree on it (report.check_parts_agree), not only on its heads and values.
                opened, mine, out, sweep=spec | {"configs": [c.id for c in configs]}, part=(index, count), epochs=epochs,
                batch_size=batch_size, warmup_epochs=warmup_epochs, optimizer=optimizer.value, schedule=schedule.value, loss=loss,
                data=data, device=compute, data_seed=data_seed, final_norm=final_norm, progress=not quiet,
            )
    except (SweepError, StoreError) as error:
        raise _bad(error) from error
    except recipe.TrainingFailed as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    except (recipe.WriteFailed, OSError) as error:  # results or checkpoints that cannot be written
        what = str(error) if isinstance(error, recipe.WriteFailed) else f"{error.filename or out}: {error.strerror or error}"
        full = isinstance(error, recipe.WriteFailed) or error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        typer.echo(f"error: {what}" + (f"\nwhat was saved before is whole: free space and run the same command again to go on "
                                       f"from {out / 'checkpoint.pt'}" if full else ""), err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: run the same command again to resume from where {out / 'checkpoint.pt'} left off "
                   "(the step it stopped at; the start, if none was saved)", err=True)
        raise typer.Exit(130) from None
    finally:
        opened.close()


def report(
    runs: list[Path] = typer.Argument(..., metavar="RUN", help="Run directories (parts inside them are found), or leaderboard.csv files."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Where report.csv, report.md, report.png (and layers.png, for a sweep over layers) and the merged leaderboard.csv go."),
):
    """Merge runs and parts of runs; average configurations that differ only by seed (mean ± sd).

    Example: tokens report runs/s1 runs/s2 --out reports/s
    """
    check_out_folder(out, "report.csv, report.md, report.png", REPORT_FILES | RUN_FILES)  # a run: refused by name later
    try:
        text = write_report(runs, out)
    except OutputError as error:
        raise typer.BadParameter(str(error), param_hint="--out") from None
    except (FileNotFoundError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="RUN") from error
    typer.echo(text)
    plots = "report.png, layers.png" if (out / "layers.png").exists() else "report.png"
    typer.echo(f"\nreport in {out}/ (report.csv, report.md, {plots}, leaderboard.csv)")


SAVED_HEAD_KEYS = {"build", "layer", "task", "classes", "store_key", "state_dict"}


def load_saved_head(path: Path, saved) -> torch.nn.Module:
    """The head a file saved by `tokens probe` holds. Refuse any other file, pointing a run's
    checkpoint at RUN/best/, and a head whose weights do not make the head it names (edited, or
    damaged): that was a traceback from deep in torch."""
    if isinstance(saved, dict) and {"plan", "probes"} <= set(saved):
        raise typer.BadParameter(f"{path} is a run checkpoint, not a saved head; use {path.parent / 'best'}/HEAD.pt",
                                 param_hint="--head")
    if not isinstance(saved, dict) or not SAVED_HEAD_KEYS <= set(saved):
        raise typer.BadParameter(f"{path} is not a head saved by `tokens probe` (RUN/best/HEAD.pt)", param_hint="--head")
    try:
        module = build_head(**saved["build"])
        module.load_state_dict(saved["state_dict"])
    except (TypeError, KeyError, ValueError, RuntimeError, AttributeError) as error:
        why = " ".join(str(error).split())
        raise typer.BadParameter(f"{path} is damaged: its weights do not make the head it names ({why[:300]}); save it again "
                                 "from its run (the same `tokens probe` command, with the run's checkpoint.pt)", param_hint="--head") from None
    return module


# What `tokens probe` and `tokens report` write into their --out (a run's part folders too).
RUN_FILES = {"config.json", "checkpoint.pt", "leaderboard.csv", "heads", "best", "params_vs_metric.png", "val_curves.png", "layers.png"}
REPORT_FILES = {"leaderboard.csv", "report.csv", "report.md", "report.png", "layers.png"}


def check_out_folder(out: Path, holds: str, ours: set[str]):
    """--out must be a folder that can be made and written: a file in its place or on its path, or
    a place that takes no writes (read-only, /proc), is named before any work. Nothing is left there.
    A folder holding anything but what this command writes (`ours`: earlier results to resume or
    replace) is refused: results written into a dataset or a token store would be mixed with it,
    and a dataset's class folders would gain folders of results."""
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} is a file; this writes a folder ({holds}): give a folder path", param_hint="--out")
    made_here = out.is_dir() and (any((out / name).is_file() for name in ours if name.endswith((".json", ".csv", ".md", ".pt")))
                                  or any(out.glob("part-*-of-*")))  # what it holds beside (a report kept inside a run) is the user's
    if out.is_dir() and not made_here:
        others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in ours)
        if others:
            raise typer.BadParameter(f"{out} holds files this command does not write ({listed(others, 3)}): its results ({holds}) "
                                     "would be mixed with them; give a new or empty folder", param_hint="--out")
    check_can_make(out)


def check_can_make(folder: Path):
    """The folder exists or can be made, and takes new files: tried with an empty folder, removed."""
    there = folder if folder.exists() else next(p for p in folder.absolute().parents if p.exists())
    if not there.is_dir():
        raise typer.BadParameter(f"cannot make the folder {folder}: {there} is a file", param_hint="--out")
    try:
        tempfile.TemporaryDirectory(dir=there, prefix=".tokens-check-").cleanup()
    except OSError as error:
        raise typer.BadParameter(f"cannot make the folder {folder}: {there} takes no new folders ({error.strerror})",
                                 param_hint="--out") from None


def prepare_output(out: Path, header: list[str]):
    """Make the folder of --out's file now, so that a bad path fails before scoring rather than after
    it; and refuse to replace a file other than earlier scores of these classes (`header`): the store,
    the head, a manifest (whose id column may come first) are not lost to a mistyped --out."""
    check_can_make(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not os.access(out, os.W_OK):
        raise typer.BadParameter(f"{out} cannot be written (permission denied)", param_hint="--out")
    if out.exists() and out.stat().st_size:
        with open(out, "rb") as f:
            first = f.readline(1 << 20).decode("utf-8", errors="replace").rstrip("\r\n")
        written = next(csv.reader([first]), [])
        if written != header and written != [header[0], *header[3:]]:  # scores of these classes, of an earlier version too (no source, offset)
            raise typer.BadParameter(f"{out} exists and is not a scores file of these classes (its first line is not "
                                     f"{','.join(header)[:80]}): it would be replaced; give another --out, or delete it first",
                                     param_hint="--out")


def predict(
    store: Path = typer.Argument(..., metavar="STORE", help="A token store of the head's encoder and layers (any dataset: its classes may differ)."),
    head: Path = typer.Option(..., "--head", help="A saved head, e.g. RUN/best/ep.pt."),
    split: str = typer.Option("test", "--split", help="The split to score."),
    out: Path = typer.Option(Path("scores.csv"), "--out", "-o", help="CSV: id, source file, offset (seconds into it), then one score column per class of the head."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Items scored at once."),
    device: str = typer.Option("auto", "--device", help="auto (GPU when present), cpu, cuda or cuda:N; under torchrun a bare cuda is the rank's GPU."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Score the written shards of an unfinished split."),
    log_scores: bool = typer.Option(False, "--log-scores", help="Write log-probabilities: they rank items exactly where "
                                    "probabilities round to 1 (logits above about 37), as the run's own metrics do."),
):
    """Write a saved head's per-item scores (sigmoid multi-label, softmax multi-class) for a split.

    Example: tokens predict S.zarr --head runs/s1/best/ep.pt --split test --out scores.csv
    """
    compute = device_option(device)
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a folder; give a file, e.g. {out / 'scores.csv'}", param_hint="--out")
    try:
        saved = load_tensors(head)
    except CheckpointError as error:
        raise typer.BadParameter(f"{error}; a head saved by `tokens probe` holds only tensors and plain values", param_hint="--head") from None
    except OSError as error:
        raise typer.BadParameter(f"cannot load {head}: {error}", param_hint="--head") from None
    module = load_saved_head(head, saved)
    opened = open_checked(store, [], allow_incomplete, optional=(split,))
    if split not in opened.splits:
        opened.close()
        raise typer.BadParameter(f"{store} has no split {split!r}; it has {', '.join(opened.splits)}", param_hint="--split")
    with opened:
        build, layer = saved["build"], saved["layer"]
        if opened.meta["dim"] != build["dim"]:
            theirs = saved.get("tokens", {}).get("backbone")  # heads saved before it was recorded: the dims alone
            which = f" ({theirs} there, {opened.meta.get('backbone')} here)" if theirs else ""
            raise typer.BadParameter(f"{head} was trained on tokens of {build['dim']} dims; {store}'s have {opened.meta['dim']}{which}: "
                                     "score a store of the head's encoder", param_hint="--head")
        if saved["task"] != opened.task:  # its scores would be sigmoids for a softmax task, or the reverse
            raise typer.BadParameter(f"{head} was trained for a {saved['task']} task; {store} is {opened.task}", param_hint="--head")
        multi = HEADS[build["name"]].multi_layer
        if multi and (saved.get("layers", opened.layers) != opened.layers or build["num_layers"] != len(opened.layers)):
            # a multi-layer head weighs each layer it was trained on: other layers, even as many, are not them
            read = saved.get("layers", f"{build['num_layers']} layers")
            raise typer.BadParameter(f"{head} reads the layers {read}; {store} caches {opened.layers}", param_hint="--head")
        if not multi and layer not in opened.layers:
            raise typer.BadParameter(f"{head} reads layer {layer}, which {store} does not cache ({opened.layers})", param_hint="--head")
        made = saved.get("tokens", {})  # heads saved before it was recorded: only the store key tells
        # backbone_config repeats fields recorded on their own (final_norm, the checkpoint hash): each said once
        differ = [entry for name in made for entry in differences(name, made[name], opened.meta.get(name))
                  if entry[0].partition("backbone_config.")[2] not in made]
        if [name for name, _, _ in differ] == ["final_norm"]:  # the same encoder's tokens, normed on one side only
            if saved.get("final_norm") is not None:
                why = "applies the encoder's final norm itself (trained with tokens probe --final-norm): give it a store of raw tokens"
            elif made["final_norm"]:
                why = (f"was trained on tokens normed at extraction (--final-norm), and {store}'s are raw: score a store "
                       "extracted with --final-norm, or train on this one with tokens probe --final-norm")
            else:
                why = f"was trained on raw tokens, and {store}'s were normed at extraction: score a store extracted without --final-norm"
            raise typer.BadParameter(f"{head} {why}", param_hint="--head")
        if differ:
            shown = ", ".join(f"{name} {short(there)} there, {short(here)} here" for name, there, here in differ[:3])
            raise typer.BadParameter(f"{head} was trained on tokens made another way ({shown}): its scores on {store} "
                                     "would mean nothing; score a store extracted as the head's was", param_hint="--head")
        if saved["store_key"] != opened.meta["cache_key"][:16]:
            typer.echo(f"note: {head} was trained on another store (key {saved['store_key']}: another dataset, other "
                       "cached layers, precision or token dtype); scoring anyway")
        if opened.classes != saved["classes"]:  # new data need not hold every class, nor in the same order: the scores are the head's
            unknown = [name for name in opened.classes if name not in saved["classes"]]
            typer.echo(f"note: {store} labels its items with the classes {short(opened.classes)}, the head scores its own "
                       f"{short(saved['classes'])}: the columns are the head's" +
                       (f"; {short(unknown)} it was not trained on and does not score" if unknown else ""))
        the_split = opened.split(split)
        items = usable_items(the_split)
        if not len(items):
            raise typer.BadParameter(f"{store} has no usable {split} items (all failed or in unwritten shards)", param_hint="--split")
        header = ["id", "source", "offset", *saved["classes"]]
        prepare_output(out, header)
        module.to(compute)
        layers = opened.layers if multi else [layer]
        try:  # the norm the head was trained behind (probe --final-norm)
            norm = None if saved.get("final_norm") is None else FinalNorm.from_params(saved["final_norm"], build["dim"], compute, str(head))
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--head") from None
        source = Source(the_split, layers, module.uses_cls, "stream", compute, norm=norm)
        (scores,) = recipe.score([(module, layer)], source, items, batch_size, saved["task"])
        if not log_scores:
            scores = np.exp(scores)
        ids, sources, offsets = (the_split.column(name)[items] for name in ("ids", "sources", "offsets"))
    # through a link, not over it; earlier scores stay whole until these are
    with written_aside(out.resolve()) as aside, open(aside, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for item_id, source_file, offset, row in zip(ids, sources, offsets, scores):
            # every digit: rounding would tie the confident items
            writer.writerow([item_id, source_file, f"{offset:.3f}".rstrip("0").rstrip("."), *map(repr, row.tolist())])
    skipped = the_split.num_items - len(items)
    typer.echo(f"{out}: scores of {len(items)} items of {split}" + (f" ({skipped} failed or unwritten items left out)" if skipped else ""))
