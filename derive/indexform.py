"""Expanding an index-level definition into concrete element expressions.

A layer is *defined* by one SymPy expression in index notation, for example

    Z[n, i, j, o] = b[o] + Sum(Xp[n, s*i + u, s*j + v, c] * W[u, v, c, o], (c, 0, C-1), (u, ...), (v, ...))

The same expression is typeset in the derivation.  ``expand`` evaluates it for
every value of the free indices on object arrays of element symbols, using
NumPy fancy indexing on integer index grids: each index symbol owns one axis.
(SymPy's own ``convert_indexed_to_array`` turns shifted indices such as
``s*i + u`` into a wrong array expression, and ``Sum.doit`` per element is far too
slow at the seed network's size, hence this small evaluator.)

The extent of each free index comes from the definition too (``extents``): an index runs
over the values at which every element the definition reads exists, as in a valid-mode
convolution.  The output shape is thus part of what the proof checks: the forward tree
must produce exactly that many elements.

This module shares no helper with ``derive.symbolic``, the interpreter of the closed
forms that the expansion is compared with: a bug in one cannot hide the same bug in the other.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import sympy

from derive.multilinear import Polynomial


def _sum(items) -> object:
    """The sum of ``items`` (SymPy expressions, or polynomials at the seed size)."""
    items = list(items)
    if any(isinstance(item, Polynomial) for item in items):
        return Polynomial.total(items)
    return sympy.Add(*items)


def _sum_trailing_axes(array: np.ndarray, count: int) -> np.ndarray:
    """Sum an object array over its last ``count`` axes, one sum per remaining element."""
    kept = array.shape[: array.ndim - count]
    flat = array.reshape(kept + (-1,))
    out = np.empty(kept, dtype=object)
    for index in np.ndindex(*kept):
        out[index] = _sum(flat[index])
    return out


class _Context:
    def __init__(self, axes: Sequence[tuple[sympy.Symbol, int, int]]):
        # each entry: (index symbol, first value, number of values)
        self.axes = list(axes)

    def grid(self, symbol: sympy.Symbol) -> np.ndarray:
        for position, (s, start, count) in enumerate(self.axes):
            if s == symbol:
                shape = [1] * len(self.axes)
                shape[position] = count
                return (start + np.arange(count)).reshape(shape)
        raise KeyError(f"index {symbol} is not bound here")

    def extended(self, more) -> "_Context":
        return _Context(self.axes + list(more))

    def ones(self) -> tuple[int, ...]:
        return (1,) * len(self.axes)


def _integer_grid(expr: sympy.Expr, ctx: _Context) -> np.ndarray:
    """An integer index expression (affine in the index symbols) on the grid."""
    if expr.is_Integer:
        return np.full(ctx.ones(), int(expr))
    if expr.is_Symbol:
        return ctx.grid(expr)
    if expr.is_Add:
        out = _integer_grid(expr.args[0], ctx)
        for arg in expr.args[1:]:
            out = out + _integer_grid(arg, ctx)
        return out
    if expr.is_Mul:
        out = _integer_grid(expr.args[0], ctx)
        for arg in expr.args[1:]:
            out = out * _integer_grid(arg, ctx)
        return out
    if isinstance(expr, sympy.floor):
        numerator, denominator = sympy.fraction(sympy.together(expr.args[0]))
        return np.floor_divide(
            _integer_grid(sympy.expand(numerator), ctx), _integer_grid(denominator, ctx)
        )
    if isinstance(expr, sympy.Mod):
        return np.mod(_integer_grid(expr.args[0], ctx), _integer_grid(expr.args[1], ctx))
    raise TypeError(f"unsupported index expression {expr}")


def _evaluate(expr: sympy.Expr, ctx: _Context, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    if isinstance(expr, sympy.Indexed):
        array = arrays[str(expr.base.label)]
        grids = [_integer_grid(index, ctx) for index in expr.indices]
        grids = np.broadcast_arrays(*grids)
        return array[tuple(grids)]
    if isinstance(expr, sympy.Sum):
        limits = []
        for symbol, low, high in expr.limits:
            low, high = int(low), int(high)
            limits.append((symbol, low, high - low + 1))
        inner = ctx.extended(limits)
        body = _evaluate(expr.function, inner, arrays)
        shape = list(body.shape)
        for k, (_, _, count) in enumerate(limits):
            shape[len(ctx.axes) + k] = count
        body = np.broadcast_to(body, shape)
        return _sum_trailing_axes(body, len(limits))
    if expr.is_Number or (expr.is_Atom and not expr.is_Symbol):
        out = np.empty(ctx.ones(), dtype=object)
        out.fill(expr)
        return out
    if expr.is_Add:
        terms = [_evaluate(arg, ctx, arrays) for arg in expr.args]
        shape = np.broadcast_shapes(*[t.shape for t in terms])
        terms = [np.broadcast_to(t, shape) for t in terms]
        out = np.empty(shape, dtype=object)
        for index in np.ndindex(*shape):
            out[index] = _sum(t[index] for t in terms)
        return out
    if expr.is_Mul:
        out = _evaluate(expr.args[0], ctx, arrays)
        for arg in expr.args[1:]:
            out = out * _evaluate(arg, ctx, arrays)
        return out
    if expr.is_Pow:
        base = _evaluate(expr.base, ctx, arrays)
        exponent = _evaluate(expr.exp, ctx, arrays)
        return np.vectorize(sympy.Pow, otypes=[object])(base, exponent)
    if isinstance(expr, sympy.Function) and not isinstance(expr, sympy.Piecewise):
        args = [_evaluate(arg, ctx, arrays) for arg in expr.args]
        return np.vectorize(expr.func, otypes=[object])(*args)
    # Anything else (a Piecewise, say): substitute the elements one output at a time.
    atoms = sorted(expr.atoms(sympy.Indexed), key=sympy.default_sort_key)
    if any(expr.atoms(sympy.Sum)):
        raise TypeError(f"cannot expand {expr!r}: a Sum inside {type(expr).__name__}")
    values = np.broadcast_arrays(*[_evaluate(atom, ctx, arrays) for atom in atoms])
    out = np.empty(values[0].shape if values else ctx.ones(), dtype=object)
    for index in np.ndindex(*out.shape):
        out[index] = expr.xreplace({atom: value[index] for atom, value in zip(atoms, values)})
    return out


def _reads(expr: sympy.Expr, limits=()):
    """(Indexed element, the Sum limits around it) for every element ``expr`` reads."""
    if isinstance(expr, sympy.Indexed):
        yield expr, limits
        return
    if isinstance(expr, sympy.Sum):
        yield from _reads(expr.function, limits + tuple(expr.limits))
        return
    for arg in expr.args:
        yield from _reads(arg, limits)


def _all_inside(reads, ctx_axes, arrays) -> bool:
    for element, limits in reads:
        axes = ctx_axes + [(s, int(low), int(high) - int(low) + 1) for s, low, high in limits]
        ctx = _Context(axes)
        shape = np.shape(arrays[str(element.base.label)])
        if len(element.indices) != len(shape):
            raise ValueError(
                f"{element} has {len(element.indices)} indices, its array {len(shape)} axes"
            )
        for axis, index in enumerate(element.indices):
            grid = _integer_grid(index, ctx)
            if grid.size and (grid.min() < 0 or grid.max() >= shape[axis]):
                return False
    return True


def extents(
    expr: sympy.Expr,
    indices: Sequence[sympy.Symbol],
    arrays: Mapping[str, np.ndarray],
    sizes: Mapping[sympy.Symbol, int],
) -> tuple[int, ...]:
    """How many values (0, 1, ...) each free index of ``expr`` takes: all those at which
    every element that ``expr`` reads exists in ``arrays``, the other free indices at 0
    (indices are affine with non-negative steps, so the first value that reads outside an
    array ends the range)."""
    expr = expr.xreplace({s: sympy.Integer(v) for s, v in sizes.items()})
    reads = list(_reads(expr))
    most = max([int(np.size(a)) for a in arrays.values()] + [0]) + 1
    found = []
    for symbol in indices:
        relevant = [(e, limits) for e, limits in reads if symbol in e.free_symbols]
        if not relevant:
            raise ValueError(f"index {symbol} reads no array, so the definition gives it no range")
        others = [(s, 0, 1) for s in indices if s != symbol]
        count = 0
        while count <= most and _all_inside(relevant, [(symbol, count, 1)] + others, arrays):
            count += 1
        if count > most:
            raise ValueError(f"index {symbol} is not bounded by the arrays it reads")
        found.append(count)
    return tuple(found)


def expand(
    expr: sympy.Expr,
    indices: Sequence[tuple[sympy.Symbol, int]],
    arrays: Mapping[str, np.ndarray],
    sizes: Mapping[sympy.Symbol, int],
) -> np.ndarray:
    """Evaluate ``expr`` for every value of ``indices`` (each ``(symbol, extent)``),
    reading ``Indexed`` elements from ``arrays`` (keyed by base label).  ``sizes``
    gives the integer value of every size symbol in the expression."""
    expr = expr.xreplace({s: sympy.Integer(v) for s, v in sizes.items()})
    ctx = _Context([(s, 0, extent) for s, extent in indices])
    out = _evaluate(expr, ctx, arrays)
    shape = tuple(extent for _, extent in indices)
    return np.array(np.broadcast_to(out, shape), dtype=object)
