"""The worker processes of an extraction (the dataset check's pool, the DataLoader's decoders): how
they start and stop so that Ctrl-C and SLURM's SIGTERM stop a run cleanly.

Both signals reach every process of the group. A worker that took one itself died, or broke off
mid-task, at a moment of its own choosing, and raced the parent's orderly stop: torch's DataLoader
then raised 'worker killed by signal' in the parent, or a worker waited forever at exit to send a
batch that nobody would read, and so did the parent, waiting for it. So the workers leave both
signals to the parent, which stops them: the decoders are killed (they hold nothing it needs), the
checkers finish the chunk in hand.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
WORKER_NICENESS = 10


def leave_signals_to_the_parent():
    """In a worker, first thing: Ctrl-C and SIGTERM are the parent's to act on. They were blocked
    since the fork (signals_held): one that came meanwhile is dropped as they are unblocked."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def start_checking_worker():
    """A dataset-checking process's init: as a decoding worker, it leaves the stop signals to the
    parent; and it exits if the parent is killed outright (SIGKILL, the OOM killer), which no
    signal of its own would tell it (torch's workers watch their parent in the same way)."""
    leave_signals_to_the_parent()
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


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
    """Around the fork of workers: the children start with the stop signals blocked, until their
    first line ignores them (torch's DataLoader sets a SIGTERM handler of its own before that line,
    one that kills a worker signalled by anyone but its parent); in the parent, a stop signal that
    comes meanwhile is acted on once they run. Outside the main thread, where Python runs no
    handler, it holds nothing; nor does it hold a signal whose handler was set outside Python."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    before: dict = {}
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # in this thread, which forks: the children inherit it
    try:
        _swap_in(lambda signum, frame: held.append(signum), before)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one pending for the process comes now, and is held
        _restore(before)
    for signum in dict.fromkeys(held):  # acted on as it would have been: a handler that raises ends the run
        signal.raise_signal(signum)


def _swap_in(handler, before: dict):
    """Set `handler` for each stop signal whose handler Python set (one set outside it could not be
    put back), recording in `before` each one it replaces as it goes."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not None:
            before[signum] = signal.signal(signum, handler)


def _restore(handlers: dict):
    """Put every handler back, even if one put back first runs for a signal meanwhile and raises
    (that error is raised once all are back: none is left holding)."""
    raised = None
    for signum, handler in handlers.items():
        while True:
            try:
                signal.signal(signum, handler)
                break
            except BaseException as error:  # a KeyboardInterrupt, from a handler put back
                raised = raised or error
    if raised is not None:
        raise raised


def stop_checking_workers(pool):
    """Stop a dataset-checking pool on an error or an interruption: the chunks not started are
    dropped, and the ones in hand (a second or so) waited for, deaf to further stop signals: a
    second Ctrl-C that broke off this wait left the parent joining its pool forever. (Killing the
    processes instead makes Python 3.11's pool fail on the chunks its map cancelled, and hang.)"""
    with _stop_signals_ignored():
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _stop_signals_ignored():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before: dict = {}
    try:
        _swap_in(signal.SIG_IGN, before)
        yield
    finally:
        _restore(before)


def stop_decoding_workers(batches):
    """Stop a DataLoader iterator's worker processes now, on an error or an interruption. They are
    killed first: they ignore the stop signals, and torch's shutdown would wait up to 5 s for each
    busy one in turn (past SLURM's grace before its SIGKILL, with many workers). torch is told first,
    so that its SIGCHLD handler does not take their deaths for a failure; its shutdown then closes
    its queues and threads. Dropping the iterator is not enough on an error path: the traceback
    keeps it alive (in a notebook, for as long as the error is kept), and so does an error raised by
    the iterator itself, through its frame."""
    if batches is None or not hasattr(batches, "_shutdown_workers"):  # only the multi-process iterator has workers
        return
    from torch.utils.data._utils.signal_handling import _remove_worker_pids

    if batches._worker_pids_set:
        _remove_worker_pids(id(batches))
        batches._worker_pids_set = False
    for worker in batches._workers:
        if worker.is_alive():
            worker.kill()
    for worker in batches._workers:
        worker.join()
    try:
        batches._shutdown_workers()
    except RuntimeError:  # torch's SIGCHLD handler, for a worker that died before (the OOM killer)
        pass  # its shutdown is done all the same: torch forgets the workers in a finally
