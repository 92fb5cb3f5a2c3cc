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
