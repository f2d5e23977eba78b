"""Results of sweeps: a run's leaderboard, per-head records and plots; reports that merge runs.

A run writes RUN/leaderboard.csv (one row per configuration, full-precision numbers),
RUN/heads/<config>.json (per-class metric and validation curve), RUN/params_vs_metric.png and
RUN/val_curves.png (and RUN/layers.png for a sweep over layers). `tokens report` reads any number
of runs and parts of runs, keeps one row per (store, configuration), averages configurations that
differ only by seed (mean ± sd), selects the best of each head by validation alone (the one whose
test figures to report), and writes DIR/leaderboard.csv (merged), DIR/report.csv, DIR/report.md and
DIR/report.png (and DIR/layers.png).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import textwrap
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tokens.cache.store import listed
from tokens.train.metrics import METRICS
from tokens.train.sweep import ALL_LAYERS, sanitise

FIRST_COLUMNS = ["head", "config", "params", "best_epoch"]
LAST_COLUMNS = ["layer", "lr", "wd", "seed", "options", "store_key", "training"]
# absent from leaderboards of earlier versions (training), or of runs (run: a report's merged
# leaderboard names the run each row came from, so that a report of it finds their stores and best/ heads)
OPTIONAL_COLUMNS = {"training": "", "run": ""}
INTEGERS = {"params", "best_epoch", "seed"}
PART = re.compile(r"part-(\d+)-of-(\d+)")  # the folder of one part of a split sweep


def _nan_to_none(value):
    """JSON has no NaN: an undefined metric is written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def comparable(value) -> float:
    """A metric to compare, higher better: an undefined one (None, NaN) never wins."""
    return -math.inf if value is None or math.isnan(value) else float(value)


def metric_columns(rows: list[dict]) -> list[str]:
    """val_* then test_* columns, the primary metric of each first (as the run wrote them)."""
    names = [k for k in rows[0] if k.startswith(("val_", "test_"))]
    return [k for k in names if k.startswith("val_")] + [k for k in names if k.startswith("test_")]


def primary_of(rows: list[dict]) -> str:
    """The metric selection maximises (metrics.METRICS), whatever the order of the columns."""
    return next((names[0] for names in METRICS.values() if f"val_{names[0]}" in rows[0]), metric_columns(rows)[0].removeprefix("val_"))


def _rank(column: str):
    """The sort key of rows by `column`, best first; ties by store, configuration and training.
    Runs (best/HEAD.pt) and reports (the selected rows) both rank by it."""
    return lambda r: (-comparable(r[column]), r.get("store_key", ""), r["config"], r.get("training", ""))


def ranked(rows: list[dict], metric: str) -> list[dict]:
    """Best validation metric first; ties in a fixed order."""
    return sorted(rows, key=_rank(f"val_{metric}"))


@contextmanager
def written_aside(path: Path):
    """A file of its own beside `path` to write, renamed onto `path` once written and deleted if the
    writing fails: a kill or a full disk meanwhile leaves the old file whole, and a part resubmitted
    while its old task still runs writes beside it."""
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield aside
        os.replace(aside, path)
    finally:
        aside.unlink(missing_ok=True)


def write_csv(path: Path, rows: list[dict], columns: list[str]):
    """Written aside (a run's leaderboard.csv says it finished: one cut short would pass for a
    finished run with fewer configurations)."""
    with written_aside(path) as aside, open(aside, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})


def leaderboard_columns(rows: list[dict]) -> list[str]:
    return FIRST_COLUMNS + metric_columns(rows) + LAST_COLUMNS


def write_run(out: Path, rows: list[dict], records: list[dict], metric: str, selected: list[dict]):
    """Everything a finished run leaves behind, then its leaderboard printed; `selected`: the rows
    of its best/ heads (selected_rows). The leaderboard is written last: `tokens report` takes a
    run that has one as finished."""
    rows = ranked(rows, metric)
    (out / "heads").mkdir(exist_ok=True)
    for record in records:
        text = json.dumps(_nan_to_none(record), indent=2)
        (out / "heads" / f"{sanitise(record['config'])}.json").write_text(text + "\n")
    plot_params_vs_metric(rows, f"test_{metric}", out / "params_vs_metric.png", chosen=selected,
                          title=f"{out.resolve().name}: each configuration and seed")
    plot_val_curves(records, metric, out / "val_curves.png", title=f"{out.resolve().name}: {len(records)} configuration{'s' * (len(records) != 1)}, one line each")
    by_layer = layer_wise(summarize(rows), metric)
    (out / "layers.png").unlink(missing_ok=True)  # an earlier sweep's, run in this folder before, would pass for this one's
    if by_layer:
        plot_layers(by_layer, f"test_{metric}", out / "layers.png", title=f"{out.resolve().name}: each head's best on validation at each layer")
    write_csv(out / "leaderboard.csv", rows, leaderboard_columns(rows))
    print(table(rows, ["head", "config", "params", "best_epoch"] + metric_columns(rows)))
    print(f"\nresults in {out}/ (leaderboard.csv, heads/, best/, params_vs_metric.png, val_curves.png{', layers.png' * bool(by_layer)})")


METRIC_NAMES = {"map": "mAP", "roc_auc": "ROC-AUC", "acc": "accuracy", "balanced_acc": "balanced accuracy"}


def metric_words(column: str) -> str:
    """'test_map' -> 'test mAP', 'val_balanced_acc_mean' -> 'validation balanced accuracy'."""
    split, _, metric = column.removesuffix("_mean").partition("_")
    return f"{'validation' if split == 'val' else split} {METRIC_NAMES.get(metric, metric)}"


def head_colours(heads) -> dict[str, str]:
    """One colour per head type, by name: a head has the same colour in every plot of a run."""
    return {head: f"C{i % 10}" for i, head in enumerate(sorted(set(heads)))}


def panelled(rows: list[dict], panel_of=None):
    """A figure with a panel per value of `panel_of(row)` (the store and training setup of a merged
    report: points of two encoders are never read as one another's), three to a line, sharing the
    y axis; returns it with (axes, panel name, the panel's rows) for each panel."""
    from matplotlib.figure import Figure  # Agg, no global backend state; imported here: it is slow to import

    panel_of = panel_of or (lambda row: None)
    panels = list(dict.fromkeys(map(panel_of, rows))) or [None]
    columns = min(len(panels), 3)
    lines = -(-len(panels) // columns)
    fig = Figure(figsize=(7 if columns == 1 else 4.2 * columns, 4.5 if lines == 1 else 3.6 * lines))
    axes = fig.subplots(lines, columns, sharey=True, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig, [(ax, panel, [r for r in rows if panel_of(r) == panel]) for ax, panel in zip(axes, panels)]


def save_panelled(fig, panels: list[tuple], ylabel: str, title: str | None, path: Path):
    """Grid, legend and title of each panel of `panelled`, the y label, the figure's title; saved to `path`."""
    wide = len(panels) > 1
    for ax, panel, _ in panels:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        if panel is not None:
            ax.set_title(textwrap.fill(panel, 45 if wide else 80), fontsize="medium")
    panels[0][0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def plot_params_vs_metric(rows: list[dict], column: str, path: Path, sd_column: str | None = None, chosen: list[dict] = (),
                          panel_of=None, title: str | None = None):
    """The metric against trainable parameters (log x), one marker per head type; error bars
    of one sd where `sd_column` is given; the `chosen` rows (selected on validation) ringed.
    `panel_of(row)` names the panel a row goes in (the store and training setup of a merged report),
    so that points of two encoders are never read as one another's (panelled)."""
    from matplotlib.ticker import EngFormatter, FuncFormatter, NullFormatter

    fig, panels = panelled(rows, panel_of)
    panel_of = panel_of or (lambda row: None)
    markers = "osD^v<>pPX*h"
    heads = head_colours(r["head"] for r in rows)
    chosen = [r for r in chosen if np.isfinite(r[column])]  # a diverged head's NaN has no place on the axes
    for ax, panel, here in panels:
        x = dodged(here)
        for i, (head, colour) in enumerate(heads.items()):
            mine = [r for r in here if r["head"] == head]
            if not mine:
                continue
            err = [r[sd_column] or 0 for r in mine] if sd_column else None
            ax.errorbar([x[id(r)] for r in mine], [r[column] for r in mine], yerr=err, fmt=markers[i % len(markers)],
                        color=colour, label=head, capsize=3, alpha=0.8)
        ringed = [r for r in chosen if panel_of(r) == panel]
        if ringed:
            ax.scatter([x[id(r)] for r in ringed], [r[column] for r in ringed], s=180, facecolors="none",
                       edgecolors="black", linewidths=1.2, zorder=3, label="selected on validation")
        ax.set_xscale("log")
        # 10k and 300k rather than 1e4 beside 300000; minor ticks labelled at 2 and 5 where a few decades
        # leave room, and every one within a decade, where no major tick may be in view
        low, high = ax.get_xlim()
        decades, short = math.log10(high / low), EngFormatter(sep="")

        def minor(value, at):
            mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
            return short(value, at) if decades < 1 or min(abs(mantissa - 2), abs(mantissa - 5)) < 1e-6 else ""

        ax.xaxis.set_major_formatter(short)
        ax.xaxis.set_minor_formatter(FuncFormatter(minor) if decades < 3 else NullFormatter())
        ax.set_xlabel("trainable parameters")
    return save_panelled(fig, panels, metric_words(column) + ("" if sd_column is None else ", mean ± sd over seeds"), title, path)


DODGE = 1.04  # the x factor between heads of one parameter count: apart on a log axis, near their count


def dodged(rows: list[dict]) -> dict[int, float]:
    """Each row's x position: its parameter count, set a little apart from other heads of the same
    count (linear and mean have as many parameters, and often close figures: one hid the other)."""
    heads_at: dict[int, dict[str, None]] = {}  # the heads of each count, in order of appearance
    for r in rows:
        heads_at.setdefault(r["params"], {})[r["head"]] = None
    x = {}
    for r in rows:
        heads = list(heads_at[r["params"]])
        x[id(r)] = r["params"] * DODGE ** (heads.index(r["head"]) - (len(heads) - 1) / 2)
    return x


def plot_val_curves(records: list[dict], metric: str, path: Path, title: str | None = None):
    """Validation metric per epoch of every configuration, one colour per head type."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    heads = head_colours(r["head"] for r in records)
    epochs = max((len(record["val_curve"]) for record in records), default=1)
    for record in records:
        curve = [np.nan if v is None else v for v in record["val_curve"]]
        # markers on short curves: a line of one epoch, or a point between NaNs, draws nothing
        ax.plot(range(1, len(curve) + 1), curve, color=heads[record["head"]], alpha=0.6, linewidth=1,
                marker="o" if epochs <= 30 else None, markersize=3)
    for head, colour in heads.items():
        ax.plot([], [], color=colour, label=head)
    ax.set_xlabel("epoch")
    ax.set_xlim(0.5, epochs + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric_words(f"val_{metric}"))
    if title:
        ax.set_title(title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}" if abs(value) < 10 else f"{value:g}"
    return str(value)


def table(rows: list[dict], columns: list[str], markdown: bool = False) -> str:
    """Rows as an aligned text table, or a Markdown table."""
    cells = [columns] + [[_cell(r[c]) for c in columns] for r in rows]
    if markdown:  # a | in a cell (a store's or run's name) would start another column; a newline, another row
        lines = ["| " + " | ".join(" ".join(cell.split("\n")).replace("|", "\\|") for cell in line) + " |" for line in cells]
        lines.insert(1, "|" + "|".join("---" for _ in columns) + "|")
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells)


# ---------------------------------------------------------------- merging runs


def find_leaderboards(path: Path) -> list[Path]:
    """A leaderboard.csv itself, a run's, or those of the parts (RUN/part-I-of-N/) inside it. Other
    folders inside a run are not its results: a report kept there may merge other runs."""
    path = Path(path)
    if path.is_file():
        return [path]
    found = [path / "leaderboard.csv"] if (path / "leaderboard.csv").exists() else []
    return found + [part / "leaderboard.csv" for part in part_folders(path) if (part / "leaderboard.csv").exists()]


def part_folders(run: Path) -> list[Path]:
    """The RUN/part-I-of-N/ folders of a split sweep, sorted."""
    return sorted(p for p in Path(run).glob("part-*-of-*") if PART.fullmatch(p.name))


def missing_parts(run: Path) -> list[str]:
    """Notes on parts of a split sweep (RUN/part-I-of-N/) that have no leaderboard yet. Parts past
    the sweep's number of configurations have none to train (they write nothing) and are not missing."""
    notes = []
    for count in {int(PART.fullmatch(p.name)[2]) for p in part_folders(run)}:
        configs = count
        for part in Path(run).glob(f"part-*-of-{count}"):
            try:
                configs = len(json.loads((part / "config.json").read_text())["sweep"]["configs"])
                break
            except (OSError, ValueError, KeyError, TypeError):
                continue
        missing = [i for i in range(1, min(count, configs) + 1)
                   if not (Path(run) / f"part-{i}-of-{count}" / "leaderboard.csv").exists()]
        if missing:
            notes.append(f"{run}: part {', '.join(map(str, missing))} of {count} not finished; the report lacks its configurations")
    return notes


def read_leaderboard(path: Path) -> list[dict]:
    """The rows of a leaderboard, numbers as numbers; any other CSV is refused by name."""
    not_ours = f"{path} is not a leaderboard.csv written by `tokens probe`"
    try:
        with open(path, newline="") as f:
            text = f.read()
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{not_ours} ({error})") from None
    columns = reader.fieldnames or []
    missing = [c for c in FIRST_COLUMNS + LAST_COLUMNS if c not in columns and c not in OPTIONAL_COLUMNS]
    missing += [f"{p}*" for p in ("val_", "test_") if not any(c.startswith(p) for c in columns)]
    for names in METRICS.values():  # a task's metrics without the one selection maximises: another would be used unsaid
        if any(f"{split}_{name}" in columns for split in ("val", "test") for name in names[:2]):
            missing += [f"{split}_{names[0]}" for split in ("val", "test") if f"{split}_{names[0]}" not in columns]
    if missing:
        raise ValueError(f"{not_ours}: it has no column {', '.join(missing)}")
    # Ours, but cut short (copied in part, a full disk): our rows each end their line, with every field
    cut = next((number for number, row in enumerate(rows, 2) if None in row or None in row.values()), None)
    if not text.endswith("\n") or cut:
        where = f"row {cut} has {'fewer' if None in rows[cut - 2].values() else 'more'} fields than the header" if cut else "its last line is cut short"
        raise ValueError(f"{path} is damaged: {where}; write it again with the command that wrote it (`tokens probe`, "
                         "from the run's checkpoint.pt, or `tokens report`)")
    if not rows:
        raise ValueError(f"{path} holds no configurations")
    trained = _configs_trained(Path(path).parent)  # a cut at a line's end leaves whole rows: the run's record tells
    if missing := [config for config in trained if config not in {row["config"] for row in rows}]:
        raise ValueError(f"{path} is damaged: it lacks {len(missing)} of the {len(trained)} configurations its run trained "
                         f"(config.json), e.g. {missing[0]}; write it again with `tokens probe`, from the run's checkpoint.pt")
    try:
        for row in rows:
            for k, default in OPTIONAL_COLUMNS.items():
                row.setdefault(k, default)
            for k, v in row.items():
                if k in INTEGERS:
                    row[k] = int(v)
                elif k in ("lr", "wd") or k.startswith(("val_", "test_")):
                    row[k] = float(v) if v else math.nan
                elif k == "layer" and re.fullmatch(r"-?\d+", v):
                    row[k] = int(v)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{not_ours}: {error}") from None
    return rows


def _configs_trained(run: Path) -> list[str]:
    """The configurations a run folder's config.json says it trained ([] where there is none to read:
    a report's folder, a leaderboard copied alone)."""
    try:
        return [config["id"] for config in json.loads((run / "config.json").read_text())["configs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def store_labels(paths: list[Path], keys: list[str]) -> dict[str, str]:
    """store_key -> a short name that tells the stores of a merged report apart: the store's file
    name from the run's config.json, with the key where two stores share a name, or the key alone."""
    names = {}
    for path in paths:
        try:
            record = json.loads((Path(path).parent / "config.json").read_text())
            names.setdefault(record["store_key"][:16], Path(record["store"]).name)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a merged or copied leaderboard: its key will do
    taken = Counter(names.get(k) for k in keys)
    labels = {}
    for k in keys:
        name = names.get(k)
        labels[k] = k[:8] if name is None else name if taken[name] == 1 else f"{name}:{k[:8]}"
    return labels


def merge(paths: list[Path]) -> tuple[list[dict], list[str], dict[tuple, Path]]:
    """All rows of all leaderboards, one per (store, configuration, training); notes on what was
    dropped; and the leaderboard each row was kept from (its run's, for a report's merged one)."""
    rows, seen, origins, columns = [], {}, {}, None
    repeated: dict[tuple[Path, Path], list[str]] = {}  # (kept from, dropped from) -> configurations
    for path in paths:
        for row in read_leaderboard(path):
            key = (row["store_key"], row["config"], row["training"])
            if key in seen:
                repeated.setdefault((seen[key], path), []).append(row["config"])
                continue
            if columns is None:
                columns = metric_columns([row])
            elif metric_columns([row]) != columns:
                raise ValueError(f"{path} has metrics {metric_columns([row])}, other runs {columns}: "
                                 "a report cannot mix multi-label and multi-class runs")
            seen[key] = path
            origins[key] = Path(row["run"]) / "leaderboard.csv" if row["run"] else path
            rows.append(row)
    notes = [f"{configs[0]} appears in {first} and {second}: kept the first" if len(configs) == 1 else
             f"{len(configs)} configurations (e.g. {configs[0]}) appear in {first} and {second}: kept the first"
             for (first, second), configs in repeated.items()]
    return rows, notes, origins


def group_id(config: str) -> str:
    return re.sub(r"/seed=[^/]*$", "", config)


DATA_SEED = re.compile(r"/data_seed=([^/]*)")  # of a training line (probe.run writes it)


def replicates(training: str) -> str:
    """A training less its data seed: runs that differ only in the batch order (and, on a store
    without a valid split, the files held out) are replicates of one setup, pooled with the head
    seeds rather than competing with each other."""
    return DATA_SEED.sub("", training)


def unfinished_marker(training: str) -> str:
    """The '/unfinished=...' of a run trained on an unfinished store ('' for a finished one)."""
    found = re.search(r"/unfinished=[^/]*", training)
    return found.group() if found else ""


def _group(row: dict) -> tuple:
    """What rows of one configuration, up to the seeds (of the heads and the batch order), share:
    store, configuration and training."""
    return row["store_key"], group_id(row["config"]), replicates(row["training"])


def summarize(rows: list[dict]) -> list[dict]:
    """One row per configuration (and training) up to the seeds: mean and sd (ddof 1; none for one
    seed) of every metric, over head seeds and data seeds alike."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_group(row), []).append(row)
    summary = []
    for (store_key, config, training), members in groups.items():
        data_seeds = sorted({m.group(1) for r in members if (m := DATA_SEED.search(r["training"]))}, key=float)
        out = {"head": members[0]["head"], "config": config, "params": members[0]["params"], "layer": members[0]["layer"],
               "seeds": len(members), "data_seeds": ",".join(data_seeds), "store_key": store_key, "training": training}
        for column in metric_columns(members):
            values = np.array([m[column] for m in members], dtype=float)
            out[f"{column}_mean"] = math.fsum(values) / len(values)  # exactly rounded: equal seeds in any order tie exactly
            out[f"{column}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else None
        summary.append(out)
    metric = primary_of(rows)
    return sorted(summary, key=_rank(f"val_{metric}_mean"))


def diverged(rows: list[dict], metric: str, labels: dict[str, str]) -> list[str]:
    """Notes on configurations some of whose seeds diverged: their mean is NaN, so they are never
    selected, and without a word they would just drop out of the selection. `labels`: store_key ->
    the store's name, given where there are several stores; the training is named where there are
    several."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_group(row), []).append(row)
    trainings = {training for _, _, training in groups}
    notes = []
    for (store_key, config, training), members in groups.items():
        nan = [m for m in members if not math.isfinite(m[f"val_{metric}"])]
        if not nan:
            continue
        # A head that diverged scores NaN on every split; one with finite test figures did not: its
        # validation items leave the metric undefined (no class with both positive and negative items).
        undefined = sum(math.isfinite(m.get(f"test_{metric}", math.nan)) for m in nan)
        why = [f"{len(nan) - undefined} of {len(members)} seeds diverged (NaN validation {metric})"] * (len(nan) > undefined) + [
            f"{undefined} of {len(members)} seeds have a validation {metric} that their validation items leave undefined "
            f"(NaN, while the test {metric} is finite)"] * bool(undefined)
        where = (f" on {labels[store_key]}" if len(labels) > 1 else "") + (f" ({training})" if len(trainings) > 1 else "")
        notes.append(f"{config}{where}: {'; '.join(why)}, so its mean is NaN and it is not selected")
    return notes


def ties(summary: list[dict], metric: str, labels: dict[str, str]) -> list[str]:
    """Notes on selected configurations whose mean validation metric others of their head equal: the
    first by name was taken, which a reader would otherwise read as the best (a small validation
    split gives many such ties). Call after mark_selected."""
    notes = []
    for chosen in (r for r in summary if r["selected"]):
        key, value = (chosen["store_key"], unfinished_marker(chosen["training"]), chosen["head"]), chosen[f"val_{metric}_mean"]
        tied = [r for r in summary if r is not chosen and r[f"val_{metric}_mean"] == value
                and (r["store_key"], unfinished_marker(r["training"]), r["head"]) == key]
        if tied:
            where = f" on {labels[chosen['store_key']]}" if len(labels) > 1 else ""
            trainings = {r["training"] for r in [chosen, *tied]}

            def named(r: dict) -> str:  # one configuration in two trainings ties with itself but for the training
                return f"{r['config']} ({r['training']})" if len(trainings) > 1 else r["config"]
            notes.append(f"{chosen['head']}{where}: {len(tied) + 1} configurations tie at a mean validation {metric} of "
                         f"{_cell(value)}; {named(chosen)} is selected as the first by name, not as better than "
                         f"{listed([named(r) for r in tied], 3)} (more validation items would tell them apart)")
    return notes


def mark_selected(summary: list[dict], metric: str):
    """Flag the first configuration of each (store, head) in the summary, which comes ranked by mean
    validation metric (ties by configuration): model selection never looks at test. Trainings
    (optimizer, schedule, epochs...) compete like learning rates; runs on the store unfinished are
    selected apart, since they validate on other items. A run's best/HEAD.pt is one of the
    selected configuration's seeds (selected_rows). A head whose every configuration diverged (a NaN
    mean validation metric) has none: no weights worth saving, and nothing to report as its best."""
    seen = set()
    for row in summary:
        key = (row["store_key"], unfinished_marker(row["training"]), row["head"])
        row["selected"] = int(key not in seen and math.isfinite(row[f"val_{metric}_mean"]))
        seen.add(key)


def layer_wise(summary: list[dict], metric: str) -> list[dict]:
    """Of each store (its runs on it unfinished apart), head and layer, the configuration of best mean
    validation metric: where in the encoder each head finds what it needs, every layer with its own
    choice of learning rate and options (a head's one selection compares layers as it does rates).
    Empty unless some head trained on two layers of a store or more. `summary` comes ranked."""
    best: dict[tuple, dict] = {}
    for row in summary:
        if math.isfinite(row[f"val_{metric}_mean"]):
            best.setdefault((row["store_key"], unfinished_marker(row["training"]), row["head"], str(row["layer"])), row)
    swept = Counter((store, marker, head) for store, marker, head, layer in best if layer != ALL_LAYERS)
    return list(best.values()) if max(swept.values(), default=0) > 1 else []


def _layer_order(layer) -> float:
    """Layers by number; a multi-layer head's 'all' after them."""
    return math.inf if str(layer) == ALL_LAYERS else int(layer)


def plot_layers(best: list[dict], column: str, path: Path, panel_of=None, title: str | None = None):
    """The test metric of each head's best configuration at each layer (layer_wise), mean ± sd over
    seeds, a line per head; a multi-layer head, which reads every layer at once, a dashed level line."""
    from matplotlib.ticker import MaxNLocator

    fig, panels = panelled(best, panel_of)
    heads = head_colours(r["head"] for r in best)
    for ax, _, here in panels:
        layers = sorted({int(r["layer"]) for r in here if str(r["layer"]) != ALL_LAYERS})
        for head, colour in heads.items():
            mine = sorted((r for r in here if r["head"] == head), key=lambda r: _layer_order(r["layer"]))
            sd = f"{column}_sd"
            for r in mine:
                if str(r["layer"]) == ALL_LAYERS:
                    ax.axhline(r[f"{column}_mean"], color=colour, linestyle="--", linewidth=1.2, label=f"{head} (all layers)")
            per_layer = [r for r in mine if str(r["layer"]) != ALL_LAYERS]
            if per_layer:
                ax.errorbar([int(r["layer"]) for r in per_layer], [r[f"{column}_mean"] for r in per_layer],
                            yerr=[r[sd] or 0 for r in per_layer], color=colour, marker="o", capsize=3, label=head)
        ax.set_xlabel("layer")
        if layers:
            ax.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
        if 0 < len(layers) <= 16:  # the layers swept, and no others
            ax.set_xticks(layers)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_panelled(fig, panels, metric_words(column) + ", mean ± sd over seeds", title, path)


def layer_table(best: list[dict], labels: dict[str, str], metric: str) -> tuple[list[dict], list[str]]:
    """layer_wise's test figures as table rows: a row per head (and store), a column per layer."""
    layers = sorted({str(r["layer"]) for r in best}, key=_layer_order)
    cells: dict[tuple, dict[str, str]] = {}
    for r in best:
        cells.setdefault((r["head"], store_column(r, labels)), {})[str(r["layer"])] = _with_sd(r, f"test_{metric}")
    several = len({store for _, store in cells}) > 1
    named = {layer: "all layers" if layer == ALL_LAYERS else f"layer {layer}" for layer in layers}
    rows = [{"head": head, "store": store} | {named[layer]: by_layer.get(layer, "") for layer in layers}
            for (head, store), by_layer in sorted(cells.items())]
    return rows, ["head", *(["store"] if several else []), *named.values()]


def best_seeds(summary: list[dict], rows: list[dict]) -> dict[tuple, dict]:
    """Of each configuration the summary marks selected, keyed as _group, the seed that did best on validation."""
    chosen = {(r["store_key"], r["config"], r["training"]) for r in summary if r["selected"]}
    best = {}
    for row in ranked(rows, primary_of(rows)):
        if _group(row) in chosen:
            best.setdefault(_group(row), row)
    return best


def selected_rows(rows: list[dict]) -> dict[str, dict]:
    """For each head, of the configuration a report selects (mark_selected: the best mean validation
    over its seeds), the seed that did best on validation: the head a run saves as best/HEAD.pt."""
    summary = summarize(rows)
    mark_selected(summary, primary_of(rows))
    return {row["head"]: row for row in best_seeds(summary, rows).values()}


def _with_sd(row: dict, column: str) -> str:
    mean, sd = row[f"{column}_mean"], row[f"{column}_sd"]
    return _cell(mean) if sd is None else f"{_cell(mean)} ± {_cell(sd)}"


# What plans of runs from before --optimizer, --schedule and --final-norm trained with (checkpoints, config.json).
EARLIER_DEFAULTS = {"optimizer": "adamw", "schedule": "cosine", "final_norm": False}


def part_fields(record: dict) -> dict:
    """What the parts of one split sweep share, from a part's config.json: the store, the sweep (its
    ordered list of configurations included) and the training (less each part's own configurations)."""
    training = {k: v for k, v in (EARLIER_DEFAULTS | (record.get("training") or {})).items() if k != "configs"}
    return {"store_key": record.get("store_key"), "sweep": record.get("sweep"), "training": training}


def part_differences(theirs: dict, mine: dict, there: str = "there", here: str = "here") -> tuple[str, bool]:
    """What differs between two records of part_fields, in words ("lr [0.001] there, [0.003] here"),
    and whether the store is among it (then the advice is not "the same arguments": a store at the
    same path changes key when it is extracted again, or with --retry-failed)."""
    words, store = [], theirs.get("store_key") != mine.get("store_key")
    if store:
        words.append("the store (another one, or the same path changed since, e.g. by --retry-failed)")
    for group in ("sweep", "training"):
        theirs_now, mine_now = theirs.get(group) or {}, mine.get(group) or {}
        keys = [k for k in dict.fromkeys([*theirs_now, *mine_now]) if k != "store_key" and theirs_now.get(k) != mine_now.get(k)]
        if "configs" in keys and len(keys) > 1:  # the list of configurations follows from what else differs
            keys.remove("configs")
        words += [_configs_differ(theirs_now.get(key) or [], mine_now.get(key) or [], there, here) if key == "configs" else
                  f"{key} {_brief(theirs_now.get(key))} {there}, {_brief(mine_now.get(key))} {here}" for key in keys]
    return "; ".join(words), store


def _configs_differ(theirs: list, mine: list, there: str, here: str) -> str:
    if sorted(theirs) == sorted(mine):
        return "the same configurations in another order (heads or values given in another order), so split into other parts"
    extra = next((c for c in mine if c not in theirs), None) or next(c for c in theirs if c not in mine)
    return f"{len(theirs)} configurations {there}, {len(mine)} {here} (one not in both: {extra})"


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_parts_agree(run: Path):
    """Parts of one split sweep (RUN/part-I-of-N/) must have run the same sweep on the same store
    with the same training: a part resubmitted after an edit of the sweep would otherwise be
    ranked beside the others as if comparable. Raises ValueError naming the part and the fields."""
    first = None
    for part in sorted(Path(run).glob("part-*-of-*")):
        try:
            record = json.loads((part / "config.json").read_text())
        except (OSError, ValueError):  # not started, or not finished writing: missing_parts tells
            continue
        shown = part_fields(record)
        if first is None:
            first = (part, shown)
            continue
        if shown != first[1]:
            differ, store = part_differences(first[1], shown, f"in {first[0].name}", f"in {part.name}")
            raise ValueError(f"{part} differs from {first[0].name} ({differ}): their results are not comparable; "
                             + ("train the parts again on one store" if store else "rerun it with the same arguments as the other parts"))


def saved_head(leaderboard: Path, row: dict) -> Path | None:
    """The file beside `leaderboard` that holds `row`'s weights: its run's (or part's) best/HEAD.pt,
    if that is the best of this configuration rather than of another of the run's."""
    from tokens.extract.checkpoints import CheckpointError, load_tensors  # torch: only when there are heads

    path = leaderboard.parent / "best" / f"{row['head']}.pt"
    try:
        saved = load_tensors(path)
    except (CheckpointError, OSError):  # none, or not a head of ours
        return None
    ours = isinstance(saved, dict) and (saved.get("store_key"), saved.get("config")) == (row["store_key"], row["config"])
    return path if ours else None


def _named(row: dict) -> str:
    """A row's configuration, and its data seed and final norm where the training names them: what
    trains it again."""
    data_seed = DATA_SEED.search(row["training"])
    named = row["config"] + (f" with --data-seed {data_seed.group(1)}" if data_seed else "")
    return named + (" with --final-norm" if "final_norm" in row["training"].split("/") else "")  # an /unfinished= may follow


def point_at_saved_heads(summary: list[dict], rows: list[dict], origins: dict[tuple, Path]) -> list[str]:
    """Set each selected configuration's `saved_head`: the file holding its best seed by validation,
    as a run's best/HEAD.pt holds it, else the best seed that some run saved (runs pooled over data
    seeds each save the best of their own), or "" where none did; lines that say which.
    `origins`: the leaderboard each row came from (merge)."""
    by_rank = ranked(rows, primary_of(rows))
    lines = []
    for row in summary:
        row["saved_head"] = ""
        if not row["selected"]:
            continue
        seeds = [r for r in by_rank if _group(r) == (row["store_key"], row["config"], row["training"])]  # best first
        found = next(((r, path) for r in seeds if (path := saved_head(origins[(r["store_key"], r["config"], r["training"])], r))), None)
        if found:
            saved, path = found
            row["saved_head"] = str(path)
            other = "" if saved is seeds[0] else f"; its best seed, {_named(seeds[0])}, was saved by no run"
            lines.append(f"{row['head']}: {path} ({_named(saved)}{other})")
        else:
            lines.append(f"{row['head']}: {_named(seeds[0])} is in no best/ folder of these runs (each run or part saves the best "
                         "of its own configurations only): train it alone, with the values its name gives")
    return lines


class OutputError(Exception):
    """The report's folder cannot be made, or is a run's; the message names it."""


def check_report_folder(runs: list[Path], out: Path):
    """A report's leaderboard.csv would replace a run's own, which its heads/ and best/ match."""
    if (out / "config.json").exists() or part_folders(out):
        raise OutputError(f"{out} is a probe run: the report would replace its leaderboard.csv; give the report a folder of its own")
    for run in runs:
        folder = Path(run) if Path(run).is_dir() else Path(run).parent
        if folder.exists() and out.exists() and out.samefile(folder):
            raise OutputError(f"{out} holds {run}'s leaderboard.csv, which the report would replace; give the report a folder of its own")


def store_column(row: dict, labels: dict[str, str]) -> str:
    """The store a row's figures go under in a table: its name, and its runs on it unfinished apart."""
    marker = unfinished_marker(row["training"]).removeprefix("/")
    return labels[row["store_key"]] + (f" ({marker})" if marker else "")


def side_by_side(summary: list[dict], labels: dict[str, str], metric: str) -> str:
    """The selected configurations' test figures as a Markdown table of heads by stores: encoders
    compared at a glance (a store's runs on it unfinished get a column of their own)."""
    cells: dict[str, dict[str, str]] = {}
    for row in summary:
        if row["selected"]:
            cells.setdefault(row["head"], {})[store_column(row, labels)] = _with_sd(row, f"test_{metric}")
    stores = sorted({store for by_store in cells.values() for store in by_store})
    rows = [{"head": head} | {store: by_store.get(store, "") for store in stores} for head, by_store in sorted(cells.items())]
    return f"Test {METRIC_NAMES.get(metric, metric)} of the selected configurations, mean ± sd over seeds:\n\n" + table(rows, ["head", *stores], markdown=True)


def write_report(runs: list[Path], out: Path) -> str:
    """Merge `runs` into `out`; return the summary table as text. Rows of runs on different
    stores would look alike, so the table and report.md then name each row's store."""
    for run in runs:
        if not Path(run).exists():
            raise FileNotFoundError(f"{run}: no such run directory or leaderboard.csv")
        check_parts_agree(run)
    check_report_folder(runs, out)
    found = {run: find_leaderboards(run) for run in runs}
    paths = [p for run in runs for p in found[run]]
    if not paths:
        started = [str(run) for run in runs if (Path(run) / "checkpoint.pt").exists() or any(Path(run).glob("part-*/checkpoint.pt"))]
        raise FileNotFoundError(f"no leaderboard.csv in {', '.join(map(str, runs))}" + (
            f": {', '.join(started)} {'holds a sweep' if len(started) == 1 else 'hold sweeps'} not finished (checkpoint.pt); "
            "run the same `tokens probe` command again to finish" if started else ""))
    rows, notes, origins = merge(paths)
    unfinished = [note for run in runs for note in missing_parts(run) or
                  ([] if found[run] else [f"{run}: no leaderboard.csv yet (not finished); the report leaves it out"])]
    notes += unfinished
    metric = primary_of(rows)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot make the folder {out}: {error.strerror or error}") from None
    write_csv(out / "leaderboard.csv", [r | {"run": origins[(r["store_key"], r["config"], r["training"])].parent.resolve()} for r in ranked(rows, metric)],
              leaderboard_columns(rows) + ["run"])
    summary = summarize(rows)
    mark_selected(summary, metric)
    heads_to_use = point_at_saved_heads(summary, rows, origins)
    metrics = metric_columns(rows)
    labels = store_labels(list(dict.fromkeys(origins.values())), list(dict.fromkeys(r["store_key"] for r in rows)))
    notes += diverged(rows, metric, labels) + ties(summary, metric, labels)
    columns = (["head", "config", "params", "seeds", "selected"] + [f"{m}_{s}" for m in metrics for s in ("mean", "sd")]
               + ["store", "store_key", "training", "data_seeds", "saved_head"])
    write_csv(out / "report.csv", [r | {"store": labels[r["store_key"]]} for r in summary], columns)
    shown = [{"head": r["head"], "config": r["config"], "store": labels[r["store_key"]], "training": r["training"],
              "params": r["params"], "seeds": r["seeds"]} | {m: _with_sd(r, m) for m in metrics} for r in summary]
    trainings = {r["training"] for r in summary}
    chosen = [row for row, r in zip(shown, summary) if r["selected"]]
    partial = [t for t in trainings if unfinished_marker(t)]
    shown_columns = (["head", "config"] + (["store"] if len(labels) > 1 else []) + (["training"] if len(trainings) > 1 or partial else [])
                     + ["params", "seeds"] + metrics)
    apart = " and store" if len(labels) > 1 else ""
    apart += " (a store's runs on it unfinished apart)" if partial else ""
    why = (f"One configuration per head{apart}: the best mean validation {metric}. "
           "Its test figures are the ones to report; the other rows' test figures were not used to choose.")
    why = "".join(f"**Note:** {note}\n\n" for note in notes if note not in unfinished) + why  # as said in the terminal
    if unfinished:  # in the file too: a report read later must not pass for the finished sweep's
        why = f"**Unfinished:** {'; '.join(unfinished)}. The selection may change once they finish.\n\n{why}"
    if partial:
        caution = ("rows whose training says unfinished= were trained and scored on the shards of an unfinished "
                   "store; they are selected apart, and their figures are not comparable with a finished store's")
        why = f"**Unfinished store:** {caution}.\n\n{why}"
        notes.append(caution)
    saved = "Saved weights of each one's best seed by validation:\n\n" + "\n".join(f"- {line}" for line in heads_to_use) + "\n\n" if heads_to_use else ""
    compared = f"{side_by_side(summary, labels, metric)}\n\n" if len(labels) > 1 else ""
    selected = table(chosen, shown_columns, markdown=True) if chosen else f"No configuration is selected: every one's mean validation {metric} is NaN."
    by_layer = layer_wise(summary, metric)
    layer_rows, layer_columns = layer_table(by_layer, labels, metric)
    layer_section = (f"## By layer\n\nTest {METRIC_NAMES.get(metric, metric)} of each head's best configuration at each layer, "
                     f"selected by validation at that layer, mean ± sd over seeds (layers.png):\n\n"
                     f"{table(layer_rows, layer_columns, markdown=True)}\n\n") if by_layer else ""
    (out / "report.md").write_text(f"## Selected by validation\n\n{why}\n\n{compared}{selected}\n\n"
                                   f"{saved}{layer_section}## All configurations\n\n{table(shown, shown_columns, markdown=True)}\n")

    # A store, and a training setup, per panel where there are several; of the setup, a panel's title
    # shows what not all of them share (epochs=3 against epochs=12), not the whole line.
    shared = set.intersection(*(set(training.split("/")) for training in trainings))
    # a setup with nothing of its own (the others add fields to it) is shown whole
    setup = {training: ", ".join(field for field in training.split("/") if field not in shared) or training for training in trainings}

    def panel_of(row: dict) -> str | None:
        parts = ([labels[row["store_key"]]] if len(labels) > 1 else []) + ([setup[row["training"]]] if len(trainings) > 1 else [])
        return ", ".join(part for part in parts if part) or None

    plot_params_vs_metric(summary, f"test_{metric}_mean", out / "report.png", sd_column=f"test_{metric}_sd", title=f"{out.resolve().name}: each configuration over its seeds",
                          chosen=[r for r in summary if r["selected"]], panel_of=panel_of)
    (out / "layers.png").unlink(missing_ok=True)  # an earlier report's, of other runs, would pass for this one's
    if by_layer:
        def store_of(row: dict) -> str | None:
            marker = unfinished_marker(row["training"]).removeprefix("/")
            return ", ".join(([labels[row["store_key"]]] if len(labels) > 1 else []) + [marker] * bool(marker)) or None

        plot_layers(by_layer, f"test_{metric}", out / "layers.png", panel_of=store_of,
                    title=f"{out.resolve().name}: each head's best on validation at each layer")
    lines = [f"note: {n}" for n in notes] + [f"{len(rows)} configuration{'s' * (len(rows) != 1)} from {len(paths)} leaderboard{'s' * (len(paths) != 1)}"]
    lines.append(table(shown, shown_columns))
    if not chosen:
        lines += ["", f"no configuration is selected: every one's mean validation {metric} is NaN (see the notes above)"]
    elif len(chosen) < len(shown):
        lines += ["", f"selected by validation {metric}, one per head{' and store' if len(labels) > 1 else ''}:", table(chosen, shown_columns)]
    if by_layer:
        lines += ["", f"best on validation at each layer, test {metric} (layers.png):", table(layer_rows, layer_columns)]
    if heads_to_use:
        lines += ["", "saved weights of each one's best seed:"] + [f"  {line}" for line in heads_to_use]
    return "\n".join(lines)
