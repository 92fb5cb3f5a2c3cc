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
from derive.steps import general_steps
from derive.treelatex import operand_latex, primitive_definitions, tree_latex
from derive.verify import Proof, VerificationError, prove, substituted

MAX_ELEMENTS = 6  # per-element equations shown per gradient; the rest is summarised
MAX_MATRIX_ENTRY = 80  # characters: longer elements make a matrix wider than any page
MAX_LISTED = 36  # elements: beyond this a gradient is too large to write out


@dataclass
class Block:
    """One step of a derivation: a heading, a paragraph, or a displayed equation."""

    kind: str  # "heading", "text" or "math"
    latex: str
    text: str = ""


def heading(title: str) -> Block:
    return Block("heading", title, title)


def paragraph(text: str) -> Block:
    """A paragraph of prose; ``$...$`` in it is inline math (LaTeX), printed as text by to_text."""
    return Block("text", text, inline_math_to_text(text))


def math(latex: str, text: str | None = None) -> Block:
    return Block("math", latex, text if text is not None else latex_to_text(latex))


# ---------------------------------------------------------------------------
# LaTeX -> readable text, for the plain-text output
# ---------------------------------------------------------------------------

_SYMBOLS = {
    r"\partial": "∂",
    r"\delta": "δ",
    r"\sigma": "σ",
    r"\sum": " Σ",  # a space before it: A Σ[j], not AΣ[j]
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
    r"\ldots": "…",
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
    r"\{": "\x01",  # literal braces: kept out of the way of the group rules below
    r"\}": "\x02",
    r"\right": "",
    r"\textstyle": "",
    r"\\": "; ",
}


def inline_math_to_text(text: str) -> str:
    """Prose with ``$...$`` inline math, the math turned into readable text."""
    return re.sub(r"\$([^$]*)\$", lambda match: latex_to_text(match.group(1)), text)


def latex_to_text(latex: str) -> str:
    text = re.sub(r"\\begin\{[a-z]*\}|\\end\{[a-z]*\}", "", latex)
    text = text.replace("\\\\", "; ")  # a line break, before "\ " (a space) can split it
    # A fraction right after a name would be glued to it (log a/b, not loga/b).
    text = re.sub(r"(?<=[A-Za-z}])\\frac", r" \\frac", text)
    for macro in sorted(_SYMBOLS, key=len, reverse=True):
        text = text.replace(macro, _SYMBOLS[macro])
    text = text.replace("&", " ").replace("\\_", "_")
    # Innermost groups first, until nothing changes: subscripts, superscripts, fractions, words.
    rules = [
        # An operator's subscript is a parameter, not an index: crop_(p,p), dilate_s; a
        # named subscript is part of a name: C_in.
        (r"\\operatorname\{([^{}]*)\}_\{(\w+)\}", r"\1_\2"),
        (r"\\operatorname\{([^{}]*)\}_\{([^{}]*)\}", r"\1_(\2)"),
        (r"_\{\\mathrm\{(\w+)\}\}", r"_\1"),
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
    text = re.sub(r"\(([\w∂^ ]+|[\w^\[\],]+)\)/\(((?:∂ )?[\w^\[\],]+)\)(?![\w(Σ])", r"\1/\2", text)
    text = re.sub(r"\(([\w^\[\],]+)\)/\(", r"\1/(", text)  # (e)/(C W) -> e/(C W)
    text = re.sub(r"[ ]{2,}", " ", text)
    text = re.sub(r"∂ (?=\w)", "∂", text)  # ∂L/∂Z, as in the prose
    text = re.sub(r"Σ_(\w)", r"Σ[\1]", text)  # \sum_j as \sum_{n,i,j} is: Σ[j]
    text = text.replace("\x01", "{").replace("\x02", "}")
    # What cases and \left( leave behind: "( 1 for z > 0 ; 0 otherwise )".
    text = re.sub(r"\( ?(-)? ", r"(\1", text)  # "( 1" -> "(1", "(- z" -> "(-z"
    text = re.sub(r" (\)|;)", r"\1", text)
    return text.strip()


# ---------------------------------------------------------------------------
# Pieces of the derivation
# ---------------------------------------------------------------------------


def _symbol_arrays(proof: Proof) -> list[np.ndarray]:
    """The proof's arrays of element symbols: its inputs, and the upstream gradient δ."""
    return [*proof.inputs.values(), *([proof.upstream] if proof.upstream is not None else [])]


def _short_names(proof: Proof) -> dict[sympy.Symbol, sympy.Symbol]:
    """Element symbols without the indices of axes of length 1 (x_{0,1,2,0} -> x_{1,2} when
    batch and channels are 1), so small examples read like the seed documents."""
    renames = {}
    for array in _symbol_arrays(proof):
        keep = [axis for axis, length in enumerate(array.shape) if length > 1]
        for index in np.ndindex(*array.shape):
            symbol = array[index]
            if not isinstance(symbol, sympy.Symbol):
                continue
            base = symbol.name.split("_{")[0]
            label = ",".join(str(index[axis]) for axis in keep)
            if base == "delta":
                base = r"\delta"
            elif len(base) > 1:
                base = rf"\mathrm{{{base}}}"  # probs_{0}, not p r o b s
            renames[symbol] = sympy.Symbol(f"{base}_{{{label}}}" if label else base)
    return renames


def _element_latex(expr, renames) -> str:
    return sympy.latex(sympy.sympify(expr).xreplace(renames))


def _partial_symbol(layer: Layer, name: str, symbol, renames) -> str:
    return r"\frac{\partial L}{\partial " + sympy.latex(symbol.xreplace(renames)) + "}"


def _as_matrix(array: np.ndarray, renames) -> tuple[str, str] | None:
    """A 2-D view of ``array`` (singleton axes dropped) as a LaTeX matrix, if small enough."""
    squeezed = np.squeeze(np.asarray(array, dtype=object))
    if squeezed.ndim == 0:
        squeezed = squeezed.reshape(1, 1)
    if squeezed.ndim == 1:
        squeezed = squeezed.reshape(1, -1)
    if squeezed.ndim != 2 or squeezed.size > MAX_LISTED:
        return None
    matrix = sympy.Matrix(squeezed.tolist())
    rows = [
        "[" + ",  ".join(latex_to_text(_element_latex(e, renames)) for e in row) + "]"
        for row in squeezed.tolist()
    ]
    return sympy.latex(matrix.xreplace(renames), mat_delim="("), "\n".join(rows)


def _dropped_axes_example(proof: Proof, renames) -> tuple[str, str] | None:
    """(short, full) LaTeX of an element whose name lost axes of length 1, if any did."""
    for array in _symbol_arrays(proof):
        array = np.asarray(array, dtype=object)
        if array.ndim > _axes_longer_than_one(array) and array.size:
            symbol = array[(-1,) * array.ndim]  # the last element: all its indices differ
            if isinstance(symbol, sympy.Symbol) and symbol in renames:
                short = renames[symbol]
                base = short.name.split("_{")[0]  # \delta for delta, as in the equations
                full = sympy.Symbol(base + "_{" + symbol.name.split("_{", 1)[1])
                return sympy.latex(short), sympy.latex(full)
    return None


def _longest_entry(array: np.ndarray, renames) -> int:
    """Characters of the longest element of ``array`` as text."""
    return max(len(latex_to_text(_element_latex(e, renames))) for e in np.asarray(array).flat)


def _axes_longer_than_one(array: np.ndarray) -> int:
    return sum(1 for length in np.shape(array) if length > 1)


def derivation(layer: Layer, config: Configuration) -> list[Block]:
    """The derivation of ``layer`` on ``config`` as a list of blocks."""
    names = {item.name: item.latex for item in layer.inputs}
    names[layer.output] = layer.output_latex
    batch = next((value for symbol, value in config.items() if symbol.name == "batch"), None)
    examples = "example" if batch == 1 else "examples"
    mean = f" The loss is a mean over $m = {batch}$ {examples}." if layer.kind == "loss" else ""
    blocks = [
        heading(f"{layer.title}"),
        paragraph(f"Configuration: {layer.describe(config)}. Indices start at 0.{mean}"),
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
                rf"With $\delta = \partial L/\partial {layer.output_latex}$ the upstream gradient, "
                "every input element collects the contributions of the outputs it influences:"
            )
        )
    for line in layer.chain_rule:
        blocks.append(math(line))

    steps = general_steps(layer.name)
    if steps:
        blocks.append(heading("From the chain rule to the closed form, for every size"))
        for kind, latex in steps:
            blocks.append(paragraph(latex) if kind == "text" else math(latex))
        blocks.append(
            paragraph(
                "`cnnderive verify --all-sizes` proves the chain rule's sum and the closed form "
                "equal for symbolic sizes. The worked example follows."
            )
        )

    try:
        proof = prove(layer, config)
        failure = None
    except VerificationError as error:
        proof, failure = None, str(error)
    if proof is None:
        blocks.append(heading("Verification"))
        blocks.append(paragraph(f"FAILED: {failure}"))
        return blocks

    renames = _short_names(proof)
    # The derived gradients at the example's numbers, where the proof fixed some (max pooling).
    derived_values = {
        g.wrt: substituted(proof.derived[g.wrt], proof.substitution) for g in layer.gradients
    }
    blocks.append(heading("3. Element by element"))
    dropped = _dropped_axes_example(proof, renames)
    if dropped:
        blocks.append(
            paragraph(
                f"Axes of length 1 are left out of the indices: ${dropped[0]}$ stands for "
                f"${dropped[1]}$."
            )
        )
    if proof.substitution:
        first = layer.inputs[0]
        numbers = substituted(proof.inputs[first.name], proof.substitution)
        shown = _as_matrix(numbers, renames)
        blocks.append(
            paragraph(
                "Which window element is the maximum depends on the numbers, so this example uses "
                f"the input {first.latex}"
                + (":" if shown else f" of shape {numbers.shape} drawn from {{0, 1, 2}}.")
            )
        )
        if shown:
            blocks.append(math(f"{first.latex} = {shown[0]}", f"{first.latex} =\n{shown[1]}"))
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
            blocks.append(math(f"{lhs} = {_element_latex(derived[index], renames)}"))
            shown += 1

    blocks.append(heading("4. Matrix form"))
    for gradient in layer.gradients:
        derived = derived_values[gradient.wrt]
        if derived.size > MAX_LISTED:
            blocks.append(
                paragraph(f"{gradient.name}: {derived.shape} array (too large to display).")
            )
            continue
        all_in_step_3 = derived.size <= MAX_ELEMENTS
        one_axis = _axes_longer_than_one(derived) < 2
        too_long = _longest_entry(derived, renames) > MAX_MATRIX_ENTRY
        if all_in_step_3 and (one_axis or too_long):
            # A matrix would only repeat step 3: on one long line, or wider than a page.
            blocks.append(
                paragraph(
                    f"{gradient.name} holds the elements of step 3 as a {derived.shape} array."
                )
            )
            continue
        if too_long:
            # Step 3 showed the first elements; the others follow, one equation each.
            blocks.append(paragraph(f"The other elements of {gradient.name}:"))
            symbols = proof.inputs[gradient.wrt]
            for index in list(np.ndindex(*symbols.shape))[MAX_ELEMENTS:]:
                lhs = _partial_symbol(layer, gradient.wrt, symbols[index], renames)
                blocks.append(math(f"{lhs} = {_element_latex(derived[index], renames)}"))
            continue
        shown = _as_matrix(derived, renames)
        label = r"\frac{\partial L}{\partial " + operand_latex(gradient.wrt, names) + "}"
        if shown is None:
            blocks.append(paragraph(f"{gradient.name}: {derived.shape} array (not 2-D)."))
        else:
            blocks.append(
                math(
                    f"{label} = {shown[0]}",
                    f"∂L/∂{operand_latex(gradient.wrt, names)} =\n{shown[1]}",
                )
            )
    if proof.upstream is not None and _axes_longer_than_one(proof.upstream) >= 2:
        shown = _as_matrix(proof.upstream, renames)
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
            applies = case.condition.xreplace(dict(config)) != sympy.false
            if case.name or not applies:
                note = "" if applies else "; not this configuration's case"
                blocks.append(paragraph(f"({case.name}{note})"))
    definitions = primitive_definitions(
        case.tree for gradient in layer.gradients for case in gradient.cases
    )
    if definitions:
        blocks.append(paragraph("The primitives, element by element:"))
        blocks += [math(definition) for definition in definitions]
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


# In a standalone document, a display wider than the line is scaled down to fit it: the
# element-by-element equations of larger configurations (softmax over many classes, say)
# are single products of many factors that no line break could split well.
_FIT_DISPLAY = r"""\newsavebox{\displaybox}
\newcommand{\fitdisplay}[1]{\begin{center}\sbox{\displaybox}{$\displaystyle #1$}%
\ifdim\wd\displaybox>\linewidth\resizebox{\linewidth}{!}{\usebox{\displaybox}}%
\else\usebox{\displaybox}\fi\end{center}}
"""


def to_latex(blocks: list[Block], standalone: bool = False) -> str:
    """The derivation as LaTeX: a fragment of ``\\[ ... \\]`` displays to include in a
    document, or (``standalone``) a whole document whose wide displays are scaled to fit."""
    lines = []
    for block in blocks:
        if block.kind == "heading":
            lines.append(rf"\subsection*{{{_escape(block.latex)}}}")
        elif block.kind == "text":
            lines.append(_escape(block.latex))
        elif standalone:
            lines.append(r"\fitdisplay{" + block.latex + "}")
        else:
            lines.append(r"\[" + "\n" + block.latex + "\n" + r"\]")
        lines.append("")
    body = "\n".join(lines)
    if not standalone:
        return body
    return (
        "\\documentclass{article}\n"
        "\\usepackage{amsmath,amssymb,graphicx}\n"
        "\\usepackage[margin=2cm]{geometry}\n"  # room for the wide index expressions
        + _FIT_DISPLAY
        + "\\begin{document}\n"
        + body
        + "\\end{document}\n"
    )


def _escape(text: str) -> str:
    """A paragraph for LaTeX: prose escaped, `code` as typewriter text, 'quoted' words in
    LaTeX's quotes, ``$...$`` inline math kept as it is."""
    pieces = []
    for part in re.split(r"(\$[^$]*\$)", text):
        if part.startswith("$"):
            pieces.append(part)
            continue
        for chunk in re.split(r"(`[^`]*`)", part):
            if chunk.startswith("`"):
                pieces.append(_escape_prose(chunk))
                continue
            # k^2 in prose is math, k squared (in `code` it stays as written).
            for bit in re.split(r"((?<![\w\\])\w\^\w+)", chunk):
                if re.fullmatch(r"\w\^\w+", bit):
                    pieces.append(f"${bit[0]}^{{{bit[2:]}}}$")
                else:
                    pieces.append(_escape_prose(bit))
    return "".join(pieces)


def _escape_prose(text: str) -> str:
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
        ("<", r"\textless{}"),
        (">", r"\textgreater{}"),
    ):
        out = out.replace(char, replacement)
    for char, replacement in (
        ("δ", r"$\delta$"),
        ("∂", r"$\partial$"),
        ("×", r"$\times$"),
        ("σ", r"$\sigma$"),
    ):
        out = out.replace(char, replacement)
    out = re.sub(r"`([^`]*)`", r"\\texttt{\1}", out)
    # 'word' -> `word' (an opening quote, not two closing ones); not an apostrophe (SymPy's).
    return re.sub(r"(?<![\w'])'([^'\n]+?)'(?!\w)", r"`\1'", out)


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
