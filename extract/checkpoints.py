"""Checkpoint files: safe loading, SHA-256 for provenance, and errors that name the file and the key.

Checkpoints come from strangers on the internet. `torch.load` with `weights_only=True` only rebuilds
tensors and plain containers; anything else (fairseq's argparse Namespace or omegaconf config, a
pickled class) could run code while unpickling, so it is refused unless the user says they trust
the file (`--allow-pickle`).
"""

from __future__ import annotations

import codecs
import hashlib
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tokens.cache.store import listed


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as given; the message names the file and what to do."""


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file; for a directory (a Hugging Face model folder), of its files' names and hashes."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
        return digest.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> tuple[dict, str]:
    """A checkpoint loaded onto the CPU (safetensors, or torch.load with weights_only unless
    allow_pickle) and its SHA-256, computed on a second thread while it loads."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the checkpoint file inside it (only ast reads a folder: a Hugging Face model's)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    hashing = ThreadPoolExecutor(1)
    digest = hashing.submit(sha256_file, path)
    try:
        state = _load(path, allow_pickle)
        if isinstance(state, torch.nn.Module):  # torch.save(model), read with --allow-pickle
            state = state.state_dict()
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: it holds a {type(state).__name__}, not the weights of a model (a dict of "
                                  "tensors, perhaps inside 'model' or 'state_dict')")
    except BaseException:  # report a refused or broken file now, not once the whole file is hashed
        hashing.shutdown(wait=False, cancel_futures=True)
        raise
    try:
        return state, digest.result()
    finally:
        hashing.shutdown()


def _load(path: Path, allow_pickle: bool):
    if path.suffix == ".safetensors":  # a format that holds tensors only: nothing in it can run
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        return load_tensors(path)
    except PickledObjects as refused:
        if not allow_pickle:
            raise CheckpointError(f"{refused}{ALLOW_PICKLE}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as err:
        raise CheckpointError(
            f"{path}: unpickling it needs the Python package that defines '{err.name}'; install it and retry"
        ) from None


class PickledObjects(CheckpointError):
    """A file that holds pickled Python objects besides tensors: loading them could run code."""


def load_tensors(path: str | Path):
    """torch.load(weights_only=True) onto the CPU: tensors and plain containers only. Raises
    PickledObjects naming what the file would have run, or CheckpointError for an unreadable file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refusal(path, err) from None
    except (RuntimeError, EOFError, KeyError, IndexError, ValueError) as err:  # torn, empty or foreign files
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_what_it_holds(path) or f'{type(err).__name__}: {_first_line(err)}'})") from None


def _what_it_holds(path: str | Path) -> str:
    """What a file that torch cannot read begins with, where that says more than torch's error (a
    text file read as a legacy pickle fails with 'KeyError: 101', its first byte)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return ""
    if head.startswith((b"PK\x03\x04", b"\x80")):  # a zip archive (torch.save) or a pickle: torn, not foreign
        return ""
    if not head:
        return "the file is empty"
    try:  # incremental: a character cut at the 64th byte is still text
        text = None if b"\0" in head else codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        text = None
    if text is None:
        return f"it begins with the bytes {head[:8].hex(' ')}, neither torch.save's zip archive nor a pickle"
    return f"it is text, beginning {text.split(chr(10))[0][:40]!r}"


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0]


ALLOW_PICKLE = ". If you trust this file, pass --allow-pickle (in Python, allow_pickle=True)."


def _refusal(path: str | Path, err: pickle.UnpicklingError) -> CheckpointError:
    """What a weights_only load that stopped means: pickled objects (named), or not a checkpoint at all."""
    if found := re.search(r"GLOBAL (\S+)", str(err)):
        return PickledObjects(
            f"{path} contains pickled Python objects ({found.group(1)}) besides tensors; unpickling them can run "
            "arbitrary code"
        )
    # Not pickled objects: torch's advice to retry with weights_only=False does not apply, its detail does.
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(err))
    detail = _what_it_holds(path) or (found.group(1).strip() if found else _first_line(err))
    return CheckpointError(f"{path}: not a readable torch checkpoint, not a file torch.save wrote ({detail})")


def pickle_refused(path: str | Path, err: pickle.UnpicklingError) -> CheckpointError:
    """The refusal of a file that another library's weights_only loading stopped (AST's transformers)."""
    refusal = _refusal(path, err)
    return CheckpointError(f"{refusal}{ALLOW_PICKLE}") if isinstance(refusal, PickledObjects) else refusal


def expect(path: str | Path, key: str, what: str, expected, found, option: str | None = None, heads: bool = False) -> None:
    """Raise a CheckpointError when a checkpoint disagrees with the configuration; `option`: the
    backbone option that sets it, for a checkpoint of another size of the family; `heads`: that
    option is a ViT's dim, which comes with a number of heads its checkpoint does not hold."""
    if expected != found:
        fix = f"; for a checkpoint of another size, pass --backbone-option {option}={found}" if option else ""
        if heads:
            fix += (f" and --backbone-option num_heads=N, its number of attention heads, which the weights do not show "
                    f"(a standard ViT's heads are 64 dims: N={found // 64})")
        raise CheckpointError(f"{path}: {key} gives {what} {found}, the configuration expects {expected}{fix}")


def count_indexed(state: dict, prefix: str) -> int:
    """How many numbered children `prefix.N.` the state dict has (e.g. transformer blocks)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for key in state if (m := pattern.match(key))})


def flat_tensors(state: dict, prefix: str = ""):
    """(key, tensor) of every tensor in a checkpoint, the keys of nested dicts joined with dots."""
    for key, value in state.items():
        if isinstance(value, dict):
            yield from flat_tensors(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            yield f"{prefix}{key}", value


def wrapping_prefixes(state: dict, blocks: str = "blocks.") -> list[str]:
    """['module.'] (DDP), ['teacher.backbone.'] (DINOv2 training), or ['student.backbone.',
    'teacher.backbone.'] (DINO's nested dicts): the parts before `blocks` of the keys."""
    return sorted({key.split(blocks)[0] for key, _ in flat_tensors(state) if f".{blocks}" in f".{key}"})


def unwrap_ddp(state: dict) -> dict:
    """A model saved from inside DistributedDataParallel has every key under 'module.': the model's
    own keys follow it (as timm's loader reads them). Any other wrapper is refused by `wrapped`."""
    if state and all(isinstance(key, str) and key.startswith("module.") for key in state):
        return {key.removeprefix("module."): value for key, value in state.items()}
    return state


def wrapped(path: str | Path, prefixes: list[str]) -> CheckpointError:
    return CheckpointError(f"{path}: its weights sit under {' and '.join(map(repr, prefixes))} (a training wrapper's keys); "
                           f"save the state dict of the model inside, with the keys that follow {prefixes[0]!r}")


def expect_depth(path: str | Path, state: dict, depth: int, option: str | None = "depth", raw: dict | None = None) -> None:
    """Check the number of transformer blocks 'blocks.N.*' in `state`. A file with none is not a
    checkpoint of depth 0 but of another layout: say whether its blocks sit under a training
    wrapper's prefix or it holds no such blocks at all (`raw`: the file's dict, when `state` is
    already renamed)."""
    found = count_indexed(state, "blocks.")
    if found:
        expect(path, "'blocks.N.*'", "depth", depth, found, option)
        return
    if prefixes := wrapping_prefixes(raw if raw is not None else state):
        raise wrapped(path, prefixes)
    first = ", ".join(repr(key) for key, _ in list(flat_tensors(raw if raw is not None else state))[:3]) or "none"
    raise CheckpointError(f"{path}: no transformer blocks ('blocks.N.*' keys) where this model keeps them "
                          f"(its first weights: {first}); is this a checkpoint of the right model?")


def load_weights(module: torch.nn.Module, state: dict, path: str | Path, unused: tuple[str, ...] = (),
                 token_path: tuple[str, ...] = ()) -> None:
    """Load every weight the module needs, checking shapes; keys it does not need (decoders, EMA
    teachers, classifier heads: parts of training we do not run) are ignored. `unused`: prefixes of
    the module's own weights that never touch the cached tokens, which a checkpoint may lack (a
    fine-tuned MAE has fc_norm instead of norm); the module keeps its own values there.
    `token_path`: prefixes of keys that shape the tokens: a checkpoint's weights there that the
    module has no place for (a qkv bias, layer scales, registers) are refused, as they come from
    another variant whose tokens these would not be.

    The checkpoint's tensors become the module's (in its dtype), so a module built on the meta
    device, without paying for a random initialisation, comes out whole."""
    every = module.state_dict()
    if left_out := [key for key in state if key not in every and key.startswith(token_path)]:
        raise CheckpointError(f"{path}: weights {listed(list(map(repr, left_out)), 4)} have no place in this model: a checkpoint of another variant "
                              "(registers, a qkv bias, layer scale...); give the model of its kind")
    own = {key: tensor for key, tensor in every.items() if key in state or not key.startswith(unused)}
    missing = [key for key in own if key not in state]
    if missing:
        raise CheckpointError(f"{path}: missing weights {listed(list(map(repr, missing)), 4)}; is this a checkpoint of the right model?")
    for key, tensor in own.items():
        expect(path, f"key {key!r}", "shape", tuple(tensor.shape), tuple(state[key].shape))
    module.load_state_dict({key: state[key].to(tensor.dtype) for key, tensor in own.items()}, assign=True, strict=not unused)
