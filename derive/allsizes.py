"""Proofs for every size: ``cnnderive verify --all-sizes``.

``derive.verify`` proves each closed form on a sweep of small configurations.  Here the
same closed forms are proven for symbolic sizes, by one of two routes:

* **index sets** (convolution, average and max pooling, dense): the derived gradient (the
  chain rule applied to the index-level definition) and the closed-form tree are both
  sums of products of array elements over affine integer sets (``derive.indexsets``);
  isl decides whether the sets are equal for all sizes (``derive.presburger``).  A
  stride times an index is not affine: the stride is factored out (``derive.stride``),
  and what that does not prove is proven for each stride 1, 2, 3, 4 on its own, every
  other size symbolic.  Max pooling's first-maximum indicator is one more array, held
  fixed by the chain rule as the tie rule says.
* **pointwise** (activations, losses, softmax): the definition reads its input only at the
  output's own index, or along the output's own row; the gradient is then a scalar
  identity in that element (and the row sums), for every shape, and SymPy settles it
  (``derive.rows``).

What neither route covers (flatten's products of sizes) is said with the reason, and
the caller falls back to the sweep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import islpy as isl
import sympy

from derive import ir
from derive.indexsets import (
    Constraint,
    NotAffine,
    TreeMeaning,
    chain_rule_terms,
    equation_terms,
    expression_terms,
    fresh,
    within,
)
from derive.layer import IndexDefinition, Layer
from derive.layers import STRIDE
from derive.presburger import Outcome, Problem, compare, same_shape
from derive.stride import factor_stride, in_dilated_sizes

STRIDES = (1, 2, 3, 4)


@dataclass
class Statement:
    """One proven (or refuted, or undecided) identity: ``what`` (forward, or a gradient and
    its case) for the sizes ``sizes`` describes, with the values ``fixed`` (the stride)."""

    what: str
    sizes: str
    outcome: Outcome
    fixed: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {
            "what": self.what,
            "status": self.outcome.status,
            "for": self.sizes,
            "fixed": self.fixed,
        }
        if self.outcome.reason:
            out["reason"] = self.outcome.reason
        if self.outcome.counterexample is not None:
            out["counterexample"] = self.outcome.counterexample.to_json()
        return out


@dataclass
class LayerProof:
    layer: str
    route: str  # "index sets", "pointwise", "row-major lemma" or "sweep"
    statements: list[Statement] = field(default_factory=list)
    reason: str = ""  # why the layer is not proven for all sizes (route "sweep")
    seconds: float = 0.0
    note: str = ""  # what an all-sizes proof takes as given

    @property
    def status(self) -> str:
        if self.route == "sweep":
            return "sweep"
        outcomes = {s.outcome.status for s in self.statements}
        if "refuted" in outcomes:
            return "refuted"
        if "undecided" in outcomes:
            return "undecided"
        return "proven"


def relational_constraints(condition) -> list[Constraint] | None:
    """A conjunction of (in)equalities as constraints; None if it is False."""
    condition = sympy.sympify(condition)
    if condition == sympy.true:
        return []
    if condition == sympy.false:
        return None
    if isinstance(condition, sympy.And):
        out = []
        for part in condition.args:
            more = relational_constraints(part)
            if more is None:
                return None
            out += more
        return out
    a, b = condition.args
    if isinstance(condition, sympy.Eq):
        return [("eq", a - b)]
    if isinstance(condition, sympy.GreaterThan):
        return [("ge", a - b)]
    if isinstance(condition, sympy.StrictGreaterThan):
        return [("ge", a - b - 1)]
    if isinstance(condition, sympy.LessThan):
        return [("ge", b - a)]
    if isinstance(condition, sympy.StrictLessThan):
        return [("ge", b - a - 1)]
    raise NotAffine(f"condition {condition} is not a conjunction of inequalities")


def _symbols_of(terms, context) -> list[sympy.Symbol]:
    found: set[sympy.Symbol] = set()
    for term in terms:
        bound = set(term.variables)
        exprs = [term.coefficient] + [e for r in term.reads for e in r.index]
        exprs += [e for _, e in term.constraints]
        for expr in exprs:
            found |= sympy.sympify(expr).free_symbols - bound
    for _, expr in context:
        found |= sympy.sympify(expr).free_symbols
    return sorted(found, key=lambda s: s.name)


def _problem(terms, free, context) -> Problem:
    sizes = [s for s in _symbols_of(list(terms), context) if s not in set(free)]
    # What SymPy knows of a size is a condition too: Dims are positive.
    known: list[Constraint] = []
    for size in sizes:
        if size.is_positive:
            known.append(("ge", size - 1))
        elif size.is_nonnegative:
            known.append(("ge", size))
    return Problem(free, list(context) + known, sizes)


def prove_sums(left, right, free: Sequence[sympy.Symbol], context: Sequence[Constraint]) -> Outcome:
    """Whether the index-level sums ``left`` and ``right`` (lists of ``Term``) are equal at
    every element ``free`` for all sizes satisfying ``context``.

    This is what ``cnnderive check`` needs: the derived gradient and a claimed one, both
    for symbolic sizes; the outcome is proven, or refuted with the smallest sizes at which
    they differ and one element with both values, or undecided with the reason."""
    return compare(left, right, _problem(list(left) + list(right), free, context))


def size_dims(layer: Layer) -> list[ir.Dim]:
    """Every size symbol of the layer's inputs, in argument order.  (Not
    ``Layer.input_dims``: SymPy caches symbols by name, so the Dim objects named "batch"
    of all layers are one object, whose ``operand`` is the last layer's.)"""
    found: list[ir.Dim] = []
    for item in layer.inputs:
        for dim in item.axes:
            if dim not in found:
                found.append(dim)
    return found


def _describe_sizes(layer: Layer, values: dict) -> str:
    """The symbolic sizes, as the derivations name them: "m, H, W, C_in, ..."."""
    symbolic = [d for d in size_dims(layer) + [p.symbol for p in layer.params] if d not in values]
    text = "all " + ", ".join(_size_name(s) for s in symbolic)
    tied = [
        f"{_size_name(k)} = {_size_name(v)}"
        for k, v in values.items()
        if isinstance(v, sympy.Symbol)
    ]
    return text + (" with " + ", ".join(tied) if tied else "")


def _fixed(values: dict) -> dict[str, int]:
    return {_size_name(symbol): int(value) for symbol, value in values.items()}


def _size_name(symbol) -> str:
    """A size as the derivations name it (C_in), or by its own name when that name is
    LaTeX that plain text would mangle (an equation layer's D^{X}_{0} is X_size0)."""
    plain = _plain(getattr(symbol, "latex_name", symbol.name))
    return symbol.name if any(ch in plain for ch in "\\^{}") else plain


def _plain(latex: str) -> str:
    return (
        latex.replace(r"C_{\mathrm{in}}", "C_in")
        .replace(r"C_{\mathrm{out}}", "C_out")
        .replace(r"D_{\mathrm{in}}", "D_in")
        .replace(r"D_{\mathrm{out}}", "D_out")
    )


def _decimated_shape(out_shape, stride):
    """The output shape with each extent ``floor(E / s) + 1`` replaced by a symbol H', and
    for each the dilated extent L = s (H' - 1) + 1 and the conditions that relate L to E
    (``L - 1 <= E <= L + s - 2``: the last window starts at most s - 1 before the end)."""
    shape, extents, context, names = [], {}, [], {}
    for axis, extent in enumerate(out_shape):
        if not extent.has(stride):
            shape.append(extent)
            continue
        floors = list(extent.atoms(sympy.floor))
        if len(floors) != 1 or sympy.simplify(extent - floors[0] - 1) != 0:
            raise NotAffine(f"an output extent {extent} that is not floor(E / s) + 1")
        span = sympy.expand(floors[0].args[0] * stride)
        if span.has(stride):
            raise NotAffine(f"an output extent {extent} that is not floor(E / s) + 1")
        decimated = sympy.Symbol(f"out_extent{axis}", integer=True, positive=True)
        dilated = sympy.Symbol(f"dilated_extent{axis}", integer=True, positive=True)
        extents[decimated] = dilated
        context += [("ge", span - (dilated - 1)), ("ge", dilated + stride - 2 - span)]
        shape.append(decimated)
        names[extent] = decimated
    return tuple(shape), extents, context, names


def _index_set_statements(
    layer: Layer, values: dict, symbolic_stride: bool = False
) -> list[Statement]:
    """The forward tree and every closed form of a multilinear layer, for one set of fixed
    values (the stride), all other sizes symbolic; or, with ``symbolic_stride``, the
    stride symbolic too, factored out by ``derive.stride``."""
    definition = layer.definition
    shapes = {item.name: tuple(item.axes) for item in layer.inputs}
    meaning = TreeMeaning(shapes, dict(layer.forward), values)
    out_shape = meaning.shape(ir.Operand(layer.output))
    extents: dict = {}
    stride_context: list[Constraint] = []
    if symbolic_stride:
        out_shape, extents, stride_context, names = _decimated_shape(out_shape, STRIDE)
        meaning.named_extents = names
    meaning.operand_shapes[layer.upstream] = out_shape

    def factored(terms, renamed_free=None):
        if not symbolic_stride:
            return list(terms)
        return [
            factor_stride(t, STRIDE, extents, tuple(renamed_free or ()), renamed_free)
            for t in terms
        ]

    base_context: list[Constraint] = [("ge", d - 1) for d in size_dims(layer)] + stride_context
    for requirement in layer.requirements:
        more = relational_constraints(requirement.condition.xreplace(meaning.values))
        if more is None:
            return []  # these fixed values are not a valid configuration
        base_context += more

    arrays = {item.latex: (item.name, tuple(item.axes)) for item in layer.inputs}
    if isinstance(definition, IndexDefinition):
        meanings = {label: (node, meaning) for label, node in definition.meanings.items()}
        rhs = definition.rhs.xreplace(meaning.values)
    elif hasattr(definition, "model"):  # an equation layer
        rhs = None
    else:  # a CustomDefinition with an index form (max pooling)
        meanings = {}
        for label, node in definition.indicators.items():
            name, shape, _ = meaning.indicator(node)
            arrays[label] = (name, shape)
        rhs = definition.index_form.xreplace(meaning.values)
    if rhs is None:
        defined, outputs = equation_terms(definition.model)
    else:
        outputs = tuple(definition.indices)
        defined = expression_terms(rhs, arrays, meanings)
    sizes_text = _describe_sizes(layer, values)

    statements = []
    forward_tree = dict(layer.forward)[layer.output]
    closed = meaning.element(forward_tree, outputs)
    defined_in_range = [t.constrained(*within(outputs, out_shape)) for t in defined]
    free = outputs
    if symbolic_stride:
        # Output indices read as s*i on either side are renamed t = s*i (proven for every t).
        strided = [
            o for o in outputs
            if any(_times_stride(t, o) for t in defined_in_range + closed)
        ]  # fmt: skip
        renamed = {o: fresh(f"{o}_dilated") for o in strided}
        defined_in_range, closed = factored(defined_in_range, renamed), factored(closed, renamed)
        free = tuple(renamed.get(o, o) for o in outputs)
    statements.append(
        Statement(
            "forward",
            sizes_text,
            _with_fixed(prove_sums(defined_in_range, closed, free, base_context), values),
            _fixed(values),
        )
    )
    for gradient in layer.gradients:
        rank = len(layer.input(gradient.wrt).axes)
        index = tuple(fresh(f"{gradient.wrt}{k}") for k in range(rank))
        derived = chain_rule_terms(
            defined,
            outputs,
            out_shape,
            None if layer.kind == "loss" else layer.upstream,
            gradient.wrt,
            index,
        )
        for case in gradient.cases:
            condition = case.condition.xreplace(meaning.values)
            more = relational_constraints(condition)
            label = f"{gradient.name} ({case.name})" if case.name else gradient.name
            if more is None:
                continue  # the case never applies with these values
            case_values = dict(values)
            # An equality that fixes a size (size = stride) is put in, so that the case's
            # tree is affine: a number, or with a symbolic stride the stride itself.
            for kind, expr in more:
                symbols = sympy.sympify(expr).free_symbols - {STRIDE}
                if kind == "eq" and len(symbols) == 1:
                    (symbol,) = symbols
                    solution = sympy.solve(expr, symbol)
                    if len(solution) == 1 and (solution[0].is_Integer or solution[0] == STRIDE):
                        case_values[symbol] = solution[0]
            case_meaning = TreeMeaning(meaning.operand_shapes, dict(layer.forward), case_values)
            case_meaning.named_extents = {
                sympy.sympify(e).xreplace(case_meaning.values): name
                for e, name in meaning.named_extents.items()
            }
            closed = factored(case_meaning.element(case.tree, index))
            fixed = {k: sympy.sympify(v) for k, v in case_values.items()}
            context = [(kind, sympy.sympify(e).xreplace(fixed)) for kind, e in base_context + more]
            derived_here = factored([t.substituted(fixed) for t in derived])
            outcome = prove_sums(derived_here, closed, index, context)
            if outcome.status == "proven":
                # Equal elements inside the gradient's shape; the tree's shape must be it too.
                expected = [
                    sympy.sympify(e).xreplace(fixed) for e in layer.input(gradient.wrt).axes
                ]
                actual = [
                    in_dilated_sizes(e, STRIDE, extents) for e in case_meaning.shape(case.tree)
                ]
                outcome = same_shape(
                    expected, actual, _problem(derived_here + closed, index, context)
                )
            numbers = {k: v for k, v in case_values.items() if sympy.sympify(v).is_Integer}
            statements.append(
                Statement(
                    label,
                    _describe_sizes(layer, case_values),
                    _with_fixed(outcome, numbers),
                    _fixed(numbers),
                )
            )
    return statements


def _times_stride(term, variable) -> bool:
    expressions = [e for r in term.reads for e in r.index] + [e for _, e in term.constraints]
    return any(
        part.has(variable) and part.has(STRIDE)
        for e in expressions
        for part in sympy.Add.make_args(sympy.expand(sympy.sympify(e)))
    )


def _strided_statements(layer: Layer) -> list[Statement]:
    """A layer without a stride once; one with a stride for a symbolic stride first
    (``derive.stride``), and what that does not prove for each stride 1 to 4 on its own.
    A refutation is only trusted from the fixed strides: with the stride factored out,
    the dilated extent is not tied to a multiple of s, so a difference found there may
    lie where the dilated array is zero."""
    if not any(p.symbol == STRIDE for p in layer.params):
        return _index_set_statements(layer, {})
    try:
        symbolic = _index_set_statements(layer, {}, symbolic_stride=True)
    except NotAffine:
        symbolic = []
    proven = [s for s in symbolic if s.outcome.status == "proven"]
    done = {s.what for s in proven}
    statements = list(proven)
    for stride in STRIDES:
        statements += [
            s for s in _index_set_statements(layer, {STRIDE: stride}) if s.what not in done
        ]
    return statements


def _with_fixed(outcome: Outcome, values: dict) -> Outcome:
    """A counterexample names the fixed values too (the stride it was found at)."""
    if outcome.counterexample is not None:
        outcome.counterexample.sizes.update({s.name: int(v) for s, v in values.items()})
    return outcome


def prove_layer(layer: Layer) -> LayerProof:
    """Prove ``layer``'s closed forms for symbolic sizes, by whichever route fits."""
    start = time.perf_counter()
    result = LayerProof(layer.name, "sweep")
    from derive import reshape, rows

    reason = ""
    if (
        isinstance(layer.definition, IndexDefinition)
        or getattr(layer.definition, "index_form", None) is not None
        or hasattr(layer.definition, "model")  # an equation layer
    ):
        try:
            result = LayerProof(layer.name, "index sets", _strided_statements(layer))
        except NotAffine as error:
            reason = str(error)
        except (isl.Error, TypeError, ValueError) as error:
            # Not a proof and not a refutation: the sweep decides, and the output says why.
            reason = (
                f"the all-sizes prover could not read this layer ({type(error).__name__}: {error})"
            )
        if result.route == "sweep":
            try:
                result = LayerProof(layer.name, "pointwise", rows.statements(layer))
            except NotAffine as error:
                reason = reason or str(error)  # the index-set reason says more
        if result.route == "sweep":
            try:
                result = LayerProof(layer.name, "row-major lemma", reshape.statements(layer))
                result.note = (
                    "its index (hW + w)C + c multiplies sizes, which no decision procedure "
                    "here handles; the mixed-radix lemma proves it once the definition's "
                    "index is recognised as the row-major decoding and the trees as "
                    "Flatten and ReshapeLike"
                )
            except NotAffine:
                pass  # the index-set reason stands
    else:
        reason = "its definition is not an index-level expression: " + _custom_reason(layer)
    if result.route == "sweep":
        result.reason = reason
    elif not result.note and getattr(layer.definition, "indicators", None):
        result.note = (
            "the first-maximum indicator is one more array here, held fixed by the chain rule "
            "(the tie rule); that the code's argmax picks the first maximum is checked on "
            "numbers full of ties by the sweep (`cnnderive verify --layer " + layer.name + "`)"
        )
    result.seconds = time.perf_counter() - start
    return result


def _custom_reason(layer: Layer) -> str:
    try:
        TreeMeaning({i.name: tuple(i.axes) for i in layer.inputs}, dict(layer.forward), {}).element(
            layer.gradients[0].cases[0].tree, ()
        )
    except NotAffine as error:
        return str(error)
    except Exception:  # noqa: BLE001 - only a reason is wanted here
        pass
    return "it is written as code (CustomDefinition)"


# ---------------------------------------------------------------------------
# What was proven, in words
# ---------------------------------------------------------------------------


def _values_text(groups: list[dict[str, int]]) -> str:
    """[{s: 1}, {s: 2}, ...] -> "s = 1, 2, 3, 4"; [{s: 1, k: 1}, ...] -> "k = s = 1, 2, ..."."""
    if not groups or not groups[0]:
        return ""
    names = list(groups[0])
    numbers = [next(iter(g.values())) for g in groups]
    if all(len(set(g.values())) == 1 for g in groups):
        return " = ".join(sorted(names)) + " = " + ", ".join(str(n) for n in numbers)
    return "; ".join(", ".join(f"{k} = {v}" for k, v in g.items()) for g in groups)


def summary(result: LayerProof) -> list[str]:
    """Lines saying plainly what was proven for which sizes (or why not)."""
    if result.route == "sweep":
        return [f"{result.layer}: not proven for all sizes: {result.reason}"]
    lines = []
    by_what: dict[str, list[Statement]] = {}
    for statement in result.statements:
        by_what.setdefault(statement.what, []).append(statement)
    for what, statements in by_what.items():
        failed = [s for s in statements if s.outcome.status != "proven"]
        if failed:
            for s in failed:
                fixed = _values_text([s.fixed]) if s.fixed else ""
                text = f"{result.layer} {what}: {s.outcome.status.upper()}"
                text += f" ({fixed})" if fixed else ""
                if s.outcome.counterexample is not None:
                    c = s.outcome.counterexample
                    sizes = ", ".join(f"{k} {v}" for k, v in c.sizes.items())
                    text += (
                        f": at {sizes}, element {list(c.element)}: derived {c.left}, "
                        f"closed form {c.right}"
                    )
                elif s.outcome.reason:
                    text += f": {s.outcome.reason}"
                lines.append(text)
            continue
        fixed = _values_text([s.fixed for s in statements])
        text = f"{result.layer} {what}: proven for {statements[0].sizes}"
        if result.route == "index sets":
            text += " allowed by the layer's requirements"
        if fixed:
            text += (
                f", with {fixed} (each on its own: the stride could not be factored out of "
                "this form)"
            )
        lines.append(text)
    if result.note:
        lines.append(f"{result.layer}: note: {result.note}")
    return lines


def to_json(result: LayerProof) -> dict:
    return {
        "layer": result.layer,
        "route": result.route,
        "status": result.status,
        "seconds": round(result.seconds, 3),
        "reason": result.reason,
        "note": result.note,
        "statements": [s.to_json() for s in result.statements],
    }
