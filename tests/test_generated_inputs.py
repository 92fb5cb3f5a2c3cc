"""Bad input to the generated layers: the error type, and a message that names the
function, what was received and what was expected."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest

from derive.layers import LAYERS
from generated import activations, avgpool2d, conv2d, dense, flatten, losses, maxpool2d

X = np.zeros((1, 4, 4, 2))
W = np.zeros((2, 2, 2, 3))
B = np.zeros(3)


def raises(kind, call, *substrings):
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    for part in substrings:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (
            lambda: conv2d.forward(X[0], W, B),
            ["conv2d.forward", "x must have 4 dimensions", "(4, 4, 2)"],
        ),
        (lambda: conv2d.forward(X, W[0], B), ["w must have 4 dimensions", "(2, 2, 3)"]),
        (lambda: conv2d.forward(X, W, B[None]), ["b must have 1 dimensions", "(1, 3)"]),
        (
            lambda: maxpool2d.forward(X[0]),
            ["maxpool2d.forward", "x must have 4 dimensions", "(4, 4, 2)"],
        ),
        (lambda: avgpool2d.forward(X[..., None]), ["avgpool2d.forward", "(1, 4, 4, 2, 1)"]),
        (lambda: flatten.forward(np.zeros((2, 3))), ["flatten.forward", "4 dimensions", "(2, 3)"]),
        (
            lambda: dense.forward(np.zeros((2, 3, 1)), np.zeros((3, 2)), np.zeros(2)),
            ["dense.forward", "x must have 2 dimensions", "(2, 3, 1)"],
        ),
        (
            lambda: losses.mse_forward(np.zeros(3), np.zeros(3)),
            ["losses.mse_forward", "pred must have 2 dimensions", "(3,)"],
        ),
        (
            lambda: losses.bce_forward(np.full((2, 3), 0.5), np.zeros((2, 3, 1))),
            ["targets must have 2 dimensions", "(2, 3, 1)"],
        ),
    ],
    ids=[
        "conv-x",
        "conv-w",
        "conv-b",
        "maxpool",
        "avgpool",
        "flatten",
        "dense",
        "mse",
        "bce-targets",
    ],
)
def test_wrong_number_of_dimensions(call, expected):
    raises(ValueError, call, *expected)


def test_conv_mismatched_channels_names_both_shapes():
    raises(
        ValueError,
        lambda: conv2d.forward(X, np.zeros((2, 2, 1, 3)), B),
        "conv2d.forward",
        "in_channels",
        "(2, 2, 1, 3)",
        "(1, 4, 4, 2)",
        "is 1",
        "is 2",
    )


def test_conv_bias_of_wrong_length():
    raises(
        ValueError,
        lambda: conv2d.forward(X, W, np.zeros(2)),
        "b has shape (2,)",
        "(2, 2, 2, 3)",
        "out_channels",
    )


def test_dense_mismatched_features_and_bias():
    x = np.zeros((2, 3))
    raises(
        ValueError,
        lambda: dense.forward(x, np.zeros((4, 5)), np.zeros(5)),
        "in_features",
        "(4, 5)",
        "(2, 3)",
    )
    raises(
        ValueError,
        lambda: dense.forward(x, np.zeros((3, 5)), np.zeros(4)),
        "out_features",
        "(4,)",
        "(3, 5)",
    )


def test_loss_targets_of_wrong_shape():
    logits = np.zeros((2, 3))
    raises(
        ValueError,
        lambda: losses.softmax_cross_entropy_forward(logits, np.zeros((2, 4))),
        "classes",
        "(2, 4)",
        "(2, 3)",
    )
    raises(
        ValueError,
        lambda: losses.bce_with_logits_forward(logits, np.zeros((3, 3))),
        "batch",
        "(3, 3)",
        "(2, 3)",
    )


@pytest.mark.parametrize(
    ("kernel", "padding", "padded"), [(5, 0, "4x4"), (7, 1, "6x6"), (9, 2, "8x8")]
)
def test_conv_kernel_larger_than_padded_input(kernel, padding, padded):
    w = np.zeros((kernel, kernel, 2, 3))
    raises(
        ValueError,
        lambda: conv2d.forward(X, w, B, padding=padding),
        f"kernel {kernel}x{kernel}",
        f"padded input {padded}",
    )


def test_conv_kernel_that_fits_only_in_one_direction():
    w = np.zeros((2, 5, 2, 3))
    raises(ValueError, lambda: conv2d.forward(X, w, B), "kernel 2x5", "padded input 4x4")


@pytest.mark.parametrize("module", [maxpool2d, avgpool2d], ids=["maxpool2d", "avgpool2d"])
def test_pool_window_that_does_not_fit(module):
    x = np.zeros((1, 4, 6, 1))
    raises(
        ValueError, lambda: module.forward(x, size=5), "pool window 5x5", "input 4x6", "at most 4"
    )


# ---------------------------------------------------------------------------
# Integer parameters
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [0, -1, -3])
def test_conv_stride_below_one(stride):
    raises(
        ValueError,
        lambda: conv2d.forward(X, W, B, stride=stride),
        "stride must be at least 1",
        f"got {stride}",
    )


def test_conv_negative_padding():
    raises(
        ValueError,
        lambda: conv2d.forward(X, W, B, padding=-1),
        "padding must be at least 0",
        "got -1",
    )


@pytest.mark.parametrize("value", [1.5, 2.0, "2", None, True, np.float64(2.0)])
@pytest.mark.parametrize("name", ["stride", "padding"])
def test_conv_non_integer_parameters(name, value):
    raises(
        TypeError,
        lambda: conv2d.forward(X, W, B, **{name: value}),
        f"{name} must be an integer",
        f"got {value!r}",
    )


def test_numpy_integers_are_integers():
    """The check accepts any integral type (``numbers.Integral``): np.int64 behaves like int."""
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(1, 5, 5, 2)), rng.normal(size=(2, 2, 2, 3)), rng.normal(size=3)
    expected, _ = conv2d.forward(x, w, b, stride=2, padding=1)
    got, _ = conv2d.forward(x, w, b, stride=np.int64(2), padding=np.int32(1))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("module", [maxpool2d, avgpool2d], ids=["maxpool2d", "avgpool2d"])
def test_pool_parameters(module):
    raises(ValueError, lambda: module.forward(X, size=0), "pool size must be at least 1", "got 0")
    raises(
        ValueError,
        lambda: module.forward(X, size=2, stride=0),
        "pool stride must be at least 1",
        "got 0",
    )
    raises(
        ValueError,
        lambda: module.forward(X, size=2, stride=-2),
        "pool stride must be at least 1",
        "got -2",
    )
    raises(TypeError, lambda: module.forward(X, size=1.5), "size must be an integer", "got 1.5")
    raises(
        TypeError,
        lambda: module.forward(X, size=2, stride=1.5),
        "stride must be an integer",
        "got 1.5",
    )


# ---------------------------------------------------------------------------
# Types, for every function of the catalogue
# ---------------------------------------------------------------------------


def valid_call(layer):
    """Arrays of the layer's example shapes (float64) and its parameters."""
    config = layer.example
    arrays = {item.name: np.full(tuple(config[d] for d in item.axes), 0.5) for item in layer.inputs}
    keywords = {p.symbol.name: config[p.symbol] for p in layer.params}
    module = importlib.import_module(f"generated.{layer.module}")
    return module, arrays, keywords


def call_forward(layer, module, arrays, keywords):
    forward = getattr(module, layer.forward_function)
    return forward(*(arrays[item.name] for item in layer.inputs), **keywords)


INPUTS = [
    pytest.param(name, item.name, id=f"{name}-{item.name}")
    for name, layer in LAYERS.items()
    for item in layer.inputs
]


@pytest.mark.parametrize(("name", "input_name"), INPUTS)
def test_integer_dtype_input(name, input_name):
    layer = LAYERS[name]
    module, arrays, keywords = valid_call(layer)
    arrays[input_name] = arrays[input_name].astype(np.int64)
    raises(
        TypeError,
        lambda: call_forward(layer, module, arrays, keywords),
        f"{layer.module}.{layer.forward_function}",
        f"{input_name} has dtype int64",
        "floating point",
    )


@pytest.mark.parametrize(("name", "input_name"), INPUTS)
def test_non_array_input(name, input_name):
    layer = LAYERS[name]
    module, arrays, keywords = valid_call(layer)
    arrays[input_name] = arrays[input_name].tolist()
    raises(
        TypeError,
        lambda: call_forward(layer, module, arrays, keywords),
        f"{input_name} must be a NumPy array",
        "got list",
    )


@pytest.mark.parametrize("name", [n for n, layer in LAYERS.items() if layer.kind != "loss"])
def test_upstream_gradient_of_wrong_shape(name):
    layer = LAYERS[name]
    module, arrays, keywords = valid_call(layer)
    out, cache = call_forward(layer, module, arrays, keywords)
    backward = getattr(module, layer.backward_function)
    wrong = np.zeros(out.shape[:-1] + (out.shape[-1] + 1,))
    where = f"{layer.module}.{layer.backward_function}"
    raises(
        ValueError,
        lambda: backward(wrong, cache),
        where,
        f"{layer.upstream} must have",
        str(out.shape),
        str(wrong.shape),
    )
    raises(
        ValueError,
        lambda: backward(wrong[..., None], cache),
        str(out.shape),
        str(wrong[..., None].shape),
    )
    raises(  # not an array at all: a TypeError, as forward gives for its inputs
        TypeError,
        lambda: backward(np.zeros(out.shape).tolist(), cache),
        str(out.shape),
        "got list",
    )


# ---------------------------------------------------------------------------
# Issue 14: the backward passes' other arguments, workspaces and the losses' domains
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n, layer in LAYERS.items() if layer.kind != "loss"])
@pytest.mark.parametrize("dtype", [np.int64, np.complex128, bool])
def test_backward_refuses_a_gradient_that_is_not_real_floating_point(name, dtype):
    """Forward refuses integer and complex inputs; backward refuses such a gradient too
    (a complex one used to come back as a complex dx)."""
    layer = LAYERS[name]
    module, arrays, keywords = valid_call(layer)
    out, cache = call_forward(layer, module, arrays, keywords)
    backward = getattr(module, layer.backward_function)
    raises(
        TypeError,
        lambda: backward(np.ones(out.shape, dtype=dtype), cache),
        f"{layer.module}.{layer.backward_function}: {layer.upstream} has dtype",
        ".astype(np.float32)",
    )


@pytest.mark.parametrize("name", list(LAYERS))
def test_backward_refuses_a_missing_or_foreign_cache(name):
    layer = LAYERS[name]
    module, arrays, keywords = valid_call(layer)
    out, cache = call_forward(layer, module, arrays, keywords)
    backward = getattr(module, layer.backward_function)
    where = f"{layer.module}.{layer.backward_function}"
    forward = f"{layer.module}.{layer.forward_function}"

    def call(bad_cache):
        return backward(bad_cache) if layer.kind == "loss" else backward(out, bad_cache)

    raises(TypeError, lambda: call(None), where, f"the cache that {forward} returned", "NoneType")
    raises(TypeError, lambda: call({"x": 1}), where, "a dict that no cnnderive forward")
    other = "maxpool2d" if name != "maxpool2d" else "conv2d"
    other_layer = LAYERS[other]
    other_module, other_arrays, other_keywords = valid_call(other_layer)
    _, other_cache = call_forward(other_layer, other_module, other_arrays, other_keywords)
    raises(TypeError, lambda: call(other_cache), where, f"the cache of {other}.forward")


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("workspace", [[], (), "ws", 0])
def test_a_workspace_that_is_not_a_dict_is_refused(name, workspace):
    layer = LAYERS[name]
    module, arrays, keywords = valid_call(layer)
    forward = getattr(module, layer.forward_function)
    raises(
        TypeError,
        lambda: forward(*arrays.values(), **keywords, workspace=workspace),
        f"{layer.module}.{layer.forward_function}: workspace must be None or a dict",
        type(workspace).__name__,
    )
    out, cache = call_forward(layer, module, arrays, keywords)
    backward = getattr(module, layer.backward_function)
    args = (cache,) if layer.kind == "loss" else (np.ones_like(out), cache)
    raises(TypeError, lambda: backward(*args, workspace=workspace), "workspace must be None")


@pytest.mark.parametrize(
    "probs",
    [[[1.5, 0.5]], [[-0.1, 0.5]], [[0.0, 0.5]], [[1.0, 0.5]], [[np.nan, 0.5]]],
    ids=["above-1", "below-0", "zero", "one", "nan"],
)
def test_bce_refuses_probabilities_where_its_loss_is_not_finite(probs):
    """The rule (issue 14): BCE on probabilities needs 0 < p < 1; 0 or 1 (infinite or
    0/0 loss and gradient) and values outside are a ValueError pointing to bce_with_logits,
    instead of a NaN with a RuntimeWarning."""
    targets = np.array([[1.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning on the way
        raises(
            ValueError,
            lambda: losses.bce_forward(np.array(probs), targets),
            "losses.bce_forward: probs must lie strictly between 0 and 1",
            "bce_with_logits",
        )


def test_bce_accepts_probabilities_close_to_0_and_1():
    loss, _ = losses.bce_forward(np.array([[1e-12, 1 - 1e-12]]), np.array([[0.0, 1.0]]))
    assert np.isfinite(loss) and loss < 1e-9


@pytest.mark.parametrize("name", [n for n, layer in LAYERS.items() if layer.kind == "loss"])
def test_every_loss_refuses_an_empty_batch(name):
    layer = LAYERS[name]
    forward = getattr(losses, layer.forward_function)
    empty = np.zeros((0, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raises(
            ValueError,
            lambda: forward(empty, empty),
            f"losses.{layer.forward_function}: the batch is empty",
            "at least one example",
        )


def test_activations_accept_any_rank_but_not_other_types():
    """Elementwise activations take any shape; softmax runs over the last axis."""
    z = np.linspace(-1, 1, 24).reshape(2, 3, 4)
    out, _ = activations.softmax_forward(z)
    np.testing.assert_allclose(out.sum(axis=-1), np.ones((2, 3)), rtol=1e-12)
    raises(TypeError, lambda: activations.tanh_forward(1.0), "z must be a NumPy array", "got float")
