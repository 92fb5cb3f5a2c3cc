"""Proven reorderings of consecutive layers.

A network may run two consecutive layers in the other order when both orders give the
same outputs and the same input gradients.  Where a ReLU is followed by a max pool, the
pool first is cheaper (the ReLU then sees a quarter of the values after a 2x2 pool).
That the orders agree is proven here, not argued in a comment: both chains are run
through the layers' own proven forward and backward trees (derive.symbolic), on every
configuration of the max pool's sweep, on integer inputs full of ties, zeros and
negative values, with symbolic upstream gradients, and must give equal outputs and equal
gradients element by element.

The proof covers exactly these layers (the catalogue's ``relu`` and ``maxpool2d``) and the
parameter values of the sweep; ``generate`` writes the proven pairs and values into
``generated/rewrites.py``, and the training code swaps a pair only where it finds it
there.  Why it holds, for the reader: a max picks one of its window's values and ReLU
is non-decreasing, so the ReLU of the largest value is the largest of the ReLU'd values;
a window whose largest value is positive routes its gradient to the same first maximum
in both orders (ReLU keeps the order of positive values, and makes the others 0, below
it) through ReLU's slope 1; a window whose largest value is not positive passes no
gradient in either order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import sympy

from derive.layer import Configuration, Layer
from derive.layers import maxpool2d, relu
from derive.symbolic import Evaluator, symbol_array
from derive.verify import LayerResult, VerificationError, applicable_cases, is_zero


@dataclass(frozen=True)
class Swap:
    """``first`` then ``second`` (the definition's order) may run as ``second`` then ``first``."""

    name: str
    first: Layer
    second: Layer
    # The sweep: values of both layers' parameters and of the sizes of the pair's input.
    configurations: Callable[[], list[Configuration]]
    # Which layer's input shape the pair's input has, in a configuration.
    input_of: Layer


RELU_THEN_MAX_POOL = Swap(
    name="relu then maxpool2d",
    first=relu,
    second=maxpool2d,
    configurations=maxpool2d.configurations,
    input_of=maxpool2d,
)

SWAPS: tuple[Swap, ...] = (RELU_THEN_MAX_POOL,)


def parameter_names(swap: Swap) -> tuple[str, ...]:
    """The run-time parameters of the pair (of either layer), in a fixed order."""
    names = [p.symbol.name for p in swap.first.params] + [p.symbol.name for p in swap.second.params]
    if len(set(names)) != len(names):
        raise ValueError(f"{swap.name}: both layers have a parameter of the same name")
    return tuple(names)


def _run(layers: list[Layer], x: np.ndarray, config: Configuration, upstream_name: str):
    """Outputs and input gradient of ``layers`` in that order, through their proven trees.

    The upstream gradient of the last layer is an array of symbols; the input gradient
    comes back as expressions in them."""
    evaluators, value = [], x
    for layer in layers:
        evaluator = Evaluator({layer.inputs[0].name: value}, config)
        for name, node in layer.forward:
            evaluator.env[name] = evaluator(node)
        value = np.asarray(evaluator.env[layer.output], dtype=object)
        evaluators.append(evaluator)
    outputs = value
    gradient = symbol_array(upstream_name, outputs.shape, real=True)
    for layer, evaluator in zip(reversed(layers), reversed(evaluators)):
        evaluator.env[layer.upstream] = gradient
        (wrt_input,) = [g for g in layer.gradients if g.wrt == layer.inputs[0].name]
        case = applicable_cases(wrt_input.cases, evaluator)[0]
        gradient = np.asarray(evaluator(case.tree), dtype=object)
    return outputs, gradient


def prove_swap(swap: Swap, config: Configuration, rng_seed: int = 0) -> None:
    """Raise VerificationError unless both orders agree on ``config``."""
    shape = swap.input_of.shapes(config)[swap.input_of.inputs[0].name]
    rng = np.random.default_rng(rng_seed)
    x = rng.integers(-2, 3, size=shape).astype(object)
    text = swap.input_of.describe(config)
    defined_out, defined_grad = _run([swap.first, swap.second], x, config, "delta")
    swapped_out, swapped_grad = _run([swap.second, swap.first], x, config, "delta")
    for what, a, b in (
        ("outputs", defined_out, swapped_out),
        ("gradients", defined_grad, swapped_grad),
    ):
        if a.shape != b.shape:
            raise VerificationError(
                f"{swap.name} on [{text}]: {what} of shapes {a.shape} and {b.shape}"
            )
        for index in np.ndindex(*a.shape):
            if not is_zero(sympy.sympify(a[index]) - sympy.sympify(b[index])):
                raise VerificationError(
                    f"{swap.name} on [{text}]: {what} differ at {list(index)}: "
                    f"{a[index]} in the definition's order, {b[index]} swapped"
                )


@dataclass
class SwapResult:
    swap: Swap
    ok: bool
    seconds: float
    proven: list[tuple[int, ...]]  # parameter values (in parameter_names order) proven
    configurations: int  # how many configurations were proven
    error: str = ""


def verify_swaps(swaps: tuple[Swap, ...] = SWAPS) -> list[SwapResult]:
    results = []
    for swap in swaps:
        start = time.perf_counter()
        names = parameter_names(swap)
        proven, count, error = set(), 0, ""
        for config in swap.configurations():
            try:
                prove_swap(swap, config)
            except VerificationError as failure:
                error = str(failure)
                break
            values = {s.name: v for s, v in config.items()}
            proven.add(tuple(values[name] for name in names))
            count += 1
        seconds = time.perf_counter() - start
        if error:
            proven, count = set(), 0  # nothing of a pair that failed anywhere counts
        results.append(SwapResult(swap, not error, seconds, sorted(proven), count, error))
    return results


def as_row(result: SwapResult) -> LayerResult:
    """``result`` as a row of verify's table."""
    names = parameter_names(result.swap)
    return LayerResult(
        name=f"swap: {result.swap.name}",
        ok=result.ok,
        seconds=result.seconds,
        configurations=[
            ", ".join(f"{n} {v}" for n, v in zip(names, values)) for values in result.proven
        ],
        cases={},
        error=result.error,
    )
