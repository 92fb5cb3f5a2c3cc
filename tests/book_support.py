"""One build of the derivation book per test session, shared by tests/test_book*.py:
every catalogue layer and one short training run of the toy network.  The proofs in it
take half a minute, so it is built once."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest


@functools.lru_cache(maxsize=None)
def _build():
    from cnnderive.book import build, katex
    from cnnderive.train.data import SUBSET_DIR, load_dataset
    from cnnderive.train.loop import RECIPES, train
    from derive.layers import LAYERS

    try:
        katex.find_katex()
    except katex.KatexMissing as error:
        return None, f"the book cannot be built here: {error}"
    root = Path(tempfile.mkdtemp(prefix="cnnderive-book-test-"))
    atexit.register(shutil.rmtree, root, True)
    run = root / "toy-run"
    bundle = load_dataset("mnist", SUBSET_DIR, allow_download=False, log=lambda line: None)
    train(replace(RECIPES["toy"], epochs=2), bundle, run, progress=False, log=lambda line: None)
    return build.build(root / "book", list(LAYERS.values()), [run]), ""


def built_book():
    """The shared Book (cnnderive.book.build.Book); skips the test where KaTeX is missing."""
    book, why = _build()
    if book is None:
        pytest.skip(why)
    return book
