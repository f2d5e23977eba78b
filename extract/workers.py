"""The worker processes of an extraction (the dataset check's pool, the DataLoader's decoders): how
they start and stop so that Ctrl-C and SLURM's SIGTERM stop a run cleanly.

Both signals reach every process of the group. A worker that took one itself died, or broke off
mid-task, at a moment of its own choosing, and raced the parent's orderly stop: torch's DataLoader
then raised 'worker killed by signal' in the parent, or a worker waited forever at exit to send a
batch that nobody would read, and so did the parent, waiting for it. So the workers leave both
signals to the parent, which stops them, and kills what does not stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
WORKER_NICENESS = 10


def leave_signals_to_the_parent():
    """In a worker, first thing: Ctrl-C and SIGTERM are the parent's to act on."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def start_decoding_worker(worker_id: int):
    """A DataLoader worker's init: it leaves the stop signals to the parent, and runs at a lower
    priority: it still takes every idle core, but gives way to the main process's threads and to the
    kernel's work of writing to disk. On the two-GPU H200 host, a one-layer extraction with 31
    workers streamed 1 764 and 1 804 clips/s this way, against 1 671 and 1 723 at normal priority
    (interleaved runs of 32 768 clips)."""
    leave_signals_to_the_parent()
    os.nice(WORKER_NICENESS)


@contextlib.contextmanager
def signals_held():
    """Around the fork of workers: a stop signal that comes meanwhile is acted on once they run
    (and ignore it), not in a child between its fork and its first line, where it inherited the
    parent's handler. Outside the main thread, where Python runs no handler, it holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    before = {signum: signal.signal(signum, lambda signum, frame: held.append(signum)) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])


def stop_decoding_workers(batches):
    """Stop a DataLoader iterator's worker processes now. Dropping the iterator is not enough on an
    error path: the traceback keeps it alive (in a notebook, for as long as the error is kept), and
    so does an error raised by the iterator itself, through its frame. A worker that does not stop
    within torch's wait is killed: it ignores the SIGTERM that torch would send it."""
    if batches is None or not hasattr(batches, "_shutdown_workers"):  # only the multi-process iterator has workers
        return
    try:
        batches._shutdown_workers()
    except RuntimeError:  # torch's SIGCHLD handler, when a worker died of something else (the OOM killer)
        pass  # its shutdown is done all the same: torch forgets the workers in a finally
    for worker in batches._workers:
        if worker.is_alive():
            worker.kill()
            worker.join()

