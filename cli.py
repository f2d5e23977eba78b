"""The `tokens` command: a thin layer that hands each verb to its stage."""

import re
import subprocess
import sys
from pathlib import Path

import typer

from tokens.cache import commands as cache_commands
from tokens.cache.store import StoreError
from tokens.cluster import REQUEUE_LEAD_SECONDS, sbatch_script, slurm_minutes
from tokens.demo import demo
from tokens.extract import commands as extract_commands
from tokens.train import commands as train_commands
from tokens.train import probe as probe_recipe
from tokens.train.sweep import SweepError

LOGS = Path("slurm-logs")  # where `tokens slurm` tasks write their logs, beside the folder they run in

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
app.command()(extract_commands.extract)
app.command()(train_commands.probe)
app.command()(train_commands.report)
app.command()(train_commands.predict)
app.command()(extract_commands.backbones)
app.command()(demo)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def slurm(
    ctx: typer.Context,
    verb: str = typer.Argument(..., metavar="VERB", help="extract or probe"),
    array: int = typer.Option(..., "--array", min=1, help="Number of array tasks: the work is split into this many parts."),
    gpus: int = typer.Option(1, "--gpus", min=0, help="GPUs per task: 1, or 0 for CPU-only tasks. A task uses one "
                             "GPU: for more, ask for more tasks."),
    cpus: int = typer.Option(8, "--cpus", min=1, help="CPU cores per task (DataLoader workers for extraction)."),
    mem: str = typer.Option(None, "--mem", help="Memory per task, e.g. 64G."),
    time: str = typer.Option(None, "--time", help="Wall-time limit per task, e.g. 04:00:00."),
    partition: str = typer.Option(None, "--partition", help="SLURM partition."),
    account: str = typer.Option(None, "--account", help="SLURM account the tasks are charged to."),
    qos: str = typer.Option(None, "--qos", help="SLURM quality of service."),
    constraint: str = typer.Option(None, "--constraint", help="SLURM node features the tasks need, e.g. 'h100|a100'."),
    after: str = typer.Option(None, "--after", metavar="JOBID", help="Start once these jobs (comma-separated ids, e.g. "
                              "the extraction's) have all finished well: a probe array submitted with its store's extraction."),
    requeue: int = typer.Option(3, "--requeue", min=0, help="Times a task that nears its time limit is requeued to go on where "
                                "it stopped: SLURM signals it 2-3 minutes before the limit, and it stops keeping its finished "
                                "work. 0: never (a task at its limit ends TIMEOUT, and jobs waiting on it with --after never start)."),
    script: Path = typer.Option(None, "--script", help="Where to write the sbatch script (default: tokens-VERB.sbatch)."),
    submit: bool = typer.Option(False, "--submit", help="Submit the script with sbatch after writing it."),
):
    """Write an sbatch script that runs `tokens VERB ARGS...` as a job array, one part per task.

    Everything after VERB that is not an option of this command is passed to `tokens VERB`, with
    --quiet (no progress bars in the logs). Each task takes its part from SLURM_ARRAY_TASK_ID and
    runs in the current directory; its log goes to slurm-logs/ there. Resubmitting finishes only
    what is missing.

    Example: tokens slurm extract data/manifest.csv --store /scratch/as2m.zarr -b eat -c eat.pt --allow-pickle --array 64 --time 04:00:00 --submit
    """
    if verb not in ("extract", "probe"):
        raise typer.BadParameter(f"{verb!r}: use extract or probe", param_hint="VERB")
    if gpus > 1:  # the task's one process would hold them and use the first
        raise typer.BadParameter(f"a task uses one GPU, not {gpus}: give --gpus 1 and more --array tasks", param_hint="--gpus")
    # Written into the script's #SBATCH lines: a value with a newline would add a line the shell runs.
    for value, option, form, example in ((mem, "--mem", r"\d+([KMGT]B?)?", "64G"), (time, "--time", r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|unlimited|infinite", "04:00:00"),
                                         (partition, "--partition", r"[\w.,-]+", "gpu"), (account, "--account", r"[\w.-]+", "proj42"),
                                         (qos, "--qos", r"[\w.-]+", "normal"), (constraint, "--constraint", r"[\w.,|&:*\[\]-]+", "h100|a100"),
                                         (after, "--after", r"\d+(_\d+)?([,:]\d+(_\d+)?)*", "1234,1235")):
        if value is not None and not re.fullmatch(form, value, re.IGNORECASE):
            raise typer.BadParameter(f"{value!r} is not a SLURM {option.removeprefix('--')} (e.g. {example})", param_hint=option)
    if requeue and time and (minutes := slurm_minutes(time)) is not None and minutes * 60 < 2 * REQUEUE_LEAD_SECONDS:
        raise typer.BadParameter(f"{time} leaves no time to work before the signal to requeue, which comes 2-3 minutes before "
                                 f"the limit: give a longer --time, or --requeue 0", param_hint="--time")
    if any(arg in ("--part", "--shard") or arg.startswith(("--part=", "--shard=")) for arg in ctx.args):
        raise typer.BadParameter("each array task picks its own part; leave out --part", param_hint="ARGS")
    # sbatch reads its #SBATCH lines with rules of its own: it drops a backslash even inside quotes and
    # expands %j and the like in the log path, so the tasks would start elsewhere or log nowhere.
    if odd := sorted(set(str(Path.cwd())) & set("\\%\n")):
        raise typer.BadParameter(f"the tasks run in this folder, {str(Path.cwd())!r}, and sbatch cannot take a folder whose path "
                                 f"holds {' or '.join(map(repr, odd))}: run tokens slurm from another folder", param_hint="the current folder")
    # Submitted to wait for other jobs, the tasks may find what those jobs make: as if not submitted yet.
    _check_forwarded(verb, ctx.args, submit and not after, array, gpus)
    quiet = [] if {"-q", "--quiet"} & set(ctx.args) else ["--quiet"]  # progress bars fill a log with carriage returns
    text = sbatch_script(
        verb, ctx.args + quiet, array=array, job_name=f"tokens-{verb}", gpus=gpus, cpus=cpus, mem=mem, time=time,
        partition=partition, account=account, qos=qos, constraint=constraint, after=after, requeues=requeue, python=sys.executable, workdir=Path.cwd(), logs=LOGS,
    )
    path = script or Path(f"tokens-{verb}.sbatch")
    try:
        # surrogateescape: a folder whose name is not UTF-8 is written back as the bytes it is named by
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
    except OSError as error:
        raise typer.BadParameter(f"cannot write {path}: {error.strerror}", param_hint="--script") from None
    LOGS.mkdir(exist_ok=True)
    typer.echo(f"wrote {path}")
    if submit:
        result = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            typer.echo(f"error: sbatch failed: {result.stderr.strip()}", err=True)
            raise typer.Exit(1)
        typer.echo(result.stdout.strip())


def _check_forwarded(verb: str, args: list[str], starts_now: bool, array: int, gpus: int):
    """Parse ARGS as `tokens VERB` will, and check what can be checked without running it, so that a
    mistake fails here rather than in every task of the array, hours later in the queue.
    `starts_now`: submitted, not waiting for other jobs, so what the tasks need must be there;
    `gpus`: each task's."""
    command = typer.main.get_command(app).commands[verb]
    try:
        params = command.make_context(f"tokens {verb}", list(args)).params
    except typer.TyperException as error:  # a usage error: unknown option, bad value, missing argument
        raise typer.BadParameter(f"tokens {verb} would refuse them: {error.format_message()}", param_hint="ARGS") from None
    wants_gpu = [f"--device {params['device']}"] * params["device"].startswith("cuda") + ["--data gpu"] * (params.get("data") == "gpu")
    if wants_gpu and not gpus:
        raise typer.BadParameter(f"{' and '.join(wants_gpu)} needs a GPU, and with --gpus 0 the tasks have none: "
                                 "give --gpus 1, or leave them out", param_hint="--gpus")
    if params["device"].startswith("cuda:") and params["device"] != "cuda:0":  # SLURM shows each task its own GPU alone
        raise typer.BadParameter(f"--device {params['device']}: each task sees only the GPU it is given, as cuda:0; "
                                 "give --device cuda, or leave it out", param_hint="ARGS")
    if params.get("dry_run"):
        raise typer.BadParameter("--dry-run in every task would write nothing: run `tokens extract ... --dry-run` here, "
                                 "then tokens slurm without it", param_hint="ARGS")
    if verb == "probe":  # what can be checked before the store exists: heads, their options, rates, --data, --out
        try:
            train_commands.check_probe_args(optimizer=params["optimizer"].value, **{key: params[key] for key in (
                "heads", "option", "lr", "wd", "layers", "seeds", "sweep", "data")})
            train_commands.check_whole_or_parts(params["out"], array)  # what it holds; it may not be made yet
            train_commands.check_out_folder(params["out"], "the parts' results", train_commands.RUN_FILES)
        except SweepError as error:
            raise typer.BadParameter(str(error), param_hint=error.option) from error
    if verb == "extract":  # the options, the backbone as each task will load it, then the dataset it will read
        from tokens.extract.run import ExtractionError, check_backbone_options, check_options, load_backbone

        try:
            fmt = check_options(params["store"], part=(1, array), **{key: params[key] for key in (
                "fmt", "dtype", "precision", "codec", "batch_size", "num_workers", "shard_size")})
            checkpoint = params["checkpoint"]
            backbone_options = extract_commands.parse_backbone_options(params["backbone_option"])
            layers = extract_commands.parse_layers(params["layers"])
            if checkpoint and not Path(checkpoint).exists() and not starts_now:  # as the dataset: it may come later
                check_backbone_options(params["backbone"], backbone_options)
                typer.echo(f"note: {checkpoint} does not exist yet; the tasks need it when they start (until then the "
                           "backbone's name and options are checked, not its layers nor the dataset)", err=True)
            else:
                model, layers = load_backbone(params["backbone"], checkpoint, params["allow_pickle"], backbone_options,
                                              params["final_norm"], layers)
                if params["dataset"].exists():
                    _check_extraction_dataset(params, model, layers, fmt, array, starts_now)
        except (ExtractionError, StoreError, ValueError, FileNotFoundError) as error:
            raise typer.BadParameter(f"tokens extract would refuse them: {error}", param_hint="ARGS") from None
    needed = params["store"] if verb == "probe" else params["dataset"]
    if not needed.exists():
        if starts_now:
            raise typer.BadParameter(f"{needed} does not exist", param_hint="ARGS")
        typer.echo(f"note: {needed} does not exist yet; the tasks need it when they start", err=True)
    elif verb == "probe":  # the sweep as the tasks will build it: more tasks than configurations leave some idle
        # An unfinished store is let through: the extraction filling it may be done before the tasks start.
        with train_commands.open_checked(needed, ["train", "test"], True, optional=("valid",)) as store:
            unfinished = probe_recipe.unfinished_shards({name: split.complete_mask() for name, split in store.splits.items()})
            if unfinished:
                typer.echo(f"note: {needed} is unfinished; the tasks refuse it unless its extraction is done when they "
                           "start (--after JOBID waits for that job)" + ("" if not params["allow_incomplete"] else
                           ", or train on its shards written then (--allow-incomplete)"), err=True)
            try:
                configs, spec = train_commands.plan_probe(store, **{key: params[key] for key in (
                    "heads", "option", "lr", "wd", "layers", "seeds", "sweep", "batch_size", "loss", "data", "final_norm")},
                    optimizer=params["optimizer"].value)
                training = probe_recipe.training_plan(store, configs, optimizer=params["optimizer"].value,
                                                      schedule=params["schedule"].value, **{key: params[key] for key in (
                                                          "epochs", "batch_size", "warmup_epochs", "loss", "data_seed", "final_norm")})
                probe_recipe.check_earlier_runs(params["out"], array, {
                    "store_key": store.meta["cache_key"], "sweep": spec | {"configs": [c.id for c in configs]}, "training": training},
                    store.task, unfinished, params["allow_incomplete"])
            except SweepError as error:
                raise typer.BadParameter(str(error), param_hint=error.option) from error
        if array > len(configs):
            raise typer.BadParameter(f"{array} tasks for a sweep of {len(configs)} configurations: use --array {len(configs)} or fewer",
                                     param_hint="--array")


def _check_extraction_dataset(params: dict, model, layers: list[int], fmt: str, array: int, starts_now: bool):
    """The dataset as each task will read it, against the store it goes into: a store of another
    configuration or dataset is refused, and so are more tasks than shards. A dataset refused as it
    is now is a note unless the tasks may start at once (--submit without --after), as one still to
    come is: its files may be on their way."""
    from tokens.extract.manifest import ManifestError
    from tokens.extract.run import check_existing, plan

    try:
        work = plan(params["dataset"], params["store"], model, layers=layers, dtype=params["dtype"], fmt=fmt,
                    codec=params["codec"], shard_size=params["shard_size"], part=(1, 1), progress=True)
    except ManifestError as error:
        if starts_now:
            raise
        typer.echo(f"note: tokens extract would refuse the dataset as it is now, {error}\nthe tasks read it when they start", err=True)
        return
    check_existing(work, params["store"])
    if array > work.shard_count():
        raise typer.BadParameter(f"{array} tasks for a dataset of {work.shard_count()} shards (of up to {work.spec.shard_size} "
                                 f"items): use --array {work.shard_count()} or fewer"
                                 f"{', or a smaller --shard-size' if work.spec.shard_size > 1 else ''}", param_hint="--array")


def main():
    """Run the command line (tokens.__main__ takes the stop signals first). A file that cannot be
    read or written (a read-only folder, a directory where a file should be) or a damaged store is
    reported with its path, not as a traceback."""
    try:
        app(prog_name="tokens")
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        typer.echo(f"error: {where}{error.strerror or error}", err=True)
        sys.exit(1)
    except StoreError as error:  # damage found mid-run (a missing shard file); opening errors are caught earlier
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)
