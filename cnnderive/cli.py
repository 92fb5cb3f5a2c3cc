"""The ``cnnderive`` console script: one entry point, a subcommand for each use.

Each subcommand's module is imported only when that subcommand runs, so that
``cnnderive train`` never imports SymPy and ``cnnderive derive`` never loads data.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures.process import BrokenProcessPool

from cnnderive_common.commandline import UsageError


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

    from cnnderive.train import cli as train_cli
    from codegen import cli as codegen_cli
    from derive import cli as derive_cli

    derive_cli.add_parsers(commands)
    codegen_cli.add_parsers(commands)
    train_cli.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports the subcommands' modules: Ctrl-C may come here
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
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
    sys.exit(main())
