"""An equation layer as an ordinary ``derive.layer.Layer``: its definition (expanded
element by element from the syntax tree, sharing nothing with the tree interpreters
it checks), the derived forward and gradient trees, the checks on sizes, and a sweep
of sizes to prove them on.  Everything downstream (verify, derive's text, codegen)
then treats it like a catalogue layer."""

from __future__ import annotations

import itertools

import numpy as np
import sympy

from derive import ir
from derive.equation.derivation import FUNCTIONS, UPSTREAM, lower
from derive.equation.model import Model, affine_expr, index_symbol, model_of
from derive.equation.steps import chain_rule_lines, notes
from derive.equation.syntax import Call, Element, EquationError, Node, Number, Reduction
from derive.layer import Definition, Gradient, Input, Layer, Requirement


class first_of_maxima(sympy.Function):
    """1 if the element at ``position`` is the first maximum of ``values`` (row-major
    window order), else 0.  Constant wherever max is differentiable, so its derivative
    is 0; at a tie it picks which element's derivative counts (the catalogue's rule)."""

    @classmethod
    def eval(cls, position, *values):
        if all(v.is_number for v in values):
            best = 0
            for k, value in enumerate(values):
                if value > values[best]:
                    best = k
            return sympy.S.One if int(position) == best else sympy.S.Zero
        return None

    def fdiff(self, argindex=1):
        return sympy.S.Zero


class _MaxOver(sympy.Function):
    """Display only: ``max`` over a reduction's indices, in the definition's LaTeX."""

    def _latex(self, printer, exp=None):
        body, *indices = self.args
        below = ",".join(printer._print(i) for i in indices)
        return r"\max_{%s} %s" % (below, printer.parenthesize(body, 60))


class EquationDefinition(Definition):
    """The equation itself, evaluated element by element on object arrays."""

    def __init__(self, model: Model):
        self.model = model

    @property
    def latex_lines(self) -> tuple[str, ...]:
        model = self.model
        lhs = sympy.IndexedBase(model.output)[tuple(index_symbol(i) for i in model.output_indices)]
        lines = [sympy.latex(sympy.Eq(lhs, display(model.equation.rhs, model), evaluate=False))]
        for name, info in model.arrays.items():
            if info.padding and any(w != 0 for w in info.padding):
                widths = ", ".join(str(w) for w in info.padding)
                lines.append(
                    rf"\tilde{{{name}}} = {name} \text{{ with }} ({widths}) \text{{ zeros added "
                    r"before and after each axis}}"
                )
        return tuple(lines)

    def expand(self, inputs, sizes, shape=None) -> np.ndarray:
        model = self.model
        extents = {
            name: int(sympy.sympify(e).xreplace({s: sympy.Integer(v) for s, v in sizes.items()}))
            for name, e in model.extents.items()
        }
        out_shape = tuple(extents[i] for i in model.output_indices)
        out = np.empty(out_shape, dtype=object)
        for values in itertools.product(*[range(n) for n in out_shape]):
            env = dict(zip(model.output_indices, values))
            out[values] = _element(model.equation.rhs, env, inputs, model, extents)
        return out


def _element(node: Node, env, inputs, model: Model, extents):
    if isinstance(node, Number):
        return sympy.Rational(node.value)
    if isinstance(node, Element):
        info = model.arrays[node.array]
        array = inputs[node.array]
        position = []
        for axis, affine in enumerate(node.indices):
            value = affine.constant + sum(c * env[name] for name, c in affine.coefficients)
            value -= info.padding[axis] if info.padding else 0
            if not 0 <= value < array.shape[axis]:
                return sympy.S.Zero  # a padding zero
            position.append(value)
        return array[tuple(position)]
    if isinstance(node, Reduction):
        bodies = []
        for values in itertools.product(*[range(extents[i]) for i in node.indices]):
            inner = dict(env, **dict(zip(node.indices, values)))
            bodies.append(_element(node.body, inner, inputs, model, extents))
        if node.kind == "sum":
            return sympy.Add(*bodies)
        if node.kind == "mean":
            return sympy.Add(*bodies) / len(bodies)
        return sympy.Add(*[b * first_of_maxima(k, *bodies) for k, b in enumerate(bodies)])
    assert isinstance(node, Call)
    args = [_element(a, env, inputs, model, extents) for a in node.arguments]
    operations = {
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "*": lambda a, b: a * b,
        "/": lambda a, b: a / b,
        "**": lambda a, b: a**b,
        "neg": lambda a: -a,
    }
    if node.function in operations:
        return operations[node.function](*args)
    return FUNCTIONS[node.function](*args)


def display(node: Node, model: Model) -> sympy.Expr:
    """The SymPy expression that typesets ``node``."""
    if isinstance(node, Number):
        return sympy.Rational(node.value)
    if isinstance(node, Element):
        info = model.arrays[node.array]
        name = node.array
        if info.padding and any(w != 0 for w in info.padding):
            name = rf"\tilde{{{node.array}}}"
        return sympy.IndexedBase(name)[tuple(affine_expr(a) for a in node.indices)]
    if isinstance(node, Reduction):
        body = display(node.body, model)
        limits = [(index_symbol(i), 0, model.extents[i] - 1) for i in node.indices]
        if node.kind == "sum":
            return sympy.Sum(body, *limits)
        if node.kind == "mean":
            return sympy.Sum(body, *limits) / sympy.Mul(*[model.extents[i] for i in node.indices])
        return _MaxOver(body, *[index_symbol(i) for i in node.indices])
    args = [display(a, model) for a in node.arguments]
    if node.function == "+":
        return sympy.Add(args[0], args[1], evaluate=False)
    if node.function == "-":
        return sympy.Add(args[0], -args[1], evaluate=False)
    if node.function == "*":
        return sympy.Mul(args[0], args[1], evaluate=False)
    if node.function == "/":
        return args[0] / args[1]
    if node.function == "**":
        return sympy.Pow(args[0], args[1], evaluate=False)
    if node.function == "neg":
        return -args[0]
    return FUNCTIONS[node.function](*args)


# ---------------------------------------------------------------------------
# Sizes to prove on
# ---------------------------------------------------------------------------


def _free_dims(model: Model):
    dims = []
    for info in model.arrays.values():
        for dim in info.dims:
            if dim not in dims:
                dims.append(dim)
    return dims


def _satisfied(model: Model, config) -> bool:
    for condition, _ in model.requirements:
        if not bool(
            sympy.sympify(condition).xreplace({d: sympy.Integer(v) for d, v in config.items()})
        ):
            return False
    return True


def _elements(model: Model, config) -> int:
    """Output elements times reduction terms: the proof's work, roughly."""
    values = {d: sympy.Integer(v) for d, v in config.items()}
    extents = {i: int(sympy.sympify(e).xreplace(values)) for i, e in model.extents.items()}
    return int(np.prod([extents[i] for i in extents]))


def configurations(model: Model, count: int = 8, limit: int = 1500) -> list[dict]:
    """Up to ``count`` valid size assignments, small enough to prove quickly: the smallest
    valid one, one with every length at least 2, and others drawn with a fixed seed."""
    dims = _free_dims(model)
    rng = np.random.default_rng(0)
    found: list[dict] = []
    candidates = [dict.fromkeys(dims, 1), dict.fromkeys(dims, 2), dict.fromkeys(dims, 3)]
    for _ in range(600):
        candidates.append({d: int(rng.integers(1, 6)) for d in dims})
    for candidate in candidates:
        if candidate in found or not _satisfied(model, candidate):
            continue
        if _elements(model, candidate) > limit:
            continue
        found.append(candidate)
        if len(found) >= count:
            break
    if not found:
        # The smallest sizes that pass, searched in order of their total.
        for total in range(len(dims), len(dims) * 9):
            for values in itertools.product(range(1, 10), repeat=len(dims)):
                if sum(values) == total:
                    candidate = dict(zip(dims, values))
                    if _satisfied(model, candidate):
                        return [candidate]
        raise EquationError("no array sizes up to 9 satisfy this equation's range checks")
    return found


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------


def _samples(model: Model):
    def draw(shapes, rng):
        # Small integers: windows tie often, and the first-maximum rule is what is proven.
        return {
            name: rng.integers(0, 3, size=shape).astype(object) for name, shape in shapes.items()
        }

    return draw


def layer_from_model(name: str, model: Model, named: bool = True) -> Layer:
    """The layer ``model`` defines; ``named=False`` keeps the generic index-space closed
    forms even where a rule of ``derive.equation.named`` would name them."""
    lowered = lower(model, named)
    inputs = tuple(
        Input(array, tuple(info.dims), array, f"array {array} of the equation ({info.rank}-D)")
        for array, info in model.arrays.items()
    )
    requirements = tuple(
        Requirement(condition, f"{message}") for condition, message in model.requirements
    )
    configs = configurations(model)
    has_max = any(r.kind == "max" for r in model.reductions)
    gradients = tuple(
        Gradient(gradient_name, array, cases) for gradient_name, array, cases in lowered.gradients
    )
    return Layer(
        name=name,
        title=f"{name}: {model.equation.text.strip()}",
        kind="layer",
        module=name,
        prefix="",
        inputs=inputs,
        params=(),
        output="out",
        output_latex=model.output,
        definition=EquationDefinition(model),
        forward=tuple(lowered.forward),
        gradients=gradients,
        requirements=requirements,
        configurations=lambda: configs,
        example=configs[0] if len(configs) == 1 else _example(model, configs),
        chain_rule=chain_rule_lines(model),
        notes=notes(model, generic=_has_generic(gradients))
        + tuple(
            f"Named closed form: the reduction is {rule}. The trees above are that rule's "
            "primitives, proven like any other closed form."
            for rule in lowered.named
        ),
        samples=_samples(model) if has_max else None,
        upstream=UPSTREAM,
        gradient_dict=True,
    )


def _has_generic(gradients) -> bool:
    generic = (ir.ScatterContract, ir.RouteView, ir.Contract)
    return any(
        isinstance(node, generic) for g in gradients for c in g.cases for node in c.tree.walk()
    )


def _example(model: Model, configs):
    """The smallest configuration in which every length is at least 2, if any."""
    wide = [c for c in configs if all(v >= 2 for v in c.values())]
    pool = wide or configs
    return min(pool, key=lambda c: (_elements(model, c), sorted(c.values())))


def layer_from_equation(name: str, text: str) -> Layer:
    """The layer that ``text`` defines, named ``name`` (a Python identifier)."""
    if not name.isidentifier() or name.startswith("_"):
        raise EquationError(
            f"layer name {name!r} must be a Python identifier not starting with '_', e.g. my_conv"
        )
    return layer_from_model(name, model_of(text))


def derived_closed_forms(text: str, parameters, dims, order):
    """The forward bindings and the gradients (in ``order`` of the arrays) that the
    derivation finds for ``text``: how the catalogue's entries get their closed forms
    from their definitions instead of writing them by hand."""
    lowered = lower(model_of(text, parameters, dims))
    by_array = {array: Gradient(name, array, cases) for name, array, cases in lowered.gradients}
    return tuple(lowered.forward), tuple(by_array[array] for array in order if array in by_array)
