"""The proof's two sides are independent: a bug in the SymPy interpreter of the trees
(derive/symbolic.py) cannot be hidden by the same bug in the expansion of the definition
(derive/indexform.py, the definitions in derive/layers.py), and the output shape is
checked, not taken from the tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from derive import symbolic
from derive.layers import LAYERS
from derive.symbolic import Evaluator
from derive.verify import VerificationError, prove

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("module", ["derive/indexform.py", "derive/layers.py", "derive/layer.py"])
def test_the_definition_side_imports_nothing_from_the_interpreter(module):
    tree = ast.parse((REPOSITORY / module).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
            imported |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    assert not [name for name in imported if name and name.startswith("derive.symbolic")]


def test_an_interpreter_that_drops_the_last_output_row_is_refused(monkeypatch):
    correct = Evaluator.eval_Correlate
    monkeypatch.setattr(Evaluator, "eval_Correlate", lambda self, node: correct(self, node)[:, :-1])
    conv2d = LAYERS["conv2d"]
    with pytest.raises(VerificationError, match="shape"):
        prove(conv2d, conv2d.example)


def test_an_interpreter_whose_ties_go_to_the_last_maximum_is_refused(monkeypatch):
    def last_maximum(values):
        best = 0
        for position, value in enumerate(values):
            if value >= values[best]:
                best = position
        return best

    # The function's code itself is replaced, so that whoever imported it gets the bug.
    monkeypatch.setattr(symbolic.first_maximum, "__code__", last_maximum.__code__)
    maxpool2d = LAYERS["maxpool2d"]
    refused = 0
    for config in maxpool2d.configurations()[:40]:
        try:
            prove(maxpool2d, config)
        except VerificationError:
            refused += 1
    assert refused > 0
