"""Judging a claimed gradient for all sizes: the core of ``cnnderive check``.

A layer ``Z[outputs] = rhs`` and a claim ``dA[index] = claim`` are both SymPy
``Indexed``/``Sum`` expressions over arrays with symbolic shapes.  ``dZ`` is the upstream
gradient (the shape of ``Z``), a read outside an array is zero, and a summation index
without limits ranges over an axis where it stands alone (``sum_over``).  The chain rule
of the definition and the claim become index-level sums (``derive.indexsets``), and
``derive.allsizes.prove_sums`` decides them: proven for all sizes, or refuted with the
smallest sizes at which they differ and one element with both values.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import sympy

from derive.indexsets import NotAffine, chain_rule_terms, expression_terms, within
from derive.presburger import Outcome


class ClaimError(ValueError):
    """A claim or definition that cannot be judged: the message names the problem."""


def sum_over(body: sympy.Expr, indices: Sequence[sympy.Symbol], shapes) -> sympy.Expr:
    """``body`` summed over ``indices``, each over an axis of an array where it stands
    alone as the index (``W[u, v, c, o]`` gives ``u`` the range of W's first axis)."""
    limits = []
    for index in indices:
        extent = None
        for read in sympy.sympify(body).atoms(sympy.Indexed):
            shape = shapes.get(str(read.base.label))
            if shape is None:
                raise ClaimError(f"unknown array {read.base.label}")
            for axis, position in enumerate(read.indices):
                if position == index:
                    extent = shape[axis]
                    break
            if extent is not None:
                break
        if extent is None:
            raise ClaimError(
                f"index {index} has no range: it stands alone in no array's axis; "
                "write it alone as one array's index"
            )
        limits.append((index, 0, extent - 1))
    return sympy.Sum(body, *limits) if limits else body


def check_gradient(
    output: sympy.Indexed,
    rhs: sympy.Expr,
    shapes: Mapping[str, tuple[sympy.Expr, ...]],
    claimed: sympy.Indexed,
    claim: sympy.Expr,
    upstream: str | None = None,
    context: Sequence[tuple[str, sympy.Expr]] = (),
) -> Outcome:
    """Whether ``claimed = claim`` is the gradient of the layer ``output = rhs``.

    ``shapes`` gives every array's shape (symbolic sizes) by its label; ``claimed`` is
    ``dA[index]`` for an array ``A``; ``upstream`` is the upstream gradient's label
    (``"d" + output label`` by default), whose shape is the output's.  ``context`` adds
    conditions on the sizes (``("ge", H - K)`` for a kernel no larger than the input)."""
    from derive.allsizes import prove_sums

    out_label = str(output.base.label)
    wrt = str(claimed.base.label)[1:] if str(claimed.base.label).startswith("d") else None
    if wrt not in shapes:
        raise ClaimError(f"{claimed.base.label} is not d of an array of the layer")
    upstream = upstream or "d" + out_label
    if out_label not in shapes:
        raise ClaimError(f"the output {out_label} has no shape")
    shape_of = dict(shapes)
    shape_of[upstream] = shapes[out_label]
    if len(claimed.indices) != len(shapes[wrt]):
        raise ClaimError(
            f"{claimed} has {len(claimed.indices)} indices; {wrt} has {len(shapes[wrt])} axes"
        )
    arrays = {label: (label, tuple(shape)) for label, shape in shape_of.items()}
    outputs = tuple(output.indices)
    index = tuple(claimed.indices)
    try:
        defined = expression_terms(rhs, arrays)
        derived = chain_rule_terms(defined, outputs, shapes[out_label], upstream, wrt, index)
        stated = [
            t.constrained(*within(index, shapes[wrt])) for t in expression_terms(claim, arrays)
        ]
    except NotAffine as error:
        raise ClaimError(str(error)) from error
    sizes = {s for shape in shape_of.values() for e in shape for s in sympy.sympify(e).free_symbols}
    positive = [("ge", s - 1) for s in sorted(sizes, key=str)]
    try:
        return prove_sums(derived, stated, index, positive + list(context))
    except NotAffine as error:
        raise ClaimError(f"not affine: {error}") from error


# ---------------------------------------------------------------------------
# A claim about an equation layer, both in the equation language
# ---------------------------------------------------------------------------


def _stand_alone_extent(index: str, node, shapes) -> sympy.Expr | None:
    """The extent of an axis where ``index`` stands alone as an array's index, inside
    ``node`` (an equation's syntax tree), if there is one."""
    kind = type(node).__name__
    if kind == "Element":
        for axis, affine in enumerate(node.indices):
            if affine.coefficients == ((index, 1),) and affine.constant == 0:
                width = node.padding[axis] if node.padding else 0
                return shapes[node.array][axis] + 2 * width
        return None
    for child in getattr(node, "arguments", ()) + ((node.body,) if kind == "Reduction" else ()):
        found = _stand_alone_extent(index, child, shapes)
        if found is not None:
            return found
    return None


def judge_claim(equation: str, claim: str) -> tuple[Outcome, dict[str, list[str]]]:
    """Whether ``claim`` (``dA[...] = ...``) is the gradient of the equation layer
    ``equation`` with respect to its array ``A``, for all sizes.

    In the claim, ``dZ`` is the upstream gradient of the equation's output ``Z``; the
    claim's free indices range over A's axes, every other index over its bound
    (``sum[u<3]``) or an axis where it stands alone, and a read outside an array is zero.
    Returns the outcome and each array's sizes by name (``{"X": ["X_size0", ...]}``).
    Raises ``EquationError`` or ``ClaimError`` (one line each) on bad input."""
    from derive.allsizes import prove_sums
    from derive.equation.model import model_of
    from derive.equation.syntax import parse
    from derive.indexsets import equation_terms, fresh, syntax_terms
    from derive.layer import Requirement

    model = model_of(equation)
    stated = parse(claim)
    wrt = stated.output[1:] if stated.output.startswith("d") else ""
    upstream = "d" + model.output
    if wrt not in model.arrays:
        raise ClaimError(
            f"the claim's left side is {stated.output}; write d and an array of the equation: "
            + ", ".join("d" + name for name in model.arrays)
        )
    shapes = {name: tuple(info.dims) for name, info in model.arrays.items()}
    shapes[upstream] = model.output_extents()
    if len(stated.output_indices) != len(shapes[wrt]):
        raise ClaimError(
            f"{stated.output} has {len(stated.output_indices)} indices but {wrt} has "
            f"{len(shapes[wrt])} axes"
        )
    index = {name: fresh(name) for name in stated.output_indices}
    free = tuple(index[name] for name in stated.output_indices)

    def extent_of(name, reduction):
        bound = dict(zip(reduction.indices, reduction.bounds)).get(name)
        if bound is not None:
            return sympy.Integer(bound)
        found = _stand_alone_extent(name, reduction.body, shapes)
        if found is None:
            raise ClaimError(
                f"index {name} has no range: give it a bound ({name}<3) or let it stand "
                "alone as an array's index somewhere in its sum"
            )
        return found

    try:
        claimed = syntax_terms(stated.rhs, index, shapes, extent_of)
        defined, outputs = equation_terms(model)
        derived = chain_rule_terms(defined, outputs, model.output_extents(), upstream, wrt, free)
    except NotAffine as error:
        raise ClaimError(str(error)) from error
    claimed = [t.constrained(*within(free, shapes[wrt])) for t in claimed]
    context = [("ge", d - 1) for info in model.arrays.values() for d in info.dims]
    from derive.allsizes import relational_constraints

    for condition, _ in model.requirements:
        context += relational_constraints(Requirement(condition, "").condition) or []
    arrays = {name: [d.name for d in info.dims] for name, info in model.arrays.items()}
    try:
        return prove_sums(derived, claimed, free, context), arrays
    except NotAffine as error:
        raise ClaimError(f"not affine: {error}") from error
