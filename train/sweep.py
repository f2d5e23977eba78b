"""A sweep: heads x head options x learning rates x weight decays x layers x seeds.

From the command line::

    tokens probe S.zarr --heads linear,ep,protobin --lr 1e-3,3e-3 --wd 1e-4 --layers -1 \\
        --seeds 0,1 --option ep.num_queries=16,32 --option protobin.lr=2e-2,4e-2

`--option HEAD.NAME=V1,V2` sweeps one constructor option of one head (see `tokens.train.heads`);
`HEAD.lr` and `HEAD.wd` give that head its own learning rates or weight decays.

Or from a TOML file (`--sweep sweep.toml`); lists are swept, scalars are fixed::

    lr = [1e-3, 3e-3]             # learning rates of heads that do not set their own
    wd = [1e-4]
    layers = [-1]                 # cached layers: a stored layer number, or -1 = the last one
    seeds = [0, 1, 2]

    [heads.linear]                # a head with its default options

    [heads.ep]
    num_queries = [16, 32]

    [heads.protobin]
    prototypes_per_class = [10, 20]
    lr = [2e-2, 4e-2]             # this head's own learning rates

Without any lr, each head gets its default (`DEFAULT_LR`: prototype heads learn with larger
rates, as in the protobin paper). Multi-layer heads (`cgp`) read every cached layer, so the
layer axis does not multiply them. Expansion order is fixed, so `--part I/N` (every N-th
configuration starting at the I-th; see `tokens.cluster`) splits a sweep the same way in every
job of an array.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from dataclasses import dataclass, field

DEFAULT_HEADS = ["linear", "ep", "protobin"]
# The papers' searches: lr in 1e-4..7e-3, and 2e-3..8e-2 for prototype heads.
DEFAULT_LR = {"protobin": 2e-2, "protofloat": 2e-2, "cgp": 2e-2}
FALLBACK_LR = 1e-3
DEFAULT_WD = [1e-4]
DEFAULT_LAYERS = [-1]
DEFAULT_SEEDS = [0]
ALL_LAYERS = "all"
KINDS = {"lr": (int, float), "wd": (int, float), "layers": int, "seeds": int}  # what each list holds


class SweepError(ValueError):
    """A sweep cannot be built as asked; `option` names the command-line option at fault."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class Config:
    """One head to train: what to build, how to optimise it, from which layer, with which seed."""

    head: str
    options: dict = field(hash=False)
    lr: float
    wd: float
    layer: int | str  # a stored layer number, or ALL_LAYERS for multi-layer heads
    seed: int

    @property
    def id(self) -> str:
        """Short and readable: `ep[num_queries=32]/lr=0.003/wd=0.0001/layer=12/seed=0`."""
        return f"{self.group}/seed={self.seed}"

    @property
    def group(self) -> str:
        """The id without the seed: configurations that a report averages over seeds."""
        options = ",".join(f"{k}={_fmt(v)}" for k, v in sorted(self.options.items()))
        head = f"{self.head}[{options}]" if options else self.head
        return f"{head}/lr={_fmt(self.lr)}/wd={_fmt(self.wd)}/layer={self.layer}"

    def record(self) -> dict:
        return {"id": self.id, "head": self.head, "options": self.options, "lr": self.lr,
                "wd": self.wd, "layer": self.layer, "seed": self.seed}


def sanitise(text: str) -> str:
    """A config id as a file name: `/` becomes `__`, anything unusual `_`."""
    return re.sub(r"[^A-Za-z0-9._=,-]", "_", text.replace("/", "__"))


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_value(text: str):
    """`16` -> 16, `2e-2` -> 0.02, `true` -> True, anything else stays a string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_list(text: str | None, option: str, kind=None) -> list | None:
    """A comma-separated command-line list, each value checked with `kind`."""
    if text is None:
        return None
    values = [parse_value(v.strip()) for v in str(text).split(",") if v.strip()]
    if not values:
        raise SweepError(f"{option} is empty", option)
    if kind is not None:
        check_kind(values, kind, option, option)
    return values


def check_kind(values: list, kind, name: str, option: str):
    """Refuse a value of the wrong type by name (a bool is not a number here)."""
    for v in values:
        if not isinstance(v, kind) or isinstance(v, bool):
            where = "" if name == option else f"{name}: "  # the option is named beside the message already
            raise SweepError(f"{where}{v!r} is not {'an integer' if kind is int else 'a number'}", option)


def parse_options(items: list[str] | None) -> dict[str, dict[str, list]]:
    """`["ep.num_queries=16,32"]` -> {"ep": {"num_queries": [16, 32]}}."""
    options: dict[str, dict[str, list]] = {}
    for item in items or []:
        match = re.fullmatch(r"\s*([\w-]+)\.(\w+)\s*=\s*(.+)", item)
        if not match:
            raise SweepError(f"--option {item!r}: write HEAD.NAME=VALUE[,VALUE...], e.g. ep.num_queries=16,32", "--option")
        head, name, values = match.groups()
        if name in options.get(head, {}):
            raise SweepError(f"--option {head}.{name} is given twice: list its values once, e.g. {head}.{name}=V1,V2", "--option")
        options.setdefault(head, {})[name] = parse_list(values, "--option")
    return options


def read_sweep_file(path) -> dict:
    """The TOML sweep file as {"heads": {head: {name: [values]}}, "lr": [...], ...} (see module doc)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise SweepError(f"cannot read sweep file {path}: {error}", "--sweep") from error
    unknown = set(data) - {"heads", "lr", "wd", "layers", "seeds"}
    if unknown:
        raise SweepError(f"{path}: unknown keys {', '.join(sorted(unknown))}; use heads, lr, wd, layers, seeds", "--sweep")
    if not isinstance(data.get("heads"), dict) or not data["heads"]:
        raise SweepError(f"{path}: no [heads.NAME] tables", "--sweep")

    def listed(value, key: str, kind=None) -> list:
        """A scalar as a one-value list; an empty list would silently sweep nothing (or the default)."""
        values = value if isinstance(value, list) else [value]
        if not values:
            raise SweepError(f"{path}: {key} is an empty list; give at least one value, or leave {key} out", "--sweep")
        if kind is not None:
            check_kind(values, kind, f"{path}: {key}", "--sweep")
        return values

    # layers = "all": each cached layer, one configuration each, resolved against the store
    sweep = {key: [ALL_LAYERS] if key == "layers" and data[key] == ALL_LAYERS else listed(data[key], key, kind)
             for key, kind in KINDS.items() if key in data}
    sweep["heads"] = {}
    for head, opts in data["heads"].items():
        if not isinstance(opts, dict):
            raise SweepError(f"{path}: heads.{head} must be a table ([heads.{head}]), not {opts!r}", "--sweep")
        sweep["heads"][head] = {k: listed(v, f"heads.{head}.{k}", KINDS[k] if k in ("lr", "wd") else None) for k, v in opts.items()}
    return sweep


def expand(
    heads: dict[str, dict[str, list]],
    lr: list[float] | None,
    wd: list[float],
    layers: list,
    seeds: list[int],
    multi_layer: set[str] = frozenset(),
    default_lr: float | None = None,
) -> list[Config]:
    """Every configuration, in a fixed order (head, options, lr, wd, layer, seed), without duplicates.

    `heads` maps a head to its swept options; its `lr` / `wd` entries override the sweep's. A head
    without any lr gets `default_lr` if given (the optimizer's own), else its AdamW default.
    """
    configs, seen = [], {}
    for head, swept in heads.items():
        swept = dict(swept)
        head_lr = swept.pop("lr", None) or lr or [default_lr or DEFAULT_LR.get(head, FALLBACK_LR)]
        head_wd = swept.pop("wd", None) or wd
        head_layers = [ALL_LAYERS] if head in multi_layer else layers
        names = sorted(swept)
        for values in itertools.product(*(swept[n] for n in names)):
            options = dict(zip(names, values))
            for rate, decay, layer, seed in itertools.product(head_lr, head_wd, head_layers, seeds):
                config = Config(head, options, float(rate), float(decay), layer, int(seed))
                if config.id not in seen:
                    seen[config.id] = config
                    configs.append(config)
                elif seen[config.id] != config:  # a result is known by its id: two under one would be one
                    raise _same_id(seen[config.id], config)
    return configs


def _same_id(one: Config, other: Config) -> SweepError:
    """Two configurations that differ only beyond the 6 significant digits of their ids."""
    if one.options != other.options:
        name = next(k for k in one.options if one.options[k] != other.options.get(k))
        option, values = f"--option {one.head}.{name}", (one.options[name], other.options[name])
    else:
        name = "lr" if one.lr != other.lr else "wd"
        option, values = f"--{name}", (getattr(one, name), getattr(other, name))
    return SweepError(f"{option}: {values[0]!r} and {values[1]!r} agree to 6 significant digits, which name a "
                      f"configuration ({one.id}): give values that differ within them", option)


def take_part(configs: list[Config], index: int, count: int) -> list[Config]:
    """The index-th of `count` interleaved parts: each part gets a mix of heads, so parts take similar
    time. While there are at least as many configurations (up to the seed) as parts, a part takes every seed
    of its configurations, so that its best/ heads are chosen over seeds, as a report chooses: the
    configuration a report selects is then saved by its part. Beyond that, seeds are dealt out too."""
    groups = list(dict.fromkeys(c.group for c in configs))
    if len(groups) < count:
        return configs[index - 1 :: count]
    mine = set(groups[index - 1 :: count])
    return [c for c in configs if c.group in mine]
