"""Naming the closed form: reductions whose solved gather form is a known composition
of the catalogue's primitives.

Each rule below recognises one shape of reduction by the affine structure of its reads
and gives, for it, the forward value and the gradient of every array it reads as a tree
of named primitives.  The rule's right to do so is the index identity written in its
docstring (the gather form, solved as ``derivation`` solves it, renamed); the proof in
``derive.verify`` then checks every tree against SymPy's derivative of the equation on
the sweep, so a rule that matched wrongly could not get past it.

A reduction no rule recognises keeps the generic form of ``derivation``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy

from derive import ir
from derive.equation.model import Model
from derive.equation.syntax import Call, Element, Reduction


@dataclass
class NamedForm:
    """A reduction's value and gradients as trees of named primitives."""

    rule: str  # what it is, for the derivation
    bindings: list[tuple[str, ir.Node]]  # forward values it needs first (padding, argmax)
    value: ir.Node
    # upstream gradient node -> {array name: cases of its gradient}
    gradients: Callable[[ir.Node], dict[str, tuple[ir.Case, ...]]]


def _standalone(element: Element) -> list:
    return [a.standalone() for a in element.indices]


def _shifted(affine, outer: str, inner: str):
    """The coefficient s when ``affine`` is ``s*outer + inner``, else None."""
    coefficients = dict(affine.coefficients)
    if set(coefficients) != {outer, inner} or coefficients[inner] != 1 or affine.constant != 0:
        return None
    return coefficients[outer]


def _product(node) -> tuple[Element, Element] | None:
    if isinstance(node, Call) and node.function == "*":
        left, right = node.arguments
        if isinstance(left, Element) and isinstance(right, Element) and left.array != right.array:
            return left, right
    return None


def _condition(case: ir.Case) -> ir.Case | None:
    """The case, unless its condition is decided false for these sizes."""
    condition = sympy.sympify(case.condition)
    return None if condition == sympy.false else case


def correlation(model: Model, node: Reduction, scope, unique) -> NamedForm | None:
    """``Z[n,i,j,o] = sum[c,u,v](A[n, s*i+u, s*j+v, c] * K[u,v,c,o])`` (A possibly padded).

    Gather forms, with p the padding and h, w positions of A:
    dA[n,h,w,c] = sum_{i,j,o} dZ[n,i,j,o] K[h+p-s*i, w+p-s*j, c, o]: the dilated gradient
    slid over the kernel turned by 180 degrees (full_convolve), cropped by the padding;
    dK[u,v,c,o] = sum_{n,i,j} A~[n, s*i+u, s*j+v, c] dZ[n,i,j,o]: the padded input
    correlated with the dilated gradient."""
    if node.kind != "sum" or len(scope) != 4:
        return None
    pair = _product(node.body)
    if pair is None:
        return None
    n, i, j, o = scope
    for image, kernel in (pair, pair[::-1]):
        if len(image.indices) != 4 or len(kernel.indices) != 4:
            continue
        ku, kv, kc, ko = _standalone(kernel)
        if None in (ku, kv, kc) or ko != o or set(node.indices) != {ku, kv, kc}:
            continue
        if _standalone(image)[0] != n or _standalone(image)[3] != kc:
            continue
        stride = _shifted(image.indices[1], i, ku)
        if stride is None or _shifted(image.indices[2], j, kv) != stride:
            continue
        padding = image.padding or (0, 0, 0, 0)
        if padding[0] != 0 or padding[3] != 0:
            continue
        break
    else:
        return None
    x, w = image.array, kernel.array
    _, H, W, _ = model.arrays[x].dims
    KH, KW, _, _ = model.arrays[w].dims
    OH = ir.Dim("out_height", "dout", 1, "H'")
    OW = ir.Dim("out_width", "dout", 2, "W'")
    rows, cols = padding[1], padding[2]
    bindings = []
    source = ir.Operand(x)
    if rows != 0 or cols != 0:
        name = unique(f"{x}_padded")
        bindings.append((name, ir.Pad(ir.Operand(x), rows, cols)))
        source = ir.Operand(name)

    def gradients(g):
        return {
            x: (
                ir.Case(
                    ir.Crop(
                        ir.FullConvolve(ir.Dilate(g, stride), ir.Rot180(ir.Operand(w))),
                        rows,
                        cols,
                        H,
                        W,
                    ),
                    name="full convolution of the dilated gradient with the turned kernel, cropped by the padding",
                ),
            ),
            w: (
                ir.Case(
                    ir.CorrelateWeights(
                        # Rows and columns past (H'-1)s + K_H were never inside a window.
                        ir.Crop(source, 0, 0, (OH - 1) * stride + KH, (OW - 1) * stride + KW),
                        ir.Dilate(g, stride),
                    ),
                    name="correlation of the padded input with the dilated gradient",
                ),
            ),
        }

    return NamedForm(
        "a 2-D correlation over channels (correlate; its adjoints full_convolve with rot180, "
        "and correlate against the dilated gradient)",
        bindings,
        ir.Correlate(source, ir.Operand(w), stride),
        gradients,
    )


def matrix_product(model: Model, node: Reduction, scope, unique) -> NamedForm | None:
    """``Z[n,o] = sum[d](A[n,d] * K[d,o])``: dA = dZ K^T, dK = A^T dZ."""
    if node.kind != "sum" or len(scope) != 2 or len(node.indices) != 1:
        return None
    pair = _product(node.body)
    if pair is None:
        return None
    (d,) = node.indices
    n, o = scope
    for left, right in (pair, pair[::-1]):
        if (
            _standalone(left) == [n, d]
            and _standalone(right) == [d, o]
            and not left.padding
            and not right.padding
        ):
            break
    else:
        return None
    x, w = ir.Operand(left.array), ir.Operand(right.array)

    def gradients(g):
        return {
            left.array: (
                ir.Case(ir.MatMul(g, ir.Transpose(w)), name="δ times the transposed weights"),
            ),
            right.array: (
                ir.Case(ir.MatMul(ir.Transpose(x), g), name="the transposed input times δ"),
            ),
        }

    return NamedForm(
        "a matrix product (its adjoints: products with the transposes)",
        [],
        ir.MatMul(x, w),
        gradients,
    )


def pooling(model: Model, node: Reduction, scope, unique) -> NamedForm | None:
    """``Z[n,i,j,c] = max|mean|sum[u<k, v<k](A[n, s*i+u, s*j+v, c])``.

    Gather form of mean: dA[n,h,w,c] = (1/k^2) sum over the windows that hold (h, w) of
    dZ: each window's share spread over it (kron with a k x k block of ones when the
    windows tile the input, s = k).  Of max: each dZ goes to its window's first maximum."""
    if node.kind not in ("max", "mean", "sum") or len(scope) != 4 or len(node.indices) != 2:
        return None
    element = node.body
    if not isinstance(element, Element) or len(element.indices) != 4 or element.padding:
        return None
    n, i, j, c = scope
    ku, kv = node.indices
    if _standalone(element)[0] != n or _standalone(element)[3] != c:
        return None
    stride = _shifted(element.indices[1], i, ku)
    if stride is None or _shifted(element.indices[2], j, kv) != stride:
        return None
    size = model.extents[ku]
    if sympy.simplify(size - model.extents[kv]) != 0 or any(b is None for b in node.bounds):
        return None
    x = element.array
    _, H, W, _ = model.arrays[x].dims
    if node.kind == "max":
        argmax = unique("argmax")

        def routed(g):
            return {
                x: (
                    ir.Case(
                        ir.RouteToArgmax(g, ir.Operand(argmax), size, stride, H, W),
                        name="argmax routing: each δ goes to the first maximum of its window",
                    ),
                )
            }

        return NamedForm(
            "max pooling (window_argmax, gather; its adjoint routes each δ to the first maximum)",
            [(argmax, ir.WindowArgmax(ir.Operand(x), size, stride))],
            ir.GatherWindows(ir.Operand(x), ir.Operand(argmax), size, stride),
            routed,
        )
    scale = size**2 if node.kind == "mean" else 1
    if node.kind == "mean":
        value = ir.pointwise(
            sympy.Symbol("window_sum") / scale, window_sum=ir.WindowSum(ir.Operand(x), size, stride)
        )
    else:
        value = ir.WindowSum(ir.Operand(x), size, stride)
    share = "δ/k^2" if node.kind == "mean" else "δ"

    def spread(g):
        # dZ is divided by k^2 before it is spread out, not after: the division runs over
        # dZ, k^2 times smaller than dA when stride = size.  The values are the same (bit
        # for bit when windows do not overlap: each element is then one dZ element over
        # k^2; a sum of several otherwise, equal up to rounding).
        scaled = ir.pointwise(sympy.Symbol("dout") / scale, dout=g) if scale != 1 else g
        cases = [
            ir.Case(
                ir.Crop(ir.Upsample(scaled, size), 0, 0, H, W),
                condition=sympy.Eq(stride, size),
                name=f"kron: each {share} copied to its whole window (windows that tile the input)",
            ),
            ir.Case(
                ir.ScatterWindows(scaled, size, stride, H, W),
                name=f"scatter-add of each {share} to every position of its window (any stride)",
            ),
        ]
        if sympy.sympify(cases[0].condition) == sympy.true:
            cases = cases[:1]
            cases[0] = ir.Case(cases[0].tree, name=cases[0].name)
        kept = tuple(case for case in cases if _condition(case) is not None)
        return {x: kept}

    kind = "average" if node.kind == "mean" else "sum"
    return NamedForm(
        f"{kind} pooling (window_sum; its adjoint spreads each window's share over the window)",
        [],
        value,
        spread,
    )


RULES = (correlation, matrix_product, pooling)


def name_reduction(model: Model, node: Reduction, scope, unique) -> NamedForm | None:
    """The first rule that recognises ``node``, or None."""
    for rule in RULES:
        form = rule(model, node, scope, unique)
        if form is not None:
            return form
    return None
