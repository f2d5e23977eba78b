"""Running on the schedulers users have: which part of the work this process does, and sbatch scripts.

A job is split into N parts numbered 1..N; part I owns every N-th shard or configuration from the
I-th. The part comes from `--part I/N`, or from the environment: a SLURM job array
(SLURM_ARRAY_TASK_ID, _MIN, _COUNT) or torchrun (RANK, WORLD_SIZE), and torchrun inside an array
task splits the task's part among its ranks. No coordinator of our own: each part owns whole
shards or configurations.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
from pathlib import Path

REQUEUE_LEAD_SECONDS = 120  # SLURM's signal before a time limit; stopping an extraction takes seconds


def resolve_part(option: str | None, environ=os.environ) -> tuple[int, int]:
    """`"2/4"` -> (2, 4), as given; None -> the SLURM array's task, or torchrun's rank, or (1, 1)
    when run by hand. Under torchrun inside an array task, rank r of W in task I of N does part
    I + N·r of N·W: every N-th of those is part I's, so the ranks share the task's part, never
    another task's (a task resubmitted without torchrun overlaps only itself)."""
    if option:
        return _part(option, environ)
    index, count = _part(None, environ)
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world = _whole(environ, "RANK"), _whole(environ, "WORLD_SIZE")
        index, count = index + count * rank, count * world
    return index, count


def part_origin(option: str | None, environ=os.environ) -> str:
    """Where resolve_part found the part, for the line that says it: a part taken from the
    environment, unasked, does a fraction of the work that the command alone does not show."""
    if option:
        return "--part"
    found = [names for names, present in (
        ("SLURM_ARRAY_TASK_ID/COUNT", "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ),
        ("RANK/WORLD_SIZE", "RANK" in environ and "WORLD_SIZE" in environ)) if present]
    return " and ".join(found) or "--part"


def _whole(environ, name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"the environment's {name}={environ[name]!r} is not a whole number") from None


def _part(option: str | None, environ) -> tuple[int, int]:
    if option:
        try:
            index, count = (int(x) for x in option.split("/"))
        except ValueError:
            raise ValueError(f"{option!r} is not of the form I/N, e.g. 1/4") from None
        if count < 1:
            raise ValueError(f"{option!r}: N, the number of parts, must be at least 1")
        if not 1 <= index <= count:
            raise ValueError(f"{option!r}: I must be between 1 and N")
        return index, count
    if "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        first = _whole(environ, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in environ else 0
        index, count = _whole(environ, "SLURM_ARRAY_TASK_ID") - first + 1, _whole(environ, "SLURM_ARRAY_TASK_COUNT")
        if not 1 <= index <= count:  # a stepped or listed array: parts would overlap and leave shards unowned
            raise ValueError(
                f"SLURM_ARRAY_TASK_ID {environ['SLURM_ARRAY_TASK_ID']} is not within the {count} tasks counted from "
                f"{first}: submit a contiguous array (--array=1-N, as `tokens slurm` writes), or give the part as I/N"
            )
        return index, count
    return 1, 1


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity (what SLURM's --cpus-per-task gives), where
    the platform reports one, else every core of the machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_device_index(environ=os.environ) -> int | None:
    """The GPU this process should use under torchrun (one GPU per rank)."""
    return int(environ["LOCAL_RANK"]) if "LOCAL_RANK" in environ else None


def pick_device(name: str):
    """`--device`: auto (a GPU when one is visible), cpu, cuda or cuda:N; a GPU without an index
    is this rank's under torchrun. Raises ValueError with the fix for a name that cannot be used.

    The chosen GPU becomes the current one, so that events, streams and the DataLoader's pinning
    thread belong to it: an event recorded on another GPU's stream does not wait for our copies.
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: no CUDA device is visible here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_device_index() or 0)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{device}: only {torch.cuda.device_count()} CUDA device(s) are visible here (cuda:0..)")
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def cuda_float32(precision: str):
    """CUDA's float32 matrix products and convolutions in `precision` while the block runs: "tf32"
    (TF32 tensor cores, float32 accumulation) or "ieee" (full float32; cuDNN's convolutions are TF32
    by default). The process's own settings come back afterwards, whatever API set them. CPUs keep
    theirs: these are CUDA's settings only."""
    import torch

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def slurm_minutes(limit: str) -> int | None:
    """A SLURM time limit in whole minutes, rounded up as SLURM rounds it: "30" (minutes), "30:00"
    (minutes:seconds), "4:00:00", "1-12", "1-12:00", "1-12:00:00" (days-hours...); None for no
    limit ("unlimited", or 0)."""
    if limit.lower() in ("unlimited", "infinite"):
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:
        hours, minutes, seconds = parts if len(parts) == 3 else [0, *(parts + [0])[:2]]
    return int(days or 0) * 1440 + hours * 60 + minutes + math.ceil(seconds / 60) or None


def sbatch_script(
    verb: str,
    args: list[str],
    *,
    array: int,
    job_name: str,
    gpus: int = 0,
    cpus: int = 4,
    mem: str | None = None,
    time: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    qos: str | None = None,
    constraint: str | None = None,
    after: str | None = None,
    requeues: int = 3,
    workdir: Path,
    logs: Path = Path("slurm-logs"),
    python: str | None = None,
) -> str:
    """An sbatch script that runs `tokens VERB ARGS` as an N-task job array, one part per task.

    The tasks run in `workdir` (absolute), where ARGS's relative paths and `logs` were meant, from
    wherever the script is submitted; sbatch reads the directive's shell quoting.

    A task near its time limit is stopped as on Ctrl-C, keeping its finished work, and requeued (at
    most `requeues` times) to go on where it stopped. A task killed at its limit would end TIMEOUT
    instead, and a job waiting on the array with afterok would never start. A requeued task keeps its
    job id, so such a job waits for it; its log is appended to, not started anew."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array=1-{array}",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --chdir={shlex.quote(str(workdir))}",
        f"#SBATCH --output={logs}/%x-%A_%a.out",
    ]
    if requeues:  # USR1 to this script only (B:), 2 minutes before the limit (or up to a minute earlier)
        lines += [f"#SBATCH --signal=B:USR1@{REQUEUE_LEAD_SECONDS}", "#SBATCH --requeue", "#SBATCH --open-mode=append"]
    if gpus:
        lines.append(f"#SBATCH --gres=gpu:{gpus}")
    if mem:
        lines.append(f"#SBATCH --mem={mem}")
    if time:
        lines.append(f"#SBATCH --time={time}")
    for option, value in (("partition", partition), ("account", account), ("qos", qos), ("constraint", constraint)):
        if value:
            lines.append(f"#SBATCH --{option}={value}")
    if after:  # comma-separated job ids: every one must have finished well
        lines.append(f"#SBATCH --dependency=afterok:{after.replace(',', ':')}")
    # -P: the working directory is not put first on the import path, where a folder named tokens/
    # (of token stores, say) would shadow the package.
    command = [python, "-P", "-m", "tokens"] if python else ["tokens"]
    # The part count is written out rather than read from SLURM_ARRAY_TASK_COUNT: resubmitting one
    # task (`sbatch --array=2 SCRIPT`) gives it a count of 1, and it would then do the whole job.
    lines += [
        "set -euo pipefail",
        f"# Task I does part I of {array}. Resubmit all tasks, or some (sbatch --array={','.join(map(str, range(1, array + 1)[-2:]))} SCRIPT): "
        "finished work is skipped.",
        *(["# This job waits for every task of those jobs to succeed: if one fails, it stays pending (DependencyNeverSatisfied).",
           "# Then scancel it, resubmit the failed tasks, and submit this script with sbatch --dependency=afterok:NEWID SCRIPT",
           "# (NEWID: the resubmitted tasks' job; the option replaces the line above)."] * bool(after)),
    ]
    run = shlex.join(command + [verb] + list(args)) + f' --part "$SLURM_ARRAY_TASK_ID/{array}"'
    if not requeues:
        return "\n".join(lines + [run, ""])
    # The command runs in the background so that this shell can take USR1 while it works: a shell
    # runs its traps only between commands, and `wait` is one it leaves for them.
    return "\n".join(lines + [
        "# Near the time limit SLURM sends USR1 to this script: the command stops as on Ctrl-C, keeping its finished",
        f"# work, and the task is requeued to go on where it stopped, at most {requeues} times (tokens slurm --requeue;",
        "# requeues after a node failure count too).",
        "command=",
        "stop_and_requeue() {",
        '  echo "tokens slurm: the time limit is near: stopping the command, which keeps its finished work"',
        "  status=1  # the command's, once read: a task signalled before its command started has done nothing",
        '  if [[ -n $command ]]; then',
        '    kill -TERM "$command" 2>/dev/null || true',
        '    wait "$command" && status=0 || status=$?',
        "  fi",
        "  (( status >= 0 && status <= 255 )) || status=1  # bash's -1: a command it could not wait for",
        "  if (( status == 0 )); then",
        '    echo "tokens slurm: the command had finished: nothing to go on with"',
        "    exit 0",
        "  fi",
        f"  if (( ${{SLURM_RESTART_COUNT:-0}} < {requeues} )); then",
        # said first: the requeue ends this script at once
        f'    echo "tokens slurm: requeueing the task (time $(( ${{SLURM_RESTART_COUNT:-0}} + 1 )) of {requeues}): it goes on where it stopped"',
        '    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" && exit 0',
        '    echo "tokens slurm: scontrol could not requeue the task; resubmit it (sbatch --array=$SLURM_ARRAY_TASK_ID SCRIPT) to go on"',
        "  else",
        f'    echo "tokens slurm: not requeued: tokens slurm --requeue {requeues} allows no more; resubmit it'
        ' (sbatch --array=$SLURM_ARRAY_TASK_ID SCRIPT) to go on"',
        "  fi",
        '  exit "$status"',
        "}",
        "trap stop_and_requeue USR1",
        run + " &",
        "command=$!",
        'wait "$command"',
        "",
    ])
