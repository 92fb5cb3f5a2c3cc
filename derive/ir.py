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

    @property
    def bindings(self) -> dict[sympy.Symbol, Node]:
        return dict(self.arguments)

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


# ---------------------------------------------------------------------------
# Index-space primitives: the generic lowering of equation layers
# ---------------------------------------------------------------------------
#
# An equation layer's arrays are read through affine index maps (``X[n, 2*i+u, c]``).
# These nodes compute with such reads directly: a "view" is an array with one axis per
# index name, read from another array through an affine map, and the other nodes
# contract, scatter, pick maxima and route gradients over such index spaces.  Index
# names are strings; the affine maps are ``IndexMap`` values.


@dataclass(frozen=True)
class IndexMap:
    """An affine map from named indices to the positions of an array's axes:
    ``axes[k]`` is a tuple of ``(index, coefficient)`` pairs and ``offsets[k]`` the
    constant of axis ``k``; coefficients and offsets are integers."""

    axes: tuple[tuple[tuple[str, int], ...], ...]
    offsets: tuple[int, ...]

    def text(self) -> str:
        """``"n, 2*i+u, 2*j+v, c"``: the map as the equation writes it."""
        parts = []
        for terms, offset in zip(self.axes, self.offsets):
            pieces = [name if c == 1 else f"{c}*{name}" for name, c in terms]
            if offset or not pieces:
                pieces.append(str(offset))
            parts.append("+".join(pieces).replace("+-", "-"))
        return ", ".join(parts)

    def position(self, values: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(
            offset + sum(c * values[name] for name, c in terms)
            for terms, offset in zip(self.axes, self.offsets)
        )

    @property
    def indices(self) -> tuple[str, ...]:
        seen: list[str] = []
        for terms in self.axes:
            seen += [name for name, _ in terms if name not in seen]
        return tuple(seen)


@dataclass(frozen=True)
class ZeroPad(Node):
    """``a`` with ``widths[k]`` zeros added before and after each axis ``k``."""

    a: Node
    widths: tuple[sympy.Expr, ...] = integer()


@dataclass(frozen=True)
class CropAxes(Node):
    """``a[starts[0] : starts[0] + extents[0], ...]``: the adjoint of ``ZeroPad``."""

    a: Node
    starts: tuple[sympy.Expr, ...] = integer()
    extents: tuple[sympy.Expr, ...] = integer()


@dataclass(frozen=True)
class IndexView(Node):
    """An array with one axis per name of ``indices`` (lengths ``extents``):
    ``view[I] = a[read(I)]``.  An index that ``read`` does not use repeats the values
    along its axis (broadcasting).  Every read lies inside ``a``."""

    a: Node
    read: IndexMap
    indices: tuple[str, ...]
    extents: tuple[sympy.Expr, ...] = integer()


@dataclass(frozen=True)
class Contract(Node):
    """``out[out_indices] = sum over the other indices of prod_k factors[k][subscripts[k]]``:
    Einstein summation over named indices."""

    factors: tuple[Node, ...]
    subscripts: tuple[tuple[str, ...], ...]
    out_indices: tuple[str, ...]


@dataclass(frozen=True)
class ScatterContract(Node):
    """The adjoint of reading an array through ``write``: a zero array of shape
    ``shape`` to which ``prod_k factors[k][subscripts[k]]`` is added at ``write(I)`` for
    every value ``I`` of the indices (``index_names`` with lengths ``index_extents``)."""

    factors: tuple[Node, ...]
    subscripts: tuple[tuple[str, ...], ...]
    write: IndexMap
    index_names: tuple[str, ...]
    index_extents: tuple[sympy.Expr, ...] = integer()
    shape: tuple[sympy.Expr, ...] = integer()


@dataclass(frozen=True)
class ArgmaxView(Node):
    """For every value of the kept indices, the position (row-major over ``reduced``) of
    the first maximum of ``a[read(I)]`` over the reduced indices."""

    a: Node
    read: IndexMap
    kept: tuple[str, ...]
    reduced: tuple[str, ...]
    extents: tuple[sympy.Expr, ...] = integer()  # of kept, then reduced


@dataclass(frozen=True)
class TakeView(Node):
    """``a[read(I)]`` at the reduced position ``index`` (from ``ArgmaxView``)."""

    a: Node
    index: Node
    read: IndexMap
    kept: tuple[str, ...]
    reduced: tuple[str, ...]
    extents: tuple[sympy.Expr, ...] = integer()


@dataclass(frozen=True)
class RouteView(Node):
    """The adjoint of ``TakeView``: a zero array of shape ``shape`` to which each element
    of ``g`` (over the kept indices) is added at ``read`` of its chosen position."""

    g: Node
    index: Node
    read: IndexMap
    kept: tuple[str, ...]
    reduced: tuple[str, ...]
    extents: tuple[sympy.Expr, ...] = integer()
    shape: tuple[sympy.Expr, ...] = integer()
