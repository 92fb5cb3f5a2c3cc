"""examples/derivations.ipynb runs from top to bottom in a fresh Jupyter kernel (nbclient):
it derives, proves, generates and trains, and its derivations display as mathematics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
NOTEBOOK = REPOSITORY / "examples" / "derivations.ipynb"


def test_the_example_notebook_runs_and_shows_its_results(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="the test extras install nbformat")
    nbclient = pytest.importorskip("nbclient", reason="the test extras install nbclient")
    pytest.importorskip("ipykernel", reason="the test extras install ipykernel")
    # The kernel is another process: it must import this checkout, not an installed copy.
    path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("CNNDERIVE_DATA", str(tmp_path / "cache"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    shown = [out for out in outputs if "text/markdown" in out.get("data", {})]
    assert len(shown) == 2  # the two derivations, as Markdown with math
    assert "$$" in shown[0]["data"]["text/markdown"]
    assert r"\operatorname{rot180}" in shown[0]["data"]["text/markdown"]
    assert "text/latex" in shown[0]["data"]
    text = "".join(out.get("text", "") for out in outputs if out["output_type"] == "stream")
    assert text.count("proven:") >= 6  # every layer of the toy network
    assert "same as generated/dense.py: True" in text
    accuracy = float(text.split("validation accuracy after 3 epochs: ")[1].split("%")[0])
    assert accuracy >= 95.0
    assert any("image/png" in out.get("data", {}) for out in outputs)  # the curves
