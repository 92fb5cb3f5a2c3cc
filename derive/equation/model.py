"""The meaning of an equation: which arrays it reads, the range of every index, and the
checks that valid sizes pass.

Ranges follow three rules, in this order:

1. an explicit bound in a reduction (``max[u<3]``) is the range of ``u``;
2. an index that stands alone in an array axis (``u`` in ``W[u,v,c,o]``) ranges over that
   axis (for ``pad(X, ...)``, over the padded axis);
3. an output index that stands alone nowhere (``i`` in ``X[n, 2*i+u, ...]``) takes the
   largest range for which every read stays inside its array: "valid".

A reduction index that none of these rules reaches has no range, and is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from derive.equation.syntax import (
    Affine,
    Call,
    Element,
    Equation,
    EquationError,
    Node,
    Number,
    Reduction,
    parse,
)
from derive.ir import Dim


def index_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, nonnegative=True)


def affine_expr(affine: Affine) -> sympy.Expr:
    return sympy.Add(
        *[coefficient * index_symbol(name) for name, coefficient in affine.coefficients],
        sympy.sympify(affine.constant),
    )


@dataclass
class ArrayInfo:
    name: str
    rank: int
    padding: tuple | None  # widths of pad(...) when the array is read padded
    dims: list[Dim] = field(default_factory=list)

    def padded_extent(self, axis: int) -> sympy.Expr:
        width = self.padding[axis] if self.padding else 0
        return self.dims[axis] + 2 * width


@dataclass(frozen=True)
class Read:
    """One array element of the equation, with the indices in scope where it stands."""

    element: Element
    scope: tuple[str, ...]  # output indices, then the enclosing reduction's indices


@dataclass
class Model:
    equation: Equation
    arrays: dict[str, ArrayInfo]  # in order of first appearance
    extents: dict[str, sympy.Expr]  # index name -> number of values (over Dims)
    reads: list[Read]
    reductions: list[Reduction]
    requirements: list[tuple[sympy.Basic, str]]  # (condition, message)

    @property
    def output(self) -> str:
        return self.equation.output

    @property
    def output_indices(self) -> tuple[str, ...]:
        return self.equation.output_indices

    def output_extents(self) -> tuple[sympy.Expr, ...]:
        return tuple(self.extents[i] for i in self.output_indices)


def _error(equation: Equation, message: str, node=None, span=None) -> EquationError:
    if node is not None:
        span = (node.start, node.end)
    if span is None:
        return EquationError(message)
    return EquationError(message, equation.text, span[0], span[1])


def _walk(node: Node, scope: tuple[str, ...], reads: list, reductions: list, equation: Equation):
    if isinstance(node, Element):
        reads.append(Read(node, scope))
    elif isinstance(node, Call):
        for argument in node.arguments:
            _walk(argument, scope, reads, reductions, equation)
    elif isinstance(node, Reduction):
        if len(scope) > len(equation.output_indices):
            raise _error(
                equation,
                f"a {node.kind}[...] inside another reduction is not supported; merge them "
                f"into one, e.g. sum[a,b](...)",
                node,
            )
        for index in node.indices:
            if index in equation.output_indices:
                raise _error(
                    equation,
                    f"{node.kind}[...] reduces over {index!r}, an output index; an index is "
                    "either on the left side or reduced, not both",
                    node,
                )
        reductions.append(node)
        _walk(node.body, scope + node.indices, reads, reductions, equation)
    elif isinstance(node, Number):
        pass


def _indices_in(node: Node) -> set[str]:
    if isinstance(node, Element):
        return {name for affine in node.indices for name in affine.indices}
    if isinstance(node, Call):
        return set().union(*[_indices_in(a) for a in node.arguments])
    if isinstance(node, Reduction):
        return _indices_in(node.body)
    return set()


def build_model(equation: Equation, parameters=(), dims=None) -> Model:
    """``dims`` may give an array's Dims (one per axis) instead of new ones: the catalogue
    names its sizes itself."""
    dims = dims or {}
    reads: list[Read] = []
    reductions: list[Reduction] = []
    _walk(equation.rhs, equation.output_indices, reads, reductions, equation)
    if not reads:
        raise _error(equation, "the right side reads no array; write e.g. Z[n] = X[n] * 2")

    # Arrays: one rank each, the output not read, a padding width per axis.
    arrays: dict[str, ArrayInfo] = {}
    for read in reads:
        element = read.element
        if element.array == equation.output:
            raise _error(
                equation,
                f"the output {element.array!r} is read on the right side; a layer's output "
                "is computed from its inputs only",
                element,
            )
        rank = len(element.indices)
        if element.padding is not None and len(element.padding) != rank:
            raise _error(
                equation,
                f"pad({element.array}, ...) gives {len(element.padding)} widths for an array "
                f"read with {rank} indices; give one width per axis",
                element,
            )
        info = arrays.get(element.array)
        if info is None:
            arrays[element.array] = ArrayInfo(element.array, rank, element.padding)
        elif info.rank != rank:
            raise _error(
                equation,
                f"array {element.array!r} is used with {_indices(info.rank)} and with {rank}; "
                "an array has one rank",
                element,
            )
        elif info.padding != element.padding:
            raise _error(
                equation,
                f"array {element.array!r} is read both with and without the same padding; "
                "read it one way",
                element,
            )

    # Scope: every index is an output index or reduced around it.
    for read in reads:
        for affine, span in zip(read.element.indices, read.element.index_spans):
            for name in affine.indices:
                if name not in read.scope:
                    raise _error(
                        equation,
                        f"index {name!r} is neither an output index nor reduced by a "
                        f"sum/max/mean around it; add it to the left side or reduce over it",
                        span=span,
                    )
    used = _indices_in(equation.rhs)
    for name in equation.output_indices:
        if name not in used:
            raise _error(
                equation,
                f"output index {name!r} is used nowhere on the right side, so nothing "
                "decides its range; use it in an array element or drop it",
                span=equation.output_span,
            )
    for reduction in reductions:
        inside = _indices_in(reduction.body)
        for name in reduction.indices:
            if name not in inside:
                raise _error(
                    equation,
                    f"{reduction.kind}[...] reduces over {name!r}, which its body never uses",
                    reduction,
                )
        if reduction.kind == "max" and not isinstance(reduction.body, Element):
            raise _error(
                equation,
                "max[...](...) takes one array element, e.g. max[u<3,v<3](X[n, 2*i+u, 2*j+v, c]); "
                "apply functions outside the max",
                reduction.body,
            )
        if len({name for name in reduction.indices}) != len(reduction.indices):
            raise _error(equation, "an index is listed twice in a reduction", reduction)
    reduced = [name for r in reductions for name in r.indices]
    for name in set(reduced):
        if reduced.count(name) > 1:
            raise _error(
                equation,
                f"index {name!r} is reduced by two reductions; give each its own index names",
            )

    # Dims: each array axis has a length; an axis where an index stands alone shares the
    # Dim of the first axis that defined the index, when neither is padded.
    extents: dict[str, sympy.Expr] = {}
    requirements: list[tuple[sympy.Basic, str]] = []
    bounds = {}
    for reduction in reductions:
        for name, bound in zip(reduction.indices, reduction.bounds):
            if bound is not None:
                bounds[name] = bound
                extents[name] = sympy.sympify(bound)
    defining: dict[str, tuple[Dim, sympy.Expr]] = {}
    for read in reads:
        element = read.element
        info = arrays[element.array]
        if info.dims:
            continue
        for axis, affine in enumerate(element.indices):
            dim = Dim(
                f"{element.array}_size{axis}",
                element.array,
                axis,
                f"D^{{{element.array}}}_{{{axis}}}",
            )
            name = affine.standalone()
            width = info.padding[axis] if info.padding else 0
            if element.array in dims:
                dim = dims[element.array][axis]
            elif name is not None and width == 0 and name in defining and name not in bounds:
                dim = defining[name][0]
            info.dims.append(dim)
            if name is not None and name not in extents:
                extents[name] = dim + 2 * width
                defining[name] = (dim, dim + 2 * width)
    # An index standing alone only in a later read of an array ranges over that axis too.
    for read in reads:
        element = read.element
        info = arrays[element.array]
        for axis, affine in enumerate(element.indices):
            name = affine.standalone()
            if name is not None and name not in extents:
                extents[name] = info.padded_extent(axis)
    for read in reads:
        element = read.element
        info = arrays[element.array]
        for axis, affine in enumerate(element.indices):
            name = affine.standalone()
            if name is None:
                continue
            length = info.padded_extent(axis)
            if sympy.simplify(length - extents[name]) != 0:
                requirements.append(
                    (
                        sympy.Eq(length, extents[name]),
                        f"axis {axis} of {element.array} has length {{{length}}}, but index "
                        f"{name} ranges over {{{extents[name]}}} elsewhere; make them equal",
                    )
                )

    # Reduction indices without a range.
    for name in reduced:
        if name not in extents:
            reduction = next(r for r in reductions if name in r.indices)
            raise _error(
                equation,
                f"index {name!r} has no range: it stands alone in no array axis and has no "
                f"bound; give one, e.g. {reduction.kind}[{name}<3](...)",
                reduction,
            )

    # Output indices: the valid range, from every axis they share with other indices.
    pending = [name for name in equation.output_indices if name not in extents]
    while pending:
        progressed = False
        for name in list(pending):
            limits = _valid_limits(name, reads, arrays, extents, equation, parameters)
            if limits is None:
                continue
            extents[name] = limits
            pending.remove(name)
            progressed = True
        if not progressed:
            raise _error(
                equation,
                f"cannot find the ranges of {', '.join(repr(p) for p in pending)}: each stands "
                "alone in no array axis and shares its axes only with each other; "
                "let one of them stand alone in some axis",
            )

    # Reads must stay inside their (padded) arrays for every index value.
    for read in reads:
        element = read.element
        info = arrays[element.array]
        for axis, (affine, span) in enumerate(zip(element.indices, element.index_spans)):
            low, high = _affine_limits(affine, extents)
            if not _nonnegative(low, parameters):
                raise _error(
                    equation,
                    f"index {str(affine)!r} of {element.array} is negative for some values "
                    f"(as low as {low}); pad the array, e.g. pad({element.array}, ...)[...], "
                    "or shift the index",
                    span=span,
                )
            if affine.standalone() is None and any(
                affine.coefficient(n) != 0 for n in equation.output_indices
            ):
                continue  # an output index's valid range keeps this read inside
            length = info.padded_extent(axis)
            requirements.append(
                (
                    sympy.Le(high, length - 1),
                    f"index {affine} of {element.array} reaches {{{high}}}, past the last "
                    f"element {{{length - 1}}} of axis {axis}; make that axis longer",
                )
            )
    for name in equation.output_indices:
        requirements.append(
            (
                sympy.Ge(extents[name], 1),
                f"the output index {name} would have {{{extents[name]}}} values; the inputs "
                "are too small for this equation",
            )
        )
    requirements = [
        (condition, message) for condition, message in requirements if condition is not sympy.true
    ]
    return Model(equation, arrays, extents, reads, reductions, requirements)


def _indices(count: int) -> str:
    return "1 index" if count == 1 else f"{count} indices"


def _nonnegative(expr, parameters=()) -> bool:
    """Whether ``expr`` is at least 0 for all sizes; the catalogue's parameters (stride,
    padding, window size) count as nonnegative, as their own checks require."""
    expr = sympy.sympify(expr)
    if parameters:
        expr = expr.xreplace(
            {p: sympy.Symbol(p.name, integer=True, nonnegative=True) for p in parameters}
        )
    return bool(expr.is_nonnegative) or (expr.is_number and expr >= 0)


def _affine_limits(affine: Affine, extents) -> tuple[sympy.Expr, sympy.Expr]:
    """The smallest and largest value of ``affine`` over the index ranges (coefficients
    are integers here)."""
    low = high = sympy.sympify(affine.constant)
    for name, coefficient in affine.coefficients:
        span = coefficient * (extents[name] - 1)
        if sympy.sympify(coefficient).is_negative:
            low += span
        else:
            high += span
    return low, high


def _valid_limits(name, reads, arrays, extents, equation, parameters=()):
    """The number of values of output index ``name`` for which every read stays inside,
    or None while an index it shares an axis with has no range yet."""
    limits = []
    for read in reads:
        element = read.element
        info = arrays[element.array]
        for axis, (affine, span) in enumerate(zip(element.indices, element.index_spans)):
            coefficient = affine.coefficient(name)
            if coefficient == 0:
                continue
            others = Affine.of({k: c for k, c in affine.coefficients if k != name}, affine.constant)
            if any(k not in extents for k in others.indices):
                return None
            if not _nonnegative(coefficient, parameters) or coefficient == 0:
                raise _error(
                    equation,
                    f"output index {name!r} has a negative coefficient in {str(affine)!r}; "
                    "write the index so that it grows with the output index",
                    span=span,
                )
            _, highest_rest = _affine_limits(others, extents)
            length = info.padded_extent(axis)
            # coefficient * (count - 1) + highest_rest <= length - 1
            limits.append(sympy.floor((length - 1 - highest_rest) / coefficient) + 1)
    if not limits:
        return None
    return limits[0] if len(limits) == 1 else sympy.Min(*limits)


def model_of(text: str, parameters=None, dims=None) -> Model:
    """Parse and check ``text``: its ``Model``, or an ``EquationError``.  ``parameters``
    maps names to the integer symbols they stand for (see ``syntax.parse``)."""
    parameters = dict(parameters or {})
    return build_model(parse(text, parameters), tuple(parameters.values()), dims)
