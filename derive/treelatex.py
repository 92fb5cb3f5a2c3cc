"""The third reading of a closed-form tree: LaTeX, for derivations and docstrings."""

from __future__ import annotations

import sympy

from derive import ir

# How cached forward values and upstream gradients are written.
OPERAND_LATEX = {
    "x_padded": r"\tilde{X}",
    "argmax": r"(u^*, v^*)",
    "dout": r"\delta",
    "da": r"\delta",
    "targets": "Y",
}


def _int(expr) -> str:
    return sympy.latex(sympy.sympify(expr))


def _operator(name: str, *arguments: str, sub: str = "", sup: str = "") -> str:
    r"""``\operatorname{name}_{sub}^{sup}\left(arg, arg\right)``, scripts only when given."""
    text = r"\operatorname{" + name + "}"
    if sub:
        text += "_{" + sub + "}"
    if sup:
        text += "^{" + sup + "}"
    return text + r"\left(" + ",\\ ".join(arguments) + r"\right)"


def operand_latex(name: str, names: dict[str, str]) -> str:
    return names.get(name) or OPERAND_LATEX.get(name) or name


def tree_latex(node: ir.Node, names: dict[str, str]) -> str:
    """LaTeX for ``node``; ``names`` maps operand names to their symbols (x -> X, out -> A)."""

    def go(n: ir.Node) -> str:
        return tree_latex(n, names)

    if isinstance(node, ir.Operand):
        return operand_latex(node.name, names)
    if isinstance(node, ir.Pointwise):
        replacements = {}
        for symbol, child in node.arguments:
            text = go(child)
            replacements[symbol] = sympy.Symbol(
                text if isinstance(child, ir.Operand) else r"\left(" + text + r"\right)"
            )
        return sympy.latex(node.expr.xreplace(replacements))
    if isinstance(node, ir.Sum):
        if not node.axes:
            return r"\sum_{\text{all}} " + go(node.a)
        axes = ",".join(str(a) for a in node.axes)
        return r"\textstyle\sum_{\text{axes } " + axes + r"} " + go(node.a)
    if isinstance(node, ir.MatMul):
        return go(node.a) + r"\, " + go(node.b)
    if isinstance(node, ir.Transpose):
        return go(node.a) + r"^{\mathsf{T}}"
    if isinstance(node, ir.Flatten):
        return _operator("flatten", go(node.a))
    if isinstance(node, ir.ReshapeLike):
        return _operator("reshape", go(node.a), r"\operatorname{shape}(" + go(node.like) + ")")
    if isinstance(node, ir.Pad):
        return _operator("pad", go(node.a), sub=_int(node.rows) + "," + _int(node.cols))
    if isinstance(node, ir.Crop):
        return _operator(
            "crop",
            go(node.a),
            sub=_int(node.top) + "," + _int(node.left),
            sup=_int(node.height) + r" \times " + _int(node.width),
        )
    if isinstance(node, ir.Dilate):
        return _operator("dilate", go(node.a), sub=_int(node.stride))
    if isinstance(node, ir.Rot180):
        return _operator("rot180", go(node.kernel))
    if isinstance(node, ir.Correlate):
        stride = "" if sympy.sympify(node.stride) == 1 else _int(node.stride)
        return _operator("correlate", go(node.a), go(node.kernel), sub=stride)
    if isinstance(node, ir.CorrelateWeights):
        return _operator("correlate", go(node.a), go(node.g), sub=r"\Sigma n")
    if isinstance(node, ir.FullConvolve):
        return _operator(r"full\_convolve", go(node.g), go(node.kernel))
    if isinstance(node, ir.WindowSum):
        return _operator(r"window\_sum", go(node.a), sub=_int(node.size) + "," + _int(node.stride))
    if isinstance(node, ir.WindowArgmax):
        return _operator(
            r"first\_argmax", go(node.a), sub=_int(node.size) + "," + _int(node.stride)
        )
    if isinstance(node, ir.GatherWindows):
        return _operator("gather", go(node.a), go(node.index))
    if isinstance(node, ir.Upsample):
        ones = r"\mathbf{1}_{" + _int(node.size) + r" \times " + _int(node.size) + "}"
        return _operator("kron", go(node.a), ones)
    if isinstance(node, ir.ScatterWindows):
        return _operator(
            r"scatter\_windows", go(node.g), sub=_int(node.size) + "," + _int(node.stride)
        )
    if isinstance(node, ir.RouteToArgmax):
        return r"\operatorname{route}\left(" + go(node.g) + r"\ \to\ " + go(node.index) + r"\right)"
    if isinstance(node, ir.Softmax):
        return _operator("softmax", go(node.z))
    if isinstance(node, ir.LogSumExp):
        return _operator("logsumexp", go(node.z))
    raise TypeError(f"no LaTeX for {type(node).__name__}")
