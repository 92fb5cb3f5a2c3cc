"""Index-level sums for symbolic sizes: the meaning of a tree, or of a definition, at
one element, for every size at once.

A gradient element such as ``dX[n, h, w, c]`` of a convolution is, for any sizes, a sum of
products of array elements over the integer points of a set cut out by affine
constraints::

    dX[n,h,w,c] = sum over (i, j, o, u, v) with s*i + u = h + p, s*j + v = w + p,
                  0 <= i < H', 0 <= u < K_H, ... of  delta[n,i,j,o] * W[u,v,c,o]

A ``Term`` is one such sum: a coefficient (a SymPy expression in the sizes, such as
``1/k**2``), the array elements it multiplies (``Read``), the summation variables and the
constraints on them.  A list of terms is their total.  Two interpreters build terms:

* ``TreeMeaning.element(node, index)``: the element ``index`` of a closed-form tree (each
  primitive of ``derive.ir`` has an index-level meaning, written beside it below);
* ``definition_terms`` and ``chain_rule_terms``: a layer's index-level definition
  (SymPy ``Indexed``/``Sum``), and the gradient the chain rule derives from it.

Sizes stay symbols (``Dim``, ``Param``).  A symbolic stride leaves products ``s*i`` in the
terms, which ``derive.stride`` factors out; otherwise the stride is given as a number.
Max pooling's routing reads its first-maximum indicator as one more array.  Whatever has
no affine meaning (flatten's ``e = (h W + w) C + c``, exponentials) raises ``NotAffine``
with the reason.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping, Sequence

import sympy

from derive import ir
from derive.functions import without_flushes

# A constraint is ("eq", e), meaning e = 0, or ("ge", e), meaning e >= 0; e is an integer
# expression in index variables and sizes.
Constraint = tuple[str, sympy.Expr]


class NotAffine(ValueError):
    """This tree or definition has no meaning as a sum over an affine integer set."""


@dataclass(frozen=True)
class Read:
    """The element ``array[index]``; it is zero where ``index`` lies outside the array."""

    array: str
    index: tuple[sympy.Expr, ...]


@dataclass(frozen=True)
class Term:
    """``coefficient * prod(reads)`` summed over the integer points of ``variables``
    that satisfy ``constraints``."""

    coefficient: sympy.Expr
    reads: tuple[Read, ...]
    variables: tuple[sympy.Symbol, ...]
    constraints: tuple[Constraint, ...]

    def constrained(self, *more: Constraint) -> "Term":
        return Term(self.coefficient, self.reads, self.variables, self.constraints + more)

    def times(self, other: "Term") -> "Term":
        return Term(
            self.coefficient * other.coefficient,
            self.reads + other.reads,
            self.variables + other.variables,
            self.constraints + other.constraints,
        )

    def scaled(self, factor) -> "Term":
        return Term(self.coefficient * factor, self.reads, self.variables, self.constraints)

    def substituted(self, values: Mapping) -> "Term":
        return Term(
            sympy.sympify(self.coefficient).xreplace(values),
            tuple(
                Read(r.array, tuple(sympy.sympify(e).xreplace(values) for e in r.index))
                for r in self.reads
            ),
            # a renamed variable stays summed; one given a number is no longer a variable
            tuple(
                values.get(v, v)
                for v in self.variables
                if not sympy.sympify(values.get(v, v)).is_number
            ),
            tuple((kind, sympy.sympify(e).xreplace(values)) for kind, e in self.constraints),
        )


_counter = itertools.count()


def fresh(stem: str = "t") -> sympy.Symbol:
    """A new summation variable, distinct from every other."""
    return sympy.Symbol(f"{stem}_{next(_counter)}", integer=True)


def within(index: Sequence[sympy.Expr], shape: Sequence[sympy.Expr]) -> tuple[Constraint, ...]:
    """``0 <= index[k] < shape[k]`` for every axis."""
    out = []
    for position, extent in zip(index, shape):
        out.append(("ge", sympy.sympify(position)))
        out.append(("ge", sympy.sympify(extent) - 1 - position))
    return tuple(out)


def equal(a, b) -> Constraint:
    return ("eq", sympy.sympify(a) - b)


def product(*sums: list[Term]) -> list[Term]:
    """The product of sums of terms, multiplied out."""
    out = [Term(sympy.S.One, (), (), ())]
    for terms in sums:
        out = [left.times(right) for left in out for right in terms]
    return out


def _is_number(expr) -> bool:
    return sympy.sympify(expr).is_Integer is True


class TreeMeaning:
    """The index-level meaning of the trees of one layer.

    ``shapes`` gives the shape of every operand a tree may name (inputs, the upstream
    gradient, forward bindings are looked up in ``bindings``); ``values`` replaces
    symbols by numbers (the stride)."""

    def __init__(
        self,
        shapes: Mapping[str, tuple[sympy.Expr, ...]],
        bindings: Mapping[str, ir.Node],
        values: Mapping[sympy.Symbol, int],
    ):
        self.values = {k: sympy.sympify(v) for k, v in values.items()}
        self.operand_shapes = {
            name: tuple(sympy.sympify(e).xreplace(self.values) for e in shape)
            for name, shape in shapes.items()
        }
        self.bindings = dict(bindings)
        # Extents written as a symbol instead (floor(E / s) + 1 as H' for a symbolic stride).
        self.named_extents: dict[sympy.Expr, sympy.Symbol] = {}

    # integer arguments ---------------------------------------------------------
    def integer(self, expr) -> sympy.Expr:
        """An integer argument, its Dims of non-input operands (the upstream gradient's
        height, say) replaced by that operand's shape, and fixed values put in."""
        expr = sympy.sympify(expr).xreplace(self.values)
        replacements = {}
        for symbol in expr.free_symbols:
            if isinstance(symbol, ir.Dim) and symbol.operand not in self.operand_shapes:
                replacements[symbol] = self.shape(ir.Operand(symbol.operand))[symbol.axis]
            elif isinstance(symbol, ir.Dim):
                own = self.operand_shapes[symbol.operand][symbol.axis]
                if own != symbol:
                    replacements[symbol] = own
        return expr.xreplace(replacements) if replacements else expr

    # shapes --------------------------------------------------------------------
    def shape(self, node: ir.Node) -> tuple[sympy.Expr, ...]:
        method = getattr(self, "shape_" + type(node).__name__, None)
        if method is None:
            raise NotAffine(f"{type(node).__name__} has no index-level meaning here")
        shape = tuple(sympy.sympify(e) for e in method(node))
        return tuple(self.named_extents.get(e, e) for e in shape)

    def shape_Operand(self, node):
        if node.name in self.operand_shapes:
            return self.operand_shapes[node.name]
        if node.name in self.bindings:
            return self.shape(self.bindings[node.name])
        raise NotAffine(f"operand {node.name!r} has no known shape")

    def shape_Pointwise(self, node):
        shapes = [self.shape(child) for _, child in node.arguments]
        rank = max((len(s) for s in shapes), default=0)
        out = []
        for axis in range(-rank, 0):
            extents = [s[axis] for s in shapes if len(s) >= -axis]
            longer = [e for e in extents if e != 1]
            out.append(longer[0] if longer else sympy.S.One)
        return tuple(out)

    def shape_Sum(self, node):
        shape = self.shape(node.a)
        axes = {a % len(shape) for a in node.axes} if node.axes else set(range(len(shape)))
        if node.keepdims:
            return tuple(1 if k in axes else e for k, e in enumerate(shape))
        return tuple(e for k, e in enumerate(shape) if k not in axes)

    def shape_MatMul(self, node):
        return (self.shape(node.a)[0], self.shape(node.b)[1])

    def shape_Transpose(self, node):
        return tuple(reversed(self.shape(node.a)))

    def shape_Pad(self, node):
        n, h, w, c = self.shape(node.a)
        return (n, h + 2 * self.integer(node.rows), w + 2 * self.integer(node.cols), c)

    def shape_Crop(self, node):
        n, _, _, c = self.shape(node.a)
        return (n, self.integer(node.height), self.integer(node.width), c)

    def shape_Dilate(self, node):
        n, h, w, c = self.shape(node.a)
        s = self.integer(node.stride)
        return (n, s * (h - 1) + 1, s * (w - 1) + 1, c)

    def shape_Rot180(self, node):
        return self.shape(node.kernel)

    def shape_Correlate(self, node):
        n, h, w, _ = self.shape(node.a)
        kh, kw, _, o = self.shape(node.kernel)
        s = self.integer(node.stride)
        return (n, sympy.floor((h - kh) / s) + 1, sympy.floor((w - kw) / s) + 1, o)

    def shape_CorrelateWeights(self, node):
        _, h, w, c = self.shape(node.a)
        _, gh, gw, o = self.shape(node.g)
        return (h - gh + 1, w - gw + 1, c, o)

    def shape_FullConvolve(self, node):
        n, h, w, _ = self.shape(node.g)
        kh, kw, c, _ = self.shape(node.kernel)
        return (n, h + kh - 1, w + kw - 1, c)

    def _pooled(self, node):
        n, h, w, c = self.shape(node.a)
        k, s = self.integer(node.size), self.integer(node.stride)
        return (n, sympy.floor((h - k) / s) + 1, sympy.floor((w - k) / s) + 1, c)

    shape_WindowSum = shape_WindowArgmax = shape_GatherWindows = _pooled

    def shape_Upsample(self, node):
        n, h, w, c = self.shape(node.a)
        k = self.integer(node.size)
        return (n, h * k, w * k, c)

    def shape_ScatterWindows(self, node):
        n, _, _, c = self.shape(node.g)
        return (n, self.integer(node.height), self.integer(node.width), c)

    shape_RouteToArgmax = shape_ScatterWindows

    def shape_Flatten(self, node):
        shape = self.shape(node.a)
        return (shape[0], sympy.Mul(*shape[1:]))

    def shape_ReshapeLike(self, node):
        return self.shape(node.like)

    def shape_Softmax(self, node):
        return self.shape(node.z)

    def shape_LogSumExp(self, node):
        return self.shape(node.z)[:-1] + (1,)

    # elements ------------------------------------------------------------------
    def element(self, node: ir.Node, index: Sequence[sympy.Expr]) -> list[Term]:
        """The element ``index`` of ``node`` as a sum of terms; zero outside the node's shape."""
        index = tuple(sympy.sympify(e) for e in index)
        method = getattr(self, "element_" + type(node).__name__, None)
        if method is None:
            raise NotAffine(
                _WHY_NOT.get(type(node).__name__, f"{type(node).__name__} is not affine")
            )
        bounds = within(index, self.shape(node))
        return [term.constrained(*bounds) for term in method(node, index)]

    def element_Operand(self, node, index):
        if node.name in self.operand_shapes:
            return [Term(sympy.S.One, (Read(node.name, index),), (), ())]
        if node.name in self.bindings:
            return self.element(self.bindings[node.name], index)
        raise NotAffine(f"operand {node.name!r} is not known")

    def element_Pointwise(self, node, index):
        symbols = [symbol for symbol, _ in node.arguments]
        # A proof is in exact arithmetic, where flush(x) is x (derive.functions).
        expr = without_flushes(node.expr).xreplace(self.values)
        expr = expr.xreplace(
            {s: self.integer(s) for s in expr.free_symbols if isinstance(s, ir.Dim)}
        )
        try:
            polynomial = sympy.Poly(expr, *symbols)
        except sympy.PolynomialError as error:
            raise NotAffine(f"the pointwise expression {node.expr} is not a polynomial") from error
        if any(not c.is_number and c.free_symbols & set(symbols) for c in polynomial.coeffs()):
            raise NotAffine(f"the pointwise expression {node.expr} is not a polynomial")
        rank = len(self.shape(node))
        arguments = []
        for _, child in node.arguments:
            child_shape = self.shape(child)
            own = index[rank - len(child_shape) :]
            own = tuple(0 if extent == 1 else i for i, extent in zip(own, child_shape))
            arguments.append(self.element(child, own))
        out = []
        for powers, coefficient in polynomial.terms():
            factors = []
            for argument, power in zip(arguments, powers):
                factors += [argument] * power
            out += [term.scaled(coefficient) for term in product(*factors)]
        return out

    def element_Sum(self, node, index):
        shape = self.shape(node.a)
        axes = {a % len(shape) for a in node.axes} if node.axes else set(range(len(shape)))
        kept = iter(index)
        inner, variables = [], []
        for axis in range(len(shape)):
            if axis in axes:
                variable = fresh("r")
                variables.append(variable)
                inner.append(variable)
                if node.keepdims:
                    next(kept)
            else:
                inner.append(next(kept))
        return [_bind(term, variables) for term in self.element(node.a, inner)]

    def element_MatMul(self, node, index):
        r, c = index
        t = fresh("k")
        terms = product(self.element(node.a, (r, t)), self.element(node.b, (t, c)))
        return [_bind(term, [t]) for term in terms]

    def element_Transpose(self, node, index):
        return self.element(node.a, tuple(reversed(index)))

    def element_Pad(self, node, index):
        n, h, w, c = index
        return self.element(
            node.a, (n, h - self.integer(node.rows), w - self.integer(node.cols), c)
        )

    def element_Crop(self, node, index):
        n, y, x, c = index
        return self.element(node.a, (n, y + self.integer(node.top), x + self.integer(node.left), c))

    def element_Dilate(self, node, index):
        n, y, x, c = index
        s = self.integer(node.stride)  # a symbolic s is factored out by derive.stride
        qy, qx = fresh("q"), fresh("q")
        terms = self.element(node.a, (n, qy, qx, c))
        return [_bind(t.constrained(equal(y, s * qy), equal(x, s * qx)), [qy, qx]) for t in terms]

    def element_Rot180(self, node, index):
        u, v, c, o = index
        kh, kw, _, _ = self.shape(node.kernel)
        return self.element(node.kernel, (kh - 1 - u, kw - 1 - v, c, o))

    def element_Correlate(self, node, index):
        n, i, j, o = index
        s = self.integer(node.stride)
        u, v, c = fresh("u"), fresh("v"), fresh("c")
        terms = product(
            self.element(node.a, (n, s * i + u, s * j + v, c)),
            self.element(node.kernel, (u, v, c, o)),
        )
        return [_bind(t, [u, v, c]) for t in terms]

    def element_CorrelateWeights(self, node, index):
        u, v, c, o = index
        n, i, j = fresh("n"), fresh("i"), fresh("j")
        terms = product(
            self.element(node.a, (n, u + i, v + j, c)), self.element(node.g, (n, i, j, o))
        )
        return [_bind(t, [n, i, j]) for t in terms]

    def element_FullConvolve(self, node, index):
        n, y, x, c = index
        kh, kw, _, _ = self.shape(node.kernel)
        u, v, o = fresh("u"), fresh("v"), fresh("o")
        terms = product(
            self.element(node.g, (n, y + u - (kh - 1), x + v - (kw - 1), o)),
            self.element(node.kernel, (u, v, c, o)),
        )
        return [_bind(t, [u, v, o]) for t in terms]

    def element_WindowSum(self, node, index):
        n, i, j, c = index
        k, s = self.integer(node.size), self.integer(node.stride)
        u, v = fresh("u"), fresh("v")
        terms = self.element(node.a, (n, s * i + u, s * j + v, c))
        return [_bind(t.constrained(*within((u, v), (k, k))), [u, v]) for t in terms]

    def element_Upsample(self, node, index):
        n, y, x, c = index
        k = self.integer(node.size)  # symbolic: y = k q + r is factored out by derive.stride
        qy, qx, ry, rx = fresh("q"), fresh("q"), fresh("r"), fresh("r")
        terms = self.element(node.a, (n, qy, qx, c))
        return [
            _bind(
                t.constrained(
                    equal(y, k * qy + ry), equal(x, k * qx + rx), *within((ry, rx), (k, k))
                ),
                [qy, qx, ry, rx],
            )
            for t in terms
        ]

    def element_ScatterWindows(self, node, index):
        n, y, x, c = index
        k, s = self.integer(node.size), self.integer(node.stride)
        i, j, u, v = fresh("i"), fresh("j"), fresh("u"), fresh("v")
        terms = self.element(node.g, (n, i, j, c))
        return [
            _bind(
                t.constrained(equal(y, s * i + u), equal(x, s * j + v), *within((u, v), (k, k))),
                [i, j, u, v],
            )
            for t in terms
        ]

    # Max pooling: which window element is the first maximum is a property of the values.
    # Its index-level form is an indicator array I[n, i, j, c, u, v] (1 at the first
    # maximum (u, v) of window (n, i, j, c)), the same array the definition multiplies
    # by; the gradient holds it fixed (the tie rule), so here it is one more array.
    def indicator(self, node: ir.Node) -> tuple[str, tuple[sympy.Expr, ...], ir.WindowArgmax]:
        """(array name, shape, the WindowArgmax) of the indicator that ``node`` computes."""
        while isinstance(node, ir.Operand) and node.name in self.bindings:
            node = self.bindings[node.name]
        if not isinstance(node, ir.WindowArgmax) or not isinstance(node.a, ir.Operand):
            raise NotAffine("a window position that is not the first maximum of an input's window")
        k = self.integer(node.size)
        return f"first_max_{node.a.name}", self.shape(node) + (k, k), node

    def _routing(self, node):
        name, shape, argmax = self.indicator(node.index)
        same = (
            self.integer(node.size) - self.integer(argmax.size),
            self.integer(node.stride) - self.integer(argmax.stride),
        )
        if any(sympy.simplify(d) != 0 for d in same):
            raise NotAffine("windows of another size or stride than the argmax's")
        return name, shape, argmax

    def element_GatherWindows(self, node, index):
        n, i, j, c = index
        name, shape, argmax = self._routing(node)
        if argmax.a != node.a:
            raise NotAffine("the maximum of one array's windows picks elements of another")
        s = self.integer(node.stride)  # the window size bounds u, v through the indicator
        u, v = fresh("u"), fresh("v")
        chosen = Term(
            sympy.S.One, (Read(name, (n, i, j, c, u, v)),), (), within((n, i, j, c, u, v), shape)
        )
        terms = product(self.element(node.a, (n, s * i + u, s * j + v, c)), [chosen])
        return [_bind(t, [u, v]) for t in terms]

    def element_RouteToArgmax(self, node, index):
        n, y, x, c = index
        name, shape, _ = self._routing(node)
        s = self.integer(node.stride)
        i, j, u, v = fresh("i"), fresh("j"), fresh("u"), fresh("v")
        chosen = Term(
            sympy.S.One, (Read(name, (n, i, j, c, u, v)),), (), within((n, i, j, c, u, v), shape)
        )
        terms = product(self.element(node.g, (n, i, j, c)), [chosen])
        return [
            _bind(t.constrained(equal(y, s * i + u), equal(x, s * j + v)), [i, j, u, v])
            for t in terms
        ]

    # The index-space primitives of equation layers: arrays read through affine maps of
    # named indices (``ir.IndexMap``), contracted and scattered over those indices.
    def _position(self, read: ir.IndexMap, values: Mapping[str, sympy.Expr]):
        return tuple(
            offset + sum(c * values[name] for name, c in terms)
            for terms, offset in zip(read.axes, read.offsets)
        )

    def shape_ZeroPad(self, node):
        return tuple(e + 2 * self.integer(w) for e, w in zip(self.shape(node.a), node.widths))

    def element_ZeroPad(self, node, index):
        return self.element(node.a, tuple(i - self.integer(w) for i, w in zip(index, node.widths)))

    def shape_CropAxes(self, node):
        return tuple(self.integer(e) for e in node.extents)

    def element_CropAxes(self, node, index):
        return self.element(node.a, tuple(i + self.integer(s) for i, s in zip(index, node.starts)))

    def shape_IndexView(self, node):
        return tuple(self.integer(e) for e in node.extents)

    def element_IndexView(self, node, index):
        return self.element(node.a, self._position(node.read, dict(zip(node.indices, index))))

    def shape_Contract(self, node):
        extents = {}
        for factor, subscripts in zip(node.factors, node.subscripts):
            extents.update(zip(subscripts, self.shape(factor)))
        return tuple(extents[name] for name in node.out_indices)

    def element_Contract(self, node, index):
        names = dict(zip(node.out_indices, index))
        summed = []
        for subscripts in node.subscripts:
            for name in subscripts:
                if name not in names:
                    names[name] = fresh(name)
                    summed.append(names[name])
        factors = [
            self.element(factor, tuple(names[name] for name in subscripts))
            for factor, subscripts in zip(node.factors, node.subscripts)
        ]
        return [_bind(t, summed) for t in product(*factors)]

    def shape_ScatterContract(self, node):
        return tuple(self.integer(e) for e in node.shape)

    def element_ScatterContract(self, node, index):
        names = {name: fresh(name) for name in node.index_names}
        ranges = within(
            [names[n] for n in node.index_names], [self.integer(e) for e in node.index_extents]
        )
        lands = [equal(p, y) for p, y in zip(self._position(node.write, names), index)]
        factors = [
            self.element(factor, tuple(names[name] for name in subscripts))
            for factor, subscripts in zip(node.factors, node.subscripts)
        ]
        return [
            _bind(t.constrained(*ranges, *lands), list(names.values())) for t in product(*factors)
        ]


_WHY_NOT = {
    "WindowArgmax": "max pooling's routing depends on which element is largest, a property of the "
    "values, not of the indices",
    "Flatten": "row-major flattening reads e = (h W + w) C + c, a product of sizes and indices",
    "ReshapeLike": "row-major reshaping reads e = (h W + w) C + c, a product of sizes and indices",
    "Softmax": "softmax is not a sum of products of array elements",
    "ArgmaxView": "the maximum of an equation's reduction is not read as an indicator array here",
    "TakeView": "the maximum of an equation's reduction is not read as an indicator array here",
    "RouteView": "the maximum of an equation's reduction is not read as an indicator array here",
    "LogSumExp": "log-sum-exp is not a sum of products of array elements",
}


def _bind(term: Term, variables: Sequence[sympy.Symbol]) -> Term:
    """``term`` summed over ``variables`` as well."""
    return Term(term.coefficient, term.reads, term.variables + tuple(variables), term.constraints)


# ---------------------------------------------------------------------------
# Definitions in SymPy Indexed/Sum notation, and the chain rule on them
# ---------------------------------------------------------------------------


def expression_terms(
    expr: sympy.Expr,
    arrays: Mapping[str, tuple[str, tuple[sympy.Expr, ...]]],
    meanings: Mapping[str, tuple[ir.Node, TreeMeaning]] | None = None,
) -> list[Term]:
    """An Indexed/Sum expression as terms.  ``arrays`` maps an Indexed base label to
    (array name, shape); ``meanings`` maps other labels to a tree that builds them
    (the padded input of a convolution).  A read outside an array is zero."""
    meanings = meanings or {}
    if isinstance(expr, sympy.Indexed):
        label = str(expr.base.label)
        if label in arrays:
            name, shape = arrays[label]
            if len(shape) != len(expr.indices):
                raise NotAffine(
                    f"{label} has {len(shape)} axes, read with {len(expr.indices)} indices"
                )
            return [
                Term(
                    sympy.S.One, (Read(name, tuple(expr.indices)),), (), within(expr.indices, shape)
                )
            ]
        if label in meanings:
            node, meaning = meanings[label]
            return meaning.element(node, tuple(expr.indices))
        raise NotAffine(f"array {label} is not known")
    if isinstance(expr, sympy.Sum):
        renames, constraints = {}, []
        for variable, low, high in expr.limits:
            new = fresh(str(variable))
            renames[variable] = new
            constraints += [("ge", new - low), ("ge", high - new)]
        body = expression_terms(expr.function.xreplace(renames), arrays, meanings)
        return [_bind(t.constrained(*constraints), list(renames.values())) for t in body]
    if expr.is_Add:
        return [t for arg in expr.args for t in expression_terms(arg, arrays, meanings)]
    if expr.is_Mul:
        factors, coefficient = [], sympy.S.One
        for arg in expr.args:
            if arg.has(sympy.Indexed):
                factors.append(expression_terms(arg, arrays, meanings))
            else:
                coefficient *= arg
        return [t.scaled(coefficient) for t in product(*factors)]
    if not expr.has(sympy.Indexed):
        return [Term(expr, (), (), ())] if expr != 0 else []
    raise NotAffine(f"{type(expr).__name__} of array elements is not a sum of products")


def chain_rule_terms(
    definition: list[Term],
    outputs: Sequence[sympy.Symbol],
    output_shape: Sequence[sympy.Expr],
    upstream: str | None,
    wrt: str,
    index: Sequence[sympy.Symbol],
) -> list[Term]:
    """``d L / d wrt[index] = sum over outputs of upstream[outputs] * d out[outputs] / d wrt[index]``.

    ``definition`` is the output element ``out[outputs]`` as terms.  A term is linear in
    ``wrt`` (read at most once); its derivative keeps the other factors where the read
    of ``wrt`` lands on ``index``.  The output indices become summation variables."""
    renames = {o: fresh(str(o)) for o in outputs}
    summed = [renames[o] for o in outputs]
    out = []
    for term in definition:
        term = term.substituted(renames)
        hits = [k for k, read in enumerate(term.reads) if read.array == wrt]
        if len(hits) > 1:
            raise NotAffine(f"the definition is not linear in {wrt}")
        if not hits:
            continue
        (hit,) = hits
        others = term.reads[:hit] + term.reads[hit + 1 :]
        lands = tuple(equal(a, b) for a, b in zip(term.reads[hit].index, index))
        reads = ((Read(upstream, tuple(summed)),) if upstream else ()) + others
        out.append(
            Term(
                term.coefficient,
                reads,
                term.variables + tuple(summed),
                term.constraints + lands + within(summed, output_shape),
            )
        )
    return out


# ---------------------------------------------------------------------------
# Equation layers: the definition's syntax tree as terms
# ---------------------------------------------------------------------------


def equation_terms(model) -> tuple[list[Term], tuple[sympy.Symbol, ...]]:
    """An equation layer's definition (``derive.equation.model.Model``) at its output
    element, as terms; and the output index symbols."""
    outputs = {name: sympy.Symbol(name, integer=True) for name in model.output_indices}
    shapes = {name: tuple(info.dims) for name, info in model.arrays.items()}
    terms = syntax_terms(model.equation.rhs, outputs, shapes, lambda name, _: model.extents[name])
    return terms, tuple(outputs[n] for n in model.output_indices)


def syntax_terms(node, names, shapes, extent_of) -> list[Term]:
    """The terms of an equation's syntax tree (``derive.equation.syntax``) with the indices
    ``names`` (index name -> symbol) free.  ``shapes`` gives each array's shape;
    ``extent_of(index, reduction)`` the range of a reduction's index.  A read of
    ``pad(X, ...)`` is a read of ``X`` shifted by the padding, zero outside ``X``."""

    def position(affine):
        return sympy.sympify(affine.constant) + sum(
            (sympy.sympify(c) * names[name] for name, c in affine.coefficients), sympy.S.Zero
        )

    kind = type(node).__name__
    if kind == "Number":
        value = sympy.Rational(node.value)
        return [Term(value, (), (), ())] if value != 0 else []
    if kind == "Element":
        if node.array not in shapes:
            raise NotAffine(f"unknown array {node.array}; the arrays are {', '.join(shapes)}")
        shape = shapes[node.array]
        if len(node.indices) != len(shape):
            raise NotAffine(f"{node.array} has {len(shape)} axes, read with {len(node.indices)}")
        index = [position(a) for a in node.indices]
        if node.padding:
            index = [i - w for i, w in zip(index, node.padding)]
        return [Term(sympy.S.One, (Read(node.array, tuple(index)),), (), within(index, shape))]
    if kind == "Reduction":
        if node.kind not in ("sum", "mean"):
            raise NotAffine(f"a {node.kind}[...] is not a sum of products")
        inner = dict(names)
        for name in node.indices:
            inner[name] = fresh(name)
        extents = [extent_of(name, node) for name in node.indices]
        ranges = within([inner[name] for name in node.indices], extents)
        terms = [
            _bind(t.constrained(*ranges), [inner[name] for name in node.indices])
            for t in syntax_terms(node.body, inner, shapes, extent_of)
        ]
        if node.kind == "mean":
            terms = [t.scaled(1 / sympy.Mul(*extents)) for t in terms]
        return terms
    arguments = [syntax_terms(a, names, shapes, extent_of) for a in node.arguments]
    if node.function == "+":
        return arguments[0] + arguments[1]
    if node.function == "-":
        return arguments[0] + [t.scaled(-1) for t in arguments[1]]
    if node.function == "neg":
        return [t.scaled(-1) for t in arguments[0]]
    if node.function == "*":
        return product(*arguments)
    if node.function == "/" and type(node.arguments[1]).__name__ == "Number":
        return [t.scaled(1 / sympy.Rational(node.arguments[1].value)) for t in arguments[0]]
    raise NotAffine(f"{node.function}(...) is not a sum of products")
