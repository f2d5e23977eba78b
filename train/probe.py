"""The probe recipe: train every configuration of a sweep together, in one pass over the data.

Each batch is read once from the store (every layer any head needs) and fed to every head in
turn. Heads share nothing else: each has its own optimizer and learning-rate schedule, its
own random state (seeded by its config's seed before it is built, and swapped in around its own
steps, so dropout draws do not depend on the other heads), and its own best epoch on the
validation split. The batch order depends only on the data seed, the epoch and the store's shard
size. So a head ends with the same weights whether it trains alone or in a sweep, and whichever
data mode feeds it.

After every epoch the whole state is written to RUN/checkpoint.pt (atomically), and a run
started again with the same sweep resumes from it and ends with the same results.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tokens import __version__
from tokens.cache.store import TokenStore
from tokens.cluster import cuda_float32
from tokens.extract.checkpoints import CheckpointError, load_tensors
from tokens.train import report
from tokens.train.data import HELD_OUT, SAMPLING, FinalNorm, Source, choose_mode, epoch_order, hold_out, split_bytes, usable_items
from tokens.train.heads import HEADS, build_head, count_parameters, shared_steps
from tokens.train.losses import DEFAULT_LOSS, make_loss
from tokens.train.metrics import compute_metrics, log_loss, primary_metric, undefined
from tokens.train.optim import lr_factor, make_optimizer
from tokens.train.sweep import Config, SweepError

HOLD_OUT = 0.1  # share of train used for validation when the store has no valid split


class TrainingFailed(Exception):
    """The sweep ran, and no head of it gave a number: not an option's fault, as a SweepError is."""


@dataclass
class Probe:
    """One configuration being trained: its head, optimizer, random state and best epoch so far."""

    config: Config
    head: nn.Module
    build: dict  # build_head arguments, to rebuild the head from a saved state dict
    optimizer: torch.optim.Optimizer
    rng: torch.Tensor
    best_state: dict | None = None
    best_metric: float = -math.inf
    best_loss: float = math.inf  # the best epoch's validation log loss: the tie-break between equal metrics
    best_epoch: int = 0
    val_metrics: dict | None = None  # validation metrics of the weights tested at the end
    curve: list = field(default_factory=list)  # validation metric per epoch


def build_args(config: Config, dim: int, num_classes: int, num_layers: int) -> dict:
    """`build_head` arguments of a configuration; multi-layer heads read every cached layer."""
    build = dict(name=config.head, dim=dim, num_classes=num_classes, **config.options)
    if HEADS[config.head].multi_layer:
        build.setdefault("num_layers", num_layers)
    return build


def build_probe(config: Config, dim: int, num_classes: int, num_layers: int, device: torch.device,
                optimizer: str = "adamw") -> Probe:
    """The head and its optimizer, initialised from the config's own seed only."""
    build = build_args(config, dim, num_classes, num_layers)
    torch.manual_seed(config.seed)
    head = build_head(**build).to(device)
    return Probe(config, head, build, make_optimizer(optimizer, head, config.lr, config.wd), rng=get_rng(device))


def get_rng(device: torch.device) -> torch.Tensor:
    """The state of the generator that dropout on `device` draws from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng(state: torch.Tensor, device: torch.device):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def layer_by_layer(layers: list) -> list[int]:
    """Indices of heads in an order that keeps heads of one layer together, so that they share the
    steps without parameters inside `shared_steps` (each head trains alone: the order changes no number)."""
    return sorted(range(len(layers)), key=lambda i: repr(layers[i]))


def head_inputs(head: nn.Module, layer, batch):
    """(tokens, mask, class token) as this head reads them from the shared batch."""
    if head.multi_layer:
        tokens, cls = batch.all_layers()
        return tokens, batch.mask, cls if head.uses_cls else None
    return batch.tokens.get(layer), batch.mask, batch.cls.get(layer) if head.uses_cls else None


@torch.no_grad()
def score(heads: list[tuple[nn.Module, object]], source: Source, items: np.ndarray, batch_size: int, task: str) -> list[np.ndarray]:
    """Log-probabilities (log-sigmoid multi-label, log-softmax multi-class) of every (head, layer) on
    `items`, in order, in float64: they rank items as the probabilities do, without the probabilities'
    ties at 1 (in float64, a sigmoid is exactly 1 above a logit of about 37) at the top of the
    ranking, where average precision weighs most; the metrics only rank.

    A batch's scores of all heads come to the CPU in one copy: one wait for the device per
    batch, not one per head and batch."""
    for head, _ in heads:
        head.eval()
    outputs = [[] for _ in heads]
    for batch in source.batches(items, batch_size):
        scores = [None] * len(heads)
        with shared_steps():
            for i in layer_by_layer([layer for _, layer in heads]):
                head, layer = heads[i]
                logits = head(*head_inputs(head, layer, batch)).double()
                scores[i] = nn.functional.logsigmoid(logits) if task == "multilabel" else logits.log_softmax(-1)
        for out, head_scores in zip(outputs, torch.stack(scores).cpu().numpy()):
            out.append(head_scores)
    return [np.concatenate(out) for out in outputs]


def classes_missing(task: str, train_labels: np.ndarray, valid_labels: np.ndarray, classes: list[str]) -> list[str]:
    """Classes some train item holds and no validation item does: a metric on those items ignores
    them, and a few files held out of a small train split often leave some out."""
    def present(y):
        return y.astype(bool).any(0) if task == "multilabel" else np.bincount(y.astype(int), minlength=len(classes)) > 0
    return [c for c, trained, validated in zip(classes, present(train_labels), present(valid_labels)) if trained and not validated]


def _state(module: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def save_checkpoint(path: Path, plan: dict, epoch: int, probes: list[Probe], step: int = 0):
    """Everything needed to continue after `epoch` epochs and `step` batches of the next, written
    aside then renamed into place."""
    state = {
        "plan": plan,
        "epoch": epoch,
        "step": step,
        "probes": [
            {
                "head": p.head.state_dict(),
                "optimizer": p.optimizer.state_dict(),
                "rng": p.rng,
                "best_state": p.best_state,
                "best_metric": p.best_metric,
                "best_loss": p.best_loss,
                "best_epoch": p.best_epoch,
                "val_metrics": p.val_metrics,
                "curve": p.curve,
            }
            for p in probes
        ],
    }
    save_aside(state, path)


class WriteFailed(Exception):
    """A checkpoint or head could not be written (a full disk, a quota); the file it replaces is whole."""


def save_aside(obj, path: Path):
    """torch.save, written aside and renamed into place (see report.written_aside). torch tells a
    failed write as a RuntimeError ('unexpected pos 65536 vs 65428'): it is named as one here."""
    try:
        with report.written_aside(path) as aside:
            torch.save(obj, aside)
    except (OSError, RuntimeError) as error:
        free = shutil.disk_usage(path.parent).free
        raise WriteFailed(f"cannot write {path} ({free / 2**20:.1f} MiB free on its disk; {error})") from error


def unfinished_shards(done: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """{split: [shards written, shards]} of the splits whose completion marks (`done`) are not all set."""
    return {name: [int(shards.sum()), len(shards)] for name, shards in done.items() if not shards.all()}


def described(unfinished: dict[str, list[int]]) -> str:
    """'train 2 of 3 shards, test 1 of 2 shards'."""
    return ", ".join(f"{name} {written} of {total} shards" for name, (written, total) in unfinished.items())


def _has_results(folder: Path) -> bool:
    """Whether a run folder holds a checkpoint or results (more than a config.json of a run stopped
    before its first epoch)."""
    return any((folder / name).exists() for name in ("checkpoint.pt", *RESULTS))


def _with_default_loss(training: dict, task: str) -> dict:
    """A recorded training plan with the default loss named: earlier versions saved it as ""."""
    return training | {"loss": DEFAULT_LOSS[task]} if training.get("loss") == "" else training


def training_plan(store: TokenStore, configs: list[Config], *, epochs: int, batch_size: int, warmup_epochs: float,
                  optimizer: str, schedule: str, loss: str | None, data_seed: int, final_norm: bool = False) -> dict:
    """What a checkpoint must agree on to be resumed (the data mode and device may change), less
    the store's unfinished shards, which a run adds when it trains on them."""
    return {"configs": [c.id for c in configs], "epochs": epochs, "batch_size": batch_size,
            "warmup_epochs": warmup_epochs, "optimizer": optimizer, "schedule": schedule,
            "loss": loss or DEFAULT_LOSS[store.task], "data_seed": data_seed, "final_norm": final_norm,
            "sampling": SAMPLING, "store_key": store.meta["cache_key"]} | ({} if "valid" in store.splits else {"held_out": HELD_OUT})


def recorded_norm(store: TokenStore, device: torch.device) -> FinalNorm:
    """The store's final norm for --final-norm, or a SweepError saying why it has none to apply."""
    try:
        return FinalNorm.recorded(store.meta, device)
    except ValueError as error:
        raise SweepError(f"{store.path}: {error}", "--final-norm") from None


def check_earlier_runs(out: Path, count: int, record: dict, task: str, unfinished: dict, allow_incomplete: bool):
    """Before a job array is submitted: the run directory's whole sweep (count 1) or parts (count N)
    with results or a checkpoint must be of this store and training, and parts of this sweep as
    well (`record`: store_key, sweep, training, as a run records them), or every task would refuse
    them when it starts. A run trained on the store unfinished resumes only with --allow-incomplete
    and the same shards, which the store, only ever gaining shards, must have now (`unfinished`).
    A run whose record cannot be read is left to the task to judge."""
    def fields(record: dict) -> dict:
        found = report.part_fields(record)
        found["training"] = {k: v for k, v in _with_default_loss(found["training"], task).items() if k != "unfinished"}
        return found if count > 1 else {name: found[name] for name in ("store_key", "training")}

    mine = fields(record)
    for folder in [out] if count == 1 else sorted(out.glob(f"part-*-of-{count}")):
        if not _has_results(folder):
            continue
        try:
            earlier = json.loads((folder / "config.json").read_text())
            theirs, trained_on = fields(earlier), earlier["training"].get("unfinished")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        why = [f"holds another sweep ({report.part_differences(theirs, mine)[0]})"] if theirs != mine else []
        if trained_on and not allow_incomplete:
            why.append("was trained on the store unfinished, which needs --allow-incomplete")
        elif trained_on and trained_on != unfinished:
            why.append(f"was trained on {described(trained_on)}, which the store no longer is")
        if why:
            raise SweepError(f"{folder} {'; and '.join(why)}: every task would refuse it; "
                             f"use another --out, or delete {out} to start over", "--out")


def read_checkpoint(path: Path, plan: dict, task: str) -> dict | None:
    """The saved state of this sweep, None if there is none; refuse one left by another sweep."""
    if not path.exists():
        return None
    try:
        state = load_tensors(path)
    except CheckpointError as error:
        raise SweepError(f"{error}; it was not written by `tokens probe`: delete it or use another --out", "--out") from None
    saved = _with_default_loss(report.EARLIER_DEFAULTS | state["plan"], task)
    if saved.get("configs") != plan["configs"] and sorted(saved.get("configs") or []) == sorted(plan["configs"]):
        # the same sweep, its heads or values listed in another order: its heads taken in this order
        position = {config: i for i, config in enumerate(saved["configs"])}
        state["probes"] = [state["probes"][position[config]] for config in plan["configs"]]
        saved = saved | {"configs": plan["configs"]}
    if saved != plan:
        differs = [_plan_difference(k, saved.get(k), plan.get(k)) for k in dict.fromkeys([*plan, *saved]) if saved.get(k) != plan.get(k)]
        raise SweepError(
            f"{path} belongs to another sweep ({'; '.join(differs)}); "
            f"use another --out, or delete {path.parent} to start over",
            "--out",
        )
    if any("val_metrics" not in saved for saved in state["probes"]):
        raise SweepError(f"{path} was written by an older version of tokens; delete it to start over", "--out")
    return state


def _plan_difference(key: str, there, here) -> str:
    """How one entry of a sweep's plan differs between its checkpoint and this command, in words."""
    if key == "configs":
        return "its configurations"
    if key == "unfinished":  # the store's written shards when the sweep began, or None once it is finished
        if not here:
            return f"it was trained on the store unfinished ({described(there)}), which is finished now"
        if not there:
            return f"it was trained on the finished store, of which only {described(here)} are there now"
        return f"it was trained on {described(there)} of the store, which has {described(here)} now"
    if key == "sampling" and there is None:
        return "it drew its batches and held-out items as an earlier version did"
    if key == "store_key":  # keys are SHA-256s: words say what changed
        return ("it was trained on another store, or on this one before it changed (extracted again into, e.g. with "
                f"--retry-failed: key {str(there)[:12]}... there, {str(here)[:12]}... here)")
    if key == "held_out" and there is None:
        return "it held out other files for validation, as an earlier version did (at random, where now each class is held out in proportion)"
    return f"{key} {there!r} there, {here!r} here"


RESULTS = ("leaderboard.csv", "best", "heads")  # what a run directory holds once a sweep has finished


def check_no_other_results(out: Path, training: dict):
    """A sweep starting afresh in a run directory that holds another sweep's results (its checkpoint
    deleted) would leave that sweep's best/ heads and heads/ records among its own: refuse. A run
    that stopped before any result (only its config.json) is no obstacle."""
    results = [name for name in RESULTS if (out / name).exists()]
    if not results:
        return
    try:
        earlier = report.EARLIER_DEFAULTS | json.loads((out / "config.json").read_text())["training"]
    except (OSError, ValueError, KeyError, TypeError):  # results whose sweep cannot be told: not ours to mix with
        earlier = None
    if _in_any_order(earlier) != _in_any_order(training):
        raise SweepError(f"{out} holds the results of another sweep ({', '.join(results)}): "
                         f"use another --out, or delete {out} to start over", "--out")


def _in_any_order(training: dict | None) -> dict | None:
    """A training plan whatever the order its configurations were listed in, which no result depends on."""
    return None if training is None else training | {"configs": sorted(training.get("configs") or [])}


def check_other_parts(out: Path, record: dict):
    """The parts of a split sweep already in the run directory must have run this sweep, on this
    store, with this training: `tokens report` refuses to merge parts that differ, so a part that
    would differ is refused now, before any work, naming the part it differs from."""
    mine = report.part_fields(record)
    for other in sorted(set(out.parent.glob("part-*-of-*")) - {out}):
        if not _has_results(other):
            continue  # started, but stopped before its first epoch: no results to be comparable with
        try:
            theirs = report.part_fields(json.loads((other / "config.json").read_text()))
        except (OSError, ValueError):  # no readable record: nothing to compare with
            continue
        if theirs != mine:
            differ, store = report.part_differences(theirs, mine)
            advice = (f"delete {other} to train it again on this store" if store else "run every part with the same arguments")
            raise SweepError(f"{other} ran another sweep ({differ}): this part would not be comparable with it; "
                             f"{advice}, or use another --out", "--out")


def restore(state: dict, probes: list[Probe], device: torch.device) -> tuple[int, int, bool]:
    """Put every probe back as it was saved: the number of epochs already done and of batches of the
    next (0 in checkpoints saved at an epoch's end, or by earlier versions), and whether the
    random states were another kind of device's (a job resubmitted to a CPU node after a GPU one,
    or the reverse): those cannot go on, so dropout draws from states seeded by each head's seed
    and the epoch instead, and differs from an uninterrupted run's from there."""
    epoch, here = state["epoch"], get_rng(device).numel()
    moved = False
    for probe, saved in zip(probes, state["probes"]):
        probe.head.load_state_dict(saved["head"])
        probe.optimizer.load_state_dict(saved["optimizer"])
        probe.rng = saved["rng"]
        if probe.rng.numel() != here:
            generator = torch.Generator(device)
            generator.manual_seed((probe.config.seed * 1_000_003 + epoch) % 2**63)
            probe.rng, moved = generator.get_state(), True
        probe.best_state, probe.best_metric = saved["best_state"], saved["best_metric"]
        # a checkpoint of an earlier version has none: its ties keep their best epoch, as that version did
        probe.best_loss = saved.get("best_loss", -math.inf)
        probe.best_epoch, probe.curve = saved["best_epoch"], list(saved["curve"])
        probe.val_metrics = saved["val_metrics"]
    return epoch, state.get("step", 0), moved


LOCK = ".lock"  # in a run folder: held by the `tokens probe` writing there (run_folder_lock)


@contextmanager
def run_folder_lock(out: Path):
    """One `tokens probe` at a time in a run folder: two at once both trained and wrote there, the
    leaderboard and checkpoint of one beside best heads of the other. The lock (flock on RUN/.lock,
    which names its holder) goes with its process however that ends, so a killed run leaves none. A
    folder made here and left with nothing else (the run refused) is removed. A file system that
    takes no locks (Lustre without its flock option) runs unlocked, as before."""
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 200).decode(errors="replace").strip() or "a process that has not named itself yet"
            raise SweepError(f"{out} is being trained by another `tokens probe` ({holder}): wait for it to finish, "
                             "or give this one another --out", "--out") from None
        except OSError:
            pass
        else:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        try:
            if made and [p.name for p in out.iterdir()] == [LOCK]:
                path.unlink()
                out.rmdir()
        except OSError:  # something came in meanwhile: the folder stays
            pass
        os.close(descriptor)


@contextmanager
def stop_between_steps():
    """A flag that Ctrl-C or SIGTERM sets while heads train, read between steps: the run then saves
    the step it is at and stops, where the epoch in hand was lost (SLURM's requeue signal comes
    minutes before the time limit, and an epoch of a large store can take longer). A second signal
    stops at once, from the last save. Outside the main thread, where signals cannot be caught,
    they stop the run as before."""
    requested = threading.Event()

    def handler(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = {}
    try:
        for number in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(number) is not None:  # None: a handler not set from Python, which could not be put back
                previous[number] = signal.signal(number, handler)
    except ValueError:
        pass
    try:
        yield requested
    finally:
        for number, earlier in previous.items():
            signal.signal(number, earlier)


def versions() -> dict:
    return {"tokens": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "scikit-learn": importlib.metadata.version("scikit-learn"), "python": platform.python_version()}


# Float32 matrix products on TF32 tensor cores while a sweep trains on a GPU: a 32-head sweep is
# bound by the heads' arithmetic, and TF32 is 3-5x faster. Validation and test are scored in full
# float32, as `tokens predict` scores, and as on a CPU. The process's own setting comes back afterwards.
@cuda_float32("tf32")
def run(
    store: TokenStore,
    configs: list[Config],
    out: Path,
    *,
    sweep: dict,
    part: tuple[int, int] = (1, 1),
    epochs: int = 30,
    batch_size: int = 128,
    warmup_epochs: float = 1.0,
    optimizer: str = "adamw",
    schedule: str = "cosine",
    loss: str | None = None,
    data: str = "auto",
    device: torch.device = torch.device("cpu"),
    data_seed: int = 0,
    final_norm: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> list[dict]:
    """Train `configs` on `store`, write the results to `out`, return the leaderboard rows.

    `final_norm` applies the encoder's final norm, which a store of raw tokens records, to every
    token the heads read.

    `stop_after` ends the run after that epoch, leaving the checkpoint to resume from, as a stop
    there would (the tests' way to interrupt a run at an epoch's end).
    """
    out = Path(out)
    task, classes = store.task, store.classes
    metric = primary_metric(task)
    norm = recorded_norm(store, device) if final_norm else None

    # Plan: which items train and validate, and which layers every batch must carry. The shards
    # written are read once: with --allow-incomplete an extraction may be adding to them meanwhile.
    done = {name: store.split(name).complete_mask() for name in ("train", "valid", "test") if name in store.splits}
    train_split = store.split("train")
    train_items = usable_items(train_split, done["train"])
    # read once, and checked (column() refuses labels no writer stores) before any training rather than at the test
    labels = {name: store.split(name).column("labels") for name in ("train", "valid", "test") if name in store.splits}
    held_out = ""
    if "valid" in store.splits:
        valid_split, valid_items = store.split("valid"), usable_items(store.split("valid"), done["valid"])
        validation = f"valid split ({len(valid_items)} items)"
    else:
        valid_split = train_split
        sources = train_split.column("sources")
        usable = len(train_items)
        train_items, valid_items = hold_out(train_items, sources[train_items], labels["train"][train_items], HOLD_OUT, data_seed)
        files, share = len(set(sources[valid_items])), len(valid_items) / max(usable, 1)
        if share > 2 * HOLD_OUT:
            count = len(set(sources[train_items])) + files
            raise SweepError(f"{store.path}: no valid split, and train's {count} file{' is' if count == 1 else 's are'} too few "
                             f"to hold out {HOLD_OUT:.0%} of its items as whole files ({len(valid_items)} of {usable} would go): "
                             "add a valid split", "STORE")
        validation = (f"no valid split: {len(valid_items)} of {usable} train items ({share:.0%}, {files} "
                      f"file{'s' * (files != 1)}, data seed {data_seed}) held out, every window of a file on one side, "
                      "each class in proportion")
        held_out = f" after {len(valid_items)} held out for validation" if len(valid_items) else ""
    test_split = store.split("test")
    test_items = usable_items(test_split, done["test"])
    if len(train_items) < 2:  # BatchNorm cannot train on a batch of one, and one item teaches nothing
        raise SweepError(f"{store.path}: train has {len(train_items)} usable item{'' if len(train_items) == 1 else 's'}"
                         f"{held_out}; a probe needs at least 2 (failed items and unwritten shards are left out)", "STORE")
    for name, items in (("validation", valid_items), ("test", test_items)):
        if not len(items):
            raise SweepError(f"{store.path}: no usable {name} items (all failed or in unwritten shards)", "STORE")
    # With --allow-incomplete: the figures are of the shards written so far, and not comparable with
    # a finished store's; a resume must find the same shards.
    unfinished = unfinished_shards(done)
    if unfinished:
        tqdm.write(f"warning: unfinished store, only the shards written so far are used ({described(unfinished)}): the figures will "
                   "not be comparable with those of the finished store")
    multi = any(HEADS[c.head].multi_layer for c in configs)
    layers = list(store.layers) if multi else [l for l in store.layers if any(c.layer == l for c in configs)]
    with_cls = any(HEADS[c.head].uses_cls for c in configs)
    # a sweep of class-token heads (linear, mlp) on a store that has class tokens reads no token maps
    with_tokens = not (train_split.class_token and all(HEADS[c.head].cls_only for c in configs))
    splits = {s.name: s for s in (train_split, valid_split, test_split)}
    mode, why = choose_mode(data, sum(split_bytes(s, layers, with_cls, with_tokens) for s in splits.values()), device)
    tqdm.write(why)
    tqdm.write(f"validation: {validation}")

    plan = training_plan(store, configs, epochs=epochs, batch_size=batch_size, warmup_epochs=warmup_epochs, optimizer=optimizer,
                         schedule=schedule, loss=loss, data_seed=data_seed, final_norm=final_norm) | (
                             {"unfinished": unfinished} if unfinished else {})
    checkpoint = out / "checkpoint.pt"
    saved = read_checkpoint(checkpoint, plan, task)
    if saved is None:
        check_no_other_results(out, plan)
        if (out / "leaderboard.csv").exists():  # this sweep finished here, its checkpoint deleted since: nothing to resume
            tqdm.write(f"{out} holds this sweep's results already (leaderboard.csv), and no checkpoint to score them "
                       f"again from: nothing to do (delete {out} to train it again)")
            try:
                return report.read_leaderboard(out / "leaderboard.csv")
            except ValueError as error:  # cut short, and nothing left to write it again from
                raise SweepError(f"{error}. No checkpoint.pt is left here to score it from: delete {out} to train the "
                                 "sweep again", "--out") from None
    record = {"store": str(Path(store.path).resolve()), "store_key": store.meta["cache_key"], "task": task,
              "classes": classes, "data_mode": mode, "device": str(device), "validation": validation,
              "part": list(part), "sweep": sweep, "configs": [c.record() for c in configs],
              "training": plan,  # how every head of this run trains
              "versions": versions()}
    if part[1] > 1:
        check_other_parts(out, record)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(record, indent=2) + "\n")

    # Sources and heads (float32 matrix products on TF32 tensor cores, see run's decorator).
    train_source = Source(train_split, layers, with_cls, mode, device, labels["train"], with_tokens, norm)
    valid_source = train_source if valid_split is train_split else Source(valid_split, layers, with_cls, mode, device,
                                                                           labels["valid"], with_tokens, norm)
    probes = [build_probe(c, train_split.dim, len(classes), len(store.layers), device, optimizer) for c in configs]
    loss_fn = make_loss(task, loss)
    valid_labels = valid_source.labels[torch.from_numpy(valid_items).to(valid_source.labels.device)].cpu().numpy()
    for name, split_labels in (("validation", valid_labels), ("test", labels["test"][test_items])):
        if found := undefined(task, split_labels):
            tqdm.write(f"note: {found[0]} cannot be computed on the {len(split_labels)} {name} items ({found[1]}): "
                       "NaN for every head")
    if lacking := classes_missing(task, labels["train"][train_items], valid_labels, classes):
        tqdm.write(f"note: the {len(valid_items)} validation items hold no item of {len(lacking)} of the {len(classes)} classes "
                   f"that train holds ({', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}): epochs and configurations "
                   "are chosen without them" + ("; a valid split holding every class would choose with them" if valid_split is
                                                train_split else ""))
    steps = max(1, len(train_items) // batch_size)
    total, warmup = epochs * steps, round(warmup_epochs * steps)

    training_order = [probes[i] for i in layer_by_layer([p.config.layer for p in probes])]
    start, skip, moved = restore(saved, probes, device) if saved else (0, 0, False)  # skip: batches of epoch `start` trained
    if start or skip:
        tqdm.write(f"resuming from {checkpoint} after epoch {start} of {epochs}" + (f" and {skip} of the next one's {steps} steps" if skip else ""))
    if moved:
        tqdm.write(f"note: {checkpoint} was saved on another kind of device than {device}: dropout goes on from new random "
                   "states, so the heads that use it will differ a little from an uninterrupted run's")

    def train_epoch(epoch: int, done: int, stop: threading.Event):
        """One epoch from its batch `done`, validated and saved; saved and stopped at a step once `stop` is set."""
        for p in probes:
            p.head.train()
        order = epoch_order(train_items, train_split.shard_size, data_seed, epoch)
        batches = train_source.batches(order[done * batch_size:], batch_size, drop_last=True)  # the epoch's batches from `done`
        for step, batch in enumerate(tqdm(batches, desc=f"epoch {epoch + 1}", initial=done, total=steps, leave=False, disable=not progress),
                                     start=done):
            factor = lr_factor(schedule, epoch * steps + step, total, warmup)
            with shared_steps():
                for p in training_order:
                    for group in p.optimizer.param_groups:
                        group["lr"] = p.config.lr * factor
                    set_rng(p.rng, device)
                    logits = p.head(*head_inputs(p.head, p.config.layer, batch))
                    p.optimizer.zero_grad(set_to_none=True)
                    loss_fn(logits, batch.labels).backward()
                    p.optimizer.step()
                    p.rng = get_rng(device)
            if stop.is_set() and step + 1 < steps:
                save_checkpoint(checkpoint, plan, epoch, probes, step=step + 1)
                tqdm.write(f"stopped at step {step + 1} of {steps} of epoch {epoch + 1}: saved in {checkpoint}")
                raise KeyboardInterrupt

        # Validate every head; keep each one's best epoch, and the validation metrics of the
        # weights it will be tested with (the best epoch's; the last epoch's while none is best),
        # so that validation is never scored again after training.
        with cuda_float32("ieee"):
            val_scores = score([(p.head, p.config.layer) for p in probes], valid_source, valid_items, batch_size, task)
        for p, scores in zip(probes, val_scores):
            metrics = compute_metrics(task, scores, valid_labels)
            p.curve.append(metrics[metric])
            value, loss = report.comparable(metrics[metric]), log_loss(task, scores, valid_labels)
            # An equal metric with a lower log loss wins too: a metric that saturates on a small
            # validation split (an mAP of 1.0 from the first epoch) would otherwise keep epoch 1.
            if value > p.best_metric or (value == p.best_metric > -math.inf and loss < p.best_loss):
                p.best_metric, p.best_loss, p.best_epoch, p.best_state = value, loss, epoch + 1, _state(p.head)
            if p.best_epoch in (0, epoch + 1):
                p.val_metrics = metrics
        save_checkpoint(checkpoint, plan, epoch + 1, probes)

    with stop_between_steps() as stop:
        for epoch in tqdm(range(start, epochs), desc="epochs", initial=start, total=epochs, disable=not progress):
            train_epoch(epoch, skip if epoch == start else 0, stop)
            if stop.is_set():
                raise KeyboardInterrupt
            if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < epochs:
                tqdm.write(f"stopped after epoch {epoch + 1}; run again to resume")
                return []

    # Test once, with each head's best weights.
    for p in probes:
        if p.best_state is not None:
            p.head.load_state_dict(p.best_state)
    test_source = Source(test_split, layers, with_cls, mode, device, labels.pop("test"), with_tokens, norm)
    test_labels = test_source.labels[torch.from_numpy(test_items).to(test_source.labels.device)].cpu().numpy()
    with cuda_float32("ieee"):
        test_scores = score([(p.head, p.config.layer) for p in probes], test_source, test_items, batch_size, task)

    # The training in a line: runs that differ only in it are told apart in reports.
    trained = "{optimizer}/{schedule}/epochs={epochs}/batch={batch_size}/warmup={warmup_epochs:g}/loss={loss}/data_seed={data_seed}"
    trained = trained.format(**plan) + ("/final_norm" if final_norm else "")
    if unfinished:  # told apart from the finished store's runs in reports
        trained += f"/unfinished={','.join(f'{name}:{w}of{n}' for name, (w, n) in unfinished.items())}"
    rows, records = [], []
    for p, test in zip(probes, test_scores):
        val_metrics, test_metrics = p.val_metrics, compute_metrics(task, test, test_labels)
        per_class = next(k for k in test_metrics if k.startswith("per_class"))
        c = p.config
        row = {"head": c.head, "config": c.id, "params": count_parameters(p.head), "best_epoch": p.best_epoch,
               "layer": c.layer, "lr": c.lr, "wd": c.wd, "seed": c.seed, "options": json.dumps(c.options, sort_keys=True),
               "store_key": store.meta["cache_key"][:16], "training": trained}
        row.update({f"val_{k}": v for k, v in val_metrics.items() if k != per_class})
        row.update({f"test_{k}": v for k, v in test_metrics.items() if k != per_class})
        rows.append(row)
        records.append(row | {
            "options": c.options, "val_curve": p.curve, "validation": validation,
            per_class: dict(zip(classes, test_metrics[per_class])),
            "fell_back_to_mean": getattr(p.head, "fell_back_to_mean", None),
        })

    # The best configuration of each head type as a report of this run selects it (the best mean
    # validation metric over seeds), in the weights of its seed that did best on validation.
    selected = report.selected_rows(rows)
    for head, row in selected.items():
        i = next(k for k, candidate in enumerate(rows) if candidate is row)
        save_best(out / "best" / f"{head}.pt", probes[i], row, task, classes, store.meta, norm)
    if unsaved := [head for head in dict.fromkeys(row["head"] for row in rows) if head not in selected]:
        for head in unsaved:  # nor one an earlier run of this sweep left in the folder
            (out / "best" / f"{head}.pt").unlink(missing_ok=True)
        tqdm.write(f"warning: no best/{{HEAD}}.pt for {', '.join(unsaved)}: every configuration of "
                   f"{'it' if len(unsaved) == 1 else 'each'} gave NaN validation metrics")

    report.write_run(out, rows, records, metric, list(selected.values()))
    diverged = [p.config.id for p, test in zip(probes, test_scores) if not np.isfinite(test).all()]
    if diverged:
        tqdm.write(f"warning: {len(diverged)} of {len(probes)} heads gave NaN or Inf scores (ranked last): {', '.join(diverged)}")
    if len(diverged) == len(probes):
        raise TrainingFailed(f"every head gave NaN or Inf scores: run `tokens verify {store.path}` (the tokens may hold "
                             f"NaN or Inf), or lower the learning rates; the run's files are in {out}")
    return rows


# What makes a store's tokens what they are, apart from the dataset: a head only means something on
# tokens made the same way (`tokens predict` compares them).
TOKEN_FIELDS = ("backbone", "backbone_config", "checkpoint_sha256", "frontend", "final_norm")


def save_best(path: Path, probe: Probe, row: dict, task: str, classes: list[str], store_meta: dict,
              norm: FinalNorm | None = None):
    """A head's weights with what `tokens predict` needs to rebuild and feed it (weights_only-loadable):
    `layers`, the layers it reads, in order (a multi-layer head reads all the store's); `final_norm`,
    the norm it was trained behind (None: raw or stored tokens as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = list(store_meta["layers"]) if HEADS[probe.config.head].multi_layer else [probe.config.layer]
    save_aside({"config": probe.config.id, "build": probe.build, "layer": probe.config.layer, "layers": layers, "task": task,
                "classes": list(classes), "store_key": row["store_key"], "state_dict": _state(probe.head),
                "tokens": {name: store_meta.get(name) for name in TOKEN_FIELDS},
                "final_norm": None if norm is None else norm.params(),
                "metrics": {k: v for k, v in row.items() if k.startswith(("val_", "test_"))}}, path)
