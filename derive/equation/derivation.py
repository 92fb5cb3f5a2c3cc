"""The adjoint of an equation layer, derived and lowered to index-space primitives.

For an output ``Z[I] = f(t_1, ..., t_m)``, where each ``t`` is an array element read
through an affine map or a reduction over such elements, the chain rule gives

    dA[a] = sum over every index value I whose read of A lands on a
            of  dZ[I_out] * (partial derivative of the body with respect to that read)

which is the *scatter* form: every output that read ``A[a]`` adds to ``dA[a]``.  The
code runs it as a *gather*: for each value of the indices that share an array axis
with a longer one (the kernel offsets), the positions written form one strided block,
on which the remaining indices are solved for exactly (``h = s*i + u`` gives
``i = (h - u) / s`` on the residue class ``h = u (mod s)``); see ``gather_steps``
for the text a derivation prints.

The pointwise parts (the functions, products and quotients around and inside the
reductions) are differentiated by SymPy.  Every tree built here is proven like the
catalogue's closed forms (``derive.verify``) before anything is generated from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from derive import ir
from derive.equation.model import Model
from derive.equation.named import name_reduction
from derive.equation.syntax import Affine, Element, Node, Number, Reduction
from derive.functions import sigmoid

UPSTREAM = "dout"


def relu(z):
    return sympy.Piecewise((z, z > 0), (0, True))


FUNCTIONS = {
    "exp": sympy.exp,
    "log": sympy.log,
    "tanh": sympy.tanh,
    "sigmoid": sigmoid,
    "relu": relu,
    "sqrt": sympy.sqrt,
    "abs": sympy.Abs,
}


def index_map(affine_list: tuple[Affine, ...]) -> ir.IndexMap:
    return ir.IndexMap(
        tuple(tuple((name, int(c)) for name, c in a.coefficients) for a in affine_list),
        tuple(int(a.constant) for a in affine_list),
    )


def _identity_map(indices: tuple[str, ...]) -> ir.IndexMap:
    return ir.IndexMap(tuple(((name, 1),) for name in indices), tuple(0 for _ in indices))


@dataclass
class Lowered:
    forward: list[tuple[str, ir.Node]]
    gradients: list[tuple[str, str, tuple[ir.Case, ...]]]  # (gradient name, array, cases)
    named: list[str]  # the rules that named a reduction, for the derivation


@dataclass
class _Contribution:
    """One read's share of an array's gradient: its cases, and whether they are in the
    padded array's coordinates (cropped before they are added up)."""

    cases: tuple[ir.Case, ...]
    padded: bool


class Lowering:
    """Builds the forward bindings and the gradient trees of one equation.

    With ``named`` (the default), reductions that a rule of ``derive.equation.named``
    recognises get that rule's primitives; otherwise, and always with ``named=False``,
    the generic index-space primitives."""

    def __init__(self, model: Model, named: bool = True):
        self.model = model
        self.named = named
        self.out = model.output_indices
        self.forward: list[tuple[str, ir.Node]] = []
        self.taken: set[str] = set(model.arrays) | {UPSTREAM, "out"}
        self.padded_sources: dict[str, ir.Operand] = {}
        self.values: dict[sympy.Symbol, ir.Node] = {}  # placeholder -> forward value
        self.element_of: dict[sympy.Symbol, tuple[Element, tuple[str, ...]]] = {}
        # reduction placeholder -> (syntax node, scope, body expression, named form or None)
        self.reduction_info: dict[sympy.Symbol, tuple] = {}
        self.rules: list[str] = []
        self.symbol_names: set[str] = {UPSTREAM}
        self.binding_of: dict[sympy.Symbol, str] = {}  # reduction placeholder -> forward name

    # -- names and sources ---------------------------------------------------------
    def unique(self, base: str) -> str:
        name, number = base, 2
        while name in self.taken:
            name, number = f"{base}{number}", number + 1
        self.taken.add(name)
        return name

    def placeholder(self, base: str) -> sympy.Symbol:
        """A fresh symbol for a value in the SymPy form of the equation (its own names:
        the emitter makes variable names unique)."""
        name, number = base, 2
        while name in self.symbol_names:
            name, number = f"{base}{number}", number + 1
        self.symbol_names.add(name)
        return sympy.Symbol(name, real=True)

    def padded(self, element: Element) -> bool:
        return bool(element.padding) and any(w != 0 for w in element.padding)

    def source(self, element: Element) -> ir.Node:
        """The array a read indexes: the input, or its zero-padded copy (made once)."""
        if not self.padded(element):
            return ir.Operand(element.array)
        if element.array not in self.padded_sources:
            name = self.unique(f"{element.array}_padded")
            self.forward.append(
                (name, ir.ZeroPad(ir.Operand(element.array), tuple(element.padding)))
            )
            self.padded_sources[element.array] = ir.Operand(name)
        return self.padded_sources[element.array]

    def extents(self, indices) -> tuple[sympy.Expr, ...]:
        return tuple(self.model.extents[i] for i in indices)

    def source_shape(self, element: Element) -> tuple[sympy.Expr, ...]:
        info = self.model.arrays[element.array]
        return tuple(info.padded_extent(axis) for axis in range(info.rank))

    # -- reads -------------------------------------------------------------------
    def trailing(self, element: Element, scope) -> bool:
        """Whether the read is the array itself lined up with the last axes of ``scope``
        (``b[o]`` in ``Z[n,i,j,o]``): NumPy's broadcasting then reads it as it is."""
        names = [a.standalone() for a in element.indices]
        return (
            self.named
            and not self.padded(element)
            and None not in names
            and tuple(names) == tuple(scope[len(scope) - len(names) :])
        )

    def view(self, element: Element, indices: tuple[str, ...]) -> ir.Node:
        return ir.IndexView(
            self.source(element), index_map(element.indices), indices, self.extents(indices)
        )

    def minimal_view(self, symbol: sympy.Symbol, scope) -> tuple[ir.Node, tuple[str, ...]]:
        """The element's view over just the indices it uses, in the order of ``scope``."""
        element, _ = self.element_of[symbol]
        names = {n for a in element.indices for n in a.indices}
        indices = tuple(n for n in scope if n in names)
        return self.view(element, indices), indices

    # -- the expression --------------------------------------------------------------
    def expression(self, node: Node, scope: tuple[str, ...]) -> sympy.Expr:
        """The SymPy form of ``node``, each element and reduction a placeholder symbol."""
        if isinstance(node, Number):
            return sympy.Rational(node.value)
        if isinstance(node, Element):
            symbol = self.placeholder(node.array.lower())
            if self.trailing(node, scope):
                self.values[symbol] = ir.Operand(node.array)
            else:
                self.values[symbol] = self.view(node, scope)
            self.element_of[symbol] = (node, scope)
            return symbol
        if isinstance(node, Reduction):
            return self.reduction(node, scope)
        args = [self.expression(a, scope) for a in node.arguments]
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

    def reduction(self, node: Reduction, scope: tuple[str, ...]) -> sympy.Symbol:
        inner = scope + node.indices
        symbol = self.placeholder("z")
        named = name_reduction(self.model, node, scope, self.unique) if self.named else None
        body, position = None, None
        if named is not None:
            self.forward += named.bindings
            value = named.value
            self.rules.append(named.rule)
        elif node.kind == "max":
            element = node.body
            position = self.unique(f"{symbol.name}_position")
            read = index_map(element.indices)
            self.forward.append(
                (
                    position,
                    ir.ArgmaxView(
                        self.source(element), read, scope, node.indices, self.extents(inner)
                    ),
                )
            )
            value = ir.TakeView(
                self.source(element),
                ir.Operand(position),
                read,
                scope,
                node.indices,
                self.extents(inner),
            )
        else:
            body = self.expression(node.body, inner)
            terms = self.polynomial(body)
            if terms is not None:
                value = self.contractions(terms, scope, inner)
            else:
                arguments = {str(s): self.values[s] for s in body.free_symbols}
                value = ir.Sum(
                    ir.pointwise(body, **arguments), tuple(range(len(scope), len(inner)))
                )
            if node.kind == "mean":
                value = ir.pointwise(sympy.Symbol("t") / self.count(node), t=value)
        binding = self.unique(symbol.name)
        self.binding_of[symbol] = binding
        self.forward.append((binding, value))
        self.values[symbol] = ir.Operand(binding)
        self.reduction_info[symbol] = (node, scope, body, named, position)
        return symbol

    def count(self, node: Reduction) -> sympy.Expr:
        return sympy.Mul(*self.extents(node.indices))

    def polynomial(self, body: sympy.Expr):
        """``body`` as a sum of monomials, each (coefficient, elements with repeats), when it
        is a polynomial in the elements without a constant term; else None.  Each monomial
        is then one contraction: ``sum[f]((X[n,f] - Y[m,f])**2)`` becomes three, and no
        array over all of n, m and f is ever made."""
        elements = sorted(body.free_symbols, key=lambda s: s.name)
        if not elements or any(e not in self.element_of for e in elements):
            return None
        if not body.is_polynomial(*elements):
            return None
        poly = sympy.Poly(sympy.expand(body), *elements)
        terms = []
        for powers, coefficient in poly.terms():
            factors = [e for e, power in zip(elements, powers) for _ in range(power)]
            if not factors or not coefficient.is_number:
                return None
            terms.append((coefficient, factors))
        return terms if len(terms) <= 8 else None

    def contractions(self, terms, scope, inner) -> ir.Node:
        """The sum over the reduced indices of a polynomial body: one contraction per
        monomial, each broadcast back to ``scope`` when it leaves out some of its indices."""
        parts = []
        for coefficient, factors in terms:
            views = [self.minimal_view(e, inner) for e in factors]
            used = {n for _, subscript in views for n in subscript}
            present = tuple(n for n in scope if n in used)
            value = ir.Contract(tuple(v for v, _ in views), tuple(s for _, s in views), present)
            if present != scope:
                value = ir.IndexView(value, _identity_map(present), scope, self.extents(scope))
            parts.append((coefficient, value))
        if len(parts) == 1 and parts[0][0] == 1:
            return parts[0][1]
        names = [f"t{k}" for k in range(len(parts))]
        total = sympy.Add(*[c * sympy.Symbol(n) for (c, _), n in zip(parts, names)])
        return ir.pointwise(total, **{n: value for (_, value), n in zip(parts, names)})

    def lower(self) -> Lowered:
        rhs = self.expression(self.model.equation.rhs, self.out)
        if rhs in self.reduction_info:
            # The output is the reduction itself: its binding becomes "out".
            number = next(
                k for k, (name, _) in enumerate(self.forward) if name == self.binding_of[rhs]
            )
            self.forward[number] = ("out", self.forward[number][1])
            self.values[rhs] = ir.Operand("out")
        else:
            self.inline_unneeded(rhs)
            arguments = {str(s): self.values[s] for s in rhs.free_symbols}
            self.forward.append(("out", ir.pointwise(rhs, **arguments)))
        return Lowered(self.forward, self.backward(rhs), self.rules)

    def inline_unneeded(self, rhs: sympy.Expr) -> None:
        """A reduction whose value no derivative of the output reads (``z`` in ``b + z``)
        is computed inside the output's expression instead of kept for the backward pass."""
        needed = set()
        for symbol in rhs.free_symbols:
            needed |= sympy.diff(rhs, symbol).free_symbols
        for symbol in [s for s in rhs.free_symbols if s in self.reduction_info]:
            if symbol in needed:
                continue
            binding = self.binding_of[symbol]
            number = next(k for k, (name, _) in enumerate(self.forward) if name == binding)
            _, tree = self.forward.pop(number)
            self.values[symbol] = tree

    # -- backward ----------------------------------------------------------------
    def backward(self, rhs: sympy.Expr) -> list[tuple[str, str, tuple[ir.Case, ...]]]:
        contributions: dict[str, list[_Contribution]] = {name: [] for name in self.model.arrays}
        upstream = ir.Operand(UPSTREAM)
        delta = sympy.Symbol(UPSTREAM, real=True)
        for symbol in sorted(rhs.free_symbols, key=lambda s: s.name):
            derivative = sympy.diff(rhs, symbol)
            if derivative == 1:
                g = upstream
            else:
                arguments = {str(s): self.values[s] for s in derivative.free_symbols}
                g = ir.pointwise(delta * derivative, **{UPSTREAM: upstream}, **arguments)
            if symbol in self.reduction_info:
                self.reduction_backward(symbol, g, contributions)
            else:
                element, scope = self.element_of[symbol]
                contributions[element.array].append(self.read_adjoint(element, scope, g))
        gradients = []
        for array, parts in contributions.items():
            if parts:
                gradients.append((f"d{array}", array, self.total(array, parts)))
        return gradients

    def read_adjoint(self, element: Element, scope, g: ir.Node) -> _Contribution:
        """The gradient of a read outside any reduction, given the gradient ``g`` of its value."""
        if self.trailing(element, scope):
            leading = tuple(range(len(scope) - len(element.indices)))
            tree = ir.Sum(g, leading) if leading else g
            along = ", ".join(scope[: len(leading)])
            name = f"sum of δ over {along}, the axes {element.array} is repeated along"
            return _Contribution((ir.Case(tree, name=name if leading else "δ itself"),), False)
        tree = ir.ScatterContract(
            (g,),
            (scope,),
            index_map(element.indices),
            scope,
            self.extents(scope),
            self.source_shape(element),
        )
        return _Contribution((ir.Case(tree, name=_generic_name(tree)),), self.padded(element))

    def reduction_backward(self, symbol, g: ir.Node, contributions) -> None:
        node, scope, body, named, position = self.reduction_info[symbol]
        inner = scope + node.indices
        if named is not None:
            for array, cases in named.gradients(g).items():
                contributions[array].append(_Contribution(cases, False))
            return
        if node.kind == "max":
            element = node.body
            tree = ir.RouteView(
                g,
                ir.Operand(position),
                index_map(element.indices),
                scope,
                node.indices,
                self.extents(inner),
                self.source_shape(element),
            )
            contributions[element.array].append(
                _Contribution(
                    (ir.Case(tree, name="each δ routed to the first maximum of its window"),),
                    self.padded(element),
                )
            )
            return
        if node.kind == "mean":
            g = ir.pointwise(sympy.Symbol("g") / self.count(node), g=g)
        terms = self.polynomial(body)
        if terms is not None:
            for coefficient, factors in terms:
                for element_symbol in dict.fromkeys(factors):
                    element, _ = self.element_of[element_symbol]
                    weight = coefficient * factors.count(element_symbol)
                    others = list(factors)
                    others.remove(element_symbol)
                    views = [self.minimal_view(e, inner) for e in others]
                    weighted = g if weight == 1 else ir.pointwise(weight * sympy.Symbol("g"), g=g)
                    tree = ir.ScatterContract(
                        (weighted, *[v for v, _ in views]),
                        (scope, *[s for _, s in views]),
                        index_map(element.indices),
                        inner,
                        self.extents(inner),
                        self.source_shape(element),
                    )
                    contributions[element.array].append(
                        _Contribution(
                            (ir.Case(tree, name=_generic_name(tree)),), self.padded(element)
                        )
                    )
            return
        for element_symbol in sorted(body.free_symbols, key=lambda s: s.name):
            element, _ = self.element_of[element_symbol]
            derivative = sympy.diff(body, element_symbol)
            spread = ir.IndexView(g, _identity_map(scope), inner, self.extents(inner))
            arguments = {str(s): self.values[s] for s in derivative.free_symbols}
            local = ir.pointwise(
                sympy.Symbol("g_spread") * derivative, g_spread=spread, **arguments
            )
            tree = ir.ScatterContract(
                (local,),
                (inner,),
                index_map(element.indices),
                inner,
                self.extents(inner),
                self.source_shape(element),
            )
            contributions[element.array].append(
                _Contribution((ir.Case(tree, name=_generic_name(tree)),), self.padded(element))
            )

    def total(self, array: str, parts: list[_Contribution]) -> tuple[ir.Case, ...]:
        """An array's gradient: its reads' shares, cropped where padded, added up."""
        info = self.model.arrays[array]

        def unpadded(tree, padded):
            if not padded:
                return tree
            return ir.CropAxes(tree, tuple(info.padding), tuple(info.dims))

        if len(parts) == 1:
            part = parts[0]
            if not part.padded:
                return part.cases
            (case,) = part.cases
            cropped = unpadded(case.tree, True)
            return (
                ir.Case(
                    cropped,
                    name="the adjoint of every read of the padded array, cropped by the padding",
                ),
            )
        # Several reads: each contributes its unconditional (last) case.
        names = [f"part{k}" for k in range(len(parts))]
        trees = [unpadded(part.cases[-1].tree, part.padded) for part in parts]
        tree = ir.pointwise(sympy.Add(*[sympy.Symbol(n) for n in names]), **dict(zip(names, trees)))
        return (ir.Case(tree, name="the sum of the adjoints of every read of the array"),)


def _generic_name(tree) -> str:
    """What a generic closed form does, in words, for the derivation and the docstrings."""
    if isinstance(tree, ir.ScatterContract) and any(len(axis) > 1 for axis in tree.write.axes):
        return "the adjoint of the read: each kernel offset's share added as one strided block"
    return "the adjoint of the read: a contraction over the indices the array does not use"


def lower(model: Model, named: bool = True) -> Lowered:
    return Lowering(model, named).lower()
