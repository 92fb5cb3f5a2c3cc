"""Adding a layer, as the README's "Adding a layer" describes, for one the catalogue lacks:
leaky ReLU. Its entry is written the way derive/layers.py writes its own activations; the
rest is the pipeline's: the proof, the generated NumPy module, and no backward by hand."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import sympy

from codegen.render import UnverifiedError, render, verified_results
from derive import layers as catalogue
from derive.verify import VerificationError, prove

SLOPE = sympy.Rational(1, 100)  # below zero


def leaky_relu(slope_in_backward=SLOPE):
    """The catalogue entry: definition, forward pass and gradient, as in derive/layers.py."""
    z, da = catalogue._zs, catalogue._das
    return catalogue._activation(
        "leaky_relu",
        "Leaky ReLU",
        lambda z_: sympy.Piecewise((z_, z_ > 0), (SLOPE * z_, True)),  # the definition
        sympy.Max(z, 0) + SLOPE * sympy.Min(z, 0),  # the forward pass the code runs
        sympy.Piecewise((da, z > 0), (slope_in_backward * da, True)),  # the closed form
        {"da": catalogue._da, "z": catalogue._z},
        (r"\frac{\partial L}{\partial Z_{n,k}} = \delta_{n,k}\,(\mathbf{1}[Z_{n,k} > 0]"
         r" + \tfrac{1}{100}\,\mathbf{1}[Z_{n,k} \le 0])",),
    )  # fmt: skip


def import_generated(files: dict[str, str], folder, name: str, monkeypatch):
    """Write the rendered files as the package ``name`` in ``folder``; import its activations."""
    (folder / name).mkdir()
    for filename, text in files.items():
        (folder / name / filename).write_text(text, encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    return importlib.import_module(f"{name}.activations")


def test_a_new_layer_is_proven_generated_and_its_gradient_is_right(tmp_path, monkeypatch):
    layer = leaky_relu()
    files = render([layer], verified_results([layer]))
    source = files["activations.py"]
    assert "def leaky_relu_forward" in source and "def leaky_relu_backward" in source
    assert "sympy" not in source and "jinja2" not in source  # generated/ needs NumPy only

    activations = import_generated(files, tmp_path, "generated_with_leaky_relu", monkeypatch)
    z = np.random.default_rng(3).standard_normal((4, 7))
    out, cache = activations.leaky_relu_forward(z)
    # Reference: the definition in NumPy; z * (1/100) and z / 100 may differ in the last bit.
    np.testing.assert_allclose(out, np.where(z > 0, z, z / 100), rtol=1e-15, atol=0)
    # Reference: central differences of L = sum(δ * A) in float64, to 1e-8.
    delta = np.random.default_rng(4).standard_normal(z.shape)
    dz = activations.leaky_relu_backward(delta, cache)
    eps = 1e-6
    numeric = np.empty_like(z)
    for index in np.ndindex(*z.shape):
        step = np.zeros_like(z)
        step[index] = eps
        plus = activations.leaky_relu_forward(z + step)[0]
        minus = activations.leaky_relu_forward(z - step)[0]
        numeric[index] = np.sum(delta * (plus - minus)) / (2 * eps)
    np.testing.assert_allclose(dz, numeric, rtol=1e-8, atol=1e-8)


def test_a_new_layer_with_a_wrong_gradient_is_not_generated():
    wrong = leaky_relu(slope_in_backward=sympy.Rational(1, 10))
    with pytest.raises(VerificationError, match="leaky_relu dz"):
        prove(wrong, wrong.example)
    with pytest.raises(UnverifiedError, match="nothing was generated") as info:
        render([wrong])
    assert "leaky_relu dz" in str(info.value)
