"""The ``cnnderive`` console script: one entry point, a subcommand for each use.

Each subcommand's module is imported only when that subcommand runs, so that
``cnnderive train`` never imports SymPy and ``cnnderive derive`` never loads data.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from concurrent.futures.process import BrokenProcessPool


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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cnnderive")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnderive",
        description="Derive CNN gradients with SymPy, prove their closed forms, "
        "generate NumPy code from them and train networks with it.",
    )
    parser.add_argument("--version", action="version", version=f"cnnderive {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from codegen import cli as codegen_cli
    from derive import cli as derive_cli
    from cnnderive.book import cli as book_cli

    derive_cli.add_parsers(commands)
    codegen_cli.add_parsers(commands)
    try:
        from cnnderive.train import cli as train_cli
    except Exception as error:  # any error importing generated/: deleted, edited, half-written
        _add_unavailable_training(commands, error)
    else:
        train_cli.add_parsers(commands)
    book_cli.add_parsers(commands)
    return parser


TRAINING_COMMANDS = ("train", "evaluate", "predict")


def _add_unavailable_training(commands, error: Exception) -> None:
    """The training commands, when the generated layers they run cannot be imported:
    each says so in one line and names the way back (`cnnderive generate`), while
    derive, verify and generate keep working."""
    where = getattr(error, "filename", None) or getattr(error, "name", None) or ""
    detail = str(error).splitlines()[0] if str(error) else ""
    reason = f"{type(error).__name__}{' in ' + str(where) if where else ''}: {detail}"

    def unavailable(args) -> int:
        raise UsageError(
            f"the generated layers cannot be imported ({reason}); run `cnnderive generate` "
            "to write generated/ again"
        )

    for name in TRAINING_COMMANDS:
        command = commands.add_parser(name, help=f"{name} (unavailable: generated/ is broken)")
        # Whatever options follow are the training command's own: not checked here.
        command.set_defaults(run=unavailable, takes_any_arguments=True)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports the subcommands' modules: Ctrl-C may come here
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_any_arguments", False):
        parser.parse_args(argv)  # argparse's own message, from the subcommand's parser
    try:
        return int(args.run(args) or 0)
    except UsageError as error:
        print(f"cnnderive {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenProcessPool:
        print(
            f"cnnderive {args.command}: a proof worker process died (killed, or out of "
            "memory?); run the command again",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    # Run as `python -m cnnderive.cli`, this file is the module __main__, and its
    # UsageError would not be the one the subcommands raise: use the package's module.
    from cnnderive.cli import main as package_main

    sys.exit(package_main())
