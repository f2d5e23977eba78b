"""`tokens info` and `tokens verify`: look at a store without loading it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import typer

from tokens.cache.store import NotAStore, StoreError, TokenStore, open_store
from tokens.cache.verify import verify as verify_store


def describe(store: TokenStore) -> dict:
    """The store at a glance, as plain data (what `tokens info --json` prints)."""
    meta = store.meta
    splits = {}
    for split in store.splits.values():
        done = split.complete_mask()
        errors = split.column("errors") if done.any() else np.array([])
        splits[split.name] = {
            "items": split.num_items,
            "complete": bool(done.all()),
            "shards": split.num_shards,
            "shards_complete": int(done.sum()),
            "failed_items": int(sum(1 for e in errors if e)),
        }
    return {
        "path": str(store.path),
        "format": store.format,
        "backbone": meta["backbone"],
        "backbone_config": meta["backbone_config"],
        "checkpoint_sha256": meta.get("checkpoint_sha256"),  # a store of an early version (no record of its key fields) may lack it
        "frontend": meta["frontend"],
        "dim": meta["dim"],
        "grid": meta["grid"],
        "num_tokens": meta["grid"][0] * meta["grid"][1],
        "num_prefix": meta["num_prefix"],
        "class_token": store.class_token,
        "layers": meta["layers"],
        "final_norm": meta["final_norm"],
        "final_norm_recorded": meta.get("final_norm_params") is not None,  # for tokens probe --final-norm
        "precision": meta.get("precision"),  # None: a store made before it was recorded
        "dtype": meta["dtype"],
        "masked": meta["masked"],
        "task": meta["task"],
        "classes": meta["classes"],
        "splits": splits,
        "shard_size": meta["shard_size"],
        "codec": meta.get("codec"),
        "disk_bytes": store.disk_bytes(),
        "created": meta.get("created"),
        "tool_version": meta.get("tool_version"),
        "cache_key": meta["cache_key"],
        "extra": meta.get("extra", {}),
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def _final_norm(info: dict) -> str:
    if info["final_norm"]:
        return "applied"
    return "not applied (recorded: tokens probe --final-norm applies it)" if info["final_norm_recorded"] else "not applied"


def _input(info: dict) -> str:
    """The front-end the tokens were made behind, in one line: an audio backbone's (fbank settings,
    normalisation) or a timm ViT's preprocessing (size, crop, mean, std), which decides whether the
    tokens are the encoder's at all."""
    settings = info["frontend"] or info["backbone_config"].get("data_config") or {}

    def shown(value) -> str:
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, list) else str(value)
    return ", ".join(f"{key}={shown(value)}" for key, value in settings.items())


def render(info: dict) -> str:
    T, F = info["grid"]
    classes = info["classes"]
    shown = ", ".join(classes[:8]) + (f", ... ({len(classes)} in all)" if len(classes) > 8 else "")
    lines = [
        f"store      {info['path']} ({info['format']}, {_size(info['disk_bytes'])} on disk)",
        f"backbone   {info['backbone']}  checkpoint sha256 {(info['checkpoint_sha256'] or '')[:16] or 'none (built-in weights)'}",
        f"tokens     grid {T}x{F} = {info['num_tokens']} tokens x {info['dim']} dims, "
        f"{info['num_prefix']} prefix tokens{'' if info['class_token'] or not info['num_prefix'] else ' (no class token)'}, {info['dtype']}, final norm {_final_norm(info)}"
        f"{', forward pass in ' + info['precision'] if info['precision'] else ''}"
        f"{', compressed with ' + info['codec'] if info['codec'] else ''}",
        *([f"input      {front_end}"] if (front_end := _input(info)) else []),
        f"layers     {', '.join(map(str, info['layers']))}",
        f"task       {info['task']}, {len(classes)} classes: {shown}",
        "splits",
    ]
    for name, s in info["splits"].items():
        state = "complete" if s["complete"] else f"INCOMPLETE ({s['shards_complete']}/{s['shards']} shards)"
        failed = f", {s['failed_items']} failed item{'s' * (s['failed_items'] != 1)}" if s["failed_items"] else ""
        lines.append(f"  {name:<8} {s['items']:>9} items  {state}{failed}")
    lines.append(f"created    {info['created'] or 'at an unrecorded time'} by tokens {info['tool_version'] or '(version unrecorded)'}; "
                 f"cache key {info['cache_key'][:16]}")
    made = info["extra"]  # provenance: who made the store, from what, with which command (the first run's)
    if made.get("dataset"):
        lines.append(f"from       {made['dataset']}" + (f" on {made['host']}" if made.get("host") else ""))
    if made.get("argv"):
        lines.append(f"command    {shlex.join(made['argv'])}")
    if made.get("versions"):
        lines.append(f"versions   {', '.join(f'{name} {version}' for name, version in made['versions'].items())}")
    return "\n".join(lines)


def failed_items(store: TokenStore) -> list[dict]:
    """The items an extraction recorded as failed, with the reason, in the shards complete so far."""
    found = []
    for split in store.splits.values():
        complete = split.complete_items()
        if not complete.any():
            continue
        errors = split.column("errors")
        rows = [i for i in np.flatnonzero(complete) if errors[i]]
        if rows:  # the ids and sources, large string columns, only when something failed
            ids, sources = split.column("ids"), split.column("sources")
            found += [{"split": split.name, "id": ids[i], "source": sources[i], "reason": errors[i]} for i in rows]
    return found


def info(
    store: Path = typer.Argument(..., metavar="STORE", help="A store: a .zarr directory or a .h5 file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for other programs instead of the summary."),
    failed: bool = typer.Option(False, "--failed", help="List the items that failed to decode, with the reason, instead of the summary."),
):
    """Summarise a store: splits, items, completeness, grid, dim, layers, classes, size, provenance."""
    try:
        with open_store(store) as opened:
            summary = failed_items(opened) if failed else describe(opened)
    except StoreError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    elif failed:
        for item in summary:
            typer.echo(f"{item['split']}\t{item['id']}\t{item['reason']}")
        if not summary:  # on stderr: the list itself stays empty for programs
            typer.echo(f"{store}: no item failed in the shards complete so far", err=True)
    else:
        typer.echo(render(summary))


def verify(
    store: Path = typer.Argument(..., metavar="STORE", help="A store: a .zarr directory or a .h5 file."),
    unmark_damaged: bool = typer.Option(
        False, "--unmark-damaged", help="Mark the complete shards found damaged as not complete, so that rerunning "
        "the extraction that made the store writes them again."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Check completeness, shapes, dtypes and NaN/Inf; name damaged shards. Exit 0 if sound, 1 if
    not, 2 if STORE is no store at all (a mistyped path: the code other commands give it)."""
    try:
        with open_store(store, mode="a" if unmark_damaged else "r") as opened:
            report, dtype = verify_store(opened, progress=not quiet), opened.meta["dtype"]
            if unmark_damaged:
                for split, shard in report.damaged:
                    opened.split(split).mark_incomplete(shard)
    except StoreError as error:  # a store whose metadata is damaged is there, and not sound
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2 if isinstance(error, NotAStore) else 1)
    if report.ok:
        typer.echo(f"{store}: sound ({report.shards_checked} complete shards checked)")
        return
    typer.echo(f"{store}: {len(report.problems)} problem{'s' * (len(report.problems) != 1)}", err=True)
    for problem in report.problems:
        typer.echo(f"  - {problem}", err=True)
    if report.damaged:
        shards = "; ".join(f"{split} {', '.join(str(shard) for s, shard in report.damaged if s == split)}"
                           for split in dict.fromkeys(s for s, _ in report.damaged))
        count = f"{len(report.damaged)} damaged shard{'s' * (len(report.damaged) != 1)}"
        if unmark_damaged:  # (`tokens info` shows the first run's command, from the folder it ran in)
            typer.echo(f"marked {count} not complete ({shards}); rerun the extraction that made the store to write "
                       f"{'it' if len(report.damaged) == 1 else 'them'} again", err=True)
        else:
            typer.echo(f"to write the {count} ({shards}) again: tokens verify {shlex.quote(str(store))} "
                       "--unmark-damaged, then rerun the extraction that made the store", err=True)
        if report.nonfinite:
            cure = ("store --dtype bfloat16 or float32 tokens, whose range float16's overflow does not limit" if dtype == "float16"
                    else f"in {dtype} tokens, they are the model's own: try --precision fp32, or check the checkpoint")
            typer.echo(f"NaN or Inf that the model itself gives come back when written again: {cure}", err=True)
    raise typer.Exit(1)
