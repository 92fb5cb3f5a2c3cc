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
        return r"\operatorname{flatten}\left(" + go(node.a) + r"\right)"
    if isinstance(node, ir.ReshapeLike):
        return (
            r"\operatorname{reshape}\left("
            + go(node.a)
            + r",\ \operatorname{shape}("
            + go(node.like)
            + r")\right)"
        )
    if isinstance(node, ir.Pad):
        return (
            r"\operatorname{pad}_{"
            + _int(node.rows)
            + ","
            + _int(node.cols)
            + r"}\left("
            + go(node.a)
            + r"\right)"
        )
    if isinstance(node, ir.Crop):
        return (
            r"\operatorname{crop}_{"
            + _int(node.top)
            + ","
            + _int(node.left)
            + r"}^{"
            + _int(node.height)
            + r" \times "
            + _int(node.width)
            + r"}\left("
            + go(node.a)
            + r"\right)"
        )
    if isinstance(node, ir.Dilate):
        return r"\operatorname{dilate}_{" + _int(node.stride) + r"}\left(" + go(node.a) + r"\right)"
    if isinstance(node, ir.Rot180):
        return r"\operatorname{rot180}\left(" + go(node.kernel) + r"\right)"
    if isinstance(node, ir.Correlate):
        stride = "" if sympy.sympify(node.stride) == 1 else r"_{" + _int(node.stride) + "}"
        return (
            r"\operatorname{correlate}"
            + stride
            + r"\left("
            + go(node.a)
            + ",\\ "
            + go(node.kernel)
            + r"\right)"
        )
    if isinstance(node, ir.CorrelateWeights):
        return (
            r"\operatorname{correlate}_{\Sigma n}\left("
            + go(node.a)
            + ",\\ "
            + go(node.g)
            + r"\right)"
        )
    if isinstance(node, ir.FullConvolve):
        return (
            r"\operatorname{full\_convolve}\left("
            + go(node.g)
            + ",\\ "
            + go(node.kernel)
            + r"\right)"
        )
    if isinstance(node, ir.WindowSum):
        return (
            r"\operatorname{window\_sum}_{"
            + _int(node.size)
            + ","
            + _int(node.stride)
            + r"}\left("
            + go(node.a)
            + r"\right)"
        )
    if isinstance(node, ir.WindowArgmax):
        return (
            r"\operatorname{first\_argmax}_{"
            + _int(node.size)
            + ","
            + _int(node.stride)
            + r"}\left("
            + go(node.a)
            + r"\right)"
        )
    if isinstance(node, ir.GatherWindows):
        return r"\operatorname{gather}\left(" + go(node.a) + ",\\ " + go(node.index) + r"\right)"
    if isinstance(node, ir.Upsample):
        return (
            r"\operatorname{kron}\left("
            + go(node.a)
            + r",\ \mathbf{1}_{"
            + _int(node.size)
            + r" \times "
            + _int(node.size)
            + r"}\right)"
        )
    if isinstance(node, ir.ScatterWindows):
        return (
            r"\operatorname{scatter\_windows}_{"
            + _int(node.size)
            + ","
            + _int(node.stride)
            + r"}\left("
            + go(node.g)
            + r"\right)"
        )
    if isinstance(node, ir.RouteToArgmax):
        return r"\operatorname{route}\left(" + go(node.g) + r"\ \to\ " + go(node.index) + r"\right)"
    if isinstance(node, ir.Softmax):
        return r"\operatorname{softmax}\left(" + go(node.z) + r"\right)"
    if isinstance(node, ir.LogSumExp):
        return r"\operatorname{logsumexp}\left(" + go(node.z) + r"\right)"
    raise TypeError(f"no LaTeX for {type(node).__name__}")
