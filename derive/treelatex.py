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


def _grouped(expr) -> str:
    """An integer expression, in parentheses if it is a sum: (K_H + s(H' - 1)) x ..."""
    expr = sympy.sympify(expr)
    return r"\left(" + _int(expr) + r"\right)" if isinstance(expr, sympy.Add) else _int(expr)


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
            sup=_grouped(node.height) + r" \times " + _grouped(node.width),
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
        ones = r"\operatorname{ones}(" + _int(node.size) + r" \times " + _int(node.size) + ")"
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
    if isinstance(node, INDEX_SPACE_NODES):
        return _index_space_latex(node, go)
    raise TypeError(f"no LaTeX for {type(node).__name__}")


INDEX_SPACE_NODES = (
    ir.ZeroPad,
    ir.CropAxes,
    ir.IndexView,
    ir.Contract,
    ir.ScatterContract,
    ir.ArgmaxView,
    ir.TakeView,
    ir.RouteView,
)


def _map_latex(index_map: ir.IndexMap) -> str:
    parts = []
    for terms, offset in zip(index_map.axes, index_map.offsets):
        expr = sympy.Add(*[c * sympy.Symbol(name) for name, c in terms], sympy.Integer(offset))
        parts.append(sympy.latex(expr))
    return ",".join(parts)


def _element_latex(node: ir.Node, indices, go) -> str:
    """``X_{n,2i+u}`` for a view of X, ``(...)_{n,i}`` for any other array over ``indices``."""
    if isinstance(node, ir.IndexView):
        return go(node.a) + "_{" + _map_latex(node.read) + "}"
    base = go(node)
    if not isinstance(node, ir.Operand):
        base = r"\left(" + base + r"\right)"
    return base + "_{" + ",".join(indices) + "}"


def _index_space_latex(node: ir.Node, go) -> str:
    if isinstance(node, ir.ZeroPad):
        return _operator("pad", go(node.a), sub=",".join(_int(w) for w in node.widths))
    if isinstance(node, ir.CropAxes):
        return _operator("crop", go(node.a), sub=",".join(_int(w) for w in node.starts))
    if isinstance(node, ir.IndexView):
        return _element_latex(node, node.indices, go)
    if isinstance(node, (ir.Contract, ir.ScatterContract)):
        product = r"\, ".join(
            _element_latex(f, s, go) for f, s in zip(node.factors, node.subscripts)
        )
        if isinstance(node, ir.Contract):
            summed = [n for s in node.subscripts for n in s if n not in node.out_indices]
            summed = list(dict.fromkeys(summed))
            return (r"\sum_{" + ",".join(summed) + "} " if summed else "") + product
        return (
            r"\operatorname{scatter}_{" + _map_latex(node.write) + r"}\left(" + product + r"\right)"
        )
    reduced = ",".join(node.reduced)
    element = go(node.a if hasattr(node, "a") else node.g)
    if isinstance(node, ir.ArgmaxView):
        return (
            r"\operatorname{first\,argmax}_{"
            + reduced
            + "} "
            + element
            + "_{"
            + _map_latex(node.read)
            + "}"
        )
    if isinstance(node, ir.TakeView):
        return r"\max_{" + reduced + "} " + element + "_{" + _map_latex(node.read) + "}"
    return (
        r"\operatorname{route}_{"
        + _map_latex(node.read)
        + r"}\left("
        + element
        + r"\ \to\ "
        + go(node.index)
        + r"\right)"
    )


# What each primitive computes, in index notation: printed under a derivation's closed
# forms, so that a reader need not guess which axes a primitive sums over, or whether
# full_convolve flips its kernel (it does not: the flip is rot180).
PRIMITIVE_DEFINITIONS: dict[type, str] = {
    ir.Pad: r"\operatorname{pad}_{p,q}(A)_{n,h,w,c} = A_{n,\,h-p,\,w-q,\,c}"
    r"\quad\text{(zero outside } A\text{)}",
    ir.Crop: r"\operatorname{crop}_{t,l}^{R \times S}(A)_{n,h,w,c} = A_{n,\,t+h,\,l+w,\,c}"
    r"\quad (h < R,\ w < S;\ \text{zero beyond the edges of } A)",
    ir.Dilate: r"\operatorname{dilate}_{s}(G)_{n,\,si,\,sj,\,o} = G_{n,i,j,o}"
    r"\quad\text{(zero in between)}",
    ir.Rot180: r"\operatorname{rot180}(K)_{u,v,c,o} = K_{K_H-1-u,\,K_W-1-v,\,c,\,o}",
    ir.Correlate: r"\operatorname{correlate}_{s}(A, K)_{n,i,j,o} = \sum_{u,v,c}"
    r" A_{n,\,si+u,\,sj+v,\,c}\,K_{u,v,c,o}\quad\text{(no subscript: } s = 1\text{)}",
    ir.CorrelateWeights: r"\operatorname{correlate}_{\Sigma n}(A, G)_{u,v,c,o} = \sum_{n,i,j}"
    r" A_{n,\,i+u,\,j+v,\,c}\,G_{n,i,j,o}",
    ir.FullConvolve: r"\operatorname{full\_convolve}(G, K)_{n,h,w,c} = \sum_{u,v,o}"
    r" G_{n,\,h+u-(K_H-1),\,w+v-(K_W-1),\,o}\,K_{u,v,c,o}"
    r"\quad\text{(} G \text{ zero outside its range; no flip here)}",
    ir.WindowSum: r"\operatorname{window\_sum}_{k,s}(A)_{n,i,j,c} = \sum_{u=0}^{k-1}\sum_{v=0}^{k-1}"
    r" A_{n,\,si+u,\,sj+v,\,c}",
    ir.WindowArgmax: r"\operatorname{first\_argmax}_{k,s}(A)_{n,i,j,c} = (u^*, v^*)"
    r"\quad\text{(the first maximum of window } (i, j) \text{ in row-major order)}",
    ir.GatherWindows: r"\operatorname{gather}(A, (u^*, v^*))_{n,i,j,c} = A_{n,\,si+u^*,\,sj+v^*,\,c}",
    ir.Upsample: r"\operatorname{kron}(A, \operatorname{ones}(k \times k))_{n,h,w,c}"
    r" = A_{n,\,\lfloor h/k \rfloor,\,\lfloor w/k \rfloor,\,c}",
    ir.ScatterWindows: r"\operatorname{scatter\_windows}_{k,s}(G)_{n,h,w,c} = "
    r"\sum_{\substack{i,u:\ si+u=h\\ j,v:\ sj+v=w}} G_{n,i,j,c}",
    ir.RouteToArgmax: r"\operatorname{route}(G \to (u^*, v^*))_{n,h,w,c} = "
    r"\sum_{i,j:\ (si+u^*_{n,i,j,c},\ sj+v^*_{n,i,j,c}) = (h, w)} G_{n,i,j,c}",
    ir.Sum: r"\textstyle\sum_{\text{axes } a} A\text{: the sum over the axes listed (0 is the batch);}"
    r"\text{ those axes are dropped, except } -1 \text{ (the last), kept with length 1}",
    ir.MatMul: r"(A\,B)_{r,q} = \sum_{d} A_{r,d}\,B_{d,q}"
    r"\quad\text{(the matrix product; every other product is elementwise)}",
    ir.Pointwise: r"A\,B,\ \frac{A}{B},\ e^{A},\ \ldots"
    r"\text{: element by element, with NumPy's broadcasting (no matrix products)}",
    ir.Flatten: r"\operatorname{flatten}(A)_{n,\,(h W + w) C + c} = A_{n,h,w,c}",
    ir.ReshapeLike: r"\operatorname{reshape}(G, \operatorname{shape}(X))"
    r"\text{: the elements of } G \text{ in row-major order, in the shape of } X",
    ir.Softmax: r"\operatorname{softmax}(Z)_{n,k} = \frac{e^{Z_{n,k}}}{\sum_{j} e^{Z_{n,j}}}",
    ir.LogSumExp: r"\operatorname{logsumexp}(Z)_{n} = \log \sum_{j} e^{Z_{n,j}}",
}


def primitive_definitions(trees) -> list[str]:
    """The definitions of the primitives in ``trees``, each once, inner ones first."""
    seen: list[type] = []
    for tree in trees:
        for node in tree.walk():
            kind = type(node)
            if kind is ir.Pointwise and len(node.arguments) < 2:
                continue  # no product of two arrays to tell from a matrix product
            if kind in PRIMITIVE_DEFINITIONS and kind not in seen:
                seen.append(kind)
    return [PRIMITIVE_DEFINITIONS[kind] for kind in seen]
