"""A real SLURM run: a 3-task extraction array and a 2-part probe sweep go through sbatch, and the
store and the merged leaderboard equal those of a single process.

Needs a SLURM that answers on this machine (CI starts a one-node one with .ci/slurm.sh). When
there is none and it cannot be started, the test is skipped with the reason, never passed.
"""

import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tokens.cache import open_store

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds, for any one command or job
SR = 16000
TOKENS = [sys.executable, "-P", "-m", "tokens"]  # what the generated sbatch scripts run too
# Variables that would make a process pick a part by itself: the single-process references and the
# submissions must not inherit them from a pytest that itself runs under SLURM or torchrun.
PART_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_COUNT",
             "SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK")
ENV = {k: v for k, v in os.environ.items() if k not in PART_VARS}


def _node_state() -> tuple[bool, str]:
    """Whether SLURM answers with a usable node, and what it said."""
    missing = [tool for tool in ("sinfo", "sbatch", "squeue", "scontrol", "scancel") if not shutil.which(tool)]
    if missing:
        return False, f"not installed: {', '.join(missing)}"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return False, "sinfo did not answer within 15 s"
    said = (result.stdout + result.stderr).strip()
    states = said.split()
    up = result.returncode == 0 and any(s.rstrip("*~#!%$@^-") in ("idle", "mix", "alloc") for s in states)
    return up, f"sinfo -h -o %t: {said or '(nothing)'} (exit {result.returncode})"


@pytest.fixture(scope="module")
def slurm():
    """Skip (with the reason) unless a SLURM node answers; as root, try .ci/slurm.sh once to start one."""
    up, said = _node_state()
    if up:
        return
    if os.geteuid() != 0:
        pytest.skip(f"no SLURM here ({said}); starting one with .ci/slurm.sh needs root")
    try:
        started = subprocess.run(["bash", str(REPO / ".ci" / "slurm.sh")], capture_output=True, text=True, timeout=240)
        script = (started.stdout + started.stderr).strip()[-2000:]
    except subprocess.TimeoutExpired:
        script = ".ci/slurm.sh did not finish in 240 s"
    except OSError as error:
        script = f"cannot run .ci/slurm.sh: {error}"
    up, said = _node_state()
    if not up:
        pytest.skip(f"SLURM cannot start on this machine: {said}; .ci/slurm.sh said: {script}")


def tone(path, seconds, freq):
    t = np.arange(round(seconds * SR)) / SR
    sf.write(path, 0.5 * np.sin(2 * np.pi * freq * t), SR)


def make_dataset(root: Path) -> Path:
    """Pitch classes low/mid/high (some clips two of them), three splits, one clip cut into 3 windows."""
    data = root / "data"
    data.mkdir()
    rows = ["path,labels,split"]
    clips = [("train", f) for f in (200, 260, 320, 450, 520, 600, 800, 950, 1100)] + \
            [("valid", f) for f in (230, 500, 900, 380)] + [("test", f) for f in (280, 560, 1000, 420)]
    for i, (split, freq) in enumerate(clips):
        labels = "low" if freq < 400 else "mid" if freq < 700 else "high"
        if freq in (450, 380, 420):
            labels += ";low"
        tone(data / f"c{i}.wav", 1.0, freq)
        rows.append(f"c{i}.wav,{labels},{split}")
    tone(data / "long.wav", 2.5, 700)  # windows at 0, 1, 2 s
    rows.append("long.wav,high;mid,train")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    return data / "manifest.csv"


def logs(cwd: Path, job: str = "") -> str:
    found = sorted((cwd / "slurm-logs").glob(f"*{job}*.out" if job else "*.out"))
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in found) or "(no slurm-logs)"


def sh(args, cwd: Path, timeout=TIMEOUT) -> str:
    """Run a command; a failure or time-out fails the test with its output and the job logs."""
    try:
        result = subprocess.run([str(a) for a in args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        out = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or "")
        for job in re.findall(r"Submitted batch job (\d+)", out):
            subprocess.run(["scancel", job], timeout=30)
        pytest.fail(f"{' '.join(map(str, args))} took over {timeout} s\n{out}\n{logs(cwd)}")
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{logs(cwd)}")
    return result.stdout


def submitted(out: str) -> str:
    match = re.search(r"Submitted batch job (\d+)", out)
    assert match, out
    return match[1]


def wait_for(job: str, cwd: Path, timeout=TIMEOUT):
    """Poll until the array job leaves the queue, then check that every task completed with exit 0."""
    deadline = time.monotonic() + timeout
    while True:
        queue = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30)
        if queue.returncode != 0 or not queue.stdout.strip():
            break
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], timeout=30)
            pytest.fail(f"job {job} still queued or running after {timeout} s:\n{queue.stdout}\n{logs(cwd, job)}")
        time.sleep(0.5)
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    if shown.returncode == 0:  # scontrol forgets a job MinJobAge (300 s by default) after it ends
        states = re.findall(r"JobState=(\S+).*?ExitCode=(\S+)", shown.stdout)
        assert states and all(s == ("COMPLETED", "0:0") for s in states), f"job {job}: {states}\n{logs(cwd, job)}"


def compare_stores(a: Path, b: Path, splits=("train", "valid", "test")):
    with open_store(a) as one, open_store(b) as two:
        assert one.meta["cache_key"] == two.meta["cache_key"]
        assert (one.classes, one.layers, one.task) == (two.classes, two.layers, two.task)
        assert set(one.splits) == set(two.splits) == set(splits)
        for name in one.splits:
            x, y = one.split(name), two.split(name)
            assert x.num_items == y.num_items and x.complete_mask().all() and y.complete_mask().all()
            for column in ("ids", "sources", "offsets", "durations", "labels", "errors"):
                np.testing.assert_array_equal(x.column(column), y.column(column), err_msg=f"{name}/{column}")
            everything = list(range(x.num_items))
            np.testing.assert_array_equal(x.read_mask(everything), y.read_mask(everything), err_msg=f"{name}/mask")
            for layer in one.layers:
                np.testing.assert_array_equal(x.read_tokens(layer, everything), y.read_tokens(layer, everything),
                                              err_msg=f"{name}/tokens/{layer}")


def leaderboard(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["config"]: row for row in csv.DictReader(f)}


def test_job_arrays_equal_a_single_process(slurm, tmp_path):
    manifest = make_dataset(tmp_path)
    extract_args = [manifest.relative_to(tmp_path), "--layers", "all", "--shard-size", "2", "--num-workers", "0", "--device", "cpu", "-q"]
    jobs = []
    try:
        # Extraction: 3 array tasks over 10 shards (train 5, valid 2, test 2 + the long clip's windows).
        sh([*TOKENS, "slurm", "extract", *extract_args, "--store", "slurm.zarr", "--array", "3", "--gpus", "0",
            "--cpus", "1", "--script", "extract.sbatch"], tmp_path)
        script = (tmp_path / "extract.sbatch").read_text()
        assert "#SBATCH --array=1-3" in script and f"{sys.executable} -P -m tokens extract" in script, script
        # Submitted from another folder, which the script's relative paths and logs must not follow,
        # beside a folder named tokens/ (of stores, say), which must not shadow the package.
        (tmp_path / "tokens").mkdir()
        (tmp_path / "elsewhere").mkdir()
        jobs.append(sh(["sbatch", "--parsable", tmp_path / "extract.sbatch"], tmp_path / "elsewhere").strip().split(";")[0])
        wait_for(jobs[-1], tmp_path)  # polls every 0.5 s; `sbatch --wait` polls at 2, 10, 42 s, ...

        info = json.loads(sh([*TOKENS, "info", "slurm.zarr", "--json"], tmp_path))
        assert {name: (s["complete"], s["shards_complete"], s["failed_items"]) for name, s in info["splits"].items()} == \
               {"train": (True, 6, 0), "valid": (True, 2, 0), "test": (True, 2, 0)}, info["splits"]
        # Each task did its own third of the shards and no more: 10 shards as 4 + 3 + 3, 20 items in all.
        task_logs = [tmp_path / "slurm-logs" / f"tokens-extract-{jobs[0]}_{i}.out" for i in (1, 2, 3)]
        written = [re.search(r"wrote (\d+) items? in (\d+) shards? \((\d+) already", p.read_text()) for p in task_logs]
        assert all(written), logs(tmp_path, jobs[0])
        assert sorted(int(m[2]) + int(m[3]) for m in written) == [3, 3, 4] and sum(int(m[1]) for m in written) == 20, \
            logs(tmp_path, jobs[0])

        # Resubmitting one task redoes only that task's part (complete by now), not the whole job.
        jobs.append(submitted(sh(["sbatch", "--wait", "--array=2", "extract.sbatch"], tmp_path)))
        again = (tmp_path / "slurm-logs" / f"tokens-extract-{jobs[1]}_2.out").read_text()
        assert "wrote 0 items in 0 shards (3 already complete)" in again, again

        sh([*TOKENS, "extract", *extract_args, "--store", "single.zarr"], tmp_path)
        compare_stores(tmp_path / "slurm.zarr", tmp_path / "single.zarr")

        # Probe sweep: 6 configurations (3 heads x 2 seeds) in 2 parts, submitted by `tokens slurm --submit`.
        probe_args = ["slurm.zarr", "--heads", "linear,ep,protobin", "--seeds", "0,1", "--epochs", "2",
                      "--batch-size", "8", "--device", "cpu"]
        out = sh([*TOKENS, "slurm", "probe", *probe_args, "--out", "run", "--array", "2", "--gpus", "0", "--cpus", "1",
                  "--script", "probe.sbatch", "--submit"], tmp_path)
        jobs.append(submitted(out))
        wait_for(jobs[-1], tmp_path)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["part-1-of-2", "part-2-of-2"]
        report = sh([*TOKENS, "report", "run", "--out", "rep"], tmp_path)
        assert "not finished" not in report, report

        sh([*TOKENS, "probe", *probe_args, "--out", "single"], tmp_path)
        merged, single = leaderboard(tmp_path / "rep" / "leaderboard.csv"), leaderboard(tmp_path / "single" / "leaderboard.csv")
        assert len(single) == 6 and sorted(merged) == sorted(single)
        metrics = [c for c in next(iter(single.values())) if c.startswith(("val_", "test_"))]
        assert {"val_map", "test_map"} <= set(metrics)
        for config, row in single.items():
            assert {c: merged[config][c] for c in metrics + ["params", "best_epoch"]} == \
                   {c: row[c] for c in metrics + ["params", "best_epoch"]}, config
    finally:
        for job in jobs:  # nothing of this test keeps running after it
            subprocess.run(["scancel", job], capture_output=True, timeout=30)


def job_field(job: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    found = re.search(rf"\b{field}=(\S+)", shown.stdout)
    return found[1] if found else ""


def shards_done(store: Path) -> int:
    """Complete shards of a store another process is writing; 0 until it can be opened."""
    try:
        with open_store(store) as s:
            return int(sum(s.split(name).complete_mask().sum() for name in s.splits))
    except Exception:  # not created yet, or caught mid-creation: look again
        return 0


def test_a_task_near_its_time_limit_stops_keeping_its_work_and_is_requeued(slurm, tmp_path):
    """SLURM's signal before a task's time limit (USR1 to the script, sent here with scancel as SLURM
    sends it at --signal's lead) stops the extraction mid-run, keeping its finished shards; the task is
    requeued under the same job id and goes on from there. Past --requeue's count it is not requeued
    and fails, and resubmitting it finishes a store equal to a single process's. Before, a task at its
    limit ended TIMEOUT, and a probe array waiting on it (afterok) never started."""
    data = tmp_path / "data"
    data.mkdir()
    rows = ["path,labels,split"]
    for i, freq in enumerate((220, 500, 900)):  # 40 one-second windows each: 60 shards of 2
        tone(data / f"long{i}.wav", 40.0, freq)
        rows.append(f"long{i}.wav,{('low', 'mid', 'high')[i]},{('train', 'train', 'test')[i]}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    store = tmp_path / "slurm.zarr"
    extract_args = ["data/manifest.csv", "--shard-size", "2", "--num-workers", "0", "--device", "cpu", "-q"]
    sh([*TOKENS, "slurm", "extract", *extract_args, "--store", store.name, "--array", "1", "--gpus", "0",
        "--cpus", "1", "--requeue", "1", "--script", "extract.sbatch"], tmp_path)
    script = (tmp_path / "extract.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@120\n#SBATCH --requeue\n#SBATCH --open-mode=append\n" in script, script
    job = submitted(sh(["sbatch", "extract.sbatch"], tmp_path))
    deadline = time.monotonic() + TIMEOUT

    def signal_once_more_shards_are_done(than: int):
        while shards_done(store) <= than:
            assert time.monotonic() < deadline, f"no more than {than} shards written in {TIMEOUT} s\n{logs(tmp_path, job)}"
            time.sleep(0.2)
        sh(["scancel", "--batch", "--signal=USR1", job], tmp_path)

    try:
        signal_once_more_shards_are_done(0)
        while not (job_field(job, "JobState") == "PENDING" and job_field(job, "Restarts") == "1"):
            assert time.monotonic() < deadline, f"job {job} not requeued: {job_field(job, 'JobState')}\n{logs(tmp_path, job)}"
            time.sleep(0.2)
        kept = shards_done(store)
        # Not SLURM's delay of minutes before a requeued job starts; but a start within a second or so of
        # the requeue is refused by the node (the last run's credential is revoked up to that second).
        time.sleep(3)
        sh(["scontrol", "update", f"JobId={job}", "StartTime=now"], tmp_path)
        while job_field(job, "JobState") != "RUNNING":
            assert time.monotonic() < deadline, f"job {job} did not start again\n{logs(tmp_path, job)}"
            time.sleep(0.2)
        signal_once_more_shards_are_done(kept)  # requeued once already: --requeue 1 lets it end here
        while job_field(job, "JobState") in ("RUNNING", "COMPLETING"):
            assert time.monotonic() < deadline, f"job {job} still running after its second signal\n{logs(tmp_path, job)}"
            time.sleep(0.2)
        assert (job_field(job, "JobState"), job_field(job, "ExitCode"), job_field(job, "Restarts")) == ("FAILED", "130:0", "1")
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    log = (tmp_path / "slurm-logs" / f"tokens-extract-{job}_1.out").read_text()  # both runs: appended, not overwritten
    stop = "tokens slurm: the time limit is near: stopping the command, which keeps its finished work"
    first, second = log.index(stop), log.rindex(stop)
    assert log.index("interrupted: ", first) < log.index("tokens slurm: requeueing the task (time 1 of 1)", first) < second, log
    assert log.index("interrupted: ", second) < log.index("tokens slurm: not requeued: tokens slurm --requeue 1 allows no more", second), log
    resumed = re.search(r"resuming: (\d+) of 60 shards already complete", log)
    assert resumed and int(resumed[1]) == kept, (kept, log)

    again = submitted(sh(["sbatch", "--wait", "extract.sbatch"], tmp_path))
    finished = (tmp_path / "slurm-logs" / f"tokens-extract-{again}_1.out").read_text()
    done = re.search(r"wrote \d+ items? in (\d+) shards? \((\d+) already complete\)", finished)
    assert done and int(done[2]) > kept and int(done[1]) + int(done[2]) == 60, finished
    sh([*TOKENS, "extract", *extract_args, "--store", "single.zarr"], tmp_path)
    compare_stores(store, tmp_path / "single.zarr", splits={"train", "test"})


def refused_at_submission(*args) -> str:
    """`tokens slurm ARGS --script job.sbatch` in the current folder: it must exit 2 and write no
    script. Its output."""
    from typer.testing import CliRunner
    from tokens.cli import app

    result = CliRunner().invoke(app, ["slurm", *map(str, args), "--script", "job.sbatch"])
    assert result.exit_code == 2, result.output
    assert not Path("job.sbatch").exists()
    return result.output


@pytest.mark.parametrize("args, message", [
    (["probe", "run.zarr", "--out", "r", "--array", "0"], "'--array'"),
    (["probe", "run.zarr", "--out", "r", "--epochs", "x", "--array", "2"], "tokens probe would refuse them: Invalid value for '--epochs'"),
    (["probe", "run.zarr", "--array", "2"], "tokens probe would refuse them: Missing option '--out'"),
    (["probe", "run.zarr", "--out", "r", "--heads", "ep,bogus", "--array", "2"], "unknown head 'bogus'"),
    (["extract", "data.csv", "--array", "2"], "tokens extract would refuse them: Missing option '--store'"),
    (["probe", "missing.zarr", "--out", "r", "--array", "2", "--submit"], "missing.zarr does not exist"),
    (["probe", "run.zarr", "--out", "whole", "--array", "2"], "whole holds a whole sweep: its parts go to another --out"),
    (["probe", "run.zarr", "--out", "thirds", "--array", "2"], "thirds holds parts of a sweep split another way"),
])
def test_arguments_every_task_would_refuse_write_no_script(tmp_path, monkeypatch, args, message):
    """A mistake fails when the script is written, not in each task of the array once it leaves the queue."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.zarr").mkdir()
    (tmp_path / "whole").mkdir()
    (tmp_path / "whole" / "config.json").write_text("{}")  # a whole sweep's run folder
    (tmp_path / "thirds" / "part-1-of-3").mkdir(parents=True)
    output = refused_at_submission(*args)
    assert message in output, output


@pytest.mark.parametrize("args, message", [
    (["--sweep", "sweep.toml"], "unknown head 'bogus'"),
    (["--heads", "ep", "--option", "ep.nonsense=3"], "head 'ep' has no option nonsense"),
    (["--lr", "-1e-3"], "--lr must be positive"),
    (["--optimizer", "sgd"], "this optimizer has no default learning rate"),
    (["--data", "disk"], "'disk': use auto, stream, ram, gpu"),
])
def test_a_sweep_every_task_would_refuse_is_refused_before_its_store_exists(tmp_path, monkeypatch, args, message):
    """Heads, their options and rates are checked even while the store is still being extracted."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep.toml").write_text("[heads.linear]\n[heads.bogus]\n")
    output = refused_at_submission("probe", "later.zarr", "--out", "r", "--array", "2", *args)
    assert message in output, output


def test_a_probe_array_into_a_folder_of_other_files_is_refused(tmp_path, monkeypatch):
    """Every task would refuse an --out holding the dataset: refused before the script is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.csv").write_text("path,labels,split\n")
    output = " ".join(refused_at_submission("probe", "later.zarr", "--out", "data", "--array", "2").split())
    assert "data holds files this command does not write (manifest.csv)" in output, output


def test_a_script_that_cannot_be_written_is_named_as_the_option_at_fault(tmp_path, monkeypatch):
    from typer.testing import CliRunner
    from tokens.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["slurm", "probe", "later.zarr", "--out", "r", "--array", "2", "--script", "no/such/job.sbatch"])
    assert result.exit_code == 2 and "Invalid value for --script: cannot write no/such/job.sbatch: No such file" in " ".join(
        result.output.split()), result.output


def test_a_folder_whose_name_is_not_utf8_is_written_into_the_script_as_its_bytes(tmp_path, monkeypatch):
    """Linux folder names are bytes: the script's --chdir must name the same folder, not fail half-written."""
    from typer.testing import CliRunner
    from tokens.cli import app

    folder = os.fsencode(tmp_path) + b"/lat\xe9n"
    os.mkdir(folder)
    monkeypatch.chdir(folder)
    result = CliRunner().invoke(app, ["slurm", "probe", "later.zarr", "--out", "r", "--array", "2", "--gpus", "0", "--script", "j.sbatch"])
    assert result.exit_code == 0, result.output
    quoted = shlex.quote(os.fsdecode(folder)).encode("utf-8", "surrogateescape")
    assert folder in quoted and b"#SBATCH --chdir=" + quoted + b"\n" in open(folder + b"/j.sbatch", "rb").read()


def test_a_script_may_be_written_before_its_store_exists(tmp_path, monkeypatch):
    from typer.testing import CliRunner
    from tokens.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["slurm", "probe", "later.zarr", "--out", "r", "--array", "2", "--script", "job.sbatch"])
    assert result.exit_code == 0 and "later.zarr does not exist yet" in result.output, result.output
    assert "#SBATCH --array=1-2" in (tmp_path / "job.sbatch").read_text()


@pytest.mark.parametrize("option, message", [("1/0", "N, the number of parts, must be at least 1"), ("3/2", "I must be between 1 and N"),
                                             ("a/2", "is not of the form I/N")])
def test_a_part_given_by_hand_that_cannot_be_is_named(option, message):
    from tokens.cluster import resolve_part

    with pytest.raises(ValueError, match=message):
        resolve_part(option, {})


def test_a_task_outside_a_contiguous_array_is_refused():
    """A stepped array (--array=1-9:2) numbers its 5 tasks 1, 3, ..., 9: parts would overlap and leave shards unowned."""
    from tokens.cluster import resolve_part

    assert resolve_part(None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "5", "SLURM_ARRAY_TASK_MIN": "1"}) == (5, 5)
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID 7 is not within the 5 tasks"):
        resolve_part(None, {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "5", "SLURM_ARRAY_TASK_MIN": "1"})


def test_torchrun_inside_an_array_task_splits_the_tasks_part_among_its_ranks():
    """The ranks of a task do exactly the task's units between them, each once: before, every rank
    did the whole part. A part given by hand is taken as given (a wrapper may compute it per rank)."""
    from tokens.cluster import resolve_part

    units, tasks, ranks = list(range(20)), 3, 2
    array = {"SLURM_ARRAY_TASK_COUNT": str(tasks), "SLURM_ARRAY_TASK_MIN": "1"}
    for task in range(1, tasks + 1):
        shares = []
        for rank in range(ranks):
            index, count = resolve_part(None, {**array, "SLURM_ARRAY_TASK_ID": str(task), "RANK": str(rank), "WORLD_SIZE": str(ranks)})
            shares += units[index - 1::count]  # how extraction and sweeps take a part
        assert sorted(shares) == units[task - 1::tasks]
    assert [resolve_part("2/3", {"RANK": str(rank), "WORLD_SIZE": "2"}) for rank in (0, 1)] == [(2, 3), (2, 3)]
    assert resolve_part(None, {"RANK": "1", "WORLD_SIZE": "4"}) == (2, 4)  # torchrun alone, as before
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID='abc' is not a whole number"):
        resolve_part(None, {**array, "SLURM_ARRAY_TASK_ID": "abc"})


def test_an_hdf5_store_is_not_split_among_tasks(tmp_path, monkeypatch):
    """HDF5 has no concurrent writers; with its file locking off (common on Lustre and NFS) they corrupt the file."""
    from tokens.extract.run import ExtractionError, extract

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("path,label,split\n")
    output = refused_at_submission("extract", "data.csv", "--store", "s.h5", "--array", "3")
    assert "an HDF5 store takes one writer, so it cannot be filled in 3 parts" in output, output
    with pytest.raises(ExtractionError, match="an HDF5 store takes one writer"):
        extract(tmp_path / "data.csv", tmp_path / "s.h5", part=(2, 3), dry_run=True)


def write_clips(folder: Path, count: int):
    """`count` half-second clips and data.csv listing them, all in the train split."""
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for i in range(count):
        sf.write(folder / f"{i}.wav", (0.1 * rng.standard_normal(SR // 2)).astype(np.float32), SR)
        rows.append(f"{i}.wav,{'ab'[i % 2]},train")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")


def test_a_part_taken_from_the_environment_is_said_with_where_it_came_from(tmp_path, monkeypatch):
    """A launcher's RANK/WORLD_SIZE, or an array task's variables in a script of one's own, make the
    command do a fraction of the work: it says so when it starts and in its summary."""
    from typer.testing import CliRunner
    from tokens.cli import app

    monkeypatch.chdir(tmp_path)
    write_clips(tmp_path, 3)
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "1"}
    result = CliRunner().invoke(app, ["extract", "data.csv", "--store", "s.zarr", "--shard-size", "1", "-q"], env=env)
    assert result.exit_code == 0, result.output
    assert "part 2/2 (from SLURM_ARRAY_TASK_ID/COUNT): this process writes every shard of that part" in result.output
    assert "wrote 1 item in 1 shard (0 already complete) of part 2/2 in" in result.output, result.output
    whole = CliRunner().invoke(app, ["extract", "data.csv", "--store", "s.zarr", "--shard-size", "1", "-q"], env={"SLURM_ARRAY_TASK_ID": None})
    assert whole.exit_code == 0 and "part" not in whole.output and "wrote 2 items in 2 shards (1 already complete) in" in whole.output, whole.output


def test_more_extraction_tasks_than_shards_are_refused_and_a_part_with_no_shard_says_so(tmp_path, monkeypatch):
    """Tasks beyond the dataset's shards would start, load the backbone and write nothing."""
    from typer.testing import CliRunner
    from tokens.cli import app

    monkeypatch.chdir(tmp_path)
    write_clips(tmp_path, 3)
    output = refused_at_submission("extract", "data.csv", "--store", "s.zarr", "--shard-size", "1", "--array", "4")
    assert "4 tasks for a dataset of 3 shards (of up to 1 items): use --array 3 or fewer" in output, output
    assert "--shard-size" not in output  # shards of one item cannot be smaller
    output = refused_at_submission("extract", "data.csv", "--store", "s.zarr", "--shard-size", "2", "--array", "3")
    assert "use --array 2 or fewer, or a smaller --shard-size" in " ".join(output.split()), output
    # The dataset is read at submission: refused as it is now, it is a note (its files may be on their
    # way), unless --submit; and a store of another dataset is refused.
    (tmp_path / "empty.csv").write_text("path,label,split\n")
    noted = CliRunner().invoke(app, ["slurm", "extract", "empty.csv", "--store", "e.zarr", "--array", "2", "--script", "e.sbatch"])
    assert noted.exit_code == 0 and "note: tokens extract would refuse the dataset as it is now" in noted.output, noted.output
    assert "no rows: the dataset is empty" in noted.output and (tmp_path / "e.sbatch").exists()
    output = refused_at_submission("extract", "empty.csv", "--store", "s.zarr", "--array", "2", "--submit")
    assert "tokens extract would refuse them: " in output and "no rows: the dataset is empty" in output, output
    assert CliRunner().invoke(app, ["extract", "data.csv", "--store", "s.zarr", "--shard-size", "1", "-q"]).exit_code == 0
    (tmp_path / "fewer.csv").write_text("\n".join((tmp_path / "data.csv").read_text().splitlines()[:-1]) + "\n")
    output = refused_at_submission("extract", "fewer.csv", "--store", "s.zarr", "--array", "2")
    assert "the dataset differs: train has 3 items in the store, 2 now" in output, output
    by_hand = CliRunner().invoke(app, ["extract", "data.csv", "--store", "s.zarr", "--shard-size", "1", "--part", "4/5"])
    assert by_hand.exit_code == 0, by_hand.output
    assert "note: part 4/5 has no shard to write: the dataset makes 3 (of up to 1 items)" in by_hand.output, by_hand.output
    # --part's former name, which sbatch scripts written by earlier versions pass: resubmitting them still works
    former = CliRunner().invoke(app, ["extract", "data.csv", "--store", "s.zarr", "--shard-size", "1", "--shard", "4/5"])
    assert former.exit_code == 0 and "note: part 4/5 has no shard to write" in former.output, former.output


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size 0: use 1 or more"),
    (["--num-workers", "-1"], "--num-workers -1: use 0 or more"),
    (["--dtype", "float8"], "--dtype 'float8'"),
    (["--precision", "fp16"], "--precision 'fp16'"),
    (["--format", "parquet"], "--format 'parquet'"),
    (["--codec", "lzf"], "codec 'lzf' is not available for zarr stores"),
    (["-b", "bogus"], "unknown backbone 'bogus'"),
    (["--layers", "99"], "--layers: 99 is not a block of this backbone"),
    (["-o", "foo=1"], "takes the options"),
    (["-b", "audiomae", "-c", "missing.pth", "--submit"], "missing.pth: no such checkpoint file"),
    (["--dry-run"], "--dry-run in every task would write nothing"),
])
def test_extract_options_every_task_would_refuse_are_refused_at_submission(tmp_path, monkeypatch, args, message):
    """The same rules as `tokens extract` applies, before a job array waits hours in the queue to fail in every task."""
    from typer.testing import CliRunner
    from tokens.cli import app

    monkeypatch.chdir(tmp_path)
    write_clips(tmp_path, 3)
    output = refused_at_submission("extract", "data.csv", "--store", "s.zarr", "--array", "2", *args)
    assert ("tokens extract would refuse them" in output or "dry-run" in message) and message in output, output
    accepted = CliRunner().invoke(app, ["slurm", "extract", "data.csv", "--store", "s.zarr", "--shard-size", "1", "--array", "2",
                                        "--script", "job.sbatch"])
    assert accepted.exit_code == 0 and (tmp_path / "job.sbatch").exists(), accepted.output
    # Without --submit, a checkpoint still to come is a note, as a dataset still to come is.
    later = CliRunner().invoke(app, ["slurm", "extract", "data.csv", "--store", "s.zarr", "-b", "audiomae", "-c", "later.pth",
                                     "--array", "2", "--script", "later.sbatch"])
    assert later.exit_code == 0 and "note: later.pth does not exist yet" in later.output, later.output


@pytest.mark.parametrize("args, message", [
    (["--gpus", "2"], "Invalid value for --gpus: a task uses one GPU, not 2: give --gpus 1 and more --array tasks"),
    (["--mem", "64G\nrm -rf ~"], "is not a SLURM mem (e.g. 64G)"),
    (["--time", "soon"], "'soon' is not a SLURM time (e.g. 04:00:00)"),
    (["--time", "1-2-3"], "'1-2-3' is not a SLURM time (e.g. 04:00:00)"),
    (["--time", "00:03:00"], "00:03:00 leaves no time to work before the signal to requeue, which comes 2-3 minutes before the limit"),
    (["--time", "3"], "3 leaves no time to work before the signal to requeue"),
    (["--requeue", "-1"], "Invalid value for '--requeue'"),
    (["--after", "12;echo"], "is not a SLURM after (e.g. 1234,1235)"),
    (["--account", "proj\n#SBATCH --x"], "is not a SLURM account (e.g. proj42)"),
    (["--constraint", "h100 ;id"], "is not a SLURM constraint (e.g. h100|a100)"),
    (["--gpus", "0", "--device", "cuda"], "--device cuda needs a GPU, and with --gpus 0 the tasks have none"),
    (["--gpus", "0", "--data", "gpu"], "--data gpu needs a GPU, and with --gpus 0 the tasks have none"),
    (["--device", "cuda:1"], "--device cuda:1: each task sees only the GPU it is given, as cuda:0"),
])
def test_sbatch_settings_that_cannot_be_are_refused_before_a_script_is_written(tmp_path, monkeypatch, args, message):
    """They are written into #SBATCH lines: a newline in one would add a line the shell runs."""
    monkeypatch.chdir(tmp_path)
    output = refused_at_submission("probe", "later.zarr", "--out", "r", "--array", "2", *args)
    assert message in " ".join(output.split()), output


@pytest.mark.parametrize("folder", ["exp%j 50%", "back\\slash"])
def test_a_folder_sbatch_would_read_otherwise_is_refused(tmp_path, monkeypatch, folder):
    """sbatch drops a backslash from #SBATCH --chdir even inside quotes, and expands %j in the log
    path: the tasks would fail to launch, with their error only in slurmd's log."""
    (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / folder)
    output = " ".join(refused_at_submission("probe", "later.zarr", "--out", "r", "--array", "2").split())
    assert "sbatch cannot take a folder whose path holds" in output and "run tokens slurm from another folder" in output, output


def test_a_script_waits_for_the_jobs_it_is_told_to_and_its_tasks_log_quietly(tmp_path, monkeypatch):
    from typer.testing import CliRunner
    from tokens.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["slurm", "probe", "later.zarr", "--out", "r", "--array", "2", "--after", "41,42_3",
                                      "--script", "job.sbatch"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "job.sbatch").read_text()
    assert "#SBATCH --dependency=afterok:41:42_3" in text
    assert "it stays pending (DependencyNeverSatisfied).\n# Then scancel it, resubmit the failed tasks" in text  # what afterok does on a failure
    assert "probe later.zarr --out r --quiet --part" in text
    CliRunner().invoke(app, ["slurm", "probe", "later.zarr", "--out", "r", "-q", "--array", "2", "--script", "job.sbatch"])
    assert text.count("--quiet") == 1 and "--quiet" not in (tmp_path / "job.sbatch").read_text()  # -q given: not twice
    for option, value, line in (("--mem", "64GB", "--mem=64GB"), ("--mem", "16g", "--mem=16g"), ("--time", "UNLIMITED", "--time=UNLIMITED"),
                                ("--time", "1-12:00:00", "--time=1-12:00:00"), ("--after", "7:8", "--dependency=afterok:7:8"),
                                ("--account", "proj-42", "--account=proj-42"), ("--qos", "high", "--qos=high"),
                                ("--constraint", "h100|a100", "--constraint=h100|a100"), ("--partition", "gpu", "--partition=gpu")):
        result = CliRunner().invoke(app, ["slurm", "probe", "later.zarr", "--out", "r", "--array", "2", option, value, "--script", "job.sbatch"])
        assert result.exit_code == 0 and f"#SBATCH {line}\n" in (tmp_path / "job.sbatch").read_text(), result.output


@pytest.mark.parametrize("limit, minutes", [("30", 30), ("30:15", 31), ("4:00:00", 240), ("1-12", 2160), ("1-12:30", 2190),
                                            ("2-00:00:30", 2881), ("UNLIMITED", None), ("0", None)])
def test_time_limits_are_read_in_slurms_forms(limit, minutes):
    """sbatch's --time forms: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]],
    rounded up to whole minutes as SLURM does (3:30 is 4 minutes); 0 is no limit."""
    from tokens.cluster import slurm_minutes

    assert slurm_minutes(limit) == minutes


def test_a_task_is_requeued_near_its_limit_unless_told_not_to(tmp_path, monkeypatch):
    """By default the script traps SLURM's USR1, sent 2 minutes before the limit, around a command run in
    the background (a shell runs traps only between commands); --requeue 0 runs the command plainly."""
    from typer.testing import CliRunner
    from tokens.cli import app

    monkeypatch.chdir(tmp_path)
    for args, requeued in ((["--time", "10"], True), (["--time", "3:30"], True), (["--time", "0"], True),
                           (["--requeue", "0", "--time", "3"], False)):
        result = CliRunner().invoke(app, ["slurm", "probe", "later.zarr", "--out", "r", "--array", "2", *args, "--script", "job.sbatch"])
        assert result.exit_code == 0, result.output
        text = (tmp_path / "job.sbatch").read_text()
        assert ("#SBATCH --signal=B:USR1@120" in text) == ("#SBATCH --requeue" in text) == ("trap stop_and_requeue USR1" in text) == requeued
        assert text.endswith('--part "$SLURM_ARRAY_TASK_ID/2" &\ncommand=$!\nwait "$command"\n' if requeued else '--part "$SLURM_ARRAY_TASK_ID/2"\n'), text
        # it parses, so that no task fails on a syntax error hours later in the queue
        checked = subprocess.run(["bash", "-n", "job.sbatch"], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr


# Stand-ins for the command a task runs and for scontrol, to run the script's requeueing with bash
# alone. The command says when it works, and what it did; STUB says what it does.
STUB_COMMAND = """#!/bin/bash
case "$STUB" in
  work) trap 'kill $!; echo "command: stopped by SIGTERM"; exit 130' TERM; touch started; sleep 60 & wait ;;
  finish-as-signalled) trap '' TERM; touch started; kill -USR1 "$PPID"; sleep 0.5; echo "command: finished"; exit 0 ;;
  fail) touch started; exit 3 ;;
esac
"""
STUB_SCONTROL = """#!/bin/bash
echo "$@" >> scontrol-calls
exit "$SCONTROL_STATUS"
"""


@pytest.mark.parametrize("stub, restarts, scontrol_status, exit_code, said, requeued", [
    ("work", 0, 0, 0, "requeueing the task (time 1 of 3): it goes on where it stopped", True),
    ("work", 2, 0, 0, "requeueing the task (time 3 of 3)", True),
    ("work", 3, 0, 130, "not requeued: tokens slurm --requeue 3 allows no more; resubmit it (sbatch --array=2 SCRIPT) to go on", False),
    ("work", 0, 1, 130, "scontrol could not requeue the task; resubmit it (sbatch --array=2 SCRIPT) to go on", True),
    ("finish-as-signalled", 0, 0, 0, "the command had finished: nothing to go on with", False),
    ("fail", 0, 0, 3, None, False),
])
def test_the_scripts_requeueing_with_bash_alone(tmp_path, monkeypatch, stub, restarts, scontrol_status, exit_code, said, requeued):
    """What a task does on SLURM's USR1, wherever SLURM cannot run: the command is stopped and waited
    for, the task requeued while requeues are left, and the script's exit is the command's otherwise
    (a task that finished as the signal came is not requeued, nor marked failed)."""
    from tokens.cluster import sbatch_script

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bin").mkdir()
    for name, text in (("command", STUB_COMMAND), ("scontrol", STUB_SCONTROL)):
        (tmp_path / "bin" / name).write_text(text)
        (tmp_path / "bin" / name).chmod(0o755)
    (tmp_path / "job.sbatch").write_text(sbatch_script("extract", ["data.csv", "--store", "s.zarr"], array=4, job_name="t",
                                                       workdir=tmp_path, python=str(tmp_path / "bin" / "command")))
    env = {**ENV, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "STUB": stub, "SCONTROL_STATUS": str(scontrol_status),
           "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "2", "SLURM_RESTART_COUNT": str(restarts)}
    script = subprocess.Popen(["bash", "job.sbatch"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline and script.poll() is None, script.communicate()
        time.sleep(0.05)
    if stub == "work":
        time.sleep(0.2)  # the command's trap is set just before it says it started
        script.send_signal(signal.SIGUSR1)
    out, _ = script.communicate(timeout=30)
    assert script.returncode == exit_code, out
    assert ("tokens slurm: the time limit is near" in out) == (stub != "fail"), out
    assert ("command: stopped by SIGTERM" in out) == (stub == "work"), out
    if said:
        assert f"tokens slurm: {said}" in out, out
    calls = (tmp_path / "scontrol-calls").read_text() if (tmp_path / "scontrol-calls").exists() else ""
    assert calls == ("requeue 7_2\n" if requeued else ""), calls


def test_a_probe_array_submitted_after_its_extraction_may_precede_its_store(tmp_path, monkeypatch):
    """The README's workflow: the extraction's job is queued, its store not made yet; the probe array
    waits for it (--after), so it is submitted, with a note, rather than refused for a missing store."""
    from typer.testing import CliRunner
    from tokens.cli import app

    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho \"Submitted batch job 4712 ($*)\"\n")
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    args = ["slurm", "probe", "later.zarr", "--out", "r", "--array", "2", "--script", "job.sbatch", "--submit"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "later.zarr does not exist" in refused.output
    result = CliRunner().invoke(app, args + ["--after", "4711"])
    assert result.exit_code == 0 and "later.zarr does not exist yet" in result.output, result.output
    assert "Submitted batch job 4712 (job.sbatch)" in result.output
    assert "#SBATCH --dependency=afterok:4711" in (tmp_path / "job.sbatch").read_text()


@pytest.mark.parametrize("args, message", [
    (["-b", "nosuch"], "unknown backbone 'nosuch'"),
    (["-b", "eat", "-o", "bogus=1"], "eat takes the options"),
    (["-b", "eat", "-o", "dim=0"], "eat option dim=0 must be positive"),
    (["-b", "eat", "-o", "final_norm=1"], "--backbone-option final_norm: use --final-norm"),
    (["-b", "timm"], "name the timm model: timm:<model_name>"),
    (["-b", "eat", "--layers", "x"], "Invalid value for --layers: 'x' is not 'all' or a comma-separated list of integers"),
])
def test_a_backbone_every_task_would_refuse_is_refused_before_its_checkpoint_exists(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    output = refused_at_submission("extract", "data.csv", "--store", "s.zarr", "-c", "later.pt", "--array", "2", *args)
    assert message in " ".join(output.split()), output


def test_a_checkpoint_still_to_come_says_what_is_not_checked_yet(tmp_path, monkeypatch):
    from typer.testing import CliRunner
    from tokens.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["slurm", "extract", "data.csv", "--store", "s.zarr", "-b", "eat", "-c", "later.pt",
                                      "--array", "2", "--script", "job.sbatch"])
    assert result.exit_code == 0 and "later.pt does not exist yet; the tasks need it when they start (until then the " \
        "backbone's name and options are checked, not its layers nor the dataset)" in " ".join(result.output.split()), result.output
