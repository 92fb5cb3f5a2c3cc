"""The derivation of an equation layer's gradients, as the general index steps a
textbook shows: the chain rule in scatter form, the index equations solved for a
gather form, and how the code runs it."""

from __future__ import annotations

import sympy

from derive.equation.model import Model, affine_expr, index_symbol
from derive.equation.syntax import Element, Reduction


def _latex(expr) -> str:
    return sympy.latex(sympy.sympify(expr))


def _position_names(rank: int) -> list[sympy.Symbol]:
    return [sympy.Symbol(f"a_{k}", integer=True) for k in range(rank)]


def _scope_of(model: Model, element: Element):
    for read in model.reads:
        if read.element is element:
            return read.scope
    return model.output_indices


def _reduction_of(model: Model, element: Element):
    for reduction in model.reductions:
        if reduction.body is element or _contains(reduction.body, element):
            return reduction
    return None


def _contains(node, element) -> bool:
    if node is element:
        return True
    if isinstance(node, Reduction):
        return _contains(node.body, element)
    return any(_contains(a, element) for a in getattr(node, "arguments", ()))


def solve_axis(affine, position: sympy.Symbol, output_indices) -> tuple[str, str] | None:
    """Solve ``affine = position`` for one index: (LaTeX of the solution, of its conditions).

    An output index is solved for when there is one (it is the long one: the rest are
    kernel offsets); a coefficient c other than 1 brings the condition that c divides
    the rest, i.e. a residue class modulo c."""
    names = affine.indices
    if len(names) <= 1 and affine.standalone() is not None:
        return None
    candidates = [n for n in names if n in output_indices] or list(names)
    if not candidates:
        return None
    target = candidates[0]
    coefficient = affine.coefficient(target)
    symbol = index_symbol(target)
    rest = sympy.expand(affine_expr(affine) - coefficient * symbol)
    numerator = position - rest
    quotient = _latex(numerator)
    if coefficient != 1:
        quotient = rf"\frac{{{quotient}}}{{{coefficient}}}"
    solution = rf"{target} = {quotient}"
    conditions = []
    if coefficient != 1:
        conditions.append(rf"{_latex(numerator)} \text{{ a multiple of }} {coefficient}")
    conditions.append(
        rf"0 \le {target} < {target.upper()}\ \text{{(the length of the output axis {target})}}"
    )
    return solution, r",\ ".join(conditions)


def chain_rule_lines(model: Model) -> tuple[str, ...]:
    lines = []
    out = model.output
    out_indices = ",".join(model.output_indices)
    for read in model.reads:
        element = read.element
        info = model.arrays[element.array]
        name = element.array
        if info.padding and any(w != 0 for w in info.padding):
            name = rf"\tilde{{{element.array}}}"
        positions = _position_names(info.rank)
        read_text = ",".join(_latex(affine_expr(a)) for a in element.indices)
        scope = read.scope
        equations = r",\ ".join(
            f"{_latex(affine_expr(a))} = {_latex(p)}"
            for a, p in zip(element.indices, positions)
            if a.standalone() is None or True
        )
        reduction = _reduction_of(model, element)
        factor = (
            r"\mathbf{1}^{\mathrm{first\,max}}"
            if reduction is not None and reduction.kind == "max"
            else rf"\frac{{\partial {out}_{{{out_indices}}}}}{{\partial {name}_{{{read_text}}}}}"
        )
        reads_of_array = sum(1 for r in model.reads if r.element.array == element.array)
        share = r"\text{(this read's share) }" if reads_of_array > 1 else ""
        lines.append(
            rf"{share}\frac{{\partial L}}{{\partial {name}_{{{','.join(_latex(p) for p in positions)}}}}}"
            rf" = \sum_{{{','.join(scope)}\,:\ {equations}}} \delta_{{{out_indices}}}\,{factor}"
        )
        solved = [
            solve_axis(a, p, model.output_indices) for a, p in zip(element.indices, positions)
        ]
        for item in solved:
            if item is not None:
                solution, conditions = item
                lines.append(rf"\text{{solved: }} {solution} \quad \text{{when }} {conditions}")
    return tuple(lines)


def notes(model: Model, generic: bool = True) -> tuple[str, ...]:
    """The prose under the closed forms; ``generic`` when some closed form is the generic
    index-space one, whose way of running is then explained."""
    texts = [
        "Each line above is the chain rule in scatter form: every output element that read an "
        "array element adds its share to that element's gradient. Solving each index equation "
        "for an output index turns it into a gather form: the kernel offsets stay free, and a "
        "coefficient $c$ other than 1 restricts the position to one residue class modulo $c$.",
    ]
    if generic:
        texts.append(
            "The generated code runs the gather form one kernel offset at a time: with the offsets "
            "fixed, the positions that receive a contribution form one strided block of the "
            "gradient (start: the offset, step: the coefficient), on which the solved index runs "
            "with step 1. No element is tested for divisibility and skipped."
        )
    if any(r.kind == "max" for r in model.reductions):
        texts.append(
            "A max passes the gradient to the first maximum of its window in row-major order; "
            "at a tie this picks one subgradient, the rule the catalogue's max pooling uses."
        )
    if any(info.padding for info in model.arrays.values()):
        texts.append(
            "A padded array is read as $\\tilde{X}$; its gradient is computed for the padded "
            "array and then cropped: the padding zeros are constants."
        )
    return tuple(texts)
