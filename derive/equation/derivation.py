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
from derive.equation.syntax import Affine, Call, Element, Node, Number, Reduction
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
    gradients: list[tuple[str, str, ir.Node]]  # (gradient name, array, tree)


class Lowering:
    """Builds the forward bindings and the gradient trees of one equation."""

    def __init__(self, model: Model):
        self.model = model
        self.out = model.output_indices
        self.placeholders: dict[int, sympy.Symbol] = {}  # id(syntax node) -> symbol
        self.values: dict[sympy.Symbol, ir.Node] = {}  # placeholder -> forward value
        self.forward: list[tuple[str, ir.Node]] = []
        self.sources: dict[str, ir.Node] = {}
        self.element_of: dict[sympy.Symbol, Element] = {}
        # reduction placeholder -> (syntax node, scope, body expression, forward binding)
        self.reduction_info: dict[sympy.Symbol, tuple] = {}
        for name, info in model.arrays.items():
            if info.padding and any(w != 0 for w in info.padding):
                padded = f"{name}_padded"
                self.forward.append((padded, ir.ZeroPad(ir.Operand(name), tuple(info.padding))))
                self.sources[name] = ir.Operand(padded)
            else:
                self.sources[name] = ir.Operand(name)

    # -- helpers -----------------------------------------------------------------
    def extents(self, indices) -> tuple[sympy.Expr, ...]:
        return tuple(self.model.extents[i] for i in indices)

    def source_shape(self, array: str) -> tuple[sympy.Expr, ...]:
        info = self.model.arrays[array]
        return tuple(info.padded_extent(axis) for axis in range(info.rank))

    def view(self, element: Element, indices: tuple[str, ...]) -> ir.IndexView:
        return ir.IndexView(
            self.sources[element.array], index_map(element.indices), indices, self.extents(indices)
        )

    @staticmethod
    def used(element: Element, scope: tuple[str, ...]) -> tuple[str, ...]:
        names = {n for a in element.indices for n in a.indices}
        return tuple(n for n in scope if n in names)

    def placeholder(self, node: Node, label: str) -> sympy.Symbol:
        symbol = sympy.Symbol(f"{label}{len(self.placeholders)}", real=True)
        self.placeholders[id(node)] = symbol
        return symbol

    def expression(self, node: Node, scope: tuple[str, ...]) -> sympy.Expr:
        """The SymPy form of ``node``, each element and reduction a placeholder symbol."""
        if isinstance(node, Number):
            return sympy.Rational(node.value)
        if isinstance(node, Element):
            symbol = self.placeholder(node, node.array.lower() + "_")
            self.values[symbol] = self.view(node, scope)
            self.element_of[symbol] = node
            return symbol
        if isinstance(node, Reduction):
            return self.reduction(node, scope)
        assert isinstance(node, Call)
        args = [self.expression(a, scope) for a in node.arguments]
        if node.function == "+":
            return args[0] + args[1]
        if node.function == "-":
            return args[0] - args[1]
        if node.function == "*":
            return args[0] * args[1]
        if node.function == "/":
            return args[0] / args[1]
        if node.function == "**":
            return args[0] ** args[1]
        if node.function == "neg":
            return -args[0]
        return FUNCTIONS[node.function](args[0])

    # -- forward -----------------------------------------------------------------
    def reduction(self, node: Reduction, scope: tuple[str, ...]) -> sympy.Symbol:
        inner = scope + node.indices
        number = len(self.forward)
        name = f"{node.kind}{number}"
        symbol = self.placeholder(node, node.kind + "_")
        if node.kind == "max":
            element = node.body
            kept_extents = self.extents(scope + node.indices)
            position = ir.ArgmaxView(
                self.sources[element.array],
                index_map(element.indices),
                scope,
                node.indices,
                kept_extents,
            )
            self.forward.append((f"{name}_position", position))
            value = ir.TakeView(
                self.sources[element.array],
                ir.Operand(f"{name}_position"),
                index_map(element.indices),
                scope,
                node.indices,
                kept_extents,
            )
        else:
            body = self.expression(node.body, inner)
            factors = self.monomial(body)
            if factors is not None:
                coefficient, elements = factors
                views = [self.minimal_view(e, inner) for e in elements]
                value = ir.Contract(tuple(v for v, _ in views), tuple(s for _, s in views), scope)
                if coefficient != 1:
                    value = ir.pointwise(coefficient * sympy.Symbol("t"), t=value)
            else:
                arguments = {str(s): self.values[s] for s in body.free_symbols}
                axes = tuple(range(len(scope), len(inner)))
                value = ir.Sum(ir.pointwise(body, **arguments), axes)
            if node.kind == "mean":
                value = ir.pointwise(sympy.Symbol("t") / self.count(node), t=value)
        self.forward.append((name, value))
        self.values[symbol] = ir.Operand(name)
        self.reduction_info[symbol] = (node, scope, body if node.kind != "max" else None, name)
        return symbol

    def count(self, node: Reduction) -> sympy.Expr:
        return sympy.Mul(*self.extents(node.indices))

    def monomial(self, body: sympy.Expr):
        """(coefficient, elements) when ``body`` is a constant times distinct elements."""
        coefficient, factors = sympy.S.One, []
        for factor in sympy.Mul.make_args(body):
            if factor.is_number:
                coefficient *= factor
            elif factor.is_Symbol and factor in self.values and factor not in factors:
                factors.append(factor)
            else:
                return None
        return coefficient, factors

    def minimal_view(self, symbol: sympy.Symbol, scope) -> tuple[ir.Node, tuple[str, ...]]:
        """The element's view over just the indices it uses."""
        node = self.element_of[symbol]
        indices = self.used(node, scope)
        return self.view(node, indices), indices

    def lower(self) -> Lowered:
        rhs = self.expression(self.model.equation.rhs, self.out)
        if rhs in self.reduction_info and self.forward[-1][0] == self.values[rhs].name:
            # The output is the reduction itself: bind it as "out" rather than copy it.
            _, tree = self.forward.pop()
            self.forward.append(("out", tree))
            self.values[rhs] = ir.Operand("out")
            node, scope, body, _ = self.reduction_info[rhs]
            self.reduction_info[rhs] = (node, scope, body, "out")
        else:
            arguments = {str(s): self.values[s] for s in rhs.free_symbols}
            self.forward.append(("out", ir.pointwise(rhs, **arguments)))
        return Lowered(self.forward, self.backward(rhs))

    # -- backward ----------------------------------------------------------------
    def backward(self, rhs: sympy.Expr) -> list[tuple[str, str, ir.Node]]:
        contributions: dict[str, list[ir.Node]] = {name: [] for name in self.model.arrays}
        upstream = ir.Operand(UPSTREAM)
        delta = sympy.Symbol("delta", real=True)
        for symbol in sorted(rhs.free_symbols, key=lambda s: s.name):
            derivative = sympy.diff(rhs, symbol)
            if derivative == 1:
                g = upstream
            else:
                arguments = {str(s): self.values[s] for s in derivative.free_symbols}
                g = ir.pointwise(delta * derivative, delta=upstream, **arguments)
            if symbol in self.reduction_info:
                self.reduction_backward(symbol, g, contributions)
            else:
                element = self.element_of[symbol]
                contributions[element.array].append(
                    ir.ScatterContract(
                        (g,),
                        (self.out,),
                        index_map(element.indices),
                        self.out,
                        self.extents(self.out),
                        self.source_shape(element.array),
                    )
                )
        gradients = []
        for array, parts in contributions.items():
            info = self.model.arrays[array]
            if not parts:
                continue
            total = parts[0]
            if len(parts) > 1:
                names = [f"part{k}" for k in range(len(parts))]
                total = ir.pointwise(
                    sympy.Add(*[sympy.Symbol(n) for n in names]), **dict(zip(names, parts))
                )
            if info.padding and any(w != 0 for w in info.padding):
                total = ir.CropAxes(total, tuple(info.padding), tuple(info.dims))
            gradients.append((f"d{array}", array, total))
        return gradients

    def reduction_backward(self, symbol, g: ir.Node, contributions) -> None:
        node, scope, body, name = self.reduction_info[symbol]
        inner = scope + node.indices
        if node.kind == "max":
            element = node.body
            contributions[element.array].append(
                ir.RouteView(
                    g,
                    ir.Operand(self.max_position(node)),
                    index_map(element.indices),
                    scope,
                    node.indices,
                    self.extents(inner),
                    self.source_shape(element.array),
                )
            )
            return
        if node.kind == "mean":
            g = ir.pointwise(sympy.Symbol("g") / self.count(node), g=g)
        factors = self.monomial(body)
        for element_symbol in sorted(body.free_symbols, key=lambda s: s.name):
            element = self.element_of[element_symbol]
            if factors is not None:
                coefficient, elements = factors
                weighted = (
                    g if coefficient == 1 else ir.pointwise(coefficient * sympy.Symbol("g"), g=g)
                )
                others = [self.minimal_view(e, inner) for e in elements if e != element_symbol]
                tree = ir.ScatterContract(
                    (weighted, *[v for v, _ in others]),
                    (scope, *[s for _, s in others]),
                    index_map(element.indices),
                    inner,
                    self.extents(inner),
                    self.source_shape(element.array),
                )
            else:
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
                    self.source_shape(element.array),
                )
            contributions[element.array].append(tree)

    def max_position(self, node) -> str:
        for binding, tree in self.forward:
            if isinstance(tree, ir.ArgmaxView) and tree.reduced == node.indices:
                return binding
        raise KeyError("max position")


def lower(model: Model) -> Lowered:
    return Lowering(model).lower()
