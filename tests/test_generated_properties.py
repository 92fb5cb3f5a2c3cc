"""Hypothesis property tests of the generated layers over many shapes and parameters.

* conv2d and the pools: batch 1-3, channels 1-3, strides 1-3, paddings 0-2, every valid
  kernel / window that fits; output shapes against the formula
  ``floor((H + 2p - K) / s) + 1`` and backward against a central difference along a
  random direction (step 1e-6, float64; tolerance below);
* float32 in -> float32 out for every forward and backward of the catalogue;
* non-contiguous (transposed, reversed) input views give the results of their copies.
"""

from __future__ import annotations

import importlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derive.layers import LAYERS
from generated import avgpool2d, conv2d, dense, maxpool2d

EPS = 1e-6
FD_TOLERANCE = 1e-6
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def seeds():
    return st.integers(0, 2**32 - 1)


@st.composite
def conv_configurations(draw):
    padding = draw(st.integers(0, 2))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    # only valid configurations: the kernel fits the padded input
    h = draw(st.integers(max(1, kh - 2 * padding), 7))
    w = draw(st.integers(max(1, kw - 2 * padding), 7))
    return {
        "batch": draw(st.integers(1, 3)),
        "height": h,
        "width": w,
        "c_in": draw(st.integers(1, 3)),
        "c_out": draw(st.integers(1, 3)),
        "kh": kh,
        "kw": kw,
        "stride": draw(st.integers(1, 3)),
        "padding": padding,
    }


@st.composite
def pool_configurations(draw):
    size = draw(st.integers(1, 4))
    return {
        "batch": draw(st.integers(1, 3)),
        "height": draw(st.integers(size, 8)),
        "width": draw(st.integers(size, 8)),
        "channels": draw(st.integers(1, 3)),
        "size": size,
        "stride": draw(st.one_of(st.none(), st.integers(1, 3))),
    }


def output_length(length, kernel, stride, padding=0):
    return (length + 2 * padding - kernel) // stride + 1


def directional_error(pairs, numeric):
    """|numeric - sum <grad, v>| / sum ||grad|| ||v|| over the (grad, direction) pairs."""
    analytic = sum(float(np.sum(g * v)) for g, v in pairs)
    scale = sum(float(np.linalg.norm(g) * np.linalg.norm(v)) for g, v in pairs)
    assert scale > 0
    return abs(numeric - analytic) / scale


@SETTINGS
@given(conv_configurations(), seeds())
def test_conv_shapes_and_gradient(config, seed):
    """Reference: central difference of <forward(x, w, b), dout> along one random direction
    in (x, w, b) jointly.  Tolerance: |fd - <grad, v>| <= 1e-6 * sum ||grad|| ||v||."""
    rng = np.random.default_rng(seed)
    c = config
    x = rng.normal(size=(c["batch"], c["height"], c["width"], c["c_in"]))
    w = rng.normal(size=(c["kh"], c["kw"], c["c_in"], c["c_out"]))
    b = rng.normal(size=c["c_out"])
    keywords = {"stride": c["stride"], "padding": c["padding"]}
    out, cache = conv2d.forward(x, w, b, **keywords)
    assert out.shape == (
        c["batch"],
        output_length(c["height"], c["kh"], c["stride"], c["padding"]),
        output_length(c["width"], c["kw"], c["stride"], c["padding"]),
        c["c_out"],
    )
    dout = rng.normal(size=out.shape)
    dx, dw, db = conv2d.backward(dout, cache)
    assert (dx.shape, dw.shape, db.shape) == (x.shape, w.shape, b.shape)

    vx, vw, vb = rng.normal(size=x.shape), rng.normal(size=w.shape), rng.normal(size=b.shape)

    def phi(t):
        value, _ = conv2d.forward(x + t * vx, w + t * vw, b + t * vb, **keywords)
        return float(np.sum(value * dout))

    numeric = (phi(EPS) - phi(-EPS)) / (2 * EPS)
    error = directional_error([(dx, vx), (dw, vw), (db, vb)], numeric)
    assert error <= FD_TOLERANCE

    # float32 in -> float32 out
    out32, cache32 = conv2d.forward(
        x.astype(np.float32), w.astype(np.float32), b.astype(np.float32), **keywords
    )
    grads32 = conv2d.backward(dout.astype(np.float32), cache32)
    assert out32.dtype == np.float32 and all(g.dtype == np.float32 for g in grads32)


def _pool_keywords(config):
    keywords = {"size": config["size"]}
    if config["stride"] is not None:
        keywords["stride"] = config["stride"]
    return keywords


@SETTINGS
@given(pool_configurations(), seeds(), st.sampled_from(["maxpool2d", "avgpool2d"]))
def test_pool_shapes_and_gradient(config, seed, name):
    """Reference: central difference of <forward(x), dout> along a random direction
    (max pool: values 0.01 apart, so a step of 1e-6 never changes a window's argmax).
    Tolerance: |fd - <dx, v>| <= 1e-6 * ||dx|| ||v||.  Stride None means stride = size."""
    module = maxpool2d if name == "maxpool2d" else avgpool2d
    rng = np.random.default_rng(seed)
    c = config
    shape = (c["batch"], c["height"], c["width"], c["channels"])
    if name == "maxpool2d":
        x = rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01
    else:
        x = rng.normal(size=shape)
    keywords = _pool_keywords(c)
    stride = c["stride"] or c["size"]
    out, cache = module.forward(x, **keywords)
    assert out.shape == (
        c["batch"],
        output_length(c["height"], c["size"], stride),
        output_length(c["width"], c["size"], stride),
        c["channels"],
    )
    dout = rng.normal(size=out.shape)
    dx = module.backward(dout, cache)
    assert dx.shape == x.shape
    v = rng.normal(size=x.shape)
    plus, _ = module.forward(x + EPS * v, **keywords)
    minus, _ = module.forward(x - EPS * v, **keywords)
    numeric = (float(np.sum(plus * dout)) - float(np.sum(minus * dout))) / (2 * EPS)
    assert directional_error([(dx, v)], numeric) <= FD_TOLERANCE

    out32, cache32 = module.forward(x.astype(np.float32), **keywords)
    dx32 = module.backward(dout.astype(np.float32), cache32)
    assert out32.dtype == np.float32 and dx32.dtype == np.float32


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), seeds())
def test_dense_shapes_and_gradient(batch, d_in, d_out, seed):
    """Reference and tolerance as for conv2d: joint random direction in (x, w, b)."""
    rng = np.random.default_rng(seed)
    x, w, b = rng.normal(size=(batch, d_in)), rng.normal(size=(d_in, d_out)), rng.normal(size=d_out)
    out, cache = dense.forward(x, w, b)
    assert out.shape == (batch, d_out)
    dout = rng.normal(size=out.shape)
    dx, dw, db = dense.backward(dout, cache)
    vx, vw, vb = rng.normal(size=x.shape), rng.normal(size=w.shape), rng.normal(size=b.shape)

    def phi(t):
        value, _ = dense.forward(x + t * vx, w + t * vw, b + t * vb)
        return float(np.sum(value * dout))

    numeric = (phi(EPS) - phi(-EPS)) / (2 * EPS)
    assert directional_error([(dx, vx), (dw, vw), (db, vb)], numeric) <= FD_TOLERANCE


def _float32_inputs(layer, config, rng):
    arrays = {}
    for item in layer.inputs:
        shape = tuple(config[d] for d in item.axes)
        if item.name == "probs" or item.name == "targets":
            arrays[item.name] = rng.uniform(0.05, 0.95, size=shape).astype(np.float32)
        else:
            arrays[item.name] = rng.normal(size=shape).astype(np.float32)
    return arrays


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_float32_in_float32_out_for_every_layer(data):
    """Every forward and backward of the catalogue, on configurations of its proof sweep:
    float32 inputs (and upstream gradient) give float32 outputs and gradients."""
    name = data.draw(st.sampled_from(sorted(LAYERS)), label="layer")
    layer = LAYERS[name]
    config = data.draw(st.sampled_from(layer.configurations()), label="configuration")
    rng = np.random.default_rng(data.draw(seeds(), label="seed"))
    arrays = _float32_inputs(layer, config, rng)
    module = importlib.import_module(f"generated.{layer.module}")
    keywords = {p.symbol.name: config[p.symbol] for p in layer.params}
    out, cache = getattr(module, layer.forward_function)(
        *(arrays[item.name] for item in layer.inputs), **keywords
    )
    assert np.asarray(out).dtype == np.float32, f"{name} forward gave {np.asarray(out).dtype}"
    backward = getattr(module, layer.backward_function)
    if layer.kind == "loss":
        grads = backward(cache)
    else:
        grads = backward(rng.normal(size=np.shape(out)).astype(np.float32), cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    for gradient, value in zip(layer.gradients, grads):
        assert value.dtype == np.float32, f"{name} {gradient.name} is {value.dtype}"


def _scrambled_view(array):
    """A non-contiguous view with the same values as ``array`` (reversed, transposed)."""
    base = np.ascontiguousarray(np.swapaxes(array[:, ::-1], 1, 2))
    view = np.swapaxes(base, 1, 2)[:, ::-1]
    np.testing.assert_array_equal(view, array)
    return view


@SETTINGS
@given(conv_configurations(), seeds())
def test_conv_on_non_contiguous_views(config, seed):
    """Reference: the same call on C-contiguous copies.  Tolerance 1e-12 relative."""
    rng = np.random.default_rng(seed)
    c = config
    x = rng.normal(size=(c["batch"], c["height"], c["width"], c["c_in"]))
    w = rng.normal(size=(c["kh"], c["kw"], c["c_in"], c["c_out"]))
    b = rng.normal(size=c["c_out"])
    keywords = {"stride": c["stride"], "padding": c["padding"]}
    out, cache = conv2d.forward(x, w, b, **keywords)
    dout = rng.normal(size=out.shape)
    expected = (out, *conv2d.backward(dout, cache))
    view_out, view_cache = conv2d.forward(_scrambled_view(x), _scrambled_view(w), b, **keywords)
    got = (view_out, *conv2d.backward(_scrambled_view(dout), view_cache))
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12 * np.abs(e).max(initial=1.0))


@SETTINGS
@given(pool_configurations(), seeds(), st.sampled_from(["maxpool2d", "avgpool2d"]))
def test_pools_on_non_contiguous_views(config, seed, name):
    """Reference: the same call on C-contiguous copies.  Tolerance 1e-12 relative."""
    module = maxpool2d if name == "maxpool2d" else avgpool2d
    rng = np.random.default_rng(seed)
    c = config
    x = rng.normal(size=(c["batch"], c["height"], c["width"], c["channels"]))
    keywords = _pool_keywords(c)
    out, cache = module.forward(x, **keywords)
    dout = rng.normal(size=out.shape)
    dx = module.backward(dout, cache)
    view_out, view_cache = module.forward(_scrambled_view(x), **keywords)
    view_dx = module.backward(_scrambled_view(dout), view_cache)
    np.testing.assert_allclose(view_out, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(view_dx, dx, rtol=1e-12, atol=1e-12)
