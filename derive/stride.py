"""A symbolic stride, factored out of index-level sums so that they become affine.

``s * i`` is not affine when both are symbols.  But a strided layer only ever reads its
window index ``i`` as ``s * i``, and the array indexed by ``i`` itself (the upstream
gradient ``delta[n, i, j, o]``) can be read on the finer grid instead: with
``t = s * i`` and ``D = dilate_s(delta)`` (``D[t] = delta[t / s]`` when s divides t, else 0),

    sum over i of  delta[i] * f(s * i)  =  sum over t of  D[t] * f(t),

for every s, because the terms with t not a multiple of s are zero.  ``D`` has
``L = s (H' - 1) + 1`` rows, a new size; ``s * H'`` is written ``L + s - 1`` everywhere.

``factor_stride`` applies this renaming to every summation variable that occurs as
``s * i``: each array read at a bare ``i`` becomes that array dilated along the axis
(``dilate_s(name, axes)``, the same name on both sides of an identity), and every
constraint is rewritten in ``t``.  For a free index (the output element of a forward
pass, read only as ``s * i``) the same renaming proves the identity at every ``t`` in
``[0, L)``, which includes the multiples of ``s`` it is about: a proof there is a proof,
but a difference might lie between the multiples, so a refutation is not trusted.

Where the renaming does not apply (an index read both bare and in another form, a
remaining product with ``s``), ``NotAffine`` is raised and the caller proves each stride
on its own.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import sympy

from derive.indexsets import NotAffine, Read, Term, fresh


def dilated_name(array: str, axes: Sequence[int]) -> str:
    return f"dilate_s({array}, axes {','.join(str(a) for a in sorted(axes))})"


def _occurs_times_stride(expr, stride, variable) -> bool:
    expanded = sympy.expand(sympy.sympify(expr))
    return any(term.has(variable) and term.has(stride) for term in sympy.Add.make_args(expanded))


def _rewrite(expr, stride, variable, t, extents: Mapping[sympy.Symbol, sympy.Symbol]):
    """``expr`` with ``variable = t / stride``, the stride's products with decimated
    extents written with the dilated extents; (numerator, denominator)."""
    out = sympy.expand(sympy.sympify(expr).xreplace({variable: t / stride}))
    numerator, denominator = sympy.fraction(sympy.together(out))
    return sympy.expand(numerator), denominator


def in_dilated_sizes(expr, stride, extents: Mapping[sympy.Symbol, sympy.Symbol]):
    """``s * H'`` written as ``L + s - 1`` (``L = s (H' - 1) + 1``, the dilated extent)."""
    expr = sympy.expand(sympy.sympify(expr))
    for decimated, dilated in extents.items():
        expr = sympy.expand(expr.subs(stride * decimated, dilated + stride - 1))
    return expr


def factor_stride(
    term: Term,
    stride: sympy.Symbol,
    extents: Mapping[sympy.Symbol, sympy.Symbol],
    free: Sequence[sympy.Symbol] = (),
    renamed_free: Mapping[sympy.Symbol, sympy.Symbol] | None = None,
) -> Term:
    """``term`` with every variable that occurs as ``stride * i`` renamed ``t = stride * i``
    (see the module docstring).  ``renamed_free`` gives the new names of free indices
    that are renamed so (the caller renames them on both sides)."""
    renamed_free = renamed_free or {}
    reads = [list(read.index) for read in term.reads]
    dilated_axes = [set() for _ in term.reads]
    constraints = list(term.constraints)
    variables = list(term.variables)
    expressions = [e for index in reads for e in index] + [e for _, e in constraints]
    candidates = [
        v for v in variables if any(_occurs_times_stride(e, stride, v) for e in expressions)
    ]
    candidates += [v for v in free if v in renamed_free]
    for variable in candidates:
        t = renamed_free.get(variable) or fresh("t")
        bare = False
        for k, index in enumerate(reads):
            for axis, e in enumerate(index):
                if sympy.sympify(e) == variable:
                    dilated_axes[k].add(axis)
                    index[axis] = t
                    bare = True
                    continue
                numerator, denominator = _rewrite(e, stride, variable, t, extents)
                if denominator != 1:
                    raise NotAffine(f"{e} reads {variable} other than as {stride}*{variable}")
                index[axis] = numerator
        if not bare and variable not in renamed_free:
            raise NotAffine(
                f"no array is read at {variable} itself, so t = {stride}*{variable} would count non-multiples"
            )
        new_constraints = []
        for kind, e in constraints:
            numerator, denominator = _rewrite(e, stride, variable, t, extents)
            if denominator not in (1, stride):
                raise NotAffine(f"constraint {e} divides by {denominator}")
            new_constraints.append((kind, numerator))  # times s > 0: the same condition
        constraints = new_constraints
        if variable in variables:
            variables[variables.index(variable)] = t
    constraints = [(kind, in_dilated_sizes(e, stride, extents)) for kind, e in constraints]
    new_reads = tuple(
        Read(
            dilated_name(read.array, axes) if axes else read.array,
            tuple(in_dilated_sizes(e, stride, extents) for e in index),
        )
        for read, index, axes in zip(term.reads, reads, dilated_axes)
    )
    return Term(term.coefficient, new_reads, tuple(variables), tuple(constraints))
