"""The numeric check on a layer's page, run at build time: the generated backward
against central finite differences of the generated forward, element by element, in
float64, on the layer's worked-example sizes."""

from __future__ import annotations

import types
from dataclasses import dataclass

import numpy as np

from derive.layer import Configuration, Layer

STEP = 1e-6  # central differences: truncation ~ STEP^2, rounding ~ 1e-16 / STEP
TOLERANCE = 1e-6  # on |finite difference - backward| / max(1, largest |gradient element|)


@dataclass
class GradientCheck:
    name: str  # the gradient's name in the code (dx, dw, ...)
    elements: int
    largest: float  # largest |element| of the generated gradient
    max_error: float  # largest |finite difference - generated| over the elements
    relative_error: float  # max_error / max(1, largest)

    @property
    def ok(self) -> bool:
        return self.relative_error <= TOLERANCE


@dataclass
class NumericCheck:
    sizes: str  # the configuration, as layer.describe writes it
    inputs: str  # how the inputs were drawn
    objective: str  # what was differentiated
    gradients: list[GradientCheck]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.gradients)


def _draw(layer: Layer, shapes: dict, rng: np.random.Generator, bounded: bool) -> dict:
    arrays = {}
    for item in layer.inputs:
        shape = shapes[item.name]
        if not item.differentiable:  # targets: rows of probabilities that sum to 1
            values = rng.uniform(0.05, 1.0, size=shape)
            arrays[item.name] = values / values.sum(axis=-1, keepdims=True)
        elif bounded:
            arrays[item.name] = rng.uniform(0.05, 0.95, size=shape)
        else:
            arrays[item.name] = rng.normal(size=shape)
    return arrays


def _scalar(layer: Layer, forward, arrays: dict, keywords: dict, upstream) -> float:
    out, _ = forward(*(arrays[item.name] for item in layer.inputs), **keywords)
    if layer.kind == "loss":
        return float(out)
    return float(np.sum(out * upstream))


def check(layer: Layer, module: types.ModuleType, config: Configuration, seed: int = 0):
    """Compare ``module``'s backward with central differences of its forward."""
    forward = getattr(module, layer.forward_function)
    backward = getattr(module, layer.backward_function)
    keywords = {p.symbol.name: config[p.symbol] for p in layer.params}
    shapes = layer.shapes(config)
    rng = np.random.default_rng(seed)
    drawn = "normal N(0, 1)"
    arrays = _draw(layer, shapes, rng, bounded=False)
    try:
        with np.errstate(all="ignore"):
            out, _ = forward(*(arrays[item.name] for item in layer.inputs), **keywords)
        finite = bool(np.all(np.isfinite(out)))
    except ValueError:  # the generated bce_forward refuses values outside (0, 1)
        finite = False
    if not finite:
        # A function of probabilities (bce): its inputs must lie inside (0, 1).
        drawn = "uniform on (0.05, 0.95), since the forward pass is not finite at normal values"
        arrays = _draw(layer, shapes, rng, bounded=True)
        out, _ = forward(*(arrays[item.name] for item in layer.inputs), **keywords)
    if any(not item.differentiable for item in layer.inputs):
        drawn += "; targets: rows of positive numbers that sum to 1"
    out, cache = forward(*(arrays[item.name] for item in layer.inputs), **keywords)
    if layer.kind == "loss":
        upstream = None
        objective = f"the loss ${layer.output_latex}$"
        grads = backward(cache)
    else:
        upstream = rng.normal(size=np.shape(out))
        objective = (
            rf"$\sum {layer.output_latex} \odot \delta$ (elementwise product, summed), "
            r"with $\delta$ drawn from N(0, 1)"
        )
        grads = backward(upstream, cache)
    if layer.gradient_dict:  # an equation layer's backward: {array name: gradient}
        grads = tuple(grads[gradient.wrt] for gradient in layer.gradients)
    elif len(layer.gradients) == 1:
        grads = (grads,)
    results = []
    for gradient, got in zip(layer.gradients, grads):
        base = arrays[gradient.wrt]
        numeric = np.empty_like(base)
        for index in np.ndindex(*base.shape):
            shifted = base.copy()
            shifted[index] += STEP
            plus = _scalar(layer, forward, {**arrays, gradient.wrt: shifted}, keywords, upstream)
            shifted[index] -= 2 * STEP
            minus = _scalar(layer, forward, {**arrays, gradient.wrt: shifted}, keywords, upstream)
            numeric[index] = (plus - minus) / (2 * STEP)
        got = np.asarray(got, dtype=np.float64)
        largest = float(np.max(np.abs(got))) if got.size else 0.0
        error = float(np.max(np.abs(numeric - got))) if got.size else 0.0
        results.append(
            GradientCheck(gradient.name, base.size, largest, error, error / max(1.0, largest))
        )
    return NumericCheck(layer.describe(config), drawn, objective, results)
