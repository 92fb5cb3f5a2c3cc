"""``cnnderive generate``: (re)write generated/ from the proven closed forms."""

from __future__ import annotations

import sys
from pathlib import Path

from cnnderive_common.commandline import UsageError, proof_progress
from cnnderive_common.files import folder_problem


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
    generate.add_argument(
        "--equation",
        action="append",
        metavar='"NAME: EQ"',
        help="derive, prove and write the layer this equation defines, as NAME.py in the "
        "package --output (repeatable; --output is then required)",
    )
    generate.set_defaults(run=run_generate)


def run_generate_equations(args) -> int:
    from codegen.render import UnverifiedError, render_equations, write_package
    from derive.cli import equation_layer
    from derive.equation import split_name

    if args.output is None:
        raise UsageError(
            "--equation writes a package of its own: give its folder with --output DIR "
            "(generated/ holds the catalogue)"
        )
    if args.check:
        raise UsageError(
            "--check compares generated/ with the catalogue; leave it out with --equation"
        )
    layers = []
    for text in args.equation:
        if split_name(text, "")[0] == "":
            raise UsageError(
                f'name the layer: --equation "NAME: {text.strip()}" (NAME becomes NAME.py)'
            )
        layer = equation_layer(text)
        if any(layer.name == other.name for other in layers):
            raise UsageError(f"two equations are named {layer.name!r}; give each its own name")
        layers.append(layer)
    problem = folder_problem(args.output)
    if problem is not None:
        raise UsageError(f"cannot write to {args.output}: {problem}; choose another --output")
    try:
        with proof_progress() as progress:
            files = render_equations(layers, progress=progress)
    except UnverifiedError as error:
        print(f"cnnderive generate: {error}", file=sys.stderr)
        return 1
    try:
        write_package(args.output, files)
    except OSError as error:
        print(
            f"cnnderive generate: could not write {error.filename or args.output}: "
            f"{error.strerror or error}",
            file=sys.stderr,
        )
        return 1
    names = ", ".join(f"{layer.name}.py" for layer in layers)
    print(f"wrote {args.output}: {names} (a package that imports NumPy only)")
    return 0


def run_generate(args) -> int:
    if args.equation:
        return run_generate_equations(args)
    from codegen.conformance import KernelConformanceError
    from codegen.render import (
        DEFAULT_OUTPUT,
        UnverifiedError,
        differences,
        foreign_files,
        render,
        write_generated,
    )
    from codegen.translation import TranslationError

    output = args.output or DEFAULT_OUTPUT
    problem = None if args.check else folder_problem(output)
    if problem is not None:  # before the proofs, which take a while
        raise UsageError(f"cannot write to {output}: {problem}; choose another --output")
    try:
        with proof_progress() as progress:
            files = render(progress=progress)
        diffs = differences(files, output)
        foreign = foreign_files(files, output)
        if not args.check:
            write_generated(files, output)
    except (UnverifiedError, KernelConformanceError, TranslationError) as error:
        print(f"cnnderive generate: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(
            f"cnnderive generate: could not write {error.filename or output}: "
            f"{error.strerror or error}",
            file=sys.stderr,
        )
        return 1
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
