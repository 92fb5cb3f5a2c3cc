"""What the subcommands' command-line modules share: the error for bad input, and the
progress bar of the proofs.  The console script (cnnderive/cli.py) turns a UsageError
into one line and exit code 2."""

from __future__ import annotations

import contextlib
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
