"""The NumPy reading of the closed-form trees: each tree becomes Python statements.

A primitive node becomes a call of the function of the same name in
``generated/_kernels.py``; a pointwise node becomes a NumPy expression printed by
``codegen.printer``; a node used twice in one function is computed once.
Nothing here knows any gradient: it only translates trees that derive/ proved.
"""

from __future__ import annotations

import keyword
from collections import Counter
from dataclasses import dataclass, field, fields

import sympy

from codegen.printer import array_code, integer_code
from codegen.translation import check_printed, check_statements
from codegen.ufuncs import UfuncLowering
from derive import ir

KERNEL_MODULE = "_k"
# The index-space primitives of equation layers (codegen/runtime/indexed.py).
INDEXED_MODULE = "_ix"

# Primitive node -> kernel function in generated/_kernels.py.
KERNELS = {
    ir.Pad: "pad",
    ir.Crop: "crop",
    ir.Dilate: "dilate",
    ir.Rot180: "rot180",
    ir.Correlate: "correlate",
    ir.CorrelateWeights: "correlate_weights",
    ir.FullConvolve: "full_convolve",
    ir.WindowSum: "window_sum",
    ir.WindowArgmax: "window_argmax",
    ir.GatherWindows: "gather_windows",
    ir.Upsample: "upsample",
    ir.ScatterWindows: "scatter_windows",
    ir.RouteToArgmax: "route_to_argmax",
    ir.Softmax: "softmax",
    ir.LogSumExp: "logsumexp",
}

# Kernels that take ``workspace=`` and ``key=``: each returns a new array (or fills a
# kept one), which a workspace lets it keep from one call to the next.
WORKSPACE_KERNELS = {
    "pad",
    "dilate",
    "correlate",
    "full_convolve",
    "window_sum",
    "window_argmax",
    "gather_windows",
    "upsample",
    "scatter_windows",
    "route_to_argmax",
}

# Nodes whose value is always an array of its own, never a view of an operand (pad and
# dilate give back their input when there is nothing to add, crop and rot180 are views):
# a statement may write over such a value when nothing else reads it (see
# Emitter.reuse_arguments).
OWN_ARRAYS = (
    ir.Correlate,
    ir.CorrelateWeights,
    ir.FullConvolve,
    ir.WindowSum,
    ir.GatherWindows,
    ir.Upsample,
    ir.ScatterWindows,
    ir.RouteToArgmax,
    ir.MatMul,
)

# Suffix of the variable that holds a shared intermediate, by node type.
SUFFIXES = {
    ir.Pad: "padded",
    ir.Crop: "cropped",
    ir.Dilate: "dilated",
    ir.Rot180: "rotated",
    ir.Softmax: "softmax",
    ir.LogSumExp: "logsumexp",
    ir.Sum: "total",
    ir.Correlate: "correlated",
    ir.Upsample: "upsampled",
    ir.Pointwise: "elementwise",
}


INDEXED_NODES = (
    ir.ZeroPad,
    ir.CropAxes,
    ir.IndexView,
    ir.Contract,
    ir.ScatterContract,
    ir.ArgmaxView,
    ir.TakeView,
    ir.RouteView,
)


def _is_name(text: str) -> bool:
    return text.isidentifier() and not keyword.iskeyword(text)


@dataclass
class Emitter:
    """Emits statements for a group of trees that live in one function body."""

    uses: Counter = field(default_factory=Counter)
    bound: dict = field(default_factory=dict)  # node -> variable name
    names: set = field(default_factory=set)
    lines: list = field(default_factory=list)
    # Floating-point errors that the statement being emitted raises by design, with why.
    expected_errors: dict = field(default_factory=dict)
    # The generated function's workspace argument (a dict or None at run time) and the
    # prefix of its keys there; with a workspace, pointwise statements write into kept
    # arrays (codegen.ufuncs) instead of fresh ones.
    workspace: str | None = None
    function: str = ""
    # Workspace keys of the kernel calls so far in this function (shared with its
    # branches), by node: each call site gets its own key, the same each time its code
    # is asked for.
    kernel_keys: dict = field(default_factory=dict)
    # Inputs of the function that are 1-D arrays (biases), see codegen.ufuncs.
    vectors: frozenset = frozenset()
    # Whether a lowered pointwise statement may write over an operand that it alone reads
    # (an OWN_ARRAYS node computed for it and found nowhere else in the function's trees).
    # Only when every tree of the function was counted before the first statement: the
    # count then says that nothing later reads the operand.
    reuse_arguments: bool = False

    def branch(self) -> Emitter:
        """An emitter for one branch of an if/else: it starts from what this one has bound."""
        return Emitter(
            uses=self.uses,
            bound=dict(self.bound),
            names=set(self.names),
            workspace=self.workspace,
            function=self.function,
            kernel_keys=self.kernel_keys,
            vectors=self.vectors,
        )

    def count(self, tree: ir.Node) -> None:
        for node in tree.walk():
            self.uses[node] += 1

    def fresh(self, base: str) -> str:
        name, number = base, 2
        while name in self.names:
            name, number = f"{base}_{number}", number + 1
        self.names.add(name)
        return name

    def assign(self, target: str, tree: ir.Node) -> None:
        """``target = <tree>``; ``target`` then stands for that tree in later statements."""
        self.names.add(target)
        self.statement(target, tree)
        self.bound.setdefault(tree, target)

    def bind(self, node: ir.Node, base: str) -> str:
        if node in self.bound:
            return self.bound[node]
        name = self.statement(None, node, base)
        self.bound[node] = name
        return name

    def statement(self, target: str | None, node: ir.Node, base: str = "") -> str:
        """Emit ``target = <node>`` (a fresh name from ``base`` if target is None).

        Operands bound on the way are emitted first, as statements of their own. When
        the expression raises floating-point errors by design (the printer says which
        and why), the statement runs inside ``np.errstate`` ignoring just those.
        """
        if self.workspace is not None and isinstance(node, ir.Pointwise):
            private = []
            if self.reuse_arguments:
                private = [
                    child
                    for _, child in node.arguments
                    if isinstance(child, OWN_ARRAYS)
                    and child not in self.bound
                    and self.uses[child] == 1
                ]
            expr, arrays = self.pointwise_arguments(node)
            if UfuncLowering.applies(expr, arrays):
                if target is None:
                    target = self.fresh(base)
                lowering = UfuncLowering(
                    arrays, self.workspace, f"{self.function}.{target}", self.vectors
                )
                # pointwise_arguments bound each of them: a kernel call is not a name.
                reusable = tuple(self.bound[child] for child in private)
                statements = lowering.lower(expr, target, reusable)
                check_statements(statements, target, expr)
                self.emit_statements(statements, lowering.expected_errors)
                return target
        outer, self.expected_errors = self.expected_errors, {}
        expression = self.code(node, top=True)
        expected, self.expected_errors = self.expected_errors, outer
        if target is None:
            target = self.fresh(base)
        self.emit_statements([f"{target} = {expression}"], expected)
        return target

    def emit_statements(self, statements: list[str], expected_errors: dict[str, str]) -> None:
        """``statements``, inside ``np.errstate`` ignoring the expected errors (with why)."""
        if not expected_errors:
            self.lines += statements
            return
        for reason in sorted(set(expected_errors.values())):
            self.lines.append(f"# {reason}")
        ignored = ", ".join(f'{error}="ignore"' for error in sorted(expected_errors))
        self.lines.append(f"with np.errstate({ignored}):")
        self.lines += ["    " + statement for statement in statements]

    def pointwise_arguments(self, node: ir.Pointwise):
        """The node's expression over the names of its (bound) arguments, and those names."""
        replacements = {}
        for symbol, child in node.arguments:
            text = self.code(child)
            if not _is_name(text):
                text = self.bind(child, symbol.name)
            replacements[symbol] = sympy.Symbol(text)
        arrays = {name: name.name for name in replacements.values()}
        return node.expr.xreplace(replacements), arrays

    def code(self, node: ir.Node, top: bool = False) -> str:
        if node in self.bound:
            return self.bound[node]
        if isinstance(node, ir.Operand):
            return node.name
        if not top and self.uses[node] > 1:
            return self.bind(node, self.base_name(node))
        return self.expression(node)

    def base_name(self, node: ir.Node) -> str:
        children = list(node.children())
        first = self.code(children[0]) if children else "value"
        first = first if _is_name(first) else "value"
        return f"{first}_{SUFFIXES.get(type(node), 'part')}"

    def expression(self, node: ir.Node) -> str:
        if isinstance(node, ir.Pointwise):
            expr, _ = self.pointwise_arguments(node)
            code = array_code(expr, self.expected_errors)
            check_printed(code, expr)
            return code
        if isinstance(node, ir.Sum):
            inner = self.operand_code(node.a)
            if not node.axes:
                return f"{inner}.sum()"
            if not node.keepdims and node.axes == tuple(range(len(node.axes))):
                return f"{KERNEL_MODULE}.sum_leading(a={self.code(node.a)}, count={len(node.axes)})"
            keep = ", keepdims=True" if node.keepdims else ""
            axes = node.axes[0] if len(node.axes) == 1 else node.axes
            return f"{inner}.sum(axis={axes}{keep})"
        if isinstance(node, ir.MatMul):
            return f"{self.operand_code(node.a)} @ {self.operand_code(node.b)}"
        if isinstance(node, ir.Transpose):
            return f"{self.operand_code(node.a)}.T"
        if isinstance(node, ir.Flatten):
            inner = self.operand_code(node.a)
            return f"{inner}.reshape({inner}.shape[0], -1)"
        if isinstance(node, ir.ReshapeLike):
            return f"{self.operand_code(node.a)}.reshape({self.operand_code(node.like)}.shape)"
        if isinstance(node, INDEXED_NODES):
            return self.indexed_call(node)
        if type(node) in KERNELS:
            # Keyword arguments named after the node's fields: the kernel's parameters
            # carry the same names (codegen.conformance checks the signatures), so no
            # argument can land in another's place.
            arguments = []
            for f in fields(node):
                value = getattr(node, f.name)
                if isinstance(value, ir.Node):
                    if self.workspace is not None and isinstance(value, ir.Pointwise):
                        # Its own statement, lowered into a kept array (see statement()),
                        # rather than an expression that makes a new array on every call.
                        code = self.bind(value, self.base_name(value))
                    else:
                        code = self.code(value)
                else:
                    code = integer_code(value)
                arguments.append(f"{f.name}={code}")
            kernel = KERNELS[type(node)]
            argmax_key = self.argmax_key(node)
            if argmax_key is not None:
                arguments.append(f'argmax_key="{argmax_key}"')
            if self.workspace is not None and kernel in WORKSPACE_KERNELS:
                number = len(self.kernel_keys) + 1
                key = self.kernel_keys.setdefault(node, f"{self.function}.{kernel}{number}")
                arguments += [f"workspace={self.workspace}", f'key="{key}"']
            return f"{KERNEL_MODULE}.{kernel}({', '.join(arguments)})"
        raise TypeError(f"no NumPy emission for {type(node).__name__}")

    def argmax_key(self, node: ir.Node) -> str | None:
        """For a gather at the argmax of the same input over the same windows, the
        workspace key of that window_argmax call (its arguments emitted already): the
        kernel then takes the maxima that call kept instead of gathering (see
        gather_windows). None for any other node, or without a workspace."""
        if self.workspace is None or not isinstance(node, ir.GatherWindows):
            return None
        index = node.index
        if isinstance(index, ir.Operand):
            # A name assigned earlier in the function (a forward's cached argmax).
            named = [bound for bound, name in self.bound.items() if name == index.name]
            index = named[0] if len(named) == 1 else index
        if not (
            isinstance(index, ir.WindowArgmax)
            and index.a == node.a
            and index.size == node.size
            and index.stride == node.stride
        ):
            return None
        return self.kernel_keys.get(index)

    def indexed_call(self, node: ir.Node) -> str:
        """A call of the index-space primitive that computes ``node``; maps and index
        lists are passed as the equation writes them, so the code reads like the math."""

        def names(items) -> str:
            return '"' + " ".join(items) + '"'

        def integers(exprs) -> str:
            items = [integer_code(e) for e in exprs]
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"

        def subscripts(lists) -> str:
            return "(" + ", ".join(names(s) for s in lists) + ("," if len(lists) == 1 else "") + ")"

        module = INDEXED_MODULE
        if isinstance(node, ir.ZeroPad):
            return f"{module}.zero_pad({self.code(node.a)}, {integers(node.widths)})"
        if isinstance(node, ir.CropAxes):
            return (
                f"{module}.crop_axes({self.code(node.a)}, {integers(node.starts)}, "
                f"{integers(node.extents)})"
            )
        if isinstance(node, ir.IndexView):
            return (
                f'{module}.index_view({self.code(node.a)}, "{node.read.text()}", '
                f"{names(node.indices)}, {integers(node.extents)})"
            )
        if isinstance(node, ir.Contract):
            factors = ", ".join(self.code(f) for f in node.factors)
            return (
                f"{module}.contract({subscripts(node.subscripts)}, {names(node.out_indices)}, "
                f"{factors})"
            )
        if isinstance(node, ir.ScatterContract):
            factors = ", ".join(self.code(f) for f in node.factors)
            return (
                f'{module}.scatter_contract({integers(node.shape)}, "{node.write.text()}", '
                f"{names(node.index_names)}, {integers(node.index_extents)}, "
                f"{subscripts(node.subscripts)}, {factors})"
            )
        window = (
            f'"{node.read.text()}", {names(node.kept)}, {names(node.reduced)}, '
            f"{integers(node.extents)}"
        )
        if isinstance(node, ir.ArgmaxView):
            return f"{module}.argmax_view({self.code(node.a)}, {window})"
        if isinstance(node, ir.TakeView):
            return f"{module}.take_view({self.code(node.a)}, {self.code(node.index)}, {window})"
        if isinstance(node, ir.RouteView):
            return (
                f"{module}.route_view({self.code(node.g)}, {self.code(node.index)}, {window}, "
                f"{integers(node.shape)})"
            )
        raise TypeError(f"no NumPy emission for {type(node).__name__}")

    def operand_code(self, node: ir.Node) -> str:
        """Code for a node used as the left operand of a method call or operator."""
        text = self.code(node)
        simple = all(_is_name(part) for part in text.split("."))  # a name or an attribute, e.g. w.T
        return text if simple else f"({text})"


def dims_in(trees) -> list[ir.Dim]:
    """Every Dim used by ``trees``, in a stable order (first use)."""
    found: list[ir.Dim] = []
    for tree in trees:
        for node in tree.walk():
            for expr in node.integer_arguments():
                for symbol in sorted(expr.free_symbols, key=lambda s: s.name):
                    if isinstance(symbol, ir.Dim) and symbol not in found:
                        found.append(symbol)
    return found
