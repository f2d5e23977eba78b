"""`tokens extract`: run a frozen backbone once over a dataset and fill a store."""

from __future__ import annotations

from pathlib import Path

import typer

from tokens.cache import StoreError
from tokens.cluster import part_origin, resolve_part
from tokens.extract.manifest import ManifestError


def parse_layers(text: str | None) -> list[int] | str | None:
    if text is None:
        return None
    if text.strip() == "all":
        return "all"
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise typer.BadParameter(f"{text!r} is not 'all' or a comma-separated list of integers, e.g. -1 or 0,4,8,11", param_hint="--layers") from None
    return layers


def parse_backbone_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--backbone-option")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        if key.strip() in options:  # as probe's --option: the last one would win without a word
            raise typer.BadParameter(f"{key.strip()} given twice ({options[key.strip()]} and {value}): give it once",
                                     param_hint="--backbone-option")
        options[key.strip()] = value
    return options


def _rate(per_second: float) -> str:
    """1234, 56, 0.42: a slow backbone on a CPU makes under one item a second, which :.0f showed as 0."""
    return f"{per_second:.0f}" if per_second >= 10 else f"{per_second:.2g}"


def _interrupted(store: Path):
    """Ctrl-C or SIGTERM: say what is kept (how many shards) and how to go on, and exit 130."""
    from tokens.cache.store import open_store, store_exists

    kept = ""
    if store_exists(store):
        try:
            with open_store(store) as opened:
                done = sum(int(split.complete_mask().sum()) for split in opened.splits.values())
                kept = f"{done} of {sum(split.num_shards for split in opened.splits.values())} shards are complete in {store} and kept; "
        except (StoreError, OSError):  # not readable now (another task writes its HDF5 file): said without the count
            kept = f"the shards already complete in {store} are kept; "
    typer.echo(f"\ninterrupted: {kept}run the same command again to go on", err=True)
    raise typer.Exit(130) from None


def extract(
    dataset: Path = typer.Argument(
        ..., metavar="DATASET", help="A manifest (.csv or .jsonl with columns path, labels or label, split, optional id/start/end) "
        "or a folder laid out as ROOT/<split>/<class>/<file>.",
    ),
    store: Path = typer.Option(..., "--store", "-s", help="Where to write: a .zarr directory (default format) or a .h5 file."),
    backbone: str = typer.Option("crepe-tiny", "--backbone", "-b", help="Backbone name; `tokens backbones` lists them. Image ViTs: timm:<model name>."),
    checkpoint: str = typer.Option(None, "--checkpoint", "-c", help="Checkpoint file (or HF directory for ast) in the backbone's original format."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow checkpoints that need full unpickling (e.g. fairseq). Only for files you trust: unpickling can run code."),
    backbone_option: list[str] = typer.Option([], "--backbone-option", "-o", metavar="KEY=VALUE", help="KEY=VALUE passed to the backbone (repeatable), e.g. -o window_seconds=2 or -o num_heads=6; `tokens backbones` lists each backbone's options."),
    layers: str = typer.Option("-1", "--layers", "-l", help="Blocks to cache, comma-separated (negative counts from the end), or 'all'."),
    final_norm: bool = typer.Option(False, "--final-norm", help="Apply the encoder's final norm to the cached tokens (default: raw block outputs, as the EP protocol uses)."),
    fmt: str = typer.Option(None, "--format", help="Store format: zarr or hdf5 (default: hdf5 for a .h5/.hdf5 store, else zarr)."),
    dtype: str = typer.Option("float16", "--dtype", help="Stored token dtype: float16, bfloat16 or float32."),
    codec: str = typer.Option(None, "--codec", help="Lossless codec (zarr: zstd, gzip, blosc-lz4; hdf5: gzip, lzf). Off by default: float16 activations gain under 10%."),
    shard_size: int = typer.Option(0, "--shard-size", help="Items per shard, the unit of writing and resuming (0: about 128 MiB per layer and 384 MiB in all, or the store's own when resuming)."),
    precision: str = typer.Option("bf16", "--precision", help="Forward pass on GPU: bf16 (autocast) or fp32. CPU runs are always fp32."),
    batch_size: int = typer.Option(32, "--batch-size", help="Items per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto (GPU when present), cpu, cuda or cuda:N; under torchrun a bare cuda is the rank's GPU."),
    num_workers: int = typer.Option(None, "--num-workers", help="DataLoader workers that decode the audio or images, at a lower priority (default: one per usable core but one, shared among a node's torchrun ranks, at most 32; at most 8 for audio encoders whose fbank runs on the GPU, where more slowed the disk)."),
    part: str = typer.Option(None, "--part", help="Do part I of N (I/N, 1-based) of the shards; defaults to the SLURM array task or torchrun rank."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad item instead of recording it and going on."),
    shard: str = typer.Option(None, "--shard", hidden=True),  # --part's former name, in sbatch scripts written before
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Extract again the items an earlier run recorded as failed (once their files are fixed): their shards are written again."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print items, bytes per item and size on disk, then stop."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Run a frozen backbone once over DATASET and store full patch-token maps.

    Rerunning the same command resumes: complete shards are skipped, and a store made with
    another configuration is refused. Bad items (unreadable, empty, NaN) are recorded in the
    store with the reason and listed at the end.

    Example: tokens extract data/manifest.csv --store as20k-eat.zarr -b eat -c EAT-base.pt --allow-pickle -l all
    """
    try:
        part_of_work = resolve_part(part or shard)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--part") from None
    if part_of_work != (1, 1):
        typer.echo(f"part {part_of_work[0]}/{part_of_work[1]} (from {part_origin(part or shard)}): this process writes "
                   "every shard of that part, not the others")
    try:  # torch takes seconds to import: an interrupt meanwhile is said as any other
        from tokens.extract.run import ExtractionError, extract as run_extract
    except KeyboardInterrupt:
        _interrupted(store)
    try:
        result = run_extract(
            dataset, store, backbone=backbone, checkpoint=checkpoint, allow_pickle=allow_pickle,
            backbone_options=parse_backbone_options(backbone_option), layers=parse_layers(layers), final_norm=final_norm,
            fmt=fmt, dtype=dtype, codec=codec, shard_size=shard_size, precision=precision, batch_size=batch_size,
            device=device, num_workers=num_workers, part=part_of_work, strict=strict, retry_failed=retry_failed, dry_run=dry_run, progress=not quiet,
            log=typer.echo,
        )
    except (ManifestError, StoreError, ExtractionError, ValueError, FileNotFoundError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        _interrupted(store)
    if dry_run:
        _print_plan(result, part_of_work)
        return
    pace = ""
    if result.streaming_seconds > 0:
        startup = result.seconds - result.streaming_seconds
        pace = f" ({startup:.1f} s to the first batch, then {_rate(result.items_written / result.streaming_seconds)} items/s)"
    typer.echo(
        f"{result.store}: wrote {_count(result.items_written, 'item')} in {_count(result.shards_written, 'shard')} "
        f"({result.shards_skipped} already complete){_of_part(part_of_work)} in {result.seconds:.1f} s{pace}"
    )
    if result.failed:
        failed = _count(len(result.failed), "item") + (" failed and is" if len(result.failed) == 1 else " failed and are")
        typer.echo(f"{failed} recorded in the store with the reason:", err=True)
        for item_id, reason in result.failed[:20]:
            typer.echo(f"  {item_id}: {reason}", err=True)
        if len(result.failed) > 20:
            typer.echo(f"  ... and {len(result.failed) - 20} more: `tokens info {store} --failed` lists them all", err=True)
    if result.failed_before:
        typer.echo(f"note: {_count(result.failed_before, 'item')} that an earlier run recorded as failed "
                   f"{'stays' if result.failed_before == 1 else 'stay'} so (`tokens info {store} --failed` lists them); "
                   "--retry-failed extracts them again once their files are fixed", err=True)
    good = result.items_written - len(result.failed) + result.good_before
    if not good and (result.failed or result.failed_before):  # a dataset of the other modality, or of a format not read here
        from tokens.extract.backbones import BACKBONES

        modality = "images" if BACKBONES[backbone.partition(":")[0]].config["modality"] == "image" else "audio"
        which = "of this run" if result.items_written else "in the store's shards"
        if part_of_work[1] > 1:  # the other parts' shards were not looked at
            which = f"of part {part_of_work[0]}/{part_of_work[1]}'s shards"
        typer.echo(f"error: every item {which} failed: {backbone} reads {modality}; is that what {dataset} holds, "
                   "in a format read here?", err=True)
        raise typer.Exit(1)


def _of_part(part: tuple[int, int]) -> str:
    return "" if part == (1, 1) else f" of part {part[0]}/{part[1]}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _print_plan(plan, part):
    from tokens.cache.commands import _size

    spec = plan.spec
    total = sum(spec.splits.values())
    per_item = plan.item_bytes()
    typer.echo(f"backbone {spec.backbone}: grid {spec.grid[0]}x{spec.grid[1]}, dim {spec.dim}, layers {spec.layers}, {spec.dtype}")
    for name, n in spec.splits.items():
        typer.echo(f"  {name:<6} {n:>9} items")
    typer.echo(f"{total} items x {_size(per_item)} per item, {_size(plan.disk_bytes())} on disk with the per-item "
               f"columns ({spec.shard_size} items per shard)")
    if part != (1, 1):
        typer.echo(f"this process does part {part[0]}/{part[1]}: {len(plan.units)} shards")
    if plan.complete:
        typer.echo(f"{plan.complete} of these {len(plan.units)} shards are already complete in the store: "
                   f"the run would write the other {len(plan.units) - plan.complete}")


def backbones():
    """List the registered backbones with their grid, dim, depth and checkpoint format."""
    from tokens.extract.backbones import BACKBONES, DEFAULT_BACKBONE, settable_options

    for name, entry in BACKBONES.items():
        config = entry.config
        facts = []
        if "grid" in config:
            facts.append(f"grid {config['grid'][0]}x{config['grid'][1]}")
        if "dim" in config:
            facts.append(f"dim {config['dim']}, {config['depth']} layers")
        default = " (default)" if name == DEFAULT_BACKBONE else ""
        # a default of 0 leaves the size to the model (timm's img_size)
        options = [f"{key}={option.default}" if option.default else f"{key} (default: the model's)"
                   for key, option in settable_options(entry).items()]
        typer.echo(f"{name}{default}\n    {'; '.join(facts + [entry.help])}"
                   + (f"\n    options (-o KEY=VALUE): {', '.join(options)}" if options else ""))
    sized = [name for name, entry in BACKBONES.items() if "dim" in settable_options(entry)]
    headed = [name for name in sized if "num_heads" in settable_options(BACKBONES[name])]
    typer.echo(f"\nA checkpoint of another size of {', '.join(sized)} needs its sizes as options, e.g. -o dim=384 -o depth=12 "
               f"for a ViT-S; {', '.join(headed)} also need -o num_heads (ViT-S 6, ViT-B 12, ViT-L 16): the weights show dim and "
               "depth (a mismatch is refused) but not the number of heads. A timm model's size comes with its name; "
               "-o img_size=N runs it at N pixels (its position embedding resampled, as DINOv2 is evaluated at 224).")
