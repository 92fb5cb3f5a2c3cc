"""``cnnderive book OUT``: write the derivation book (see cnnderive.book.build)."""

from __future__ import annotations

import sys
from pathlib import Path

from cnnderive.cli import UsageError, proof_progress
from cnnderive.files import folder_problem


def add_parsers(commands) -> None:
    book = commands.add_parser(
        "book",
        help="write the derivation book: a static HTML site of every layer's derivation",
        description="Write a static HTML site into OUT: a page per layer with its derivation "
        "(rendered by KaTeX), its generated code beside each closed form, its proof record and "
        "a numeric check run now, an index of all layers, and a page per training run given "
        "with --runs.  Open OUT/index.html in a browser; no server or network is needed.",
    )
    book.add_argument("out", type=Path, metavar="OUT", help="folder to write the site into")
    book.add_argument(
        "--runs",
        nargs="+",
        type=Path,
        default=[],
        metavar="RUN_DIR",
        help="training run folders (made by `cnnderive train`) to add a page for",
    )
    book.add_argument(
        "--layer",
        action="append",
        metavar="NAME",
        help="only this catalogue layer (repeatable; default: all of them)",
    )
    book.add_argument(
        "--equation",
        action="append",
        default=[],
        metavar='"NAME: EQ"',
        help="also a page for the layer this equation defines (repeatable)",
    )
    book.add_argument(
        "--katex",
        type=Path,
        default=None,
        metavar="DIR",
        help="KaTeX's npm package folder (default: $CNNDERIVE_KATEX, else .cache/node/node_modules/katex)",
    )
    book.set_defaults(run=run_book)


def run_book(args) -> int:
    from cnnderive.book import build, katex
    from derive.layers import LAYERS

    names = args.layer or list(LAYERS)
    unknown = [name for name in names if name not in LAYERS]
    if unknown:
        raise UsageError(f"unknown layer {unknown[0]!r}; choose one of: {', '.join(LAYERS)}")
    from derive.cli import equation_layer
    from derive.equation import split_name

    equations = []
    for text in args.equation:
        if split_name(text, "")[0] == "":
            raise UsageError(f'name the layer: --equation "NAME: {text.strip()}"')
        layer = equation_layer(text)
        if layer.name in LAYERS or any(layer.name == e.name for e in equations):
            raise UsageError(f"the name {layer.name!r} is taken; give the equation another name")
        equations.append(layer)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"{args.out} is a file; name a folder for the book")
    problem = folder_problem(args.out)
    if problem is not None:
        raise UsageError(f"cannot write the book into {args.out}: {problem}")
    try:
        katex.find_katex(args.katex)
    except katex.KatexMissing as error:
        raise UsageError(str(error)) from None

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        with proof_progress() as progress:
            book = build.build(
                args.out,
                [LAYERS[name] for name in names] + equations,
                args.runs,
                katex_folder=args.katex,
                progress=progress,
                log=log,
            )
    except build.NotARun as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        print(
            f"cnnderive book: could not write {error.filename or args.out}: {error.strerror or error}",
            file=sys.stderr,
        )
        return 1
    index = (args.out / "index.html").resolve()
    print(f"wrote {len(book.pages)} pages; open {index.as_uri()}")
    for message in book.math_errors:
        print(f"KaTeX error: {message}", file=sys.stderr)
    for name in book.unproven:
        print(f"{name}: its proof failed; its page says why and shows no code", file=sys.stderr)
    for name in book.failed_checks:
        print(f"{name}: the generated gradient differs from finite differences", file=sys.stderr)
    return 0 if book.ok else 1
