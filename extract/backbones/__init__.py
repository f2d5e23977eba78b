"""Backbone registry: `build_backbone(name, checkpoint=...)` is the one door in.

Each family module enters its builders in BACKBONES with the configuration they document (front-end,
dim, grid, depth, checkpoint format) next to the model code, as timm's registry does. Heavy optional
libraries (transformers, timm) are imported only when their backbone is built.
"""

from __future__ import annotations

import inspect
import math

from . import crepe, audiomae, eat, beats, ast, timm_vit  # noqa: F401  (they register themselves; default first)
from .base import BACKBONES, Backbone, Entry

DEFAULT_BACKBONE = "crepe-tiny"

__all__ = ["BACKBONES", "DEFAULT_BACKBONE", "Backbone", "Entry", "build_backbone", "checked_options", "options_of"]


def options_of(entry: Entry) -> dict[str, inspect.Parameter]:
    """The options a backbone's builder takes (`--backbone-option KEY=VALUE`), with their defaults."""
    return {p.name: p for p in inspect.signature(entry.build).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name != "allow_pickle"}


def settable_options(entry: Entry) -> dict[str, inspect.Parameter]:
    """The options given as -o KEY=VALUE: a timm model's name follows `timm:`, and the final norm is --final-norm."""
    return {name: p for name, p in options_of(entry).items() if name not in ("model_name", "final_norm")}


def build_backbone(name: str, checkpoint: str | None = None, *, allow_pickle: bool = False, **options) -> Backbone:
    """Build a registered backbone in eval mode with frozen weights.

    name: a BACKBONES key, or "timm:<model_name>" for a timm ViT. checkpoint: a local file (a folder
    for ast); only crepe-* run without one. allow_pickle: accept checkpoints that need full unpickling
    (trusted files only). options: the builder's keyword options, e.g. final_norm=True,
    window_seconds=2.0 (crepe), dim/depth/num_heads for other sizes of a family.
    """
    entry, options = checked_options(name, options)
    model = entry.build(name, checkpoint, allow_pickle=allow_pickle, **options)
    return model.eval().requires_grad_(False)


def _timm_knows(name: str) -> bool:
    """Whether `name` is a timm model's (given without timm:); False where timm is not installed."""
    try:
        import timm
    except ImportError:
        return False
    return ":" not in name and timm.is_model(name.partition(".")[0])


def checked_options(name: str, options: dict) -> tuple[Entry, dict]:
    """The registry entry of `name` and its options as its builder takes them (numbers as numbers),
    or a ValueError naming what it lacks: what can be checked before a checkpoint is there."""
    family, _, model_name = name.partition(":")
    entry = BACKBONES.get(family)
    if entry is None:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} (timm as timm:<model_name>"
                         f"{f', here timm:{name}' if _timm_knows(name) else ''})")
    if "model_name" in options:  # it would be overridden by, or stand in for, the name after timm:
        raise ValueError(f"{family}: give the model as timm:<model_name>, not as the option model_name")
    if "model_name" in options_of(entry) and not model_name:
        raise ValueError(f"name the {family} model: {family}:<model_name>, e.g. timm:vit_base_patch16_224.mae")
    options = dict(options)
    if model_name:
        options["model_name"] = model_name
    parameters = options_of(entry)
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        takes = list(settable_options(entry))
        raise ValueError(f"{family} takes {'the options ' + ', '.join(takes) if takes else 'no options'}; not {', '.join(unknown)}")
    for key, value in options.items():  # the CLI passes what is not a number as text
        default = parameters[key].default
        if isinstance(default, (int, float)) and not isinstance(default, bool):  # sizes and lengths
            if isinstance(value, str) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{family} option {key}={value!r} is not a number")
            if isinstance(default, int) and value != int(value):
                raise ValueError(f"{family} option {key}={value!r} is not a whole number")
            if value <= 0:
                raise ValueError(f"{family} option {key}={value!r} must be positive")
            options[key] = type(default)(value)
    return entry, options
