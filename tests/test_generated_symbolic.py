"""The generated NumPy code against SymPy's own chain-rule derivative, at random numbers.

For every layer of ``derive.layers.LAYERS`` and a few configurations (the layer's
``example`` plus targeted entries of its sweep: stride 2 / padding 1 for the
convolution, overlapping windows and gaps for the pools, the largest entry for
everything), ``derive.verify.prove`` builds the element symbols and the gradient
SymPy derived by the chain rule (``proof.derived``).  Here the symbols get random
float64 values, the derived expressions are evaluated in 30-digit arithmetic, and
the generated forward/backward run on the same numbers.

Reference: SymPy's derived gradient (and the index-level definition for the forward
pass), evaluated with 30 significant digits.  Tolerance: normwise relative error
``max|generated - reference| / max|reference| <= 1e-12`` in float64.
"""

from __future__ import annotations

import importlib
import zlib

import numpy as np
import pytest
import sympy

from derive.layers import LAYERS
from derive.verify import prove

TOLERANCE = 1e-12
DIGITS = 30


def _values(config) -> dict[str, int]:
    return {symbol.name: value for symbol, value in config.items()}


def _matches(config, wanted: dict[str, int]) -> bool:
    values = _values(config)
    return all(values.get(name) == value for name, value in wanted.items())


def chosen_configurations(layer) -> list[dict]:
    """The example, the targeted entries of the sweep, the middle and the last entry."""
    sweep = layer.configurations()
    params = {p.symbol.name for p in layer.params}
    targets: list[dict[str, int]] = []
    if {"stride", "padding"} <= params:
        targets += [
            {"stride": 2, "padding": 1, "kernel_height": 3, "kernel_width": 3},
            {"stride": 1, "padding": 1, "kernel_height": 2, "kernel_width": 3, "batch": 2},
            {"stride": 2, "padding": 0, "kernel_height": 2, "kernel_width": 2, "in_channels": 2},
        ]
    if {"size", "stride"} <= params:
        # overlapping windows, windows with gaps between them, stride = size on an input
        # the window does not divide
        targets += [
            {"size": 3, "stride": 1, "in_height": 5, "batch": 2},
            {"size": 3, "stride": 2, "in_height": 5},
            {"size": 2, "stride": 3, "in_height": 5},
            {"size": 2, "stride": 2, "in_height": 5, "channels": 2},
        ]
    chosen = [dict(layer.example)]
    for wanted in targets:
        found = next(c for c in sweep if _matches(c, wanted))  # StopIteration: sweep changed
        chosen.append(found)
    chosen += [sweep[len(sweep) // 2], sweep[-1]]
    unique = []
    for config in chosen:
        if config not in unique:
            unique.append(config)
    return unique


CASES = [
    pytest.param(name, config, id=f"{name}-{layer.describe(config)}")
    for name, layer in LAYERS.items()
    for config in chosen_configurations(layer)
]


def draw_values(layer, proof, rng) -> dict[str, np.ndarray]:
    """float64 values for every input of the proof (sensible ranges for the losses)."""
    values = {}
    for name, symbols in proof.inputs.items():
        shape = symbols.shape
        if symbols.size and all(s in proof.substitution for s in symbols.flat):
            # max pooling: the proof fixed x to small integers full of ties (layer.samples)
            fixed = np.empty(shape, dtype=np.float64)
            for index in np.ndindex(*shape):
                fixed[index] = float(proof.substitution[symbols[index]])
            values[name] = fixed
        elif name == "probs":
            values[name] = rng.uniform(0.05, 0.95, size=shape)
        elif name == "targets" and layer.name == "softmax_cross_entropy":
            values[name] = rng.dirichlet(np.ones(shape[-1]), size=shape[0])
        elif name == "targets" and layer.name in ("bce", "bce_with_logits"):
            values[name] = rng.uniform(0.0, 1.0, size=shape)
        else:
            values[name] = rng.normal(size=shape)
    if layer.name == "relu":
        values["z"].flat[0] = 0.0  # the kink: both sides take the derivative there as 0
    return values


def high_precision(array: np.ndarray, mapping: dict) -> np.ndarray:
    """Evaluate an object array of SymPy expressions at ``mapping`` with DIGITS digits."""
    array = np.asarray(array, dtype=object)
    out = np.empty(array.shape, dtype=np.float64)
    for index in np.ndindex(*array.shape):
        value = sympy.sympify(array[index]).xreplace(mapping).evalf(DIGITS)
        assert value.is_number, f"unevaluated symbols left in {value}"
        out[index] = float(value)
    return out


def symbol_mapping(symbols: np.ndarray, values: np.ndarray) -> dict:
    return {
        symbols[index]: sympy.Float(float(values[index]), DIGITS)
        for index in np.ndindex(*symbols.shape)
    }


def relative_error(got, reference) -> float:
    got, reference = np.asarray(got, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    assert got.shape == reference.shape, f"shape {got.shape}, expected {reference.shape}"
    scale = np.max(np.abs(reference), initial=0.0)
    difference = np.max(np.abs(got - reference), initial=0.0)
    if scale == 0.0:
        return float(difference)
    return float(difference / scale)


@pytest.mark.parametrize(("name", "config"), CASES)
def test_generated_code_matches_sympy_derivative(name, config):
    layer = LAYERS[name]
    proof = prove(layer, config)
    rng = np.random.default_rng(zlib.crc32(f"{name} {layer.describe(config)}".encode()))
    values = draw_values(layer, proof, rng)

    mapping = {}
    for input_name, symbols in proof.inputs.items():
        mapping.update(symbol_mapping(symbols, values[input_name]))
    dout = None
    if proof.upstream is not None:
        dout = rng.normal(size=proof.upstream.shape)
        mapping.update(symbol_mapping(proof.upstream, dout))

    module = importlib.import_module(f"generated.{layer.module}")
    forward = getattr(module, layer.forward_function)
    backward = getattr(module, layer.backward_function)
    keywords = {p.symbol.name: config[p.symbol] for p in layer.params}
    out, cache = forward(*(values[item.name] for item in layer.inputs), **keywords)
    grads = backward(cache) if dout is None else backward(dout, cache)
    if len(layer.gradients) == 1:
        grads = (grads,)

    # Forward: reference is the index-level definition, evaluated at the same numbers.
    expected_out = high_precision(proof.defined, {**mapping, **proof.substitution})
    error = relative_error(out, expected_out)
    assert error <= TOLERANCE, f"forward: relative error {error:.3g} > {TOLERANCE}"

    # Backward: reference is SymPy's chain-rule derivative of the definition.
    assert len(grads) == len(layer.gradients)
    for gradient, got in zip(layer.gradients, grads):
        reference = high_precision(proof.derived[gradient.wrt], {**mapping, **proof.substitution})
        error = relative_error(got, reference)
        assert error <= TOLERANCE, (
            f"{gradient.name}: relative error {error:.3g} > {TOLERANCE}\n"
            f"generated {np.asarray(got).ravel()}\nderived   {reference.ravel()}"
        )


def test_configurations_cover_the_parameters():
    """The selection above really contains stride 2, padding 1, overlapping pools and batch 2."""
    conv = [_values(c) for c in chosen_configurations(LAYERS["conv2d"])]
    assert any(v["stride"] == 2 and v["padding"] == 1 for v in conv)
    assert any(v["batch"] == 2 and v["in_channels"] == 2 and v["out_channels"] == 2 for v in conv)
    for pool in ("maxpool2d", "avgpool2d"):
        values = [_values(c) for c in chosen_configurations(LAYERS[pool])]
        assert any(v["stride"] < v["size"] for v in values)
        assert any(v["stride"] > v["size"] for v in values)
        assert any(v["stride"] == v["size"] and v["in_height"] % v["size"] for v in values)


def test_max_pool_proof_inputs_tie():
    """The max-pool comparison runs on inputs with ties (else the tie rule goes untested)."""
    layer = LAYERS["maxpool2d"]
    proof = prove(layer, layer.example)
    x = np.array([int(proof.substitution[s]) for s in proof.inputs["x"].ravel()]).reshape(
        proof.inputs["x"].shape
    )
    windows = x.reshape(1, 2, 2, 2, 2, 1).transpose(0, 1, 3, 5, 2, 4).reshape(-1, 4)
    tied = [(row == row.max()).sum() > 1 for row in windows]
    assert any(tied), f"no window of {x[0, :, :, 0].tolist()} ties"
