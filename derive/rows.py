"""All-sizes proofs of the pointwise layers: activations, softmax and the losses.

Their definitions read each input at the output's own element, and, inside a sum over
the last axis, along the output's own row (softmax's denominator).  Written with one
scalar symbol per array for "this element" and ``RowSum(g)`` for "g summed over the
row", the chain rule needs no sizes at all.  For an output element ``E`` (a function of
this element's values and of row sums) and upstream gradient ``delta``,

    dL/da_k = sum_k' delta_k' dE_k'/da_k
            = delta_k dE/da (row sums held fixed)                     [k' = k]
              + sum over row sums R = RowSum(g) of  dg/da (at k) * RowSum(delta dE/dR)

since ``a_k`` enters ``E_k'`` for k' != k only through the row sums, and dR/da_k is
``dg/da`` at k.  A loss ``L = c sum_rows RowSum(f)`` is the same with ``delta E`` replaced by
``f``.  The closed-form tree reads the same way (``Sum`` over the last axis with
``keepdims`` is a row sum, ``Softmax`` and ``LogSumExp`` are written with one), factors
that do not depend on the row position are taken out of row sums, the remaining row
sums become symbols, and SymPy must simplify the difference to zero.  That is an
identity in the element's values and the row sums, so it holds for every shape.
"""

from __future__ import annotations

import itertools

import sympy

from derive import ir
from derive.functions import without_flushes
from derive.indexsets import NotAffine
from derive.layer import IndexDefinition, Layer


class RowSum(sympy.Function):
    """``RowSum(g)``: ``g`` (an expression in this element's values) summed over the row."""


def _locals_of(layer: Layer) -> dict[str, sympy.Symbol]:
    symbols = {item.name: sympy.Symbol(f"{item.name}_k", real=True) for item in layer.inputs}
    symbols[layer.upstream] = sympy.Symbol("delta_k", real=True)
    return symbols


def _held(expr):
    """``expr`` with its row sums replaced by placeholders, and the way back."""
    expr = sympy.sympify(expr)
    placeholders = {row: sympy.Dummy("R") for row in expr.atoms(RowSum)}
    return expr.xreplace(placeholders), {p: row for row, p in placeholders.items()}


def _is_local(expr, local_symbols) -> bool:
    """Whether ``expr`` depends on the row position: a row sum does not."""
    held, _ = _held(expr)
    return bool(held.free_symbols & local_symbols)


def row_sum(expr, local_symbols) -> sympy.Expr:
    """``RowSum(expr)`` with every factor that does not depend on the row position (sizes,
    other row sums) taken out, term by term."""
    expr = sympy.expand(sympy.sympify(expr))
    total = []
    for term in sympy.Add.make_args(expr):
        outside, inside = [], []
        for factor in sympy.Mul.make_args(term):
            (inside if _is_local(factor, local_symbols) else outside).append(factor)
        if not inside:
            # A constant summed over the row: the row's length, which no catalogue form needs.
            raise NotAffine(f"a row sum of {term}, which does not depend on the element")
        total.append(sympy.Mul(*outside) * RowSum(sympy.Mul(*inside)))
    return sympy.Add(*total)


def _definition_locals(expr, layer: Layer, element, symbols) -> sympy.Expr:
    """The definition's expression with reads of this element as local symbols and sums
    over the last axis as row sums."""
    labels = {item.latex: item for item in layer.inputs}
    local_symbols = set(symbols.values())

    def go(e):
        if isinstance(e, sympy.Indexed):
            item = labels.get(str(e.base.label))
            if item is None:
                raise NotAffine(f"array {e.base.label} is not an input")
            if tuple(e.indices) != tuple(element):
                raise NotAffine(f"{e} reads another element than the output's own")
            return symbols[item.name]
        if isinstance(e, sympy.Sum):
            if len(e.limits) != 1 or not element:
                raise NotAffine("a sum that is not along one row")
            variable, low, high = e.limits[0]
            reads = e.function.atoms(sympy.Indexed)
            extents = {
                labels[str(r.base.label)].axes[-1] for r in reads if str(r.base.label) in labels
            }
            if low != 0 or len(extents) != 1 or sympy.simplify(high - (extents.pop() - 1)) != 0:
                raise NotAffine("a sum that does not run over the whole last axis")
            inner = (
                e.function.xreplace({variable: element[-1]})
                if variable != element[-1]
                else e.function
            )
            return row_sum(go(inner), local_symbols)
        if not e.args:
            return e
        return e.func(*[go(a) for a in e.args])

    return go(expr)


def _tree_locals(node: ir.Node, layer: Layer, symbols) -> sympy.Expr:
    """A closed-form tree at this element, in local symbols and row sums."""
    local_symbols = set(symbols.values())
    bindings = dict(layer.forward)

    def go(n):
        if isinstance(n, ir.Operand):
            if n.name in symbols:
                return symbols[n.name]
            if n.name in bindings:
                return go(bindings[n.name])
            raise NotAffine(f"operand {n.name} is not known")
        if isinstance(n, ir.Pointwise):
            # A proof is in exact arithmetic, where flush(x) is x (derive.functions).
            return without_flushes(n.expr).xreplace({s: go(child) for s, child in n.arguments})
        if isinstance(n, ir.Sum):
            if n.axes in ((-1,),) and n.keepdims:
                return row_sum(go(n.a), local_symbols)
            raise NotAffine("a sum over other axes than the last, kept")
        if isinstance(n, ir.Softmax):
            z = go(n.z)
            return sympy.exp(z) / row_sum(sympy.exp(z), local_symbols)
        if isinstance(n, ir.LogSumExp):
            return sympy.log(row_sum(sympy.exp(go(n.z)), local_symbols))
        raise NotAffine(f"{type(n).__name__} is not pointwise")

    return go(node)


def _derivative(quantity_summand, wrt_symbol, local_symbols) -> sympy.Expr:
    """d/da_k of ``RowSum(quantity_summand)`` (see the module docstring)."""
    held, back = _held(quantity_summand)
    direct = sympy.diff(held, wrt_symbol).xreplace(back)
    through = sympy.S.Zero
    for placeholder, row in back.items():
        outer = sympy.diff(held, placeholder).xreplace(back)
        through += sympy.diff(row.args[0], wrt_symbol) * row_sum(outer, local_symbols)
    return direct + through


def _equal(a, b) -> bool:
    from derive.verify import is_zero

    rows = {}
    difference = sympy.sympify(a - b)
    for row in sorted(difference.atoms(RowSum), key=sympy.default_sort_key):
        rows[row] = (
            sympy.Symbol(f"S{len(rows)}", positive=True)
            if _positive(row)
            else sympy.Symbol(f"S{len(rows)}", real=True)
        )
    return is_zero(difference.xreplace(rows))


def _positive(row) -> bool:
    """A row sum of exponentials is positive (so that log and division simplify)."""
    return bool(row.args[0].is_positive)


def statements(layer: Layer):
    """The all-sizes statements of a pointwise layer (raises NotAffine if it is not one)."""
    from derive.allsizes import Statement
    from derive.presburger import Outcome

    definition = layer.definition
    if not isinstance(definition, IndexDefinition):
        raise NotAffine("the definition is not an index-level expression")
    symbols = _locals_of(layer)
    local_symbols = set(symbols.values())
    rhs = definition.rhs
    if layer.kind == "loss":
        coefficient, total = rhs.as_independent(sympy.Sum, as_Add=False)
        if not isinstance(total, sympy.Sum) or len(total.limits) != 2:
            raise NotAffine("the loss is not a mean of a sum over examples and classes")
        element = tuple(limit[0] for limit in total.limits)
        # The sum must run over every element: then each element's gradient is its term's.
        for item in layer.inputs:
            for (_, low, high), extent in zip(total.limits, item.axes):
                if low != 0 or sympy.simplify(high - (extent - 1)) != 0:
                    raise NotAffine("the loss does not sum over every element of its inputs")
        summand = _definition_locals(total.function, layer, element, symbols)
        scale = coefficient
        shape_text = "every batch size m and number of classes K"
    else:
        element = tuple(definition.indices)
        value = _definition_locals(rhs, layer, element, symbols)
        summand = symbols[layer.upstream] * value
        scale = sympy.S.One
        shape_text = (
            "every shape (along the last axis for the row sums)"
            if value.has(RowSum)
            else "every shape (elementwise)"
        )
    out = []
    for gradient in layer.gradients:
        derived = scale * _derivative(summand, symbols[gradient.wrt], local_symbols)
        for case in gradient.cases:
            if case.condition != sympy.true:
                raise NotAffine("a case with a condition on the sizes")
            closed = _tree_locals(case.tree, layer, symbols)
            label = f"{gradient.name} ({case.name})" if case.name else gradient.name
            if _equal(derived, closed):
                outcome = Outcome("proven", details=[f"scalar identity: {closed}"])
            else:
                example = _counterexample(layer, derived, closed, symbols)
                outcome = Outcome(
                    "refuted" if example else "undecided",
                    f"derived {derived}, closed form {closed}",
                    example,
                )
            out.append(Statement(label, shape_text, outcome))
    return out


def row_values(name: str, length: int, sign: int = 1) -> list[sympy.Rational]:
    """The numbers a counterexample puts in one row of an array: distinct, in (0, 1) (valid
    probabilities and targets) or, with ``sign`` -1, in (-1, 0); the upstream gradient's
    of both signs."""
    if name == "upstream":
        return [sympy.Rational((-1) ** k * (k + 2), 5) for k in range(length)]
    offset = sum(map(ord, name)) % 3
    return [sign * sympy.Rational(k + 1 + offset, length + 4) for k in range(length)]


def _value_at_first(expr, sizes, rows, symbols):
    """``expr`` (local symbols and row sums) at the row's first element, for ``rows`` of
    numbers: a row sum adds its summand over the whole row."""
    expr = sympy.sympify(expr).xreplace(sizes)
    length = len(next(iter(rows.values())))
    summed = {
        row: sympy.Add(
            *[
                row.args[0].xreplace({symbols[n]: v[k] for n, v in rows.items()})
                for k in range(length)
            ]
        )
        for row in expr.atoms(RowSum)
    }
    first = {symbols[name]: values[0] for name, values in rows.items()}
    return sympy.N(expr.xreplace(summed).xreplace(first), 30)


def _counterexample(layer: Layer, derived, closed, symbols):
    """The smallest sizes (batch, row length) at which the two forms differ at element
    (0, 0), with the numbers used (every row the same), or None if none up to 3 x 4 does
    (then SymPy merely failed to simplify, and the outcome is undecided)."""
    from derive.presburger import Counterexample

    batch, length = layer.inputs[0].axes[0], layer.inputs[0].axes[-1]
    shapes = sorted(itertools.product(range(1, 4), range(1, 5)), key=lambda mk: (sum(mk), mk))
    # Activations are tried at negative inputs too (ReLU's mask); losses keep probabilities.
    signs = (1, -1) if layer.kind == "activation" else (1,)
    for (examples, count), sign in itertools.product(shapes, signs):
        rows = {
            name: row_values("upstream" if name == layer.upstream else name, count, sign)
            for name in symbols
        }
        sizes = {batch: examples, length: count}

        left = _value_at_first(derived, sizes, rows, symbols)
        right = _value_at_first(closed, sizes, rows, symbols)
        if left.is_number and right.is_number and abs(left - right) > 1e-12 * (1 + abs(left)):
            return Counterexample(
                sizes={batch.name: examples, length.name: count},
                element=(0, 0),
                left=left,
                right=right,
                inputs={
                    name: [[float(v) for v in values]] * examples
                    for name, values in rows.items()
                    if name in {i.name for i in layer.inputs}
                    or (name == layer.upstream and layer.kind != "loss")
                },
            )
    return None
