"""Imports go one way (README, "How it fits together"): derive -> codegen -> generated ->
training, the console script on top, and cnnderive_common below everything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent

# folder -> the project's packages its modules must not import
FORBIDDEN = {
    "cnnderive_common": {"cnnderive", "derive", "codegen", "generated"},
    "derive": {"cnnderive", "codegen", "generated"},
    "codegen": {"cnnderive", "generated"},
    "cnnderive/train": {"derive", "codegen", "cnnderive.cli"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_go_one_way(folder):
    bad = []
    for path in sorted((REPOSITORY / folder).glob("*.py")):
        for name in _imports(path):
            for forbidden in FORBIDDEN[folder]:
                if name == forbidden or name.startswith(forbidden + "."):
                    bad.append(f"{path.relative_to(REPOSITORY)} imports {name}")
    assert bad == []
