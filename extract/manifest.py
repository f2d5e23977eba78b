"""Read a dataset description, check all of it, and plan the items the extractor will encode.

A dataset is a CSV or JSONL manifest (columns `path`, `labels` or `label`, `split`, optional `id`,
`start`, `end`) or a folder laid out as ROOT/<split>/<class>/<file>. Every problem is collected and
raised together in one ManifestError before anything is decoded, so the user fixes the manifest in
one pass instead of discovering one mistake per hour of extraction. Problems are located by the
line number of the file, as an editor shows it: a CSV header is line 1, so its first row is line 2.

A missing file is a manifest problem (the user can fix it before any work); a file that exists but
cannot be decoded is not: it stays an item, and the extractor records it as failed and goes on.
"""

import codecs
import csv
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import soundfile as sf
from tqdm import tqdm

from tokens.cache.store import is_token_store, listed
from tokens.cluster import usable_cores
from tokens.extract.workers import signals_held, start_checking_worker, stop_checking_workers

SPLITS = ("train", "valid", "test")
OUTSIDE_FIX = " (the manifest's folder): keep the manifest at or above the files it lists, or link their folder into its own"
# Split names other tools and datasets use, and ours they stand for: said beside the refusal.
SPLIT_NAMES_MEANT = {"val": "valid", "validation": "valid", "dev": "valid", "development": "valid",
                     "training": "train", "testing": "test",
                     **{name: name for name in ("train", "valid", "test")}}  # other case, or spaces around
COLUMNS = ("path", "labels", "label", "split", "id", "start", "end")  # what a manifest's rows may say
# A recording's last partial window becomes an item only if it holds at least this fraction of a
# window: a 0.3 s tail padded to 10 s is mostly padding and adds little but cost. A recording
# shorter than one window is always kept whole.
MIN_LAST_WINDOW = 0.1
# Checking a row (path, file header) costs about 0.1 ms: large datasets are checked in worker
# processes, CHUNK_ROWS at a time. On the 2-core machine 8 192 rows take 0.47 s that way against 0.65 s
# in one process, and 2 048 rows the same either way: below PARALLEL_ROWS it is not worth it.
PARALLEL_ROWS = 4096
CHUNK_ROWS = 1024
# In class folders, the files the decoders read, by suffix, as torchvision's ImageFolder picks its
# files: notes, label lists or cover pictures kept beside the clips are skipped (and counted), not
# made into failed items. Audio: each format libsndfile reads under its own name, and the other
# suffixes those formats go by (RAW has no header to read); images: every format Pillow opens, but
# for its stubs (HDF5, GRIB, BUFR), which recognise a file and cannot decode it: an .h5 token store
# kept beside the pictures is not a picture.
AUDIO_SUFFIXES = frozenset({f".{name.lower()}" for name in sf.available_formats() if name != "RAW"}
                           | {".wave", ".aif", ".aifc", ".snd", ".oga", ".opus", ".sph", ".sf", ".mat", ".8svx", ".iff"})


class ManifestError(ValueError):
    """Every problem found in a dataset description, one per line, raised before any work. Past
    SHOWN problems the message lists the first ones and counts the rest by kind: a manifest of a
    million rows with one wrong split name would print a million lines, the first scrolled away."""

    SHOWN = 50

    def __init__(self, source: Path, problems: list[str]):
        # by line, as the file reads (a duplicate id is found after every row's own check); the file's own first
        problems = sorted(problems, key=lambda p: int(m[1]) if (m := re.match(r"line (\d+): ", p)) else 0)
        self.problems = problems
        listing = "\n".join(f"  {p}" for p in problems[: self.SHOWN])
        if len(problems) > self.SHOWN:
            kinds = Counter(_kind(p) for p in problems[self.SHOWN :])
            top = kinds.most_common(5)
            listing += f"\n  ... and {len(problems) - self.SHOWN} more, of which:" + "".join(f"\n    {count} x {kind}" for kind, count in top)
            if len(kinds) > 5:
                listing += f"\n    {kinds.total() - sum(count for _, count in top)} of {len(kinds) - 5} other kinds"
        super().__init__(f"{source}: {len(problems)} problem(s); fix them and run again:\n{listing}")


def _kind(problem: str) -> str:
    """A problem less what differs from row to row (its line, quoted values, a missing file's path),
    so that problems of one kind are counted together: "unknown split '…' (use train, valid or test)"."""
    kind = re.sub(r"^line \d+: ", "", problem)
    kind = re.sub(r"(file not found): .*", r"\1", kind)
    kind = re.sub(r"\(also line \d+\)", "(also line …)", kind)
    return re.sub(r"'[^']*'", "'…'", kind)


@dataclass(frozen=True)
class Item:
    """One unit of work: a whole image, or one window of an audio recording."""

    id: str
    path: Path  # absolute
    source: str  # the path relative to the dataset root, "/"-separated: what the store records
    offset: float  # seconds into the file; 0 for images
    duration: float | None  # seconds to read; None: to the end (images, audio of unknown length)
    split: str
    labels: list[int]  # indices into Dataset.classes


@dataclass
class Dataset:
    """The planned items of each split, with the label space they refer to."""

    root: Path  # the folder that item paths are relative to
    task: str  # "multilabel" or "multiclass"
    classes: list[str]
    splits: dict[str, list[Item]]  # only the splits that have items, in SPLITS order
    sample_rate: int | None  # the rate audio items are decoded at; None for images
    notes: list[str] = field(default_factory=list)  # what was left out without being a problem, for the user to see

    def fingerprint(self) -> str:
        """SHA-256 of everything that decides what is stored and how it is labelled (cache key)."""
        items = [
            [it.split, it.id, it.source, it.offset, it.duration, it.labels]
            for items in self.splits.values()
            for it in items
        ]
        text = json.dumps({"task": self.task, "classes": self.classes, "items": items}, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class _Row:
    """A manifest row that passed every check."""

    where: str  # "line 7" or, for class folders, the file's relative path
    rel: str  # path relative to the dataset root, "/"-separated
    path: Path
    split: str
    labels: list[str]
    id: str | None
    start: float
    end: float | None


def read_dataset(
    source: str | Path,
    *,
    window_seconds: float | None,
    sample_rate: int | None,
    modality: str,
    classes: list[str] | None = None,
    progress: bool = False,
    store: str | Path | None = None,
) -> Dataset:
    """Check a manifest or class-folder tree and expand it into items.

    Audio longer than `window_seconds` is cut into windows (see MIN_LAST_WINDOW for the tail);
    durations come from file headers, nothing is decoded. `classes` fixes the label space when
    resuming into an existing store: a label outside it is a problem. `progress` shows a bar: the
    files of a large dataset take minutes to check. `store`: the store being filled, left out of a
    class-folder tree that holds it.
    """
    if modality not in ("audio", "image"):
        raise ValueError(f"modality must be 'audio' or 'image', not {modality!r}")
    if modality == "audio" and not sample_rate:
        raise ValueError("audio needs the sample_rate its encoder expects")
    if window_seconds is not None and window_seconds <= 0:
        raise ValueError(f"window_seconds must be positive, not {window_seconds}")
    source = Path(source).absolute()
    columns, records, problems, notes = _read(source, store, modality)
    _check_columns(columns, modality, problems, notes)
    root = (source if source.is_dir() else source.parent).resolve()
    window = window_seconds if modality == "audio" else None
    with tqdm(total=len(records), desc="checking the dataset", unit="row", disable=not progress, leave=False) as bar:
        task, rows = _check(root, columns, records, classes, problems, notes, modality == "audio", window, bar)

    names = list(classes) if classes is not None else sorted({name for row, _ in rows for name in row.labels})
    if rows and not names:
        problems.append("no row has a label: a store needs at least one class")
    index = {name: i for i, name in enumerate(names)}
    splits: dict[str, list[Item]] = {split: [] for split in SPLITS}
    first_row_of: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    for row, windows in rows:
        labels = sorted({index[name] for name in row.labels})
        for n, (offset, duration) in enumerate(windows):
            item_id = _item_id(row, offset, first=n == 0)
            if first_row_of.setdefault(item_id, row.where) != row.where:
                fix = "" if row.id else ": a file listed twice, or rows of one file (cut by start/end) that need an id column to tell them apart"
                duplicates.setdefault(row.where, f"duplicate id {item_id!r} (also {first_row_of[item_id]}){fix}")
            splits[row.split].append(Item(item_id, row.path, row.rel, offset, duration, row.split, labels))
    problems += [f"{where}: {problem}" for where, problem in duplicates.items()]
    if problems:
        raise ManifestError(source, problems)
    notes += _leaks(splits) + _unlearnable(splits, names) + _unprobeable(splits) + _case_clashes(names) + _joined_labels(task, names)
    return Dataset(root, task, names, {s: items for s, items in splits.items() if items}, sample_rate, notes)


def _check_columns(columns: list[str], modality: str, problems: list[str], notes: list[str]):
    """Columns that are not read: one of ours in other case ('Start') is a problem, since reading it
    would change the items; others (a typo, metadata kept in the manifest) get a note."""
    known = {name.lower(): name for name in COLUMNS}
    unread = [name for name in columns if name not in COLUMNS and name]  # '': a spreadsheet's index column
    if miscased := [name for name in unread if name.lower() in known and known[name.lower()] not in columns]:
        problems += [f"column {name!r} is not read: the column is {known[name.lower()]!r} (lower case)" for name in miscased]
    elif unread:
        notes.append(f"column(s) {', '.join(map(repr, unread))} not read: the columns read are {', '.join(COLUMNS)}")
    if modality == "image" and (spans := [name for name in ("start", "end") if name in columns]):
        notes.append(f"column(s) {', '.join(spans)} not read: spans of time are for audio, and an image is taken whole")


def _leaks(splits: dict[str, list[Item]]) -> list[str]:
    """A note naming recordings with items in more than one split: a probe would be scored on parts of
    recordings it was trained on. (Rows may cut one file on purpose, so it is not a problem.)"""
    found: dict[str, list[str]] = {}
    for name, items in splits.items():
        for item in items:
            where = found.setdefault(item.source, [])
            if name not in where:
                where.append(name)
    shared = {source: names for source, names in found.items() if len(names) > 1}
    if not shared:
        return []
    source, names = next(iter(shared.items()))
    return [f"{len(shared)} recording(s) have items in more than one split (e.g. {source} in {' and '.join(names)}): "
            "a probe would be scored on parts of recordings it was trained on"]


def _unlearnable(splits: dict[str, list[Item]], classes: list[str]) -> list[str]:
    """A note naming classes that no train item holds: a probe cannot learn them."""
    if not splits["train"]:
        return []
    seen = {label for item in splits["train"] for label in item.labels}
    missing = [name for i, name in enumerate(classes) if i not in seen]
    return [f"class(es) {listed(missing)} have no train item: a probe cannot learn them"] if missing else []


def _case_clashes(classes: list[str]) -> list[str]:
    """A note on class names that differ only in case ('Dog', 'dog'): two classes, usually meant as one."""
    by_folded: dict[str, list[str]] = {}
    for name in classes:
        by_folded.setdefault(name.casefold(), []).append(name)
    clashes = [" and ".join(map(repr, names)) for names in by_folded.values() if len(names) > 1]
    return [f"class names differ only in case, and are different classes: {listed(clashes)}"] if clashes else []


def _joined_labels(task: str, classes: list[str]) -> list[str]:
    """A note on multi-class names holding ';': the `label` column takes one class per row, so
    'dog;cat' became a class of its own, where a `labels` column would have made it two."""
    joined = [name for name in classes if ";" in name] if task == "multiclass" else []
    return [f"class names hold ';' ({listed([repr(n) for n in joined])}): the label column takes one class per row, so each "
            "is a class of its own; for several classes per row, name the column labels (multi-label)"] if joined else []


def _unprobeable(splits: dict[str, list[Item]]) -> list[str]:
    """A note when train or test has no item: `tokens probe` refuses such a store, and a store
    takes no new rows later, so this is the moment to add them."""
    missing = [name for name in ("train", "test") if not splits[name]]
    if not missing:
        return []
    return [f"no {' or '.join(missing)} rows: `tokens probe` trains on train and scores on test, and refuses a store "
            f"without them; a store takes no rows later, so add them before extracting"]


def _suffixes(modality: str) -> frozenset[str]:
    """The file suffixes a class folder's items may have."""
    if modality == "audio":
        return AUDIO_SUFFIXES
    from PIL import Image, ImageFile

    Image.init()
    stubs = {kind for kind, (factory, _) in Image.OPEN.items() if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)}
    return frozenset(suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN and kind not in stubs)


def _read(source: Path, store: str | Path | None, modality: str) -> tuple[list[str], list[tuple[str, dict]], list[str], list[str]]:
    """Columns, (location, record) pairs, reading problems and notes of any supported source."""
    if source.is_dir():
        return _read_folders(source, store, _suffixes(modality))
    if not source.is_file():
        raise ManifestError(source, ["no such file or folder"])
    if source.suffix.lower() == ".csv":
        return *_read_csv(source), []
    if source.suffix.lower() in (".jsonl", ".ndjson"):
        return *_read_jsonl(source), []
    raise ManifestError(source, ["not a .csv or .jsonl manifest, nor a folder of <split>/<class>/ files"])


def _text_of(source: Path) -> str:
    """The manifest's text; one that is not UTF-8 is refused naming the line, not with a codec's message."""
    data = source.read_bytes().removeprefix(codecs.BOM_UTF8)  # Excel writes a byte-order mark
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ManifestError(source, [f"line {line}: byte 0x{data[error.start]:02x} is not UTF-8 text; save the manifest as UTF-8"]) from None


def _read_csv(source: Path) -> tuple[list[str], list[tuple[str, dict]], list[str]]:
    records, problems = [], []
    reader = csv.reader(io.StringIO(_text_of(source), newline=""))
    header = [name.strip() for name in next(reader, [])]
    while header and not header[-1]:  # a trailing comma
        header.pop()
    twice = sorted({name for name in header if header.count(name) > 1 and name})
    if twice:
        problems.append(f"line 1: the header names {', '.join(map(repr, twice))} more than once")
    line = reader.line_num + 1  # a quoted field may span lines: a row starts after the last one
    try:
        for values in reader:
            while len(values) > len(header) and not values[-1].strip():  # trailing commas
                values.pop()
            # A short row leaves its last columns empty (optional ones left off the end), unless it cuts
            # off one no row may leave empty: then the count says what is wrong, not "unknown split ''".
            # (A row over several lines is a quote never closed, which the check of its path names.)
            short = (len(values) < len(header) and reader.line_num == line
                     and not {"path", "split", "label"}.isdisjoint(header[len(values):]))
            blank = not any(value.strip() for value in values)
            if not blank and (len(values) > len(header) or short):
                problems.append(f"line {line}: {len(values)} fields but the header has {len(header)}")
            elif not blank:
                records.append((f"line {line}", dict(zip(header, values))))
            line = reader.line_num + 1
    except csv.Error as error:  # a field past the csv module's limit: most often a quote never closed
        problems.append(f"line {line}: {error} (a quote opened here and never closed?)")
    return header, records, problems


def _read_jsonl(source: Path) -> tuple[list[str], list[tuple[str, dict]], list[str]]:
    columns, records, problems = {}, [], []
    for line, text in enumerate(_text_of(source).split("\n"), 1):  # lines as an editor counts them
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"line {line}: not valid JSON ({e.msg})")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {line}: not a JSON object")
            continue
        columns.update(dict.fromkeys(record))
        records.append((f"line {line}", record))
    return list(columns), records, problems


def _read_folders(root: Path, store: str | Path | None, suffixes: frozenset[str]) -> tuple[list[str], list[tuple[str, dict]], list[str], list[str]]:
    """ROOT/<split>/<class>/<file> (files may sit deeper inside a class folder; linked folders and files
    are followed, as ImageFolder follows them). Hidden entries and token stores (the one being filled,
    and others kept in the dataset, as a first run's `--store ROOT/tiny.zarr`) are left out; so are
    files without one of `suffixes`, with a note that counts them."""
    records, problems, split_dirs, other_files, empty = [], [], [], [], []
    store = None if store is None else os.path.realpath(store)  # symbolic links and ".." as the filesystem sees them

    def is_store(path: Path) -> bool:
        return (store is not None and _within(os.path.realpath(path), store)) or is_token_store(path)

    def skipped(path: Path) -> bool:
        return path.name.startswith(".") or is_store(path)

    for split_dir in sorted(p for p in root.iterdir() if p.is_dir() and not skipped(p)):
        if split_dir.name not in SPLITS:
            meant = SPLIT_NAMES_MEANT.get(split_dir.name.lower().strip())
            problems.append(f"{split_dir.name}/: not a split folder (use train, valid or test{f'; rename it {meant}/?' if meant else ''})")
            continue
        split_dirs.append(split_dir)
        for class_dir in sorted(p for p in split_dir.iterdir() if not skipped(p)):
            if not class_dir.is_dir():
                problems.append(f"{split_dir.name}/{class_dir.name}: file outside a class folder")
                continue
            records_before = len(records)
            for file in _files(class_dir, skipped):
                rel = file.relative_to(root).as_posix()
                if file.suffix.lower() in suffixes:
                    records.append((rel, {"path": rel, "split": split_dir.name, "label": class_dir.name}))
                elif not is_store(file):  # only files of other kinds are looked into: a store has any name
                    other_files.append(rel)
            if len(records) == records_before:
                empty.append(f"{split_dir.name}/{class_dir.name}")
    if not split_dirs and (manifests := sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in (".csv", ".jsonl"))):
        problems.insert(0, f"no split folders, but a manifest at the top ({listed(manifests, 3)}): to read it, give the file "
                           f"({root / manifests[0]}) rather than its folder")
    elif not split_dirs and not problems and (loose := sorted(p for p in root.iterdir() if p.is_file() and not skipped(p))):
        problems.append(f"no split folders, but {len(loose)} file(s) at the top (e.g. {loose[0].name}): lay the folder out as "
                        "ROOT/<split>/<class>/<file> with splits train, valid, test, or give a manifest")
    notes = []
    if other_files and not records and not problems:
        problems.append(f"none of the {len(other_files)} files in the class folders has a suffix read here "
                        f"({listed(sorted(suffixes))}), e.g. {other_files[0]}")
    elif other_files:
        kinds = Counter(PurePosixPath(rel).suffix.lower() or "suffix-less" for rel in other_files)
        some = "1 file in the class folders is of another kind than those read here and is" if len(other_files) == 1 else \
            f"{len(other_files)} files in the class folders are of other kinds than those read here and are"
        notes.append(f"{some} left out ({', '.join(f'{n} {kind}' for kind, n in kinds.most_common())}; e.g. {other_files[0]})")
    if empty and records:
        notes.append(f"{len(empty)} class folder(s) hold no file read here, so add no item ({listed(empty)})")
    if split_dirs and (top := sorted(p.name for p in root.iterdir() if p.is_file() and not skipped(p) and p.suffix.lower() in suffixes)):
        notes.append(f"{len(top)} file(s) at the top of the folder, in no split or class folder, are left out ({listed(top, 3)})")
    return ["path", "label", "split"], records, problems, notes


def _files(folder: Path, skipped: Callable[[Path], bool]) -> list[Path]:
    """The files under `folder`, sorted, hidden ones left out, through linked folders too. A folder
    `skipped` says to leave out is not entered, nor one a link leads back into from below it (a loop).
    A link that leads nowhere is kept, for the row check to name it as such (shared storage not
    mounted) rather than let its items vanish."""
    files, chains = [], {str(folder): {os.path.realpath(folder)}}  # each folder's own and its parents' real paths
    for parent, folders, names in os.walk(folder, followlinks=True):
        chain = chains.pop(parent)
        kept = []
        for name in folders:
            path = os.path.join(parent, name)
            if (real := os.path.realpath(path)) not in chain and not skipped(Path(path)):
                kept.append(name)
                chains[path] = chain | {real}
        folders[:] = kept
        files += [Path(parent, name) for name in names if not name.startswith(".")]
    return sorted(files)


def _within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it (both real paths)."""
    return path == folder or path.startswith(folder + os.sep)


def _check(
    root: Path, columns: list[str], records: list[tuple[str, dict]], classes: list[str] | None, problems: list[str],
    notes: list[str], audio: bool, window: float | None, bar: tqdm,
) -> tuple[str, list[tuple[_Row, list]]]:
    """The task and the rows without problems with their (offset, duration) windows; every problem
    found is appended to `problems`, and a note on rows whose `end` lies past their file's to `notes`."""
    if not records and not problems:
        problems.append("no rows: the dataset is empty")
        return "", []
    missing = [repr(name) for name in ("path", "split") if name not in columns]
    if "labels" in columns and "label" in columns:
        problems.append("both 'labels' and 'label' columns: keep 'labels' (multi-label) or 'label' (multi-class)")
    elif "labels" not in columns and "label" not in columns:
        missing.append("'labels' (multi-label) or 'label' (multi-class)")
    if missing:
        found = f"the columns are {', '.join(map(repr, columns))}" if columns else "no columns were found"
        problems.append(f"missing required column(s): {', '.join(missing)} ({found})")
        return "", []
    task = "multilabel" if "labels" in columns else "multiclass"
    known = None if classes is None else set(classes)
    check = functools.partial(_check_records, root, task, known, audio, window)
    chunks = [records[i:i + CHUNK_ROWS] for i in range(0, len(records), CHUNK_ROWS)]
    workers = min(usable_cores(), len(chunks)) if len(records) >= PARALLEL_ROWS else 1
    rows, cut = [], []
    # fork, not spawn or forkserver: those re-run the top level of the user's script in every child
    # (a script that calls extract() without a __main__ guard would start its extraction again).
    # The extractor's GPU warm-up thread may run meanwhile; the children only read file headers and
    # never touch CUDA, so no lock that thread holds is needed in them.
    context = multiprocessing.get_context("fork")
    with (ProcessPoolExecutor(workers, mp_context=context, initializer=start_checking_worker)
          if workers > 1 else nullcontext()) as pool:
        try:
            with signals_held():  # map forks the pool's processes
                checked = pool.map(check, chunks) if pool else map(check, chunks)
            for chunk in checked:
                for row, row_problems, windows, past_the_end in chunk:
                    problems += [f"{row.where}: {p}" for p in row_problems]
                    if not row_problems:
                        rows.append((row, windows))
                    if past_the_end:
                        cut.append(f"{row.where}: {past_the_end}")
                bar.update(len(chunk))
        except BaseException:  # Ctrl-C: the chunks not started are dropped
            if pool:
                stop_checking_workers(pool)
            raise
    if cut:  # often a whole manifest's times in another unit, or files other than those annotated
        notes.append(f"{len(cut)} row(s) end past the end of their file and are cut there (e.g. {cut[0]})")
    return task, rows


def _check_records(root: Path, task: str, known: set[str] | None, audio: bool, window: float | None,
                   records: list[tuple[str, dict]]) -> list[tuple[_Row, list[str], list, str | None]]:
    """(row, its problems, its windows, how its `end` lies past its file's if it does) of each
    record; runs in worker processes for large datasets."""
    _names_by_nfc.cache_clear()  # folders may have changed since the last dataset was read
    _below.cache_clear()
    checked = []
    for where, record in records:
        row, problems = _check_row(root, where, record, task, known)
        windows, past_the_end = [], None
        if not problems and not audio and PurePosixPath(row.rel).suffix.lower() in AUDIO_SUFFIXES:
            problems.append(f"{row.rel} is audio, and this backbone reads images")  # not found after decoding them all
        if not problems:
            windows, past_the_end = _windows(row, window, problems) if audio else ([(0.0, None)], None)
        checked.append((row, problems, windows, past_the_end))
    return checked


@functools.lru_cache(maxsize=4096)
def _below(directory: str, root: str) -> str | None:
    """Where `directory` (absolute) lies inside the dataset folder `root` (a real path) when one of
    its parents is that folder reached through a link, as on clusters whose /scratch or /home is
    one: '' for the folder itself, 'a/b' below it; None when none of them is. Once per directory."""
    head, below = directory, []
    while True:
        try:
            if os.path.samefile(head, root):
                return "/".join(reversed(below))
        except OSError:  # not there
            pass
        parent, name = os.path.split(head)
        if parent == head:
            return None
        head = parent
        below.append(name)


def _check_row(root: Path, where: str, record: dict, task: str, known: set[str] | None) -> tuple[_Row, list[str]]:
    bad = []
    raw_path = _text(record.get("path"))
    # Plain strings rather than pathlib: this runs once per row, and millions of rows are common.
    full = os.path.normpath(os.path.join(root, raw_path))  # removes "..": the lexical check below needs that
    inside = os.path.join(root, "")  # the root with one trailing separator
    if os.path.isabs(raw_path) and not (full + os.sep).startswith(inside):
        below = _below(os.path.dirname(full), str(root))
        if below is not None:  # through a link to the dataset folder (/scratch -> /lustre/scratch, say)
            full = os.path.normpath(os.path.join(root, below, os.path.basename(full)))
    if not raw_path:
        bad.append("empty path")
    elif "\0" in raw_path:
        bad.append(f"path {raw_path!r} contains a NUL character")
    # Items are recorded by their path inside the folder, so the path as written must stay inside;
    # where a link inside leads (audio kept on shared storage) does not matter.
    elif not (full + os.sep).startswith(inside):
        bad.append(f"path {raw_path!r} leads outside the dataset folder {root}{OUTSIDE_FIX}")
    elif not os.path.isfile(full):
        if os.path.isdir(full):
            bad.append(f"{raw_path} is a folder, not a file")
        elif os.path.lexists(full):  # a named pipe, a device, or a link that loops or leads nowhere
            what = "a link that leads nowhere (or in a loop)" if os.path.islink(full) else "not a regular file (a pipe or a device)"
            bad.append(f"{raw_path} is {what}")
        elif "\n" in raw_path or "\r" in raw_path:  # what a CSV quote never closed swallows
            bad.append(f"file not found: {raw_path[:60]!r}... spans several lines: a quote opened on this line and never closed?")
        elif _renormalised(full, len(inside)):
            bad.append(f"file not found: {raw_path}, but a file of this name in another Unicode normalisation exists "
                       "(names copied from macOS are often NFD): rename it or the row")
        else:
            bad.append(f"file not found: {raw_path}")

    split = _text(record.get("split"))
    if split not in SPLITS:
        meant = SPLIT_NAMES_MEANT.get(split.lower().strip() if isinstance(split, str) else None)
        bad.append(f"unknown split {split!r} (use train, valid or test{f'; {meant} for this one?' if meant else ''})")

    column = "labels" if task == "multilabel" else "label"
    try:
        labels = _labels(record.get(column), task)
    except TypeError as error:
        labels = []
        bad.append(f"{column} {error}")
    else:
        if not labels and task == "multiclass":  # a multi-label clip may hold none of the classes
            bad.append("empty label")
        elif known is not None and (unknown := [name for name in labels if name not in known]):
            bad.append(f"label(s) not among the store's classes: {', '.join(unknown)}")

    start = _seconds(record.get("start"), "start", bad) or 0.0
    end = _seconds(record.get("end"), "end", bad)
    if end is not None and start >= end:
        bad.append(f"start {start:g} is not before end {end:g}")

    item_id = _text(record.get("id")) or None
    if item_id is not None and "\0" in item_id:  # HDF5 strings cannot hold one: refused for both formats
        bad.append(f"id {item_id!r} contains a NUL character")

    rel = "" if bad else full[len(inside):].replace(os.sep, "/")
    return _Row(where, rel, Path(full), split, labels, item_id, start, end), bad


def _renormalised(full: str, start: int) -> bool:
    """Whether a file exists at `full` once each name from `start` on is taken as on disk when only
    Unicode normalisation tells them apart ('café' in NFC, as typed, against NFD, as macOS writes it):
    the two print alike, so "file not found" alone would baffle. Asked only of a path not found."""
    if full[start:].isascii():  # names that only normalisation tells apart are not ASCII
        return False
    path = full[:start]
    for name in full[start:].split(os.sep):
        if not os.path.lexists(os.path.join(path, name)):
            name = _names_by_nfc(path).get(unicodedata.normalize("NFC", name))
            if name is None:
                return False
        path = os.path.join(path, name)
    return os.path.isfile(path)


@functools.lru_cache(maxsize=256)
def _names_by_nfc(folder: str) -> dict[str, str]:
    """A folder's entries by their NFC form: listed once for all the rows not found in it."""
    try:
        return {unicodedata.normalize("NFC", name): name for name in os.listdir(folder)}
    except OSError:
        return {}


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def _labels(value, task: str) -> list[str]:
    """Class names of one row: `;`-separated (or a JSON list) for multi-label, one name otherwise.
    A JSON value of another kind (an object, true, a list in a list) is a TypeError, not a name."""
    names = value if isinstance(value, list) and task == "multilabel" else [value]
    for name in names:
        if name is not None and (isinstance(name, bool) or not isinstance(name, (str, int, float))):
            raise TypeError(f"{value!r} is not {'a class name' if task == 'multiclass' else 'class names'} (text, or a list of text)")
    if task == "multiclass":
        return [name] if (name := _text(value)) else []
    names = value if isinstance(value, list) else _text(value).split(";")
    return [name for name in map(_text, names) if name]


def _seconds(value, name: str, bad: list[str]) -> float | None:
    text = _text(value)
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        bad.append(f"{name} {text!r} is not a number of seconds")
        return None
    if not math.isfinite(seconds) or seconds < 0:
        bad.append(f"{name} {text} is not a finite, non-negative number of seconds")
        return None
    return seconds


def _windows(row: _Row, window: float | None, bad: list[str]) -> tuple[list[tuple[float, float | None]], str | None]:
    """(offset, duration) pairs covering the row's span of its file, from the file's header only,
    and, when the row's `end` lies past the file's end, which it is clipped to, a phrase that says so.

    A file soundfile cannot open becomes one item, so that its failure is recorded once, later. A
    `start` at or past the file's end is a mistake in the row, appended to `bad` now rather than
    failing at extraction (the same test as load_window's, in frames); an empty recording with no
    `start` stays an item that fails.
    """
    try:
        with sf.SoundFile(str(row.path)) as audio:  # the header only; sf.info also formats names we do not use
            file_seconds = audio.frames / audio.samplerate
            starts_past = row.start > 0 and round(row.start * audio.samplerate) >= audio.frames
            ends_past = row.end is not None and round(row.end * audio.samplerate) > audio.frames
    except sf.SoundFileError:
        return [(row.start, None if row.end is None else row.end - row.start)], None
    if starts_past:
        bad.append(f"start {row.start:g} is not before the end of {row.rel} ({file_seconds:g} s)")
        return [], None
    past_the_end = f"end {row.end:g} is past the end of {row.rel} ({file_seconds:g} s)" if ends_past else None
    length = max(min(file_seconds, math.inf if row.end is None else row.end) - row.start, 0.0)
    if window is None:
        return [(row.start, round(length, 6))], past_the_end
    full = math.floor(length / window + 1e-9)
    spans = [(row.start + k * window, window) for k in range(full)]
    rest = length - full * window
    if full == 0 or rest >= MIN_LAST_WINDOW * window - 1e-9:  # 4.1 - 4 is 0.0999...: a tenth, as 2.1 - 2 is
        spans.append((row.start + full * window, rest))
    return [(round(offset, 6), round(duration, 6)) for offset, duration in spans], past_the_end


def _item_id(row: _Row, offset: float, first: bool) -> str:
    """The `id` column (windows after the first get `@<offset>`), else the relative path, with
    `@<offset>` for any window not at the start of the file."""
    seconds = f"{offset:.3f}".rstrip("0").rstrip(".")
    if row.id:
        return row.id if first else f"{row.id}@{seconds}"
    return row.rel if offset == 0 else f"{row.rel}@{seconds}"
