"""Deciding, for every size at once, whether two index-level sums are equal.

Each side is a list of ``derive.indexsets.Term``.  A term is turned into an isl relation
from the output element to the product it contributes::

    { [n, h, w, c] -> [delta indices..., W indices...] : exists summation variables ... }

with the sizes as isl parameters.  The argument that makes set equality mean sum
equality:

1. Products of different arrays (or with different coefficients) are different
   monomials, so terms are grouped by their arrays and compared group by group.
2. Within a term, distinct points of the summation set must give distinct products;
   otherwise a product would be counted several times and a set would lose the count.
   isl checks that the relation (element, variables) -> (element, product) is injective;
   a term that is not injective is reported as undecided, never passed.
3. Where two terms of one side share a product, their coefficients add: the relations
   are split into pieces (intersection and differences) that each carry one total
   coefficient.
4. Then, for every coefficient, the two sides' pieces must be the same set of (element,
   product) pairs for all sizes: a question of Presburger arithmetic that isl decides.

When a set differs, isl gives the smallest sizes (by their total, then in order) at which it
does, and the element where it does; both sides are then written out at those sizes as
explicit sums of products, a counterexample one can check by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import islpy as isl
import sympy

from derive.indexsets import Constraint, NotAffine, Term


@dataclass
class Counterexample:
    """Sizes at which two sums differ, one output element where they do, and both values
    there (sums of products of elements ``name[i, j, ...]``)."""

    sizes: dict[str, int]
    element: tuple[int, ...]
    left: sympy.Expr
    right: sympy.Expr
    # Numbers the values were computed at, when they are numbers (pointwise layers: the
    # one row of each array, batch 1); None when left and right are written out.
    inputs: dict[str, list[float]] | None = None

    def to_json(self) -> dict:
        out = {
            "sizes": self.sizes,
            "element": list(self.element),
            "left": str(self.left),
            "right": str(self.right),
        }
        if self.inputs is not None:
            out["inputs"] = self.inputs
        return out


@dataclass
class Outcome:
    """``proven`` (equal for every size the context allows), ``refuted`` (with a
    counterexample) or ``undecided`` (with the reason)."""

    status: str
    reason: str = ""
    counterexample: Counterexample | None = None
    details: list[str] = field(default_factory=list)


def _names(symbols, prefix):
    return {s: f"{prefix}{k}" for k, s in enumerate(symbols)}


def affine(expr, names: Mapping[sympy.Symbol, str]) -> str:
    """``expr`` in isl's syntax; it must be affine (floor of an affine expression over an
    integer is allowed)."""
    expr = sympy.sympify(expr)
    if expr.is_Integer:
        return f"({int(expr)})"
    if expr.is_Symbol:
        if expr not in names:
            raise NotAffine(f"symbol {expr} has no meaning here")
        return names[expr]
    if expr.is_Add:
        return "(" + " + ".join(affine(a, names) for a in expr.args) + ")"
    if expr.is_Mul:
        numbers = [a for a in expr.args if a.is_Number]
        rest = [a for a in expr.args if not a.is_Number]
        coefficient = sympy.Mul(*numbers)
        if not coefficient.is_Integer or len(rest) != 1:
            raise NotAffine(f"{expr} is not affine: a product of symbols")
        return f"{int(coefficient)}*{affine(rest[0], names)}"  # isl reads -1*x, not (-1)*x
    if isinstance(expr, sympy.floor):
        numerator, denominator = sympy.fraction(sympy.together(expr.args[0]))
        if not denominator.is_Integer:
            raise NotAffine(f"{expr} is not affine: division by a symbol")
        return f"floor({affine(sympy.expand(numerator), names)}/{int(denominator)})"
    raise NotAffine(f"{expr} is not affine")


_INTEGRAL: dict[sympy.Expr, sympy.Expr] = {}


def _integral(expr) -> sympy.Expr:
    """``expr`` times the least common denominator of its rational coefficients (a
    condition ``e >= 0`` or ``e = 0`` means the same after it).  Remembered: the same
    constraints come back in every term and every comparison."""
    if expr not in _INTEGRAL:
        expanded = sympy.expand(expr)
        denominators = [
            term.as_coeff_Mul()[0].q
            for term in sympy.Add.make_args(expanded)
            if term.as_coeff_Mul()[0].is_Rational
        ]
        lcm = math.lcm(*[int(q) for q in denominators]) if denominators else 1
        _INTEGRAL[expr] = sympy.expand(expanded * lcm) if lcm != 1 else expanded
    return _INTEGRAL[expr]


def _condition(constraint: Constraint, names) -> str:
    kind, expr = constraint
    return f"{affine(_integral(sympy.sympify(expr)), names)} {'=' if kind == 'eq' else '>='} 0"


def _body(conditions: list[str]) -> str:
    return " and ".join(conditions) if conditions else "true"


class Problem:
    """The sizes (isl parameters), the conditions on them, and the free indices of the
    element both sums describe."""

    def __init__(self, free: Sequence[sympy.Symbol], context: Sequence[Constraint], sizes):
        self.free = tuple(free)
        self.sizes = tuple(sizes)
        self.context = tuple(context)
        self.size_names = {s: f"P{k}" for k, s in enumerate(self.sizes)}
        self.free_names = _names(self.free, "a")
        prefix = "[" + ", ".join(self.size_names.values()) + "] -> "
        self.prefix = prefix
        conditions = [_condition(c, self.size_names) for c in self.context]
        self.context_set = isl.Set(prefix + "{ : " + _body(conditions) + " }")

    # one term --------------------------------------------------------------------
    def _ordered(self, term: Term):
        reads = tuple(sorted(term.reads, key=lambda r: r.array))
        arrays = tuple(r.array for r in reads)
        if len(set(arrays)) != len(arrays):
            raise Undecided(
                f"a product reads {arrays[0]} twice; its elements could pair up in two orders"
            )
        return reads, arrays

    def relation(self, term: Term, fixed: Mapping | None = None) -> isl.Map:
        """(element) -> (indices of the product's elements), with ``fixed`` values put in."""
        reads, _ = self._ordered(term)
        names = dict(self.size_names)
        names.update(self.free_names)
        names.update(_names(term.variables, "v"))
        outputs = [index for read in reads for index in read.index]
        out_names = [f"m{k}" for k in range(len(outputs))]
        conditions = [f"{m} = {affine(e, names)}" for m, e in zip(out_names, outputs)]
        conditions += [_condition(c, names) for c in term.constraints]
        body = _body(conditions)
        if term.variables:
            body = f"exists ({', '.join(names[v] for v in term.variables)}: {body})"
        text = (
            "{ ["
            + ", ".join(self.free_names.values())
            + "] -> ["
            + ", ".join(out_names)
            + "] : "
            + body
            + " }"
        )
        relation = isl.Map(self.prefix + text).intersect_params(self.context_set)
        if fixed:
            relation = relation.intersect_params(self.point(fixed))
        return relation

    def injective(self, term: Term) -> bool:
        """Whether distinct summation points of ``term`` give distinct products."""
        reads, _ = self._ordered(term)
        names = dict(self.size_names)
        names.update(self.free_names)
        names.update(_names(term.variables, "v"))
        outputs = [index for read in reads for index in read.index]
        out_names = [f"m{k}" for k in range(len(outputs))]
        conditions = [f"{m} = {affine(e, names)}" for m, e in zip(out_names, outputs)]
        conditions += [_condition(c, names) for c in term.constraints]
        copies = [f"e{k}" for k in range(len(self.free))]  # the element again, on the right
        conditions += [f"{e} = {a}" for e, a in zip(copies, self.free_names.values())]
        domain = list(self.free_names.values()) + [names[v] for v in term.variables]
        text = (
            "{ ["
            + ", ".join(domain)
            + "] -> ["
            + ", ".join(copies + out_names)
            + "] : "
            + _body(conditions)
            + " }"
        )
        return isl.Map(self.prefix + text).intersect_params(self.context_set).is_injective()

    def point(self, values: Mapping[sympy.Symbol, int]) -> isl.Set:
        conditions = [f"{self.size_names[s]} = {int(v)}" for s, v in values.items()]
        return isl.Set(self.prefix + "{ : " + _body(conditions) + " }")

    # a whole side ----------------------------------------------------------------
    def pieces(self, terms: Sequence[Term]) -> dict[tuple, list[tuple[isl.Map, sympy.Expr]]]:
        """arrays -> [(relation, total coefficient)], the relations of one group disjoint."""
        groups: dict[tuple, list[tuple[isl.Map, sympy.Expr]]] = {}
        for term in terms:
            _, arrays = self._ordered(term)
            if not self.injective(term):
                raise Undecided(
                    "a sum repeats a product (its summation set maps onto the products "
                    "many-to-one), so comparing sets would not compare the sums; "
                    "counting would be needed"
                )
            new, coefficient = self.relation(term), sympy.sympify(term.coefficient)
            kept = []
            for old, old_coefficient in groups.get(arrays, []):
                shared = old.intersect(new)
                if shared.is_empty():
                    kept.append((old, old_coefficient))
                    continue
                kept.append((old.subtract(shared), old_coefficient))
                kept.append((shared, old_coefficient + coefficient))
                new = new.subtract(shared)
            kept.append((new, coefficient))
            groups[arrays] = [(r, sympy.simplify(c)) for r, c in kept if not r.is_empty()]
        return groups


class Undecided(Exception):
    """The sums are not of a form whose equality this procedure decides."""


def _by_coefficient(pieces, space_like: isl.Map | None):
    """[(relation, coefficient)] -> [(coefficient, union of its relations)], equal
    coefficients (after simplification) merged; zero coefficients dropped."""
    out: list[list] = []
    for relation, coefficient in pieces:
        if sympy.simplify(coefficient) == 0:
            continue
        for entry in out:
            if sympy.simplify(entry[0] - coefficient) == 0:
                entry[1] = entry[1].union(relation)
                break
        else:
            out.append([coefficient, relation])
    return out


def compare(left: Sequence[Term], right: Sequence[Term], problem: Problem) -> Outcome:
    """Whether the sums ``left`` and ``right`` are equal at every element, for all sizes
    in ``problem``'s context."""
    try:
        left_pieces, right_pieces = problem.pieces(left), problem.pieces(right)
    except Undecided as reason:
        return Outcome("undecided", str(reason))
    differences = []
    details = []
    for arrays in sorted(set(left_pieces) | set(right_pieces)):
        lefts = _by_coefficient(left_pieces.get(arrays, []), None)
        rights = _by_coefficient(right_pieces.get(arrays, []), None)
        # Every region of (element, product) pairs where the two sides' coefficients
        # differ, with that difference: a product on both sides with other coefficients,
        # or on one side only.
        regions = []
        for cl, a in lefts:
            for cr, b in rights:
                if sympy.simplify(cl - cr) != 0:
                    regions.append((a.intersect(b), cl - cr))
        everything_right = _union([b for _, b in rights])
        everything_left = _union([a for _, a in lefts])
        for cl, a in lefts:
            regions.append((a if everything_right is None else a.subtract(everything_right), cl))
        for cr, b in rights:
            regions.append((b if everything_left is None else b.subtract(everything_left), -cr))
        for region, difference in regions:
            region = region.intersect_params(_where_nonzero(difference, problem))
            if not region.is_empty():
                differences.append(region)
        details.append(f"{' * '.join(arrays) or 'constant'}: compared")
    if not differences:
        return Outcome("proven", details=details)
    # Where the sets differ only in which coefficient a product carries (1/k against 1/k^2),
    # the values can still agree at some sizes (k = 1): those sizes are set aside and the
    # next smallest tried.
    for _ in range(MAX_TRIES):
        counterexample = _counterexample(differences, left, right, problem)
        if sympy.expand(counterexample.left - counterexample.right) != 0:
            return Outcome("refuted", counterexample=counterexample)
        sizes = {s: counterexample.sizes[s.name] for s in problem.sizes}
        elsewhere = problem.context_set.subtract(problem.point(sizes))
        differences = [d.intersect_params(elsewhere) for d in differences]
        differences = [d for d in differences if not d.is_empty()]
        if not differences:
            break
    return Outcome(
        "undecided",
        "the sums differ as sets of products but not in value at the smallest sizes tried: "
        "their coefficients differ as expressions and agree at those sizes",
    )


MAX_TRIES = 8


def same_shape(expected, actual, problem: Problem) -> Outcome:
    """Whether two shapes (integer expressions) are equal for all sizes; if not, the
    smallest sizes at which they differ."""
    names = dict(problem.size_names)
    differs = []
    for a, b in zip(expected, actual):
        text = affine(sympy.sympify(a) - b, names)
        differs.append(f"({text} >= 1 or {text} <= -1)")
    if len(expected) != len(actual):
        differs = ["true"]
    if not differs:
        return Outcome("proven")
    where = isl.Set(problem.prefix + "{ : " + " or ".join(differs) + " }").intersect(
        problem.context_set
    )
    if where.is_empty():
        return Outcome("proven")
    as_set = isl.Set.from_params(where).move_dims(
        isl.dim_type.set, 0, isl.dim_type.param, 0, len(problem.sizes)
    )
    point = as_set.lexmin().sample_point()
    sizes = {
        s.name: point.get_coordinate_val(isl.dim_type.set, k).to_python()
        for k, s in enumerate(problem.sizes)
    }
    values = {s: sympy.Integer(sizes[s.name]) for s in problem.sizes}
    return Outcome(
        "refuted",
        "the closed form has another shape than the gradient",
        Counterexample(
            sizes,
            (),
            sympy.Tuple(*[sympy.sympify(e).xreplace(values) for e in expected]),
            sympy.Tuple(*[sympy.sympify(e).xreplace(values) for e in actual]),
        ),
    )


def _union(relations):
    out = None
    for relation in relations:
        out = relation if out is None else out.union(relation)
    return out


def _where_nonzero(coefficient, problem: Problem) -> isl.Set:
    """The sizes at which ``coefficient`` (an expression in the sizes) is not zero, as far
    as affine conditions say: integer roots of a coefficient in one size are set aside
    (1/k - 1/k^2 is zero at k = 1); otherwise every size."""
    coefficient = sympy.simplify(coefficient)
    symbols = coefficient.free_symbols & set(problem.sizes)
    conditions = []
    if len(symbols) == 1:
        (symbol,) = symbols
        numerator, _ = sympy.fraction(sympy.together(coefficient))
        for root in sympy.solve(numerator, symbol):
            if root.is_Integer:
                name = problem.size_names[symbol]
                conditions.append(f"({name} <= {int(root) - 1} or {name} >= {int(root) + 1})")
    return isl.Set(problem.prefix + "{ : " + _body(conditions) + " }")


def _smallest_sizes(differences, problem: Problem) -> dict[sympy.Symbol, int]:
    """The sizes with the smallest total (then the smallest in order) at which some
    difference is nonempty."""
    best = None
    count = len(problem.sizes)
    names = list(problem.size_names.values())
    for difference in differences:
        params = difference.params().intersect(problem.context_set)
        as_set = isl.Set.from_params(params).move_dims(
            isl.dim_type.set, 0, isl.dim_type.param, 0, count
        )
        ordered = isl.Map(
            "{ ["
            + ", ".join(names)
            + "] -> [total, "
            + ", ".join(names)
            + "] : total = "
            + (" + ".join(names) or "0")
            + " }"
        )
        try:
            point = as_set.apply(ordered).lexmin().sample_point()
        except isl.Error:  # a size with no lower bound: any point where the sums differ
            point = as_set.apply(ordered).sample_point()
        values = [
            point.get_coordinate_val(isl.dim_type.set, k).to_python() for k in range(count + 1)
        ]
        if best is None or values < best:
            best = values
    return dict(zip(problem.sizes, best[1:]))


def _counterexample(differences, left, right, problem: Problem) -> Counterexample:
    sizes = _smallest_sizes(differences, problem)
    fixed = problem.point(sizes)
    element = None
    for difference in differences:
        domain = difference.intersect_params(fixed).domain()
        if domain.is_empty():
            continue
        point = domain.lexmin().sample_point()
        candidate = tuple(
            point.get_coordinate_val(isl.dim_type.set, k).to_python()
            for k in range(len(problem.free))
        )
        if element is None or candidate < element:
            element = candidate
    return Counterexample(
        sizes={s.name: v for s, v in sizes.items()},
        element=element,
        left=value_at(left, problem, sizes, element),
        right=value_at(right, problem, sizes, element),
    )


def _points(bounded: isl.Set) -> list[tuple[int, ...]]:
    """Every integer point of a bounded set without parameters."""
    points = []
    width = bounded.dim(isl.dim_type.set)
    bounded.foreach_point(
        lambda p: points.append(
            tuple(p.get_coordinate_val(isl.dim_type.set, k).to_python() for k in range(width))
        )
    )
    return points


def value_at(terms: Sequence[Term], problem: Problem, sizes, element) -> sympy.Expr:
    """The sum at ``element`` for the given sizes, written out as products of elements
    ``name[i, j, ...]`` (SymPy ``Indexed``)."""
    fixed_element = dict(zip(problem.free, element))
    total = []
    for term in terms:
        reads, _ = problem._ordered(term)
        relation = problem.relation(term, fixed=sizes)
        point_text = "{ [" + ", ".join(str(v) for v in element) + "] }"
        products = relation.intersect_domain(
            isl.Set(problem.prefix + point_text).intersect_params(problem.point(sizes))
        ).range()
        # The sizes are fixed: as parameters they only get in the way of listing the points.
        products = products.project_out(isl.dim_type.param, 0, products.dim(isl.dim_type.param))
        coefficient = sympy.sympify(term.coefficient).xreplace(
            {s: sympy.Integer(v) for s, v in {**sizes, **fixed_element}.items()}
        )
        for coordinates in sorted(_points(products)):
            factors, position = [], 0
            for read in reads:
                width = len(read.index)
                factors.append(
                    sympy.IndexedBase(read.array)[coordinates[position : position + width]]
                )
                position += width
            total.append(coefficient * sympy.Mul(*factors))
    return sympy.Add(*total)
