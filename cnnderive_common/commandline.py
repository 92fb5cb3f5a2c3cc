"""What the subcommands' command-line modules share: the error for bad input, the
progress bar of the proofs, and how a command stops on a signal or a closed pipe.  The
console script (cnnderive/cli.py) turns a UsageError into one line and exit code 2."""

from __future__ import annotations

import contextlib
import os
import signal
import sys


class UsageError(Exception):
    """A problem with the user's input: printed as one clear line, exit code 2."""


@contextlib.contextmanager
def proof_progress():
    """A ``progress(done, total)`` callback for derive.verify.verify_layers that shows a
    progress bar on a terminal's stderr (the proofs take 15 s or more), and nothing
    elsewhere."""
    from tqdm import tqdm

    bar = tqdm(desc="proving", unit=" configurations", file=sys.stderr, disable=None, leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield progress
    finally:
        bar.close()


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived.  A KeyboardInterrupt, so that every place that tidies up after
    Ctrl-C (a training run keeps its checkpoint and draws its plots) does so for it too."""


# Exit codes of a command stopped by a signal, as a shell reports them (128 + signal number).
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _raise_terminated(signum, frame):
    raise Terminated()


def _default_sigterm_in_child() -> None:
    """In a forked child (a proof or training worker), SIGTERM ends the process again:
    process pools stop their workers with it, and a worker that raised Terminated
    instead would not stop."""
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_default_sigterm_in_child)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises no second
    BrokenPipeError (the reader went away; nothing more can reach it)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is no real file (pytest, say)
        pass
