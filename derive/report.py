"""A derivation, step by step, as LaTeX or as plain text.

The steps follow a textbook: the forward equation in index notation; the chain
rule; the partial derivatives element by element for a small configuration (the
seed documents write out the four equations of a 2x2 kernel); the same result as
matrices; the closed form; and whether SymPy confirmed it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import sympy

from derive.layer import Configuration, Layer
from derive.treelatex import operand_latex, tree_latex
from derive.verify import Proof, VerificationError, prove, substituted

MAX_ELEMENTS = 6  # per-element equations shown per gradient; the rest is summarised


@dataclass
class Block:
    """One step of a derivation: a heading, a paragraph, or a displayed equation."""

    kind: str  # "heading", "text" or "math"
    latex: str
    text: str = ""


def heading(title: str) -> Block:
    return Block("heading", title, title)


def paragraph(text: str) -> Block:
    return Block("text", text, text)


def math(latex: str, text: str | None = None) -> Block:
    return Block("math", latex, text if text is not None else latex_to_text(latex))


# ---------------------------------------------------------------------------
# LaTeX -> readable text, for the plain-text output
# ---------------------------------------------------------------------------

_SYMBOLS = {
    r"\partial": "∂",
    r"\delta": "δ",
    r"\sigma": "σ",
    r"\sum": "Σ",
    r"\times": "×",
    r"\cdot": "·",
    r"\le": "≤",
    r"\leq": "≤",
    r"\ge": "≥",
    r"\geq": "≥",
    r"\to": "→",
    r"\implies": "⇒",
    r"\mathsf{T}": "T",
    r"\lfloor": "⌊",
    r"\rfloor": "⌋",
    r"\infty": "∞",
    r"\tilde{X}": "X̃",
    r"\max": "max",
    r"\min": "min",
    r"\log": "log",
    r"\exp": "exp",
    r"\tanh": "tanh",
    r"\bmod": "mod",
    r"\Sigma": "Σ",
    r"\:": " ",
    r"\!": "",
    r"\qquad": "    ",
    r"\quad": "  ",
    r"\;": " ",
    r"\,": " ",
    r"\ ": " ",
    r"\left": "",
    r"\right": "",
    r"\textstyle": "",
    r"\\": "; ",
}


def latex_to_text(latex: str) -> str:
    text = re.sub(r"\\begin\{[a-z]*\}|\\end\{[a-z]*\}", "", latex)
    text = text.replace("\\\\", "; ")  # a line break, before "\ " (a space) can split it
    for macro in sorted(_SYMBOLS, key=len, reverse=True):
        text = text.replace(macro, _SYMBOLS[macro])
    text = text.replace("&", " ").replace("\\_", "_")
    # Innermost groups first, until nothing changes: subscripts, superscripts, fractions, words.
    rules = [
        (r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)"),
        (r"\\(?:operatorname|mathrm|text|mathbf|substack)\{([^{}]*)\}", r"\1"),
        (r"\^\{([^{}]*)\}", r"^(\1)"),
        (r"_\{([^{}]*)\}", r"[\1]"),
    ]
    previous = None
    while previous != text:
        previous = text
        for pattern, replacement in rules:
            text = re.sub(pattern, replacement, text)
        if previous == text:  # plain groups last, so that they cannot break a fraction apart
            text = re.sub(r"(?<!\\frac)(?<!\})\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\([A-Za-z]+)", r"\1", text)  # any other macro: its name
    text = re.sub(r"\^\((\w+)\)", r"^\1", text)  # k^(2) -> k^2
    # (a)/(b) -> a/b for simple a and b; a denominator with a space keeps its parentheses
    # (e/(C W), not e/C W), except a derivative's "∂ X".
    text = re.sub(r"\(([\w∂^ ]+)\)/\(((?:∂ )?[\w^\[\],]+)\)(?![\w(Σ])", r"\1/\2", text)
    text = re.sub(r"\(([\w^]+)\)/\(", r"\1/(", text)  # (e)/(C W) -> e/(C W)
    return re.sub(r"[ ]{2,}", " ", text).strip()


# ---------------------------------------------------------------------------
# Pieces of the derivation
# ---------------------------------------------------------------------------


def _short_names(proof: Proof, text: bool = False) -> dict[sympy.Symbol, sympy.Symbol]:
    """Element symbols without the indices of axes of length 1 (x_{0,1,2,0} -> x_{1,2} when
    batch and channels are 1), so small examples read like the seed documents; with
    ``text``, named for plain text (x[1,2], δ[0,0])."""
    arrays = list(proof.inputs.values()) + ([proof.upstream] if proof.upstream is not None else [])
    renames = {}
    for array in arrays:
        keep = [axis for axis, length in enumerate(array.shape) if length > 1]
        for index in np.ndindex(*array.shape):
            symbol = array[index]
            if not isinstance(symbol, sympy.Symbol):
                continue
            base = symbol.name.split("_{")[0]
            label = ",".join(str(index[axis]) for axis in keep)
            if text:
                base = "δ" if base == "delta" else base
                renames[symbol] = sympy.Symbol(f"{base}[{label}]" if label else base)
            else:
                base = r"\delta" if base == "delta" else base
                renames[symbol] = sympy.Symbol(f"{base}_{{{label}}}" if label else base)
    return renames


def _element_latex(expr, renames) -> str:
    return sympy.latex(sympy.sympify(expr).xreplace(renames))


def _partial_symbol(layer: Layer, name: str, symbol, renames) -> str:
    return r"\frac{\partial L}{\partial " + sympy.latex(symbol.xreplace(renames)) + "}"


def _as_matrix(array: np.ndarray, renames, text_renames) -> tuple[str, str] | None:
    """A 2-D view of ``array`` (singleton axes dropped) as a LaTeX matrix, if small enough."""
    squeezed = np.squeeze(np.asarray(array, dtype=object))
    if squeezed.ndim == 0:
        squeezed = squeezed.reshape(1, 1)
    if squeezed.ndim == 1:
        squeezed = squeezed.reshape(1, -1)
    if squeezed.ndim != 2 or squeezed.size > 36:
        return None
    matrix = sympy.Matrix(squeezed.tolist())
    rows = [
        "[" + ",  ".join(sympy.sstr(e.xreplace(text_renames)) for e in row) + "]"
        for row in squeezed.tolist()
    ]
    return sympy.latex(matrix.xreplace(renames), mat_delim="("), "\n".join(rows)


def derivation(layer: Layer, config: Configuration) -> list[Block]:
    """The derivation of ``layer`` on ``config`` as a list of blocks."""
    names = {item.name: item.latex for item in layer.inputs}
    names[layer.output] = layer.output_latex
    blocks = [
        heading(f"{layer.title}"),
        paragraph(f"Configuration: {layer.describe(config)}. Indices start at 0."),
    ]

    blocks.append(heading("1. Forward pass in index notation"))
    for line in layer.definition.latex_lines:
        blocks.append(math(line))

    blocks.append(heading("2. Chain rule"))
    if layer.kind == "loss":
        blocks.append(
            paragraph("The loss is the last step, so its gradient is differentiated directly.")
        )
    else:
        blocks.append(
            paragraph(
                f"With δ = ∂L/∂{layer.output_latex} the upstream gradient, every input element collects "
                f"the contributions of the outputs it influences:"
            )
        )
    for line in layer.chain_rule:
        blocks.append(math(line))

    try:
        proof = prove(layer, config)
        failure = None
    except VerificationError as error:
        proof, failure = None, str(error)
    if proof is None:
        blocks.append(heading("Verification"))
        blocks.append(paragraph(f"FAILED: {failure}"))
        return blocks

    renames, text_renames = _short_names(proof), _short_names(proof, text=True)
    # The derived gradients at the example's numbers, where the proof fixed some (max pooling).
    derived_values = {
        g.wrt: substituted(proof.derived[g.wrt], proof.substitution) for g in layer.gradients
    }
    blocks.append(heading("3. Element by element"))
    if proof.substitution:
        blocks.append(
            paragraph(
                "Which window element is the maximum depends on the numbers, so this example uses the "
                "input "
                + ", ".join(f"{k}={v}" for k, v in list(proof.substitution.items())[:16])
                + "."
            )
        )
    for gradient in layer.gradients:
        derived = derived_values[gradient.wrt]
        symbols = proof.inputs[gradient.wrt]
        shown = 0
        for index in np.ndindex(*symbols.shape):
            if shown == MAX_ELEMENTS:
                blocks.append(
                    paragraph(f"... and {symbols.size - shown} more elements of {gradient.name}.")
                )
                break
            lhs = _partial_symbol(layer, gradient.wrt, symbols[index], renames)
            text = f"∂L/∂{symbols[index].xreplace(text_renames)} = {sympy.sstr(sympy.sympify(derived[index]).xreplace(text_renames))}"
            blocks.append(math(f"{lhs} = {_element_latex(derived[index], renames)}", text))
            shown += 1

    blocks.append(heading("4. Matrix form"))
    for gradient in layer.gradients:
        derived = derived_values[gradient.wrt]
        shown = _as_matrix(derived, renames, text_renames)
        label = r"\frac{\partial L}{\partial " + operand_latex(gradient.wrt, names) + "}"
        if shown is None:
            blocks.append(
                paragraph(f"{gradient.name}: {derived.shape} array (too large to display).")
            )
        else:
            blocks.append(
                math(
                    f"{label} = {shown[0]}",
                    f"∂L/∂{operand_latex(gradient.wrt, names)} =\n{shown[1]}",
                )
            )
    for symbol_name, array in (
        ("input", proof.inputs[layer.inputs[0].name]),
        ("upstream", proof.upstream),
    ):
        if array is None or symbol_name == "input":
            continue
        shown = _as_matrix(array, renames, text_renames)
        if shown is not None:
            blocks.append(math(r"\delta = " + shown[0], "δ =\n" + shown[1]))

    blocks.append(heading("5. Closed form"))
    for gradient in layer.gradients:
        for case in gradient.cases:
            condition = ""
            if case.condition != sympy.true:
                condition = r"\qquad \text{when } " + sympy.latex(case.condition)
            lhs = r"\frac{\partial L}{\partial " + operand_latex(gradient.wrt, names) + "}"
            blocks.append(math(f"{lhs} = {tree_latex(case.tree, names)}{condition}"))
            if case.name:
                blocks.append(paragraph(f"({case.name})"))
    for note in layer.notes:
        blocks.append(paragraph(note))

    blocks.append(heading("6. Verification"))
    proven = [f"{g} ({c})" if c else g for g, by_case in proof.closed.items() for c in by_case]
    blocks.append(
        paragraph(
            "SymPy derived every gradient above from the definition, evaluated each closed form on the "
            "same symbols, and the difference simplified to zero in every element: verified for this "
            f"configuration ({', '.join(proven)}). `cnnderive verify` proves the full sweep of configurations."
        )
    )
    return blocks


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def to_latex(blocks: list[Block], standalone: bool = False) -> str:
    lines = []
    for block in blocks:
        if block.kind == "heading":
            lines.append(rf"\subsection*{{{_escape(block.latex)}}}")
        elif block.kind == "text":
            lines.append(_escape(block.latex))
        else:
            lines.append(r"\[" + "\n" + block.latex + "\n" + r"\]")
        lines.append("")
    body = "\n".join(lines)
    if not standalone:
        return body
    return (
        "\\documentclass{article}\n"
        "\\usepackage{amsmath,amssymb}\n"
        "\\allowdisplaybreaks\n"
        "\\begin{document}\n" + body + "\\end{document}\n"
    )


def _escape(text: str) -> str:
    """Escape a plain-text paragraph for LaTeX, keeping `code` as typewriter text."""
    out = text
    for char, replacement in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("$", r"\$"),
        ("#", r"\#"),
        ("_", r"\_"),
        ("{", r"\{"),
        ("}", r"\}"),
        ("^", r"\^{}"),
        ("~", r"\~{}"),
    ):
        out = out.replace(char, replacement)
    for char, replacement in (
        ("δ", r"$\delta$"),
        ("∂", r"$\partial$"),
        ("×", r"$\times$"),
        ("σ", r"$\sigma$"),
    ):
        out = out.replace(char, replacement)
    return re.sub(r"`([^`]*)`", r"\\texttt{\1}", out)


def to_text(blocks: list[Block]) -> str:
    lines = []
    for block in blocks:
        if block.kind == "heading":
            lines += ["", block.text, "-" * len(block.text)]
        elif block.kind == "text":
            lines.append(block.text)
        else:
            lines += ["    " + line for line in block.text.splitlines()]
    return "\n".join(lines).strip() + "\n"


def equations(blocks: list[Block]) -> list[str]:
    """The LaTeX of every displayed equation (what a LaTeX engine must accept)."""
    return [block.latex for block in blocks if block.kind == "math"]
