"""The ``cnnderive`` console script: one entry point, a subcommand for each use.

Each subcommand's module is imported only when that subcommand runs, so that
``cnnderive train`` never imports SymPy and ``cnnderive derive`` never loads data.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from cnnderive_common.commandline import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    Terminated,
    UsageError,
    sigterm_as_interrupt,
    silence_stdout,
)

# The top-level packages that cnnderive installs beside itself.
SIBLING_PACKAGES = ("derive", "codegen", "generated")


def shadowing_problem(names=SIBLING_PACKAGES) -> str | None:
    """Why one of cnnderive's top-level packages ``names`` would not be cnnderive's own,
    or None.

    ``python -m cnnderive`` puts the current folder first on the import path, so a
    user's ``derive.py`` (or ``codegen/``, ``generated.py``) there would be imported in
    place of the package installed beside ``cnnderive``, and fail far from the cause.
    """
    home = Path(__file__).resolve().parent.parent
    for name in names:
        module = sys.modules.get(name)
        if module is not None:
            origin = getattr(module, "__file__", None)
        else:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            origin = spec.origin if spec is not None else None
        if origin is None:  # missing (generated/ deleted, say): each command says so
            continue
        found = Path(origin).resolve()
        if found != home / name / "__init__.py":
            return (
                f"{found} shadows cnnderive's package '{name}'; rename that file or run "
                "cnnderive from another folder"
            )
    return None


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

    from cnnderive.book import cli as book_cli
    from codegen import cli as codegen_cli
    from derive import cli as derive_cli

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
    shadowed = shadowing_problem(("generated",))

    def unavailable(args) -> int:
        if shadowed is not None:  # another generated package came first: not ours to rewrite
            raise UsageError(f"the generated layers cannot be imported: {shadowed}")
        raise UsageError(
            f"the generated layers cannot be imported ({reason}); run `cnnderive generate` "
            "to write generated/ again"
        )

    for name in TRAINING_COMMANDS:
        command = commands.add_parser(name, help=f"{name} (unavailable: generated/ is broken)")
        # Whatever options follow are the training command's own: not checked here.
        command.set_defaults(run=unavailable, takes_any_arguments=True)


def main(argv: list[str] | None = None) -> int:
    # The parser needs derive and codegen; a shadowed generated stops only the training
    # commands (see _add_unavailable_training), and derive still works.
    problem = shadowing_problem(("derive", "codegen"))
    if problem is not None:
        print(f"cnnderive: error: {problem}", file=sys.stderr)
        return 2
    with sigterm_as_interrupt():
        try:
            parser = build_parser()  # imports the subcommands' modules: Ctrl-C may come here
        except KeyboardInterrupt as stop:
            return _stopped(stop)
        args, unknown = parser.parse_known_args(argv)
        if unknown and not getattr(args, "takes_any_arguments", False):
            parser.parse_args(argv)  # argparse's own message, from the subcommand's parser
        return _run(args)


def _stopped(stop: KeyboardInterrupt) -> int:
    terminated = isinstance(stop, Terminated)
    print("terminated" if terminated else "interrupted", file=sys.stderr)
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


def _run(args) -> int:
    try:
        code = int(args.run(args) or 0)
        # Output to a pipe is buffered: flushed here, a reader that went away shows now,
        # where it is handled, and not in the interpreter's exit, which would print an
        # "Exception ignored" message.
        sys.stdout.flush()
        return code
    except UsageError as error:
        print(f"cnnderive {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        return _stopped(stop)
    except BrokenPipeError:
        # The reader of our output went away (`cnnderive evaluate RUN | head -1`): stop
        # quietly, as command-line tools do.
        silence_stdout()
        return EXIT_BROKEN_PIPE
    except UnicodeEncodeError as error:
        encoding = getattr(sys.stdout, "encoding", None) or error.encoding
        print(
            f"cnnderive {args.command}: error: the output encoding ({encoding}) cannot show "
            f"{error.object[error.start : error.end]!a}; set PYTHONIOENCODING=utf-8",
            file=sys.stderr,
        )
        return 2
    except BrokenProcessPool:
        print(
            f"cnnderive {args.command}: a proof worker process died (killed, or out of "
            "memory?); run the command again",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
