"""``cnnderive book OUT``: the derivation book, a static HTML site.

One page per layer (its derivation, the generated code beside the closed forms, the
proof record and a numeric check run now), an index with the pipeline and a table of
every layer, and a page per training run.  Every formula is rendered by KaTeX here, at
build time, and KaTeX's style sheet and fonts are copied beside the pages: the site
needs no server, no script and no network, and opens from the file system.

The pages are built from ``derive.layer.Layer`` objects only, so any layer works:
the catalogue's, or one made elsewhere (an equation layer, say).
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jinja2
import sympy
from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from cnnderive.book import code, katex, numeric
from cnnderive.files import replace_atomically
from derive import report
from derive.layer import Layer
from derive.treelatex import operand_latex, tree_latex
from derive.verify import LayerResult, verify_layers, verify_stable_forms

TEMPLATES = Path(__file__).with_name("templates")
ASSETS = "assets"
PYGMENTS_STYLE = "default"  # every token colour has contrast 4.5:1 or more on white (WCAG AA)

_MATH_TOKEN = "\x02math:{}\x03"


@dataclass
class Book:
    """What a build wrote, and what went wrong in it."""

    out: Path
    pages: list[Path] = field(default_factory=list)
    math_errors: list[str] = field(default_factory=list)  # "page: KaTeX message (formula)"
    unproven: list[str] = field(default_factory=list)  # layers whose proof failed
    failed_checks: list[str] = field(default_factory=list)  # layers whose numeric check failed
    formulas: dict[str, int] = field(default_factory=dict)  # page (relative path) -> formulas on it

    @property
    def ok(self) -> bool:
        return not (self.math_errors or self.unproven or self.failed_checks)


class Formulas:
    """Collects every formula of the book, hands out a placeholder for each, and renders
    them all with one run of KaTeX at the end."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bool, str]] = []  # latex, display, page
        self.page = ""

    def __call__(self, latex: str, display: bool = False) -> Markup:
        self.items.append((latex, display, self.page))
        return Markup(_MATH_TOKEN.format(len(self.items) - 1))

    def prose(self, text: str) -> Markup:
        """A paragraph of the derivations' prose: ``$...$`` is inline math, `...` code."""
        pieces = []
        for part in re.split(r"(\$[^$]+\$)", text):
            if len(part) > 1 and part.startswith("$") and part.endswith("$"):
                pieces.append(self(part[1:-1]))
                continue
            for chunk in re.split(r"(`[^`]+`)", part):
                if len(chunk) > 1 and chunk.startswith("`") and chunk.endswith("`"):
                    pieces.append(f"<code>{html.escape(chunk[1:-1])}</code>")
                else:
                    escaped = html.escape(chunk, quote=False)
                    # k^2 in prose is k squared (as report.to_latex sets it).
                    pieces.append(re.sub(r"(?<![\w\\])(\w)\^(\w+)", r"\1<sup>\2</sup>", escaped))
        return Markup("".join(pieces))

    def fill(self, pages: dict[Path, str], katex_folder: Path) -> list[str]:
        """Replace the placeholders in ``pages`` by KaTeX's HTML; returns KaTeX's errors."""
        rendered = katex.render(
            [(latex, display) for latex, display, _ in self.items], katex_folder
        )
        errors = [
            f"{page}: {result.error} (in {latex!r})"
            for (latex, _, page), result in zip(self.items, rendered)
            if result.error
        ]

        def substitute(match):
            return rendered[int(match.group(1))].html

        pattern = re.compile(re.escape(_MATH_TOKEN).replace(r"\{\}", r"(\d+)"))
        for path, text in pages.items():
            pages[path] = pattern.sub(substitute, text)
        return errors


def slug(name: str) -> str:
    """A file name for a page: letters, digits, _ and - only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "layer"


def python_html(source: str) -> Markup:
    return Markup(highlight(source, PythonLexer(), HtmlFormatter(cssclass="highlight")))


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


# ---------------------------------------------------------------------------
# A layer's page
# ---------------------------------------------------------------------------


def _sections(blocks: list[report.Block], formulas: Formulas) -> tuple[list, list]:
    """The derivation as (introduction, sections): each section a heading and its
    items, each item ("text" | "math", Markup).  The first heading is the layer's title,
    which the page shows as its own heading."""
    intro: list = []
    sections: list[dict] = []
    for number, block in enumerate(blocks):
        if block.kind == "heading":
            if number > 0:
                sections.append({"heading": block.text, "items": []})
            continue
        item = (
            ("math", formulas(block.latex, display=True))
            if block.kind == "math"
            else ("text", formulas.prose(block.latex))
        )
        (sections[-1]["items"] if sections else intro).append(item)
    return intro, sections


def _ranges_text(ranges: dict[str, list[int]]) -> str:
    parts = []
    for key in sorted(ranges):
        low, high = ranges[key]
        parts.append(f"{key} {low}" if low == high else f"{key} {low}–{high}")
    return ", ".join(parts)


def closed_forms(layer: Layer) -> list[dict]:
    """Each gradient's closed forms as LaTeX: [{name, wrt, cases: [{latex, name}]}]."""
    names = {item.name: item.latex for item in layer.inputs}
    names[layer.output] = layer.output_latex
    out = []
    for gradient in layer.gradients:
        lhs = r"\frac{\partial L}{\partial " + operand_latex(gradient.wrt, names) + "}"
        cases = []
        for case in gradient.cases:
            latex = f"{lhs} = {tree_latex(case.tree, names)}"
            if case.condition != sympy.true:
                latex += r"\qquad \text{when } " + sympy.latex(case.condition)
            cases.append({"latex": latex, "name": case.name})
        out.append({"name": gradient.name, "wrt": gradient.wrt, "cases": cases})
    return out


def proof_record(layer: Layer, result: LayerResult) -> dict:
    rows = []
    for gradient in layer.gradients:
        for case in gradient.cases:
            proven = result.cases.get(gradient.name, {}).get(case.name, [])
            rows.append(
                {
                    "gradient": gradient.name,
                    "case": case.name,
                    "count": len(proven),
                    "sizes": _ranges_text(result.ranges.get(gradient.name, {}).get(case.name, {})),
                }
            )
    return {
        "ok": result.ok,
        "error": result.error,
        "configurations": result.configurations,
        "seconds": result.seconds,
        "rows": rows,
        # The all-sizes proof (`cnnderive verify --all-sizes`), where a result carries one.
        "all_sizes": getattr(result, "all_sizes", None),
    }


def layer_page(layer: Layer, result: LayerResult, formulas: Formulas) -> tuple[dict, str, str]:
    """(the page's template context, its LaTeX source, its generated module or "")."""
    formulas.page = f"layers/{slug(layer.name)}.html"
    blocks = report.derivation(layer, layer.example)
    intro, sections = _sections(blocks, formulas)
    forms = closed_forms(layer)
    for form in forms:
        for case in form["cases"]:
            case["math"] = formulas(case["latex"], display=True)
    context = {
        "layer": layer,
        "slug": slug(layer.name),
        "intro": intro,
        "sections": sections,
        "forms": forms,
        "proof": proof_record(layer, result),
        "check": None,
        "forward_code": None,
        "backward_code": None,
        "step": numeric.STEP,
        "tolerance": numeric.TOLERANCE,
    }
    source = ""
    if result.ok:
        source = code.module_source(layer, result)
        for form in forms:
            form["code"] = python_html(
                code.gradient_statements(source, layer.backward_function, form["name"])
            )
        context["forward_code"] = python_html(code.function_source(source, layer.forward_function))
        context["backward_code"] = python_html(
            code.function_source(source, layer.backward_function)
        )
        context["check"] = numeric.check(layer, code.load(layer, source), layer.example)
    return context, report.to_latex(blocks, standalone=True), source


# ---------------------------------------------------------------------------
# A training run's page
# ---------------------------------------------------------------------------

RUN_PICTURES = ("curves.png", "filters.png")


class NotARun(ValueError):
    """A --runs folder without the metrics.json that `cnnderive train` writes."""


def read_run(folder: Path) -> dict:
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        raise NotARun(
            f"{folder} has no metrics.json: it is not a training run folder "
            "(`cnnderive train` makes one)"
        )
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        epochs = list(metrics.get("epochs", []))
        recipe = dict(metrics.get("recipe", {}))
    except (ValueError, AttributeError, TypeError) as error:
        raise NotARun(f"{metrics_path} is not readable as a run's metrics ({error})") from error
    last = epochs[-1] if epochs else {}
    trained = [e for e in epochs if e.get("images_per_second")]
    return {
        "folder": folder,
        "name": folder.resolve().name,
        "metrics": metrics,
        "recipe": recipe,
        "epochs": epochs,
        "last": last,
        "throughput": (
            sum(e["images_per_second"] for e in trained) / len(trained) if trained else None
        ),
        "seconds": sum(e.get("seconds") or 0 for e in epochs),
        "pictures": [name for name in RUN_PICTURES if (folder / name).is_file()],
    }


def _run_latex(run: dict) -> str:
    """The run page's LaTeX source: its recipe and its epochs as a table."""
    recipe = ", ".join(f"{key} {value}" for key, value in run["recipe"].items())
    rows = [
        f"{e.get('epoch')} & {e.get('loss') or 0:.4f} & {100 * (e.get('val_accuracy') or 0):.2f}"
        rf"\,\% & {e.get('images_per_second') or 0:.0f} \\"
        for e in run["epochs"]
    ]
    table = (
        r"\begin{array}{rrrr} \text{epoch} & \text{loss} & \text{validation accuracy} & "
        r"\text{images/s} \\ \hline " + " ".join(rows) + r" \end{array}"
    )
    blocks = [
        report.heading(f"Training run {run['name']}"),
        report.paragraph(f"Recipe: {recipe}."),
        report.math(table),
    ]
    return report.to_latex(blocks, standalone=True)


# ---------------------------------------------------------------------------
# The whole book
# ---------------------------------------------------------------------------


def _write(path: Path, data: bytes | str) -> None:
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda stream: stream.write(payload))


def _copy(source: Path, target: Path) -> None:
    _write(target, source.read_bytes())


def build(
    out: str | Path,
    layers: list[Layer],
    runs: list[str | Path] = (),
    *,
    katex_folder: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> Book:
    """Write the book into ``out``: index.html, layers/NAME.html for each of ``layers``,
    runs/NAME/index.html for each run folder, the LaTeX sources in tex/ and the generated
    modules in code/.  Raises katex.KatexMissing or NotARun before any proof runs."""
    out = Path(out)
    katex_path = katex.find_katex(katex_folder)
    run_data = [read_run(Path(folder)) for folder in runs]
    taken: set[str] = set()
    for run in run_data:  # two runs called seed0 in different folders get two pages
        base = name = slug(run["name"])
        number = 2
        while name in taken:
            name, number = f"{base}-{number}", number + 1
        run["slug"] = name
        taken.add(name)

    log(f"proving {len(layers)} layer(s) on their sweeps")
    results = {r.name: r for r in verify_layers(layers, progress=progress)}
    stable = verify_stable_forms()

    env = _environment()
    formulas = Formulas()
    env.globals.update(math=formulas, prose=formulas.prose, root="../")
    book = Book(out)
    pages: dict[Path, str] = {}
    contexts = []
    log("writing the layer pages (derivation, code and numeric check of each)")
    for layer in layers:
        result = results[layer.name]
        context, latex, source = layer_page(layer, result, formulas)
        contexts.append(context)
        name = context["slug"]
        if not result.ok:
            book.unproven.append(layer.name)
        elif not context["check"].ok:
            book.failed_checks.append(layer.name)
        _write(out / "tex" / f"{name}.tex", latex)
        if source:
            _write(out / "code" / f"{name}.py", source)
        pages[out / "layers" / f"{name}.html"] = env.get_template("layer.html.jinja").render(
            **context, title=layer.title
        )
    for run in run_data:
        formulas.page = f"runs/{run['slug']}/index.html"
        folder = out / "runs" / run["slug"]
        for picture in run["pictures"]:
            _copy(run["folder"] / picture, folder / picture)
        _write(folder / "run.tex", _run_latex(run))
        pages[folder / "index.html"] = env.get_template("run.html.jinja").render(
            run=run, title=f"Training run {run['name']}", root="../../"
        )
    formulas.page = "index.html"
    index_latex = _index_latex(contexts)
    _write(out / "tex" / "index.tex", index_latex)
    first, example = pipeline_example(contexts)
    pages[out / "index.html"] = env.get_template("index.html.jinja").render(
        pages=contexts,
        first=first,
        example=example,
        runs=run_data,
        stable=stable,
        title="The derivation book",
        root="",
    )

    log("rendering the formulas with KaTeX")
    book.math_errors = formulas.fill(pages, katex_path)
    for _, _, page in formulas.items:
        book.formulas[page] = book.formulas.get(page, 0) + 1
    katex.copy_assets(katex_path, out / ASSETS / "katex", _copy)
    _copy(TEMPLATES / "book.css", out / ASSETS / "book.css")
    _write(
        out / ASSETS / "code.css",
        HtmlFormatter(style=PYGMENTS_STYLE).get_style_defs(".highlight") + "\n",
    )
    for path, text in pages.items():
        _write(path, text)
        book.pages.append(path)
    return book


def pipeline_example(contexts: list[dict]) -> tuple[dict | None, dict | None]:
    """(page, closed form) that the index's pipeline shows: the first layer's gradient
    with respect to its weights (its second input) where it has one, the textbook case."""
    if not contexts or not contexts[0]["forms"]:
        return None, None
    first = contexts[0]
    forms = first["forms"]
    by_weights = [form for form in forms if form["wrt"] != first["layer"].inputs[0].name]
    return first, (by_weights or forms)[0]


def _index_latex(contexts: list[dict]) -> str:
    """The index's LaTeX source: every layer's closed forms."""
    blocks = [report.heading("The closed forms of the derivation book")]
    for context in contexts:
        blocks.append(report.heading(context["layer"].title))
        for form in context["forms"]:
            for case in form["cases"]:
                blocks.append(report.math(case["latex"]))
                if case["name"]:
                    blocks.append(report.paragraph(f"({case['name']})"))
    return report.to_latex(blocks, standalone=True)
