"""The generated NumPy code against numbers: finite differences, full Jacobians,
dot-product (adjoint) tests, the max-pool tie rule and numerical stability.

Every test states its reference and its tolerance.  All finite differences are
central, in float64, with step EPS = 1e-6, on continuous random data that keeps
away from the non-differentiable points (max-pool windows have distinct values
0.01 apart, ReLU inputs are at least 0.1 away from 0).
"""

from __future__ import annotations

import importlib
import math
import warnings
import zlib

import numpy as np
import pytest

from derive.layers import LAYERS
from generated import activations, avgpool2d, conv2d, dense, flatten, losses, maxpool2d

EPS = 1e-6
FD_TOLERANCE = 1e-6
ADJOINT_TOLERANCE = 1e-12


# ---------------------------------------------------------------------------
# Running a layer through the catalogue's names
# ---------------------------------------------------------------------------


def functions(layer):
    module = importlib.import_module(f"generated.{layer.module}")
    return getattr(module, layer.forward_function), getattr(module, layer.backward_function)


def run_forward(layer, arrays, keywords):
    forward, _ = functions(layer)
    return forward(*(arrays[item.name] for item in layer.inputs), **keywords)


def run_backward(layer, upstream, cache) -> dict[str, np.ndarray]:
    _, backward = functions(layer)
    grads = backward(cache) if layer.kind == "loss" else backward(upstream, cache)
    if len(layer.gradients) == 1:
        grads = (grads,)
    assert len(grads) == len(layer.gradients)
    return {g.wrt: got for g, got in zip(layer.gradients, grads)}


def distinct_values(shape, rng) -> np.ndarray:
    """Values 0.01 apart in random order: no max-pool window ties, even after a step of EPS."""
    count = int(np.prod(shape))
    return (rng.permutation(count).reshape(shape) * 0.01 - 0.005 * count).astype(np.float64)


VARIANTS = {
    "conv2d": [
        {"x": (2, 5, 5, 2), "w": (3, 3, 2, 3), "stride": 1, "padding": 0},
        {"x": (2, 6, 5, 3), "w": (3, 2, 3, 2), "stride": 2, "padding": 1},
        {"x": (1, 7, 6, 1), "w": (2, 2, 1, 4), "stride": 3, "padding": 2},
    ],
    "maxpool2d": [
        {"x": (2, 6, 6, 2), "size": 2, "stride": None},
        {"x": (1, 7, 5, 3), "size": 3, "stride": 1},
        {"x": (2, 5, 6, 1), "size": 2, "stride": 3},
    ],
    "avgpool2d": [
        {"x": (2, 6, 6, 2), "size": 2, "stride": None},
        {"x": (1, 7, 5, 3), "size": 3, "stride": 1},
        {"x": (2, 5, 6, 1), "size": 2, "stride": 3},
    ],
    "dense": [{"x": (3, 4), "w": (4, 5)}, {"x": (1, 7), "w": (7, 2)}],
    "flatten": [{"x": (2, 3, 4, 2)}],
    **{name: [{"z": (3, 5)}, {"z": (2, 3, 4)}] for name in ("sigmoid", "relu", "tanh", "softmax")},
    **{
        name: [{"shape": (3, 4)}, {"shape": (1, 5)}]
        for name in ("bce", "bce_with_logits", "softmax_cross_entropy", "mse")
    },
}


def make_inputs(name, variant, rng):
    """(arrays by input name, keyword parameters) for one variant of one layer."""
    keywords = {
        k: v for k, v in variant.items() if k in ("stride", "padding", "size") and v is not None
    }
    if name == "conv2d":
        w = rng.normal(size=variant["w"])
        arrays = {"x": rng.normal(size=variant["x"]), "w": w, "b": rng.normal(size=w.shape[-1])}
    elif name == "maxpool2d":
        arrays = {"x": distinct_values(variant["x"], rng)}
    elif name in ("avgpool2d", "flatten"):
        arrays = {"x": rng.normal(size=variant["x"])}
    elif name == "dense":
        w = rng.normal(size=variant["w"])
        arrays = {"x": rng.normal(size=variant["x"]), "w": w, "b": rng.normal(size=w.shape[-1])}
    elif name == "relu":
        z = np.sign(rng.normal(size=variant["z"])) * (0.1 + np.abs(rng.normal(size=variant["z"])))
        z.flat[0], z.flat[1] = abs(z.flat[0]), -abs(z.flat[1])  # both sides of the kink
        arrays = {"z": z}
    elif name in ("sigmoid", "tanh", "softmax"):
        arrays = {"z": 2 * rng.normal(size=variant["z"])}
    else:
        shape = variant["shape"]
        if name == "bce":
            arrays = {"probs": rng.uniform(0.05, 0.95, shape), "targets": rng.uniform(0, 1, shape)}
        elif name == "bce_with_logits":
            arrays = {"logits": 2 * rng.normal(size=shape), "targets": rng.uniform(0, 1, shape)}
        elif name == "softmax_cross_entropy":
            targets = rng.dirichlet(np.ones(shape[1]), size=shape[0])
            arrays = {"logits": 2 * rng.normal(size=shape), "targets": targets}
        else:
            arrays = {"pred": rng.normal(size=shape), "targets": rng.normal(size=shape)}
    return arrays, keywords


def objective(layer, arrays, keywords, upstream):
    """A scalar whose gradient is what backward returns: the loss, or <forward(...), upstream>."""
    out, _ = run_forward(layer, arrays, keywords)
    if layer.kind == "loss":
        return float(out)
    return float(np.sum(out * upstream))


def shifted(arrays, name, delta):
    return {**arrays, name: arrays[name] + delta}


FD_CASES = [
    pytest.param(name, number, gradient.wrt, id=f"{name}-{number}-{gradient.wrt}")
    for name, variants in VARIANTS.items()
    for number in range(len(variants))
    for gradient in LAYERS[name].gradients
]


def test_every_layer_and_input_has_finite_difference_cases():
    covered = {(p.values[0], p.values[2]) for p in FD_CASES}
    expected = {(name, g.wrt) for name, layer in LAYERS.items() for g in layer.gradients}
    assert covered == expected


@pytest.mark.parametrize(("name", "number", "wrt"), FD_CASES)
def test_backward_matches_central_difference_along_random_direction(name, number, wrt):
    """Reference: (phi(a + EPS v) - phi(a - EPS v)) / (2 EPS), with phi the loss or
    <forward(a), dout>, v a random normal direction for input ``wrt``.  Tolerance:
    |fd - <grad, v>| <= 1e-6 * ||grad|| ||v|| (relative to the Cauchy-Schwarz bound)."""
    layer = LAYERS[name]
    rng = np.random.default_rng(zlib.crc32(f"{name} {number} {wrt}".encode()))
    arrays, keywords = make_inputs(name, VARIANTS[name][number], rng)
    out, cache = run_forward(layer, arrays, keywords)
    upstream = None if layer.kind == "loss" else rng.normal(size=np.shape(out))
    grad = run_backward(layer, upstream, cache)[wrt]
    assert grad.shape == arrays[wrt].shape

    direction = rng.normal(size=arrays[wrt].shape)
    plus = objective(layer, shifted(arrays, wrt, EPS * direction), keywords, upstream)
    minus = objective(layer, shifted(arrays, wrt, -EPS * direction), keywords, upstream)
    numeric = (plus - minus) / (2 * EPS)
    analytic = float(np.sum(grad * direction))
    scale = np.linalg.norm(grad) * np.linalg.norm(direction)
    assert scale > 0
    error = abs(numeric - analytic) / scale
    assert error <= FD_TOLERANCE, (
        f"fd {numeric!r}, backward {analytic!r}, relative error {error:.3g}"
    )


# ---------------------------------------------------------------------------
# Full Jacobians at tiny sizes
# ---------------------------------------------------------------------------

JACOBIAN_CASES = {
    "conv2d 1x3x3x1, kernel 2x2": (
        "conv2d",
        {"x": (1, 3, 3, 1), "w": (2, 2, 1, 1), "stride": 1, "padding": 0},
    ),
    "conv2d 1x3x3x2, kernel 2x2x2x2, stride 2, padding 1": (
        "conv2d",
        {"x": (1, 3, 3, 2), "w": (2, 2, 2, 2), "stride": 2, "padding": 1},
    ),
    "conv2d 2x4x3x1, kernel 3x1x1x2, stride 2": (
        "conv2d",
        {"x": (2, 4, 3, 1), "w": (3, 1, 1, 2), "stride": 2, "padding": 0},
    ),
    "maxpool2d 1x4x4x1, size 2": ("maxpool2d", {"x": (1, 4, 4, 1), "size": 2, "stride": None}),
    "maxpool2d 1x4x4x1, size 3, stride 1": (
        "maxpool2d",
        {"x": (1, 4, 4, 1), "size": 3, "stride": 1},
    ),
    "maxpool2d 1x5x5x1, size 2, stride 3": (
        "maxpool2d",
        {"x": (1, 5, 5, 1), "size": 2, "stride": 3},
    ),
    "avgpool2d 1x4x4x1, size 2": ("avgpool2d", {"x": (1, 4, 4, 1), "size": 2, "stride": None}),
    "avgpool2d 1x4x4x1, size 3, stride 1": (
        "avgpool2d",
        {"x": (1, 4, 4, 1), "size": 3, "stride": 1},
    ),
    "avgpool2d 1x5x5x1, size 2, stride 2": (
        "avgpool2d",
        {"x": (1, 5, 5, 1), "size": 2, "stride": 2},
    ),
    "dense 2x3 -> 2": ("dense", {"x": (2, 3), "w": (3, 2)}),
    "flatten 1x2x2x2": ("flatten", {"x": (1, 2, 2, 2)}),
    **{f"{name} 2x3": (name, {"z": (2, 3)}) for name in ("sigmoid", "relu", "tanh", "softmax")},
    **{
        f"{name} 2x3": (name, {"shape": (2, 3)})
        for name in ("bce", "bce_with_logits", "softmax_cross_entropy", "mse")
    },
}


@pytest.mark.parametrize("case", list(JACOBIAN_CASES))
def test_full_jacobian_matches_finite_differences(case):
    """Reference: the Jacobian column by column from central differences (step EPS) along
    every coordinate of every differentiable input.  The backward side builds it row by
    row from one-hot upstream gradients (for a loss, the gradient is the only row).
    Tolerance: max|J_fd - J_backward| <= 1e-6 * max|J_backward|."""
    name, variant = JACOBIAN_CASES[case]
    layer = LAYERS[name]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    arrays, keywords = make_inputs(name, variant, rng)
    out, cache = run_forward(layer, arrays, keywords)
    out_size = int(np.size(out))
    for gradient in layer.gradients:
        wrt = gradient.wrt
        size = arrays[wrt].size
        numeric = np.empty((out_size, size))
        for column in range(size):
            step = np.zeros(size)
            step[column] = EPS
            step = step.reshape(arrays[wrt].shape)
            plus, _ = run_forward(layer, shifted(arrays, wrt, step), keywords)
            minus, _ = run_forward(layer, shifted(arrays, wrt, -step), keywords)
            numeric[:, column] = (np.ravel(plus) - np.ravel(minus)) / (2 * EPS)
        analytic = np.empty((out_size, size))
        if layer.kind == "loss":
            analytic[0] = run_backward(layer, None, cache)[wrt].ravel()
        else:
            for row in range(out_size):
                upstream = np.zeros(out_size)
                upstream[row] = 1.0
                upstream = upstream.reshape(out.shape)
                analytic[row] = run_backward(layer, upstream, cache)[wrt].ravel()
        scale = np.abs(analytic).max()
        assert scale > 0
        error = np.abs(numeric - analytic).max() / scale
        assert error <= FD_TOLERANCE, (
            f"{gradient.name}: relative error {error:.3g}\nfinite differences\n{numeric}\nbackward\n{analytic}"
        )


# ---------------------------------------------------------------------------
# Dot-product tests: <A x, y> = <x, A^T y>
# ---------------------------------------------------------------------------


def assert_adjoint(ax, y, x, aty):
    """|<A x, y> - <x, A^T y>| <= 1e-12 * sum|A x * y| (the size of the terms summed)."""
    assert aty.shape == x.shape
    left = float(np.sum(ax * y))
    right = float(np.sum(x * aty))
    scale = float(np.sum(np.abs(ax * y)))
    assert scale > 0
    assert abs(left - right) <= ADJOINT_TOLERANCE * scale, (left, right, abs(left - right) / scale)


CONV_SHAPES = [
    ((2, 5, 5, 2), (3, 3, 2, 3), 1, 0),
    ((2, 6, 5, 3), (3, 2, 3, 2), 2, 1),
    ((1, 7, 6, 1), (2, 2, 1, 4), 3, 2),
    ((1, 8, 8, 2), (5, 5, 2, 1), 2, 2),
]


@pytest.mark.parametrize(("x_shape", "w_shape", "stride", "padding"), CONV_SHAPES)
def test_conv_adjoint_in_x(x_shape, w_shape, stride, padding):
    """A = conv with fixed w and b = 0, A^T = backward's dx."""
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
    b = np.zeros(w_shape[-1])
    ax, cache = conv2d.forward(x, w, b, stride=stride, padding=padding)
    y = rng.normal(size=ax.shape)
    dx, _, _ = conv2d.backward(y, cache)
    assert_adjoint(ax, y, x, dx)


@pytest.mark.parametrize(("x_shape", "w_shape", "stride", "padding"), CONV_SHAPES)
def test_conv_adjoint_in_w(x_shape, w_shape, stride, padding):
    """A = conv with fixed x and b = 0 as a map of w, A^T = backward's dw."""
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
    b = np.zeros(w_shape[-1])
    aw, cache = conv2d.forward(x, w, b, stride=stride, padding=padding)
    y = rng.normal(size=aw.shape)
    _, dw, _ = conv2d.backward(y, cache)
    assert_adjoint(aw, y, w, dw)


def test_dense_adjoint_in_x_and_w():
    rng = np.random.default_rng(3)
    x, w = rng.normal(size=(4, 6)), rng.normal(size=(6, 3))
    out, cache = dense.forward(x, w, np.zeros(3))
    y = rng.normal(size=out.shape)
    dx, dw, _ = dense.backward(y, cache)
    assert_adjoint(out, y, x, dx)  # A = X -> X W
    assert_adjoint(out, y, w, dw)  # A = W -> X W


@pytest.mark.parametrize(("size", "stride"), [(2, None), (3, 1), (2, 3), (3, 2), (4, 4)])
def test_avgpool_adjoint(size, stride):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 9, 7, 3))
    keywords = {"size": size} if stride is None else {"size": size, "stride": stride}
    out, cache = avgpool2d.forward(x, **keywords)
    y = rng.normal(size=out.shape)
    assert_adjoint(out, y, x, avgpool2d.backward(y, cache))


@pytest.mark.parametrize(("size", "stride"), [(2, None), (3, 1), (2, 3), (3, 2), (4, 4)])
def test_maxpool_adjoint_at_fixed_argmax(size, stride):
    """For fixed argmax max pooling is a linear selection P x, and forward(x) = P x at the
    same x: <forward(x), y> = <x, backward(y)> (also on integer data full of ties)."""
    rng = np.random.default_rng(5)
    keywords = {"size": size} if stride is None else {"size": size, "stride": stride}
    for x in (rng.normal(size=(2, 9, 7, 3)), rng.integers(0, 3, size=(2, 9, 7, 3)).astype(float)):
        out, cache = maxpool2d.forward(x, **keywords)
        y = rng.normal(size=out.shape)
        assert_adjoint(out, y, x, maxpool2d.backward(y, cache))


def test_flatten_adjoint():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 4, 5, 2))
    out, cache = flatten.forward(x)
    y = rng.normal(size=out.shape)
    assert_adjoint(out, y, x, flatten.backward(y, cache))


# ---------------------------------------------------------------------------
# Max pooling: ties go to the first maximum in row-major window order
# ---------------------------------------------------------------------------


def loop_max_pool(x, size, stride):
    """Straightforward reference: scan each window row by row, keep the first maximum
    (a later element replaces it only if strictly greater)."""
    n, h, w, c = x.shape
    out_h, out_w = (h - size) // stride + 1, (w - size) // stride + 1
    out = np.zeros((n, out_h, out_w, c), dtype=x.dtype)
    where = np.zeros((n, out_h, out_w, c, 2), dtype=int)
    for b in range(n):
        for i in range(out_h):
            for j in range(out_w):
                for ch in range(c):
                    best = (stride * i, stride * j)
                    for u in range(size):
                        for v in range(size):
                            row, col = stride * i + u, stride * j + v
                            if x[b, row, col, ch] > x[b, best[0], best[1], ch]:
                                best = (row, col)
                    out[b, i, j, ch] = x[b, best[0], best[1], ch]
                    where[b, i, j, ch] = best
    return out, where


def loop_max_pool_backward(dout, where, x_shape):
    dx = np.zeros(x_shape, dtype=dout.dtype)
    for b, i, j, ch in np.ndindex(*dout.shape):
        row, col = where[b, i, j, ch]
        dx[b, row, col, ch] += dout[b, i, j, ch]
    return dx


@pytest.mark.parametrize("x", [np.zeros((1, 2, 2, 1)), np.ones((1, 2, 2, 1))])
def test_tied_window_routes_everything_to_first_element(x):
    out, cache = maxpool2d.forward(x, size=2)
    dx = maxpool2d.backward(np.full((1, 1, 1, 1), 5.0), cache)
    expected = np.zeros((1, 2, 2, 1))
    expected[0, 0, 0, 0] = 5.0
    np.testing.assert_array_equal(out, x[:, :1, :1, :])
    np.testing.assert_array_equal(dx, expected)


def test_tie_rule_is_row_major_not_column_major():
    """Maxima at (0, 1) and (1, 0): row-major order visits (0, 1) first."""
    x = np.array([[0.0, 3.0], [3.0, 1.0]]).reshape(1, 2, 2, 1)
    _, cache = maxpool2d.forward(x, size=2)
    dx = maxpool2d.backward(np.ones((1, 1, 1, 1)), cache)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[0.0, 1.0], [0.0, 0.0]])


def test_overlapping_tied_windows_accumulate():
    """size 3, stride 1 on a 4x4 input: four windows.  All zeros: each window's gradient
    goes to its own top-left element.  One maximum shared by all windows: it collects
    the sum of the four gradients."""
    g = np.array([[1.0, 2.0], [4.0, 8.0]]).reshape(1, 2, 2, 1)
    _, cache = maxpool2d.forward(np.zeros((1, 4, 4, 1)), size=3, stride=1)
    dx = maxpool2d.backward(g, cache)
    expected = np.zeros((4, 4))
    expected[:2, :2] = g[0, :, :, 0]
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)

    x = np.zeros((1, 4, 4, 1))
    x[0, 1, 1, 0] = 1.0  # inside all four windows
    _, cache = maxpool2d.forward(x, size=3, stride=1)
    dx = maxpool2d.backward(g, cache)
    expected = np.zeros((4, 4))
    expected[1, 1] = 1.0 + 2.0 + 4.0 + 8.0
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)

    x[0, 0, 3, 0] = 1.0  # ties with (1, 1) in window (0, 1) only, and comes first there
    _, cache = maxpool2d.forward(x, size=3, stride=1)
    dx = maxpool2d.backward(g, cache)
    expected = np.zeros((4, 4))
    expected[1, 1] = 1.0 + 4.0 + 8.0
    expected[0, 3] = 2.0
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)


@pytest.mark.parametrize(("size", "stride"), [(2, 2), (3, 1), (2, 1), (3, 2), (2, 3), (3, 3)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_many_ties_match_loop_reference(size, stride, dtype):
    """Small integers after a ReLU (as on MNIST, where about 40% of windows tie).
    Reference: the loop above.  Tolerance: exact for the forward; the backward sums the
    same float values in possibly different order, so 1e-6 relative for float32 and
    1e-12 for float64."""
    rng = np.random.default_rng(size * 10 + stride)
    x = np.maximum(rng.integers(-2, 3, size=(2, 9, 8, 3)), 0).astype(dtype)
    out, cache = maxpool2d.forward(x, size=size, stride=stride)
    expected_out, where = loop_max_pool(x, size, stride)
    np.testing.assert_array_equal(out, expected_out)

    windows = [
        x[b, stride * i : stride * i + size, stride * j : stride * j + size, ch]
        for b, i, j, ch in np.ndindex(*out.shape)
    ]
    tied = np.mean([(win == win.max()).sum() > 1 for win in windows])
    assert tied > 0.3, f"only {tied:.0%} of windows tie; the test would not exercise the rule"

    dout = rng.normal(size=out.shape).astype(dtype)
    dx = maxpool2d.backward(dout, cache)
    expected_dx = loop_max_pool_backward(dout.astype(np.float64), where, x.shape)
    assert dx.dtype == dtype
    tolerance = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(dx, expected_dx, rtol=tolerance, atol=tolerance * np.abs(dout).sum())


# ---------------------------------------------------------------------------
# Numerical stability
# ---------------------------------------------------------------------------

HUGE_LOGITS = [[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0]]
ONE_HOT = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def softplus_reference(z: float) -> float:
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_with_logits_is_finite_for_huge_logits(dtype):
    """Reference: sum of softplus(z) - y z in Python floats (stable textbook form), / m.
    Tolerance: 1e-6 relative.  Overflow, division by zero and invalid operations raise;
    underflow is allowed (exp(-1e4) is 0 in floating point, which is the right answer)."""
    z, y = np.array(HUGE_LOGITS, dtype=dtype), np.array(ONE_HOT, dtype=dtype)
    with warnings.catch_warnings(), np.errstate(over="raise", divide="raise", invalid="raise"):
        warnings.simplefilter("error")
        loss, cache = losses.bce_with_logits_forward(z, y)
        grad = losses.bce_with_logits_backward(cache)
    expected = (
        sum(
            softplus_reference(zi) - yi * zi
            for row_z, row_y in zip(HUGE_LOGITS, ONE_HOT)
            for zi, yi in zip(row_z, row_y)
        )
        / 2
    )
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert loss.dtype == dtype and grad.dtype == dtype
    assert abs(float(loss) - expected) <= 1e-6 * expected
    sigmoid = 1 / (1 + np.exp(-np.clip(np.array(HUGE_LOGITS), -700, 700)))
    np.testing.assert_allclose(grad, (sigmoid - np.array(ONE_HOT)) / 2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_is_finite_for_huge_logits(dtype):
    """Reference: per row, logsumexp (shifted by the row maximum, in Python floats) minus
    the labelled logit, / m.  Tolerance 1e-6 relative; overflow, division by zero and
    invalid operations raise (underflow to 0 of exp(-2e4) is allowed)."""
    z, y = np.array(HUGE_LOGITS, dtype=dtype), np.array(ONE_HOT, dtype=dtype)
    with warnings.catch_warnings(), np.errstate(over="raise", divide="raise", invalid="raise"):
        warnings.simplefilter("error")
        loss, cache = losses.softmax_cross_entropy_forward(z, y)
        grad = losses.softmax_cross_entropy_backward(cache)
    expected = 0.0
    for row_z, row_y in zip(HUGE_LOGITS, ONE_HOT):
        top = max(row_z)
        lse = top + math.log(math.fsum(math.exp(v - top) for v in row_z))
        expected += sum(yi * (lse - zi) for zi, yi in zip(row_z, row_y))
    expected /= 2
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert loss.dtype == dtype and grad.dtype == dtype
    assert abs(float(loss) - expected) <= 1e-6 * expected
    softmax = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # exp(-1e4) is 0 in float64 too
    np.testing.assert_allclose(grad, (softmax - np.array(ONE_HOT)) / 2, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_and_tanh_of_huge_inputs_are_finite_without_warnings(dtype):
    """np.errstate(all="raise") and warnings as errors: any overflow, underflow, division
    by zero or invalid operation fails.  Reference values: sigmoid(1e4) = 1,
    sigmoid(-1e4) = 0, tanh(+-1e4) = +-1 (to 1e-12 absolute)."""
    z = np.array([[1e4, -1e4, 0.0]], dtype=dtype)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        a, cache = activations.sigmoid_forward(z)
        dz = activations.sigmoid_backward(np.ones_like(z), cache)
        t, t_cache = activations.tanh_forward(z)
        dt = activations.tanh_backward(np.ones_like(z), t_cache)
    for array in (a, dz, t, dt):
        assert np.all(np.isfinite(array)) and array.dtype == dtype
    np.testing.assert_allclose(a, [[1.0, 0.0, 0.5]], atol=1e-12)
    np.testing.assert_allclose(dz, [[0.0, 0.0, 0.25]], atol=1e-12)
    np.testing.assert_allclose(t, [[1.0, -1.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(dt, [[0.0, 0.0, 1.0]], atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_keeps_its_relative_accuracy_for_negative_inputs(dtype):
    """Reference: 1 / (1 + e^20) = 2.0611536181902037e-09 and 1 / (1 + e^80) =
    1.8048513878454153e-35 (mpmath, 30 digits); relative tolerance 1e-6 in float32,
    1e-14 in float64.  A form with cancellation, such as (1 + tanh(z/2)) / 2, returns 0
    or a multiple of float eps here."""
    z = np.array([[-20.0, -80.0]], dtype=dtype)
    a, _ = activations.sigmoid_forward(z)
    np.testing.assert_allclose(
        a,
        [[2.0611536181902037e-09, 1.8048513878454153e-35]],
        rtol=1e-6 if dtype == np.float32 else 1e-14,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_of_huge_inputs_is_finite(dtype):
    """Overflow, division by zero and invalid operations raise (exp(-2e4) underflowing
    to 0 is the right answer and allowed).  Reference: softmax = one-hot at the maximum
    (to 1e-12 absolute); the gradient of sum(softmax) is 0."""
    z = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], dtype=dtype)
    with warnings.catch_warnings(), np.errstate(over="raise", divide="raise", invalid="raise"):
        warnings.simplefilter("error")
        s, cache = activations.softmax_forward(z)
        ds = activations.softmax_backward(np.ones_like(z), cache)
    assert s.dtype == dtype and ds.dtype == dtype
    np.testing.assert_allclose(s, [[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-7)
    np.testing.assert_allclose(ds, np.zeros_like(z), atol=1e-7)


@pytest.mark.parametrize("module", ["conv2d", "dense"])
def test_input_gradient_false_skips_only_the_input_gradient(module):
    """Reference: the default call; input_gradient=False returns None for dx and identical dw, db."""
    import importlib

    layer = importlib.import_module(f"generated.{module}")
    rng = np.random.default_rng(7)
    if module == "conv2d":
        x, w, b = (
            rng.standard_normal((2, 6, 6, 2)),
            rng.standard_normal((3, 3, 2, 4)),
            rng.standard_normal(4),
        )
    else:
        x, w, b = rng.standard_normal((3, 5)), rng.standard_normal((5, 4)), rng.standard_normal(4)
    out, cache = layer.forward(x, w, b)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = layer.backward(dout, cache)
    skipped = layer.backward(dout, cache, input_gradient=False)
    assert dx is not None and skipped[0] is None
    assert np.array_equal(skipped[1], dw) and np.array_equal(skipped[2], db)


WORKSPACE_CASES = [
    pytest.param(name, number, id=f"{name}-{number}")
    for name, variants in VARIANTS.items()
    for number in range(len(variants))
]


@pytest.mark.parametrize("name, number", WORKSPACE_CASES)
def test_a_workspace_gives_bitwise_the_same_results_and_reuses_its_arrays(name, number):
    """Reference: the same call without a workspace, bitwise.  Calling again with the same
    workspace and new inputs of the same shapes writes into the arrays kept the first
    time (no new allocation) and gives the new results."""
    layer = LAYERS[name]
    forward, backward = functions(layer)
    rng = np.random.default_rng(number)
    arrays, keywords = make_inputs(name, VARIANTS[name][number], rng)
    inputs = [arrays[item.name] for item in layer.inputs]

    def both(inputs, workspace):
        out, cache = forward(*inputs, **keywords, workspace=workspace)
        upstream = (
            None if layer.kind == "loss" else np.cos(np.arange(np.size(out))).reshape(np.shape(out))
        )
        if layer.kind == "loss":
            grads = backward(cache, workspace=workspace)
        else:
            grads = backward(upstream, cache, workspace=workspace)
        grads = grads if isinstance(grads, tuple) else (grads,)
        return [np.copy(out), *(np.copy(g) for g in grads)], [out, *grads]

    expected, _ = both(inputs, None)
    workspace = {}
    got, first_arrays = both(inputs, workspace)
    for want, have in zip(expected, got):
        assert np.array_equal(want, have) and want.dtype == have.dtype
    # flatten only reshapes, and dense adds its bias in place to the new array its matrix
    # product makes: they have nothing to keep.
    if name not in ("flatten", "dense"):
        assert workspace, f"{name}: nothing was kept in the workspace"
    kept = {key: id(value) for key, value in workspace.items()}

    others = [
        array * 0.5 + 0.25 if item.name != "targets" else array
        for array, item in zip(inputs, layer.inputs)
    ]
    expected_again, _ = both(others, None)
    got_again, _ = both(others, workspace)
    for want, have in zip(expected_again, got_again):
        assert np.array_equal(want, have)
    assert {key: id(value) for key, value in workspace.items()} == kept


@pytest.mark.parametrize("ufunc", [np.add, np.subtract, np.multiply, np.divide])
@pytest.mark.parametrize(
    "shape", [(3, 4, 5, 6), (2, 7, 1), (0, 3, 2), (4, 5), (2, 3, 4, 1)], ids=str
)
def test_with_vector_is_the_plain_ufunc_bitwise(ufunc, shape):
    """Reference: ufunc(x, y, out=...) itself, for the vector on either side, contiguous or
    not (a transposed view takes the plain path)."""
    from generated import _kernels

    rng = np.random.default_rng(0)
    full = rng.normal(size=shape).astype(np.float32)
    vector = rng.normal(size=shape[-1]).astype(np.float32) + 3
    for x, y in ((vector, full), (full, vector)):
        want = ufunc(x, y)
        out = np.empty_like(want)
        assert _kernels.with_vector(ufunc, x, y, out) is not None
        assert np.array_equal(out, want)
    strided = (
        np.ascontiguousarray(np.swapaxes(full, 0, -2)).swapaxes(0, -2) if full.ndim > 2 else full
    )
    out = np.empty(strided.shape, np.float32)
    _kernels.with_vector(ufunc, strided, vector, out)
    assert np.array_equal(out, ufunc(strided, vector))


@pytest.mark.parametrize(
    "shapes",
    [((2, 3),), ((2, 3), (2, 3)), ((6,), (4, 5, 6)), ((4, 1, 6), (5, 1), (4, 5, 6)), ((), (3,))],
    ids=str,
)
def test_broadcast_shapes_is_numpys(shapes):
    from generated import _kernels

    assert _kernels.broadcast_shapes(*shapes) == np.broadcast_shapes(*shapes)


def test_broadcast_shapes_refuses_what_numpy_refuses():
    from generated import _kernels

    with pytest.raises(ValueError):
        _kernels.broadcast_shapes((2, 3), (3, 2))


def test_buffer_reusing_gives_back_only_an_array_that_fits_and_may_be_written():
    from generated import _kernels

    array = np.zeros((2, 3, 4), np.float32)
    assert _kernels.buffer_reusing(array, None, "k", (2, 3, 4), np.float32) is array
    workspace = {}
    misfits = [
        (array, (2, 3, 5), np.float32),  # another shape (a broadcast result)
        (array, (2, 3, 4), np.float64),  # another dtype (a wider result type)
        (array[:, :, ::2], (2, 3, 2), np.float32),  # not contiguous
        (np.zeros(3), (3,), np.float64),
    ]
    misfits[-1][0].flags.writeable = False  # read-only
    for operand, shape, dtype in misfits:
        got = _kernels.buffer_reusing(operand, workspace, "k", shape, dtype)
        assert got is not operand and got.shape == shape and got.dtype == dtype
        assert got is workspace["k"]


@pytest.mark.parametrize("ufunc", [np.maximum, np.minimum])
@pytest.mark.parametrize("shape", [(64, 28, 28, 6), (3, 4, 5), (0, 3, 2), (40000,)], ids=str)
def test_with_scalar_is_the_plain_ufunc_bitwise(ufunc, shape):
    """Reference: ufunc(x, y, out=...) itself, bitwise, for the scalar on either side, with
    NaN, infinities and signed zeros among the values; (64, 28, 28, 6) is large enough to
    take the repeated row, a transposed view and a 1-D array take the plain call."""
    from generated import _kernels

    rng = np.random.default_rng(0)
    full = rng.normal(size=shape).astype(np.float32)
    flat = full.reshape(-1)
    flat[: min(flat.size, 5)] = [np.nan, np.inf, -np.inf, -0.0, 0.0][: min(flat.size, 5)]
    for scalar in (0, -0.0, 0.5):
        for x, y in ((scalar, full), (full, scalar)):
            want = ufunc(x, y)
            out = np.empty_like(want)
            assert _kernels.with_scalar(ufunc, x, y, out) is not None
            assert np.array_equal(out.view(np.uint32), want.view(np.uint32))
    if full.ndim > 2:
        strided = full.transpose(1, 0, *range(2, full.ndim))
        out = np.empty(strided.shape, np.float32)
        _kernels.with_scalar(ufunc, strided, 0, out)
        assert np.array_equal(out.view(np.uint32), ufunc(strided, 0).view(np.uint32))


def test_one_minus_a_is_computed_in_the_wider_dtype_of_mixed_inputs():
    """Reference: NumPy in float64 on the float32 outputs widened (exact), in the lowered
    order, bitwise: ((1 - a) * da) * a for sigmoid; (1 - a^2) * da for tanh, with a^2 in
    float32 as NumPy computes ``a**2``.  The subtraction must not round in float32."""
    from generated import activations

    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 10)).astype(np.float32)
    da = rng.normal(size=(64, 10))
    out, cache = activations.sigmoid_forward(z)
    wide = out.astype(np.float64)
    for workspace in (None, {}):
        got = activations.sigmoid_backward(da, cache, workspace=workspace)
        assert got.dtype == np.float64
        assert np.array_equal(got, (1.0 - wide) * da * wide)
    out, cache = activations.tanh_forward(z)
    squared = (out**2).astype(np.float64)
    assert np.array_equal(activations.tanh_backward(da, cache), (1.0 - squared) * da)


def test_maxpool_workspace_follows_inputs_whose_windows_have_the_same_shape():
    """Reference: the same calls without a workspace, bitwise.  Inputs of 8x8, 9x9, 8x9 and
    9x8 pixels all give 4x4 windows at size 2, stride 2 (and 7x7 / 8x8 at stride 1 give 6x6 /
    7x7): the window offsets kept in the workspace must follow the input's width, not only
    the output's shape."""
    rng = np.random.default_rng(0)
    workspace = {}
    for height, width, stride in [(8, 8, 2), (9, 9, 2), (8, 9, 2), (9, 8, 2), (8, 8, 2), (7, 7, 1)]:
        x = rng.integers(-2, 3, size=(3, height, width, 2)).astype(np.float32)
        x[0, 0, 0, 0] = -0.0
        want, want_cache = maxpool2d.forward(x, size=2, stride=stride)
        got, cache = maxpool2d.forward(x, size=2, stride=stride, workspace=workspace)
        assert np.array_equal(want.view(np.uint32), got.view(np.uint32))
        upstream = rng.normal(size=want.shape).astype(np.float32)
        want_dx = maxpool2d.backward(upstream, want_cache)
        got_dx = maxpool2d.backward(upstream, cache, workspace=workspace)
        assert np.array_equal(want_dx.view(np.uint32), got_dx.view(np.uint32))


def test_an_inf_pixel_spoils_only_the_outputs_whose_window_holds_it():
    """Seed-sized kernel (9x9, one input channel: the banded path for finite inputs).
    Reference: the window sum written out directly for each output; an output is
    non-finite exactly when its window contains the inf pixel."""
    from generated import conv2d

    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 16, 40, 1))
    x[1, 7, 20, 0] = np.inf
    w = rng.normal(size=(9, 9, 1, 3))
    out, cache = conv2d.forward(x, w, np.zeros(3))
    windows = np.lib.stride_tricks.sliding_window_view(x[..., 0], (9, 9), axis=(1, 2))
    with np.errstate(invalid="ignore"):
        direct = np.einsum("nijuv,uvo->nijo", windows, w[:, :, 0, :])
    np.testing.assert_array_equal(np.isfinite(out), np.isfinite(direct))
    finite = np.isfinite(direct)
    np.testing.assert_allclose(out[finite], direct[finite], rtol=1e-10, atol=1e-10)


def test_an_inf_in_the_weights_gradient_spoils_only_the_weights_whose_terms_hold_it():
    """The banded weights product (seed-sized kernel, one input channel) computes and
    drops entries for pixels outside the windows: an inf pixel or an inf upstream
    gradient must reach exactly the weights whose sums hold it, as in the sums written
    out directly (where inf * 0 is NaN too)."""
    from generated import conv2d

    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 16, 40, 1))
    w = rng.normal(size=(9, 9, 1, 3))
    _, cache = conv2d.forward(x, w, np.zeros(3))
    x[1, 7, 20, 0] = np.inf  # after the forward: its cache holds the same array
    upstream = rng.normal(size=(2, 8, 32, 3))
    upstream[0, 3, 30, 2] = -np.inf
    upstream[1, 0, 0, 0] = 0.0
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, as in the direct sums
        _, dw, _ = conv2d.backward(upstream, cache, input_gradient=False)
    windows = np.lib.stride_tricks.sliding_window_view(x[..., 0], (8, 32), axis=(1, 2))
    with np.errstate(invalid="ignore"):
        direct = np.einsum("nuvij,nijo->uvo", windows, upstream)
    np.testing.assert_array_equal(np.isnan(dw[:, :, 0, :]), np.isnan(direct))
    np.testing.assert_array_equal(np.isinf(dw[:, :, 0, :]), np.isinf(direct))
    finite = np.isfinite(direct)
    assert not finite.all()
    np.testing.assert_allclose(dw[:, :, 0, :][finite], direct[finite], rtol=1e-10, atol=1e-10)
