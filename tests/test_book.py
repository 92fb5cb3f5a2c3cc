"""The derivation book without a browser: its pages, its numeric check, the code beside
each closed form, the command's errors, and the notebook display.  The browser's view of
the pages is tested in test_book_browser.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import types
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import sympy
from book_support import built_book

import cnnderive
from cnnderive.book import build, code, numeric
from cnnderive.cli import main
from derive import layers as catalogue
from derive.ir import Operand
from derive.layers import LAYERS
from derive.verify import verify_layers
from generated import dense as generated_dense


class Links(HTMLParser):
    """Every href and src of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.targets.append(value)
            if name == "id" and value:
                self.ids.add(value)


def parsed(path: Path) -> Links:
    links = Links()
    links.feed(path.read_text(encoding="utf-8"))
    return links


# ---------------------------------------------------------------------------
# The built book
# ---------------------------------------------------------------------------


def test_every_layer_has_a_page_and_the_build_reports_nothing_wrong():
    book = built_book()
    assert book.ok, (book.math_errors, book.unproven, book.failed_checks)
    names = {path.name for path in book.pages}
    assert {f"{name}.html" for name in LAYERS} <= names
    assert "index.html" in names
    assert (book.out / "runs" / "toy-run" / "index.html") in book.pages
    for name in LAYERS:
        assert (book.out / "tex" / f"{name}.tex").is_file()
        assert (book.out / "code" / f"{name}.py").is_file()


def test_every_formula_is_rendered_and_no_placeholder_is_left():
    book = built_book()
    for page in book.pages:
        text = page.read_text(encoding="utf-8")
        assert "\x02" not in text and "\x03" not in text, page
        assert "katex-error" not in text, page
        expected = book.formulas.get(page.relative_to(book.out).as_posix(), 0)
        assert text.count('<span class="katex">') == expected, page
    conv = (book.out / "layers" / "conv2d.html").read_text(encoding="utf-8")
    # The LaTeX of the closed form is kept in KaTeX's MathML annotation.
    assert r"\operatorname{rot180}\left(W\right)" in conv


def test_a_layer_page_has_derivation_code_proof_and_numeric_check():
    book = built_book()
    page = (book.out / "layers" / "conv2d.html").read_text(encoding="utf-8")
    for heading in (
        "1. Forward pass in index notation",
        "2. Chain rule",
        "3. Element by element",
        "5. Closed form",
        "Proof record",
        "Numeric check",
    ):
        assert heading in page
    # Each closed form stands beside its code (Pygments' markup).
    assert page.count('<div class="pair">') == 3
    assert page.count('class="highlight"') == 3 + 2  # three gradients, forward, backward
    assert f"on {len(LAYERS['conv2d'].configurations())} configurations" in page
    assert page.count(">agrees<") == 3


def test_every_local_link_and_resource_resolves_and_none_is_remote():
    book = built_book()
    for page in book.pages:
        links = parsed(page)
        for target in links.targets:
            url = urlparse(target)
            assert url.scheme == "" and url.netloc == "", f"{page}: {target} is not a local file"
            if url.path:
                assert (page.parent / unquote(url.path)).resolve().is_file(), f"{page}: {target}"
            if url.fragment and not url.path:
                assert url.fragment in links.ids, f"{page}: no #{url.fragment}"
    # KaTeX's style sheet points at fonts that were copied.
    css = (book.out / "assets" / "katex" / "katex.min.css").read_text(encoding="utf-8")
    fonts = set(re.findall(r"url\((fonts/[^)]+)\)", css))
    assert fonts and all((book.out / "assets" / "katex" / font).is_file() for font in fonts)


def test_the_run_page_shows_recipe_pictures_accuracy_and_throughput():
    book = built_book()
    page = (book.out / "runs" / "toy-run" / "index.html").read_text(encoding="utf-8")
    assert "validation accuracy (last epoch)" in page and "images/s" in page
    assert 'src="curves.png"' in page and 'src="filters.png"' in page
    assert "<th>lr</th><td>0.2</td>" in page  # the toy recipe
    assert (book.out / "runs" / "toy-run" / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("name", ["tex/index.tex", "runs/toy-run/run.tex", "tex/conv2d.tex"])
def test_the_latex_sources_compile(name, tmp_path):
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed here (.ci/install-test-tools installs it)")
    book = built_book()
    source = tmp_path / "page.tex"
    shutil.copyfile(book.out / name, source)
    completed = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", source.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout[-2000:]


# ---------------------------------------------------------------------------
# Any Layer object: one the catalogue lacks, and one whose closed form is wrong
# ---------------------------------------------------------------------------

_z, _da = sympy.symbols("z da", real=True)


def _square(gradient_factor: int):
    """A = Z^2, with the closed form dZ = factor * Z * delta (factor 2 is right)."""
    return catalogue._activation(
        "square" if gradient_factor == 2 else "square_wrong",
        "Square",
        lambda z: z**2,
        _z**2,
        gradient_factor * _z * _da,
        {"da": Operand("da"), "z": Operand("z")},
        (r"\frac{\partial L}{\partial Z_{n,k}} = 2\,\delta_{n,k} Z_{n,k}",),
    )


def test_a_layer_outside_the_catalogue_gets_a_page(tmp_path):
    built_book()  # skips where KaTeX is missing
    right, wrong = _square(2), _square(3)
    book = build.build(tmp_path, [right, wrong])
    assert book.unproven == ["square_wrong"] and not book.failed_checks and not book.math_errors
    page = (tmp_path / "layers" / "square.html").read_text(encoding="utf-8")
    assert '<span class="nf">square_backward</span>' in page and ">agrees<" in page
    refused = (tmp_path / "layers" / "square_wrong.html").read_text(encoding="utf-8")
    assert "Not proven" in refused and "square_wrong_backward</span>" not in refused
    assert not (tmp_path / "code" / "square_wrong.py").exists()


# ---------------------------------------------------------------------------
# The numeric check and the code beside each closed form
# ---------------------------------------------------------------------------


def test_the_numeric_check_agrees_with_the_generated_dense_layer():
    result = numeric.check(LAYERS["dense"], generated_dense, LAYERS["dense"].example)
    assert result.ok
    assert [g.name for g in result.gradients] == ["dx", "dw", "db"]
    assert all(g.relative_error < 1e-8 for g in result.gradients)


def test_the_numeric_check_refuses_a_wrong_gradient():
    def backward(dout, cache, **keywords):
        dx, dw, db = generated_dense.backward(dout, cache, **keywords)
        dw = dw.copy()
        dw[0, 0] *= 1.001  # one element 0.1 % off
        return dx, dw, db

    wrong = types.SimpleNamespace(forward=generated_dense.forward, backward=backward)
    result = numeric.check(LAYERS["dense"], wrong, LAYERS["dense"].example)
    assert not result.ok
    assert [g.ok for g in result.gradients] == [True, False, True]


def test_bce_inputs_are_drawn_inside_its_domain():
    layer = LAYERS["bce"]
    source = code.module_source(layer, verify_layers([layer], workers=1)[0])
    result = numeric.check(layer, code.load(layer, source), layer.example)
    assert result.ok and "uniform on (0.05, 0.95)" in result.inputs


SOURCE = '''
def backward(dout, cache, *, workspace=None):
    """Docstring."""
    x = cache["x"]
    w = cache["w"]
    height = x.shape[1]
    scaled = dout * 2
    unused = x + 1
    dw = np.empty(w.shape)
    np.multiply(x, scaled, out=dw)
    if height > 1:
        dx = scaled @ w
    else:
        dx = scaled
    return dx, dw
'''


def test_gradient_statements_take_what_a_gradient_reads_and_writes():
    assert code.gradient_statements(SOURCE, "backward", "dw") == (
        "scaled = dout * 2\ndw = np.empty(w.shape)\nnp.multiply(x, scaled, out=dw)\n"
    )
    assert code.gradient_statements(SOURCE, "backward", "dx") == (
        "height = x.shape[1]\nscaled = dout * 2\n"
        "if height > 1:\n    dx = scaled @ w\nelse:\n    dx = scaled\n"
    )
    with pytest.raises(KeyError):
        code.gradient_statements(SOURCE, "backward", "db")


def test_the_page_code_is_the_generated_module():
    layer = LAYERS["dense"]
    source = code.module_source(layer, verify_layers([layer], workers=1)[0])
    on_disk = Path(generated_dense.__file__).read_text(encoding="utf-8")
    assert source == on_disk
    loaded = code.load(layer, source)
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(2, 3)), rng.normal(size=(3, 4)), rng.normal(size=4)
    assert np.array_equal(loaded.forward(x, w, b)[0], generated_dense.forward(x, w, b)[0])


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--layer", "conv3d"], "unknown layer 'conv3d'"),
        (["--runs", "{tmp}"], "has no metrics.json: it is not a training run folder"),
        (["--katex", "{tmp}/nowhere"], "KaTeX is not at"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(arguments, message, tmp_path, capsys):
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    assert main(["book", str(tmp_path / "out"), *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "out" / "index.html").exists()


def test_an_output_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "book.html"
    target.write_text("mine")
    assert main(["book", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "mine"


# ---------------------------------------------------------------------------
# Notebook display
# ---------------------------------------------------------------------------


def test_a_derivation_displays_as_markdown_and_latex():
    shown = cnnderive.derivation("conv2d")
    assert shown.proven
    markdown = shown._repr_markdown_()
    assert markdown.startswith("## 2-D convolution")
    assert "### 5. Closed form" in markdown
    assert r"\operatorname{rot180}\left(W\right)" in markdown
    displays = re.findall(r"^\$\$\n(.*?)\n\$\$$", markdown, flags=re.S | re.M)
    assert displays == [b.latex for b in shown.blocks if b.kind == "math"]
    assert shown._repr_latex_().startswith(r"\subsection*{2-D convolution")
    assert "∂L/∂" in str(shown)


def test_a_derivation_takes_the_sizes_of_cnnderive_derive():
    shown = cnnderive.derivation("conv2d", stride=2, padding=1, height=4, width=4)
    assert "stride 2, padding 1" in repr(shown)
    with pytest.raises(ValueError, match="unknown size 'heigth'"):
        cnnderive.derivation("conv2d", heigth=4)
    with pytest.raises(ValueError, match="larger than the padded input"):
        cnnderive.derivation("conv2d", kernel=9)
    with pytest.raises(ValueError, match="unknown layer"):
        cnnderive.derivation("conv3d")


def test_markdown_prose_escapes_emphasis_outside_math_and_code():
    from cnnderive.book.notebook import _markdown_prose

    assert _markdown_prose("a_b *c* $x_{1}*y$ `d_e`") == r"a\_b \*c\* $x_{1}*y$ `d_e`"


def test_importing_cnnderive_stays_light():
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, cnnderive; print(sorted(m for m in ('sympy', 'numpy', 'jinja2', 'derive') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert completed.stdout.strip() == "[]"


def test_the_command_builds_the_layers_it_is_given(tmp_path, capsys):
    built_book()  # skips where KaTeX is missing
    out = tmp_path / "book"
    assert main(["book", str(out), "--layer", "relu", "--layer", "dense"]) == 0
    printed = capsys.readouterr().out
    assert f"open {(out / 'index.html').resolve().as_uri()}" in printed
    assert sorted(p.name for p in (out / "layers").iterdir()) == ["dense.html", "relu.html"]
    index = (out / "index.html").read_text(encoding="utf-8")
    assert 'href="layers/relu.html"' in index and "conv2d" not in index
