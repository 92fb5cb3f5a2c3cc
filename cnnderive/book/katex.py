"""KaTeX, found in its npm package and run with node at build time.

The book's formulas are turned into HTML here, once, so that its pages need no script
and no network in the browser: only KaTeX's style sheet and fonts, which ``copy_assets``
copies beside the pages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPOSITORY = Path(__file__).resolve().parents[2]
# Where .ci/install-test-tools puts KaTeX (npm install --prefix .cache/node katex@0.16).
DEFAULT_KATEX = REPOSITORY / ".cache" / "node" / "node_modules" / "katex"
INSTALL_HINT = "npm install --prefix .cache/node katex@0.16"


class KatexMissing(RuntimeError):
    """node or KaTeX's npm package is not there; the message says how to get it."""


@dataclass(frozen=True)
class Rendered:
    html: str
    error: str  # KaTeX's message when it rejected the formula, else ""


def find_katex(folder: str | os.PathLike | None = None) -> Path:
    """KaTeX's package folder: ``folder``, else $CNNDERIVE_KATEX, else .cache/node in the
    repository.  Raises KatexMissing, naming what is missing and how to install it."""
    if folder is None:
        folder = os.environ.get("CNNDERIVE_KATEX") or DEFAULT_KATEX
    folder = Path(folder)
    if shutil.which("node") is None:
        raise KatexMissing(
            "node is not installed; the book renders its formulas with KaTeX under node "
            "(Debian: apt-get install nodejs npm)"
        )
    if not (folder / "dist" / "katex.min.css").is_file():
        raise KatexMissing(
            f"KaTeX is not at {folder}; install it with `{INSTALL_HINT}` in the repository, "
            "or name its folder with --katex or $CNNDERIVE_KATEX"
        )
    return folder


def render(formulas: list[tuple[str, bool]], katex: Path) -> list[Rendered]:
    """HTML for each (latex, display) pair, in one node process."""
    if not formulas:
        return []
    completed = subprocess.run(
        ["node", str(Path(__file__).with_name("render_math.js")), str(katex)],
        input=json.dumps(formulas),
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"KaTeX under node failed:\n{completed.stderr.strip()}")
    return [Rendered(item["html"], item["error"]) for item in json.loads(completed.stdout)]


def copy_assets(katex: Path, out: Path, copy: Callable[[Path, Path], None]) -> None:
    """KaTeX's style sheet and fonts into ``out`` (katex.min.css and fonts/ beside it,
    where the style sheet's relative urls point), each file by ``copy(source, target)``."""
    copy(katex / "dist" / "katex.min.css", out / "katex.min.css")
    for font in sorted((katex / "dist" / "fonts").iterdir()):
        copy(font, out / "fonts" / font.name)
