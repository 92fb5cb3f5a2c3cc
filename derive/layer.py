"""What a layer is, to cnnderive: its index-level definition, its forward pass and
gradients as closed-form trees, the checks its inputs must pass, and the sweep of
configurations on which the closed forms are proven."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import sympy

from derive import indexform
from derive.ir import Case, Dim, Node, Param


@dataclass(frozen=True)
class Input:
    """An array argument.  ``axes`` lists a ``Dim`` per axis; an axis whose Dim
    belongs to another operand must match that operand's length."""

    name: str
    axes: tuple[Dim, ...]
    latex: str
    description: str
    differentiable: bool = True
    any_rank: bool = (
        False  # elementwise functions accept any shape; ``axes`` is then only the sweep's
    )
    # Values strictly between these bounds, where the formulas are finite (BCE's
    # probabilities: log(0) at 0 and 1), and what to do instead; None: any value.
    open_interval: tuple[float, float] | None = None
    interval_advice: str = ""


@dataclass(frozen=True)
class RuntimeParam:
    """A keyword-only integer argument of the generated forward function."""

    symbol: Param
    default: int | None
    description: str
    default_from: Param | None = None  # ``None`` default means "same as this parameter"


@dataclass(frozen=True)
class Requirement:
    """A condition on sizes and parameters that valid input satisfies.

    ``message`` names the problem and the way out; ``{expr}`` placeholders are
    integer expressions over the layer's Dim and Param names."""

    condition: sympy.Basic
    message: str

    def placeholders(self) -> list[str]:
        return re.findall(r"\{([^{}]+)\}", self.message)

    def format(self, values: Mapping[str, int]) -> str:
        def substitute(match):
            expr = sympy.sympify(match.group(1), locals={k: sympy.Symbol(k) for k in values})
            return str(expr.xreplace({sympy.Symbol(k): v for k, v in values.items()}))

        return re.sub(r"\{([^{}]+)\}", substitute, self.message)


@dataclass(frozen=True)
class Gradient:
    """The gradient of the layer's output (or loss) with respect to one input."""

    name: str
    wrt: str
    cases: tuple[Case, ...]


class Definition:
    """The index-level definition of a layer's forward pass."""

    latex_lines: tuple[str, ...]

    def expand(
        self, inputs: Mapping[str, np.ndarray], sizes: Mapping[sympy.Symbol, int]
    ) -> np.ndarray:
        """One expression per output element, over the definition's own index ranges."""
        raise NotImplementedError


@dataclass
class IndexDefinition(Definition):
    """``lhs[indices] = rhs`` in SymPy ``Indexed`` notation.

    ``arrays`` maps the inputs to the arrays the definition indexes (for conv2d the
    zero-padded input); ``auxiliary`` adds LaTeX lines that define those arrays, and
    ``meanings`` the trees that build them.
    """

    lhs: sympy.Expr
    rhs: sympy.Expr
    indices: tuple[sympy.Symbol, ...]
    arrays: Callable[[Mapping[str, np.ndarray], Mapping[sympy.Symbol, int]], dict[str, np.ndarray]]
    auxiliary: tuple[str, ...] = ()
    # Arrays the definition reads that are not inputs (the padded input of a convolution),
    # each as the tree that builds it: the all-sizes proof (derive.allsizes) reads them so.
    meanings: Mapping[str, Node] = field(default_factory=dict)

    @property
    def latex_lines(self) -> tuple[str, ...]:
        return (sympy.latex(sympy.Eq(self.lhs, self.rhs, evaluate=False)),) + self.auxiliary

    def expand(self, inputs, sizes):
        arrays = self.arrays(inputs, sizes)
        shape = indexform.extents(self.rhs, self.indices, arrays, sizes)
        return indexform.expand(self.rhs, list(zip(self.indices, shape)), arrays, sizes)


@dataclass
class CustomDefinition(Definition):
    """A definition that ``IndexDefinition`` cannot express (the first-maximum selection
    of max pooling): a LaTeX statement and the code that builds its elements, output
    shape included."""

    latex_lines: tuple[str, ...]
    build: Callable[[Mapping[str, np.ndarray], Mapping[sympy.Symbol, int]], np.ndarray]
    # The same statement in Indexed/Sum notation, for the all-sizes proof
    # (derive.allsizes): the output element at ``indices``, in which the arrays named in
    # ``indicators`` (max pooling's first-maximum indicator, with the tree that computes
    # it) are held constant by the chain rule, as the tie rule says.
    index_form: sympy.Expr | None = None
    indices: tuple[sympy.Symbol, ...] = ()
    indicators: Mapping[str, Node] = field(default_factory=dict)

    def expand(self, inputs, sizes):
        return self.build(inputs, sizes)


Configuration = Mapping[sympy.Symbol, int]


@dataclass
class Layer:
    name: str
    title: str
    kind: str  # "layer", "activation" or "loss"
    module: str  # generated module name
    prefix: str  # function-name prefix inside the module ("" -> forward/backward)
    inputs: tuple[Input, ...]
    params: tuple[RuntimeParam, ...]
    output: str  # name of the forward binding that is returned ("out" or "loss")
    output_latex: str
    definition: Definition
    forward: tuple[tuple[str, Node], ...]
    gradients: tuple[Gradient, ...]
    requirements: tuple[Requirement, ...]
    configurations: Callable[[], list[Configuration]]
    example: Configuration
    chain_rule: tuple[str, ...] = ()  # LaTeX: the general chain-rule step in index notation
    notes: tuple[str, ...] = ()
    samples: Callable[[Mapping[str, tuple], np.random.Generator], dict[str, np.ndarray]] | None = (
        None
    )
    seed_size: Configuration | None = None
    upstream: str = "dout"  # name of the upstream-gradient argument of backward
    # backward returns {input name: gradient} (equation layers) instead of a tuple
    gradient_dict: bool = False

    # -- names ---------------------------------------------------------------
    @property
    def forward_function(self) -> str:
        return f"{self.prefix}forward"

    @property
    def backward_function(self) -> str:
        return f"{self.prefix}backward"

    def input(self, name: str) -> Input:
        for item in self.inputs:
            if item.name == name:
                return item
        raise KeyError(name)

    def shapes(self, config: Configuration) -> dict[str, tuple[int, ...]]:
        return {item.name: tuple(config[d] for d in item.axes) for item in self.inputs}

    def describe(self, config: Configuration) -> str:
        parts = [
            "x".join(str(n) for n in shape) or "scalar" for shape in self.shapes(config).values()
        ]
        text = ", ".join(f"{name} {part}" for name, part in zip(self.shapes(config), parts))
        for p in self.params:
            text += f", {p.symbol.name} {config[p.symbol]}"
        return text

    def violated(self, config: Configuration) -> list[str]:
        """Messages of the requirements that ``config`` breaks."""
        values = {s.name: v for s, v in config.items()}
        problems = []
        for requirement in self.requirements:
            if not bool(requirement.condition.xreplace(dict(config))):
                problems.append(requirement.format(values))
        return problems
