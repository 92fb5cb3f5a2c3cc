"""Closed forms as small trees of array primitives.

Every forward pass and every gradient in cnnderive is written once, as a tree of
the nodes below.  Two interpreters read the same tree:

* ``derive.symbolic.evaluate`` runs it on arrays of SymPy expressions; comparing
  the result with the gradient SymPy derived from the index-level definition is
  the proof;
* ``codegen.emit`` turns it into NumPy source; that is the code that runs.

So the code that runs is, by construction, the formula that was proven.

Arrays are NHWC.  Kernels are (KH, KW, C_in, C_out).  Integer arguments (sizes,
strides, paddings) are SymPy expressions over ``Param`` and ``Dim`` symbols, so a
generated function keeps them as run-time values while the proof substitutes
concrete numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator, Mapping

import sympy

# ---------------------------------------------------------------------------
# Integer symbols: run-time parameters and array dimensions
# ---------------------------------------------------------------------------


class Param(sympy.Symbol):
    """A run-time integer parameter of a layer, such as ``stride`` or ``padding``."""

    def __new__(cls, name: str, latex: str):
        obj = super().__new__(cls, name, integer=True)
        obj.latex_name = latex
        return obj

    def _latex(self, printer) -> str:
        return self.latex_name


class Dim(sympy.Symbol):
    """The length of one axis of a named operand, e.g. the input height ``x.shape[1]``.

    ``name`` is the local variable the generated code binds it to.
    """

    def __new__(cls, name: str, operand: str, axis: int, latex: str):
        obj = super().__new__(cls, name, integer=True, positive=True)
        obj.operand = operand
        obj.axis = axis
        obj.latex_name = latex
        return obj

    def __getnewargs_ex__(self):
        return ((self.name, self.operand, self.axis, self.latex_name), {})

    def _hashable_content(self):
        return super()._hashable_content() + (self.operand, self.axis)

    def _latex(self, printer) -> str:
        return self.latex_name


# ---------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """Base of all tree nodes.  Subclasses are frozen dataclasses: equal trees hash equal,
    which lets the emitter compute a shared subexpression once."""

    def children(self) -> Iterator["Node"]:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Node):
                yield value
            elif isinstance(value, tuple):
                for item in value:
                    if isinstance(item, Node):
                        yield item
                    elif isinstance(item, tuple):  # Pointwise arguments: (symbol, node) pairs
                        yield from (part for part in item if isinstance(part, Node))
            elif isinstance(value, Mapping):
                for item in value.values():
                    if isinstance(item, Node):
                        yield item

    def integer_arguments(self) -> Iterator[sympy.Expr]:
        for f in fields(self):
            if f.metadata.get("integer"):
                value = getattr(self, f.name)
                for item in value if isinstance(value, tuple) else (value,):
                    yield sympy.sympify(item)

    def walk(self) -> Iterator["Node"]:
        """Every node of the tree, children before parents."""
        for child in self.children():
            yield from child.walk()
        yield self


def integer(default=None):
    """Marks a dataclass field as an integer expression (size, stride, padding)."""
    if default is None:
        return field(metadata={"integer": True})
    return field(default=default, metadata={"integer": True})


@dataclass(frozen=True)
class Operand(Node):
    """A named array: a layer input (``x``, ``w``), the upstream gradient ``dout``,
    or a value the forward pass cached (``x_padded``, ``out``)."""

    name: str


@dataclass(frozen=True)
class Pointwise(Node):
    """An elementwise SymPy expression; each free symbol is bound to an array
    (NumPy broadcasting rules apply)."""

    expr: sympy.Expr
    arguments: tuple[tuple[sympy.Symbol, Node], ...]

    def integer_arguments(self) -> Iterator[sympy.Expr]:
        yield from (s for s in self.expr.free_symbols if isinstance(s, (Param, Dim)))


def pointwise(expr, **arguments: Node) -> Pointwise:
    """``pointwise(a * (1 - a), a=Operand("out"))``: symbols are looked up by name."""
    expr = sympy.sympify(expr)
    by_name = {s.name: s for s in expr.free_symbols if not isinstance(s, (Param, Dim))}
    missing = set(by_name) - set(arguments)
    if missing:
        raise ValueError(f"pointwise expression {expr} has unbound symbols {sorted(missing)}")
    bound = tuple(
        (by_name[name], node) for name, node in sorted(arguments.items()) if name in by_name
    )
    return Pointwise(expr, bound)


@dataclass(frozen=True)
class Sum(Node):
    """Sum over ``axes`` (all axes when empty)."""

    a: Node
    axes: tuple[int, ...] = ()
    keepdims: bool = False


@dataclass(frozen=True)
class MatMul(Node):
    """Matrix product of two 2-D arrays."""

    a: Node
    b: Node


@dataclass(frozen=True)
class Transpose(Node):
    """Transpose of a 2-D array."""

    a: Node


@dataclass(frozen=True)
class Flatten(Node):
    """(N, ...) -> (N, prod(...)), row-major (C order)."""

    a: Node


@dataclass(frozen=True)
class ReshapeLike(Node):
    """``a`` reshaped to the shape of the array ``like`` (row-major)."""

    a: Node
    like: Node


@dataclass(frozen=True)
class Pad(Node):
    """Zero padding of the spatial axes (1, 2): ``rows`` above and below, ``cols`` left and right."""

    a: Node
    rows: sympy.Expr = integer()
    cols: sympy.Expr = integer()


@dataclass(frozen=True)
class Crop(Node):
    """The window ``[top, top + height) x [left, left + width)`` of the spatial axes (1, 2).

    Rows or columns of the window that lie beyond the array are zeros: in a
    gradient they are the input positions that no forward window reached.
    """

    a: Node
    top: sympy.Expr = integer()
    left: sympy.Expr = integer()
    height: sympy.Expr = integer()
    width: sympy.Expr = integer()


@dataclass(frozen=True)
class Dilate(Node):
    """Insert ``stride - 1`` zeros between neighbouring elements of the spatial axes."""

    a: Node
    stride: sympy.Expr = integer()


@dataclass(frozen=True)
class Rot180(Node):
    """A kernel (KH, KW, C_in, C_out) turned by 180 degrees in its spatial axes."""

    kernel: Node


@dataclass(frozen=True)
class Correlate(Node):
    """Valid cross-correlation, contracting input channels:
    ``out[n,i,j,o] = sum_{u,v,c} a[n, s*i+u, s*j+v, c] * k[u,v,c,o]``."""

    a: Node
    kernel: Node
    stride: sympy.Expr = integer(1)


@dataclass(frozen=True)
class CorrelateWeights(Node):
    """Valid cross-correlation of a batch of images with a batch of gradient maps,
    summed over the batch:
    ``out[u,v,c,o] = sum_{n,i,j} a[n, u+i, v+j, c] * g[n,i,j,o]``."""

    a: Node
    g: Node


@dataclass(frozen=True)
class FullConvolve(Node):
    """Full-mode sliding product, contracting output channels:
    ``out[n,y,x,c] = sum_{u,v,o} g~[n, y+u, x+v, o] * k[u,v,c,o]`` where ``g~`` is ``g``
    zero-padded by KH-1 rows and KW-1 columns.  Like most deep-learning texts we say
    "convolve" for the unflipped product; the flip is written explicitly as ``Rot180``."""

    g: Node
    kernel: Node


@dataclass(frozen=True)
class WindowSum(Node):
    """Sum of each ``size`` x ``size`` window, windows ``stride`` apart."""

    a: Node
    size: sympy.Expr = integer()
    stride: sympy.Expr = integer()


@dataclass(frozen=True)
class WindowArgmax(Node):
    """Position ``u*size + v`` of the maximum in each window.  Ties go to the first
    maximum in row-major window order (as PyTorch does)."""

    a: Node
    size: sympy.Expr = integer()
    stride: sympy.Expr = integer()


@dataclass(frozen=True)
class GatherWindows(Node):
    """The element of each window at the position ``index`` (from ``WindowArgmax``)."""

    a: Node
    index: Node
    size: sympy.Expr = integer()
    stride: sympy.Expr = integer()


@dataclass(frozen=True)
class Upsample(Node):
    """Nearest-neighbour upsampling, ``kron(a, ones(size, size))`` on the spatial axes."""

    a: Node
    size: sympy.Expr = integer()


@dataclass(frozen=True)
class ScatterWindows(Node):
    """Adjoint of ``WindowSum``: every element of ``g`` is added to each position
    of its window in a zero array of spatial size ``height`` x ``width``."""

    g: Node
    size: sympy.Expr = integer()
    stride: sympy.Expr = integer()
    height: sympy.Expr = integer()
    width: sympy.Expr = integer()


@dataclass(frozen=True)
class RouteToArgmax(Node):
    """Adjoint of ``GatherWindows``: every element of ``g`` goes to the window
    position ``index`` in a zero array of spatial size ``height`` x ``width``
    (added, where overlapping windows share a maximum)."""

    g: Node
    index: Node
    size: sympy.Expr = integer()
    stride: sympy.Expr = integer()
    height: sympy.Expr = integer()
    width: sympy.Expr = integer()


@dataclass(frozen=True)
class Softmax(Node):
    """``exp(z) / sum(exp(z))`` along the last axis."""

    z: Node


@dataclass(frozen=True)
class LogSumExp(Node):
    """``log(sum(exp(z)))`` along the last axis, keeping that axis with length 1."""

    z: Node


# ---------------------------------------------------------------------------
# A closed form with the condition under which it holds
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """``tree`` is the closed form wherever ``condition`` (a SymPy relational over
    Param/Dim symbols, or ``True``) holds."""

    tree: Node
    condition: sympy.Basic = sympy.true
    name: str = ""


def free_operands(node: Node) -> set[str]:
    names = {n.name for n in node.walk() if isinstance(n, Operand)}
    for n in node.walk():
        for expr in n.integer_arguments():
            names |= {s.operand for s in expr.free_symbols if isinstance(s, Dim)}
    return names


def free_integer_symbols(node: Node) -> set[sympy.Symbol]:
    found: set[sympy.Symbol] = set()
    for n in node.walk():
        for expr in n.integer_arguments():
            found |= expr.free_symbols
    return found
