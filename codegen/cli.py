"""``cnnderive generate``: (re)write generated/ from the proven closed forms."""

from __future__ import annotations

import sys
from pathlib import Path

from cnnderive.cli import UsageError, proof_progress
from cnnderive.files import folder_problem


def add_parsers(commands) -> None:
    generate = commands.add_parser(
        "generate",
        help="rewrite generated/ from the proven closed forms",
        description="Prove every closed form, then render generated/ from the templates.  With "
        "--check, write nothing: print a unified diff and exit 1 if generated/ is out of date.",
    )
    generate.add_argument(
        "--check", action="store_true", help="compare only; exit 1 on any difference"
    )
    generate.add_argument(
        "--output", type=Path, default=None, help="directory to write (default: generated/)"
    )
    generate.set_defaults(run=run_generate)


def run_generate(args) -> int:
    from codegen.render import DEFAULT_OUTPUT, UnverifiedError, foreign_files, generate

    output = args.output or DEFAULT_OUTPUT
    problem = None if args.check else folder_problem(output)
    if problem is not None:  # before the proofs, which take a while
        raise UsageError(f"cannot write to {output}: {problem}; choose another --output")
    try:
        with proof_progress() as progress:
            diffs = generate(output=output, check=args.check, progress=progress)
    except UnverifiedError as error:
        print(f"cnnderive generate: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(
            f"cnnderive generate: could not write {error.filename or output}: "
            f"{error.strerror or error}",
            file=sys.stderr,
        )
        return 1
    foreign = foreign_files(output)
    listing = ", ".join(str(output / name) for name in foreign)
    if args.check:
        if diffs or foreign:
            sys.stdout.write("".join(diffs))
            if foreign:
                print(
                    f"{output} holds files that cnnderive does not generate: {listing}; "
                    "remove them (they would be shipped and imported with the package).",
                    file=sys.stderr,
                )
            if diffs:
                print(
                    f"\n{output} differs from what the proofs and templates generate; run "
                    "`cnnderive generate`.",
                    file=sys.stderr,
                )
            return 1
        print(f"{output} is up to date.")
        return 0
    print(f"wrote {output} ({len(diffs)} file(s) changed)")
    if foreign:
        print(
            f"note: {output} also holds files that cnnderive does not generate, left as they "
            f"are: {listing}",
            file=sys.stderr,
        )
    return 0
