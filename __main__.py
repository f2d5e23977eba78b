"""The `tokens` command's entry, for the console script and `python -m tokens`.

It takes the stop signals before anything heavy is imported: torch takes seconds to import, and
SIGTERM (SLURM's at a time limit, or the requeueing sbatch script's) or Ctrl-C in them should say what
was stopped, not end the process without a word. SIGTERM stops a command as Ctrl-C does: it says what
is kept and how to go on, where a task's log used to just end.
"""

import signal
import sys


def _terminated(signum, frame):
    # One is enough: a second (SLURM signals every process of a job, a user may send another) would
    # cut short the cleanup that writes the shards in hand and stops the decoding workers.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main():
    signal.signal(signal.SIGTERM, _terminated)
    try:
        from tokens.cli import main as run_command_line
    except KeyboardInterrupt:
        sys.stderr.write("interrupted while tokens was starting: nothing was done\n")
        sys.exit(130)
    run_command_line()


if __name__ == "__main__":  # not again in a spawned child process, which imports this module
    main()
