"""The `tokens` command: a thin layer that hands each verb to its stage."""

import typer

from tokens.cache import commands as cache_commands

app = typer.Typer(
    help=(
        "Cache full patch-token maps of frozen encoders once, then train many probe heads on them.\n\n"
        "Typical use: `tokens extract DATASET --store S.zarr`, `tokens info S.zarr`, "
        "`tokens probe S.zarr --heads linear,ep,protobin --out RUN`, `tokens report RUN`. "
        "`tokens demo` runs the whole pipeline offline on a small built-in dataset."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.command()(cache_commands.info)
app.command()(cache_commands.verify)
