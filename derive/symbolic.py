"""The SymPy interpreter of the closed-form trees (see ``derive.ir``).

``evaluate(tree, env, sizes)`` runs a tree on NumPy arrays of dtype ``object``
whose elements are SymPy expressions (or exact numbers).  The definitions here
are deliberately plain, index by index, so that each one can be read against
its docstring in ``derive.ir``; speed matters only enough for the seed-size proof.
"""

from __future__ import annotations

import itertools
from typing import Mapping

import numpy as np
import sympy

from derive import ir
from derive.functions import without_flushes
from derive.multilinear import Polynomial


def total(items) -> object:
    """The sum of ``items``: one ``sympy.Add``, or one table merge for polynomials."""
    items = list(items)
    if any(isinstance(item, Polynomial) for item in items):
        return Polynomial.total(items)
    return sympy.Add(*items)


def substitute(expr: sympy.Expr, values: dict) -> object:
    """``expr`` with its symbols replaced by ``values`` (SymPy expressions or polynomials)."""
    if not any(isinstance(value, Polynomial) for value in values.values()):
        return expr.xreplace(values)
    if expr in values:
        return values[expr]
    if expr.is_Number:
        return expr
    if expr.is_Add:
        return Polynomial.total(substitute(arg, values) for arg in expr.args)
    if expr.is_Mul:
        out = substitute(expr.args[0], values)
        for arg in expr.args[1:]:
            out = out * substitute(arg, values)
        return out
    if expr.is_Pow and expr.exp.is_Integer and expr.exp > 0:
        base = substitute(expr.base, values)
        out = base
        for _ in range(int(expr.exp) - 1):
            out = out * base
        return out
    raise TypeError(f"{expr} is not a polynomial; it cannot take polynomial values")


def add_reduce(array: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Sum an object array over ``axes`` with one ``sympy.Add`` per output element.

    ``np.sum`` would add the terms pairwise and rebuild a growing ``Add`` each
    time; building each sum in one call is linear in the number of terms.
    """
    axes = tuple(a % array.ndim for a in axes)
    kept = [a for a in range(array.ndim) if a not in axes]
    moved = np.transpose(array, kept + list(axes))
    out_shape = moved.shape[: len(kept)]
    flat = moved.reshape(out_shape + (-1,))
    out = np.empty(out_shape, dtype=object)
    for index in np.ndindex(*out_shape):
        out[index] = total(flat[index])
    return out


def first_maximum(values) -> int:
    """Position of the first maximum of ``values``: the tie rule of max pooling."""
    best = 0
    for position, value in enumerate(values):
        if value > values[best]:  # strictly greater: the first maximum wins a tie
            best = position
    return best


def object_zeros(shape) -> np.ndarray:
    out = np.empty(shape, dtype=object)
    out.fill(sympy.S.Zero)
    return out


def symbol_array(
    name: str, shape: tuple[int, ...], polynomial: bool = False, **assumptions
) -> np.ndarray:
    """An object array of fresh element symbols ``name_{i,j,...}`` (0-based indices),
    or of those symbols as ``Polynomial`` variables."""
    out = np.empty(shape, dtype=object)
    for index in np.ndindex(*shape):
        label = ",".join(str(i) for i in index)
        symbol = sympy.Symbol(f"{name}_{{{label}}}", **assumptions)
        out[index] = Polynomial.variable(symbol) if polynomial else symbol
    return out


class Evaluator:
    """Evaluates trees against one environment, remembering each node's value."""

    def __init__(self, env: Mapping[str, np.ndarray], sizes: Mapping[sympy.Symbol, int]):
        self.env = dict(env)
        self.sizes = dict(sizes)
        self.memo: dict[ir.Node, np.ndarray] = {}

    # integer arguments -------------------------------------------------------
    def integer(self, expr) -> int:
        expr = sympy.sympify(expr)
        values = {}
        for s in expr.free_symbols:
            if isinstance(s, ir.Dim):
                values[s] = np.shape(self.env[s.operand])[s.axis]
            elif s in self.sizes:
                values[s] = self.sizes[s]
            else:
                raise KeyError(f"no value for integer symbol {s}")
        value = sympy.sympify(expr.xreplace({s: sympy.Integer(v) for s, v in values.items()}))
        if not value.is_Integer:
            raise ValueError(f"integer argument {expr} evaluated to {value}")
        return int(value)

    def condition(self, condition) -> bool:
        condition = sympy.sympify(condition)
        if condition in (sympy.true, sympy.false):
            return bool(condition)
        values = {s: self.integer(s) for s in condition.free_symbols}
        return bool(condition.xreplace(values))

    # nodes ---------------------------------------------------------------------
    def __call__(self, node: ir.Node):
        if node not in self.memo:
            method = getattr(self, "eval_" + type(node).__name__)
            self.memo[node] = method(node)
        return self.memo[node]

    def eval_Operand(self, node: ir.Operand):
        return self.env[node.name]

    def eval_Pointwise(self, node: ir.Pointwise):
        # The proof is in exact arithmetic, where no value is subnormal: a flush is x itself.
        expr = without_flushes(node.expr).xreplace(
            {
                s: self.integer(s)
                for s in node.expr.free_symbols
                if isinstance(s, (ir.Param, ir.Dim))
            }
        )
        symbols = [s for s, _ in node.arguments]
        arrays = np.broadcast_arrays(
            *[np.asarray(self(child), dtype=object) for _, child in node.arguments]
        )
        out = np.empty(arrays[0].shape if arrays else (), dtype=object)
        for index in np.ndindex(*out.shape):
            out[index] = substitute(expr, {s: a[index] for s, a in zip(symbols, arrays)})
        return out

    def eval_Sum(self, node: ir.Sum):
        a = self(node.a)
        axes = node.axes or tuple(range(a.ndim))
        out = add_reduce(a, axes)
        if node.keepdims:
            out = np.expand_dims(out, tuple(ax % a.ndim for ax in axes))
        return out

    def eval_MatMul(self, node: ir.MatMul):
        a, b = self(node.a), self(node.b)
        return add_reduce(a[:, :, None] * b[None, :, :], (1,))

    def eval_Transpose(self, node: ir.Transpose):
        return self(node.a).T

    def eval_Flatten(self, node: ir.Flatten):
        a = self(node.a)
        return a.reshape(a.shape[0], -1)

    def eval_ReshapeLike(self, node: ir.ReshapeLike):
        return self(node.a).reshape(np.shape(self(node.like)))

    def eval_Pad(self, node: ir.Pad):
        a = self(node.a)
        rows, cols = self.integer(node.rows), self.integer(node.cols)
        out = object_zeros((a.shape[0], a.shape[1] + 2 * rows, a.shape[2] + 2 * cols, a.shape[3]))
        out[:, rows : rows + a.shape[1], cols : cols + a.shape[2], :] = a
        return out

    def eval_Crop(self, node: ir.Crop):
        a = self(node.a)
        top, left = self.integer(node.top), self.integer(node.left)
        height, width = self.integer(node.height), self.integer(node.width)
        out = object_zeros((a.shape[0], height, width, a.shape[3]))
        for y, x in itertools.product(range(height), range(width)):
            if top + y < a.shape[1] and left + x < a.shape[2]:
                out[:, y, x, :] = a[:, top + y, left + x, :]
        return out

    def eval_Dilate(self, node: ir.Dilate):
        a = self(node.a)
        s = self.integer(node.stride)
        out = object_zeros(
            (a.shape[0], (a.shape[1] - 1) * s + 1, (a.shape[2] - 1) * s + 1, a.shape[3])
        )
        out[:, ::s, ::s, :] = a
        return out

    def eval_Rot180(self, node: ir.Rot180):
        return self(node.kernel)[::-1, ::-1, :, :]

    def eval_Correlate(self, node: ir.Correlate):
        a, k = self(node.a), self(node.kernel)
        s = self.integer(node.stride)
        kh, kw = k.shape[:2]
        out_h = (a.shape[1] - kh) // s + 1
        out_w = (a.shape[2] - kw) // s + 1
        rows = s * np.arange(out_h)[:, None] + np.arange(kh)[None, :]  # (out_h, kh)
        cols = s * np.arange(out_w)[:, None] + np.arange(kw)[None, :]  # (out_w, kw)
        # windows[n, i, j, u, v, c] = a[n, s*i+u, s*j+v, c]
        windows = a[:, rows[:, None, :, None], cols[None, :, None, :], :]
        products = windows[..., None] * k[None, None, None, :, :, :, :]
        return add_reduce(products, (3, 4, 5))

    def eval_CorrelateWeights(self, node: ir.CorrelateWeights):
        a, g = self(node.a), self(node.g)
        gh, gw = g.shape[1:3]
        out_h, out_w = a.shape[1] - gh + 1, a.shape[2] - gw + 1
        rows = np.arange(out_h)[:, None] + np.arange(gh)[None, :]  # (u, i)
        cols = np.arange(out_w)[:, None] + np.arange(gw)[None, :]  # (v, j)
        # windows[n, u, v, i, j, c] = a[n, u+i, v+j, c]
        windows = a[:, rows[:, None, :, None], cols[None, :, None, :], :]
        # products[n, u, v, i, j, c, o]
        products = windows[..., None] * g[:, None, None, :, :, None, :]
        return add_reduce(products, (0, 3, 4))

    def eval_FullConvolve(self, node: ir.FullConvolve):
        g, k = self(node.g), self(node.kernel)
        kh, kw = k.shape[:2]
        padded = object_zeros(
            (g.shape[0], g.shape[1] + 2 * (kh - 1), g.shape[2] + 2 * (kw - 1), g.shape[3])
        )
        padded[:, kh - 1 : kh - 1 + g.shape[1], kw - 1 : kw - 1 + g.shape[2], :] = g
        out_h, out_w = g.shape[1] + kh - 1, g.shape[2] + kw - 1
        rows = np.arange(out_h)[:, None] + np.arange(kh)[None, :]
        cols = np.arange(out_w)[:, None] + np.arange(kw)[None, :]
        # windows[n, y, x, u, v, o] = padded[n, y+u, x+v, o]
        windows = padded[:, rows[:, None, :, None], cols[None, :, None, :], :]
        # products[n, y, x, u, v, c, o] = windows[n,y,x,u,v,o] * k[u,v,c,o]
        products = windows[:, :, :, :, :, None, :] * k[None, None, None, :, :, :, :]
        return add_reduce(products, (3, 4, 6))

    def _windows(self, a, size: int, stride: int):
        """windows[n, i, j, u, v, c] = a[n, stride*i+u, stride*j+v, c]."""
        out_h = (a.shape[1] - size) // stride + 1
        out_w = (a.shape[2] - size) // stride + 1
        rows = stride * np.arange(out_h)[:, None] + np.arange(size)[None, :]
        cols = stride * np.arange(out_w)[:, None] + np.arange(size)[None, :]
        return a[:, rows[:, None, :, None], cols[None, :, None, :], :]

    def eval_WindowSum(self, node: ir.WindowSum):
        windows = self._windows(self(node.a), self.integer(node.size), self.integer(node.stride))
        return add_reduce(windows, (3, 4))

    def eval_WindowArgmax(self, node: ir.WindowArgmax):
        size = self.integer(node.size)
        windows = self._windows(self(node.a), size, self.integer(node.stride))
        n, h, w, _, _, c = windows.shape
        out = np.zeros((n, h, w, c), dtype=np.int64)
        for index in np.ndindex(n, h, w, c):
            values = [
                windows[index[:3] + (u, v, index[3])] for u in range(size) for v in range(size)
            ]
            if not all(getattr(sympy.sympify(v), "is_number", False) for v in values):
                raise TypeError(
                    "WindowArgmax needs numeric window values; the tie rule decides on numbers"
                )
            out[index] = first_maximum(values)
        return out

    def eval_GatherWindows(self, node: ir.GatherWindows):
        size = self.integer(node.size)
        windows = self._windows(self(node.a), size, self.integer(node.stride))
        index = self(node.index)
        u, v = np.divmod(index, size)
        n, i, j, c = np.indices(index.shape)
        return windows[n, i, j, u, v, c]

    def eval_Upsample(self, node: ir.Upsample):
        size = self.integer(node.size)
        return np.repeat(np.repeat(self(node.a), size, axis=1), size, axis=2)

    def eval_ScatterWindows(self, node: ir.ScatterWindows):
        g = self(node.g)
        size, stride = self.integer(node.size), self.integer(node.stride)
        height, width = self.integer(node.height), self.integer(node.width)
        out = object_zeros((g.shape[0], height, width, g.shape[3]))
        for n in range(g.shape[0]):
            terms = {}
            for i, j, u, v in itertools.product(
                range(g.shape[1]), range(g.shape[2]), range(size), range(size)
            ):
                terms.setdefault((stride * i + u, stride * j + v), []).append(g[n, i, j, :])
            for (y, x), parts in terms.items():
                for c in range(g.shape[3]):
                    out[n, y, x, c] = total(p[c] for p in parts)
        return out

    def eval_RouteToArgmax(self, node: ir.RouteToArgmax):
        g, index = self(node.g), self(node.index)
        size, stride = self.integer(node.size), self.integer(node.stride)
        height, width = self.integer(node.height), self.integer(node.width)
        out = object_zeros((g.shape[0], height, width, g.shape[3]))
        for n, i, j, c in np.ndindex(*g.shape):
            u, v = divmod(int(index[n, i, j, c]), size)
            out[n, stride * i + u, stride * j + v, c] += g[n, i, j, c]
        return out

    def eval_Softmax(self, node: ir.Softmax):
        exps = np.vectorize(sympy.exp, otypes=[object])(self(node.z))
        totals = add_reduce(exps, (-1,))[..., None]
        return exps / totals

    def eval_LogSumExp(self, node: ir.LogSumExp):
        exps = np.vectorize(sympy.exp, otypes=[object])(self(node.z))
        return np.vectorize(sympy.log, otypes=[object])(add_reduce(exps, (-1,)))[..., None]

    # index-space primitives (equation layers), element by element ----------------
    def _integers(self, exprs) -> tuple[int, ...]:
        return tuple(self.integer(e) for e in exprs)

    def _index_values(self, names, extents):
        """Every assignment of values to ``names``, row-major."""
        for values in itertools.product(*[range(n) for n in extents]):
            yield dict(zip(names, values))

    def eval_ZeroPad(self, node: ir.ZeroPad):
        a = self(node.a)
        widths = self._integers(node.widths)
        out = object_zeros(tuple(n + 2 * w for n, w in zip(a.shape, widths)))
        for index in np.ndindex(*a.shape):
            out[tuple(i + w for i, w in zip(index, widths))] = a[index]
        return out

    def eval_CropAxes(self, node: ir.CropAxes):
        a = self(node.a)
        starts, extents = self._integers(node.starts), self._integers(node.extents)
        out = object_zeros(extents)
        for index in np.ndindex(*extents):
            out[index] = a[tuple(i + s for i, s in zip(index, starts))]
        return out

    def eval_IndexView(self, node: ir.IndexView):
        a = self(node.a)
        extents = self._integers(node.extents)
        out = np.empty(extents, dtype=object)
        for values in self._index_values(node.indices, extents):
            out[tuple(values[name] for name in node.indices)] = a[node.read.position(values)]
        return out

    def _products(self, factors, subscripts, names, extents):
        """(index values, product of the factors' elements) for every index value."""
        arrays = [self(f) for f in factors]
        for values in self._index_values(names, extents):
            product = sympy.S.One
            for array, subscript in zip(arrays, subscripts):
                product = product * array[tuple(values[name] for name in subscript)]
            yield values, product

    def _contraction_extents(self, factors, subscripts) -> dict[str, int]:
        extents = {}
        for factor, subscript in zip(factors, subscripts):
            for name, length in zip(subscript, np.shape(self(factor))):
                extents.setdefault(name, length)
        return extents

    def eval_Contract(self, node: ir.Contract):
        extents = self._contraction_extents(node.factors, node.subscripts)
        names = list(extents)
        terms: dict[tuple, list] = {}
        for values, product in self._products(
            node.factors, node.subscripts, names, [extents[n] for n in names]
        ):
            terms.setdefault(tuple(values[n] for n in node.out_indices), []).append(product)
        out = np.empty(tuple(extents[n] for n in node.out_indices), dtype=object)
        for index in np.ndindex(*out.shape):
            out[index] = total(terms.get(index, [sympy.S.Zero]))
        return out

    def eval_ScatterContract(self, node: ir.ScatterContract):
        shape = self._integers(node.shape)
        terms: dict[tuple, list] = {}
        extents = self._integers(node.index_extents)
        for values, product in self._products(
            node.factors, node.subscripts, node.index_names, extents
        ):
            terms.setdefault(node.write.position(values), []).append(product)
        out = object_zeros(shape)
        for position, items in terms.items():
            if any(p < 0 or p >= n for p, n in zip(position, shape)):
                raise ValueError(f"a write at {position} lies outside the shape {shape}")
            out[position] = total(items)
        return out

    def _window_values(self, a, node, kept_values, reduced_extents):
        """The elements of one window, in row-major order of the reduced indices."""
        values = []
        for reduced in itertools.product(*[range(n) for n in reduced_extents]):
            assignment = dict(kept_values, **dict(zip(node.reduced, reduced)))
            values.append(a[node.read.position(assignment)])
        return values

    def eval_ArgmaxView(self, node: ir.ArgmaxView):
        a = self(node.a)
        extents = self._integers(node.extents)
        kept_extents, reduced_extents = extents[: len(node.kept)], extents[len(node.kept) :]
        out = np.empty(kept_extents, dtype=object)
        for kept in self._index_values(node.kept, kept_extents):
            window = self._window_values(a, node, kept, reduced_extents)
            if not all(getattr(sympy.sympify(v), "is_number", False) for v in window):
                raise ValueError("the position of a maximum needs numbers, not symbols")
            best = 0
            for position, value in enumerate(window):
                if value > window[best]:  # strictly greater: the first maximum keeps a tie
                    best = position
            out[tuple(kept[n] for n in node.kept)] = best
        return out

    def _reduced_position(self, node, flat: int, reduced_extents) -> dict[str, int]:
        position = {}
        for name, length in reversed(list(zip(node.reduced, reduced_extents))):
            position[name] = flat % length
            flat //= length
        return position

    def eval_TakeView(self, node: ir.TakeView):
        a, index = self(node.a), self(node.index)
        extents = self._integers(node.extents)
        kept_extents, reduced_extents = extents[: len(node.kept)], extents[len(node.kept) :]
        out = np.empty(kept_extents, dtype=object)
        for kept in self._index_values(node.kept, kept_extents):
            here = tuple(kept[n] for n in node.kept)
            chosen = self._reduced_position(node, int(index[here]), reduced_extents)
            out[here] = a[node.read.position(dict(kept, **chosen))]
        return out

    def eval_RouteView(self, node: ir.RouteView):
        g, index = self(node.g), self(node.index)
        extents = self._integers(node.extents)
        kept_extents, reduced_extents = extents[: len(node.kept)], extents[len(node.kept) :]
        terms: dict[tuple, list] = {}
        for kept in self._index_values(node.kept, kept_extents):
            here = tuple(kept[n] for n in node.kept)
            chosen = self._reduced_position(node, int(index[here]), reduced_extents)
            terms.setdefault(node.read.position(dict(kept, **chosen)), []).append(g[here])
        out = object_zeros(self._integers(node.shape))
        for position, items in terms.items():
            out[position] = total(items)
        return out


def evaluate(node: ir.Node, env: Mapping[str, np.ndarray], sizes: Mapping[sympy.Symbol, int]):
    return Evaluator(env, sizes)(node)
