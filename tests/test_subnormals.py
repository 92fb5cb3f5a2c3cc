"""No subnormal floats out of the generated code's saturating paths.

A subnormal float (nonzero, smaller in magnitude than ``np.finfo(dtype).tiny``) costs
tens of times more per operation on many x86 CPUs. A saturated sigmoid made thousands
of them per batch in the seed network's convolution gradient. derive/ wraps the
closed forms that make them in ``flush_subnormal`` (the identity in the proof's exact
arithmetic), and the generated code sets them to 0. These tests build inputs that do
produce subnormals in the unflushed formulas and check, deterministically, that the
generated results hold none and differ from those formulas only there. (How much time
this saves is measured by benchmarks/training.py, not tested.)
"""

from __future__ import annotations

import numpy as np
import pytest

from cnnderive.train.networks import build
from generated import _kernels, activations, losses

FLOATS = (np.float32, np.float64)


def subnormal(a) -> np.ndarray:
    a = np.asarray(a)
    return (a != 0) & (np.abs(a) < np.finfo(a.dtype).tiny)


def flushed(reference: np.ndarray) -> np.ndarray:
    """What the generated code must give: ``reference`` with its subnormal values set to 0."""
    return np.where(subnormal(reference), np.zeros_like(reference), reference)


def same_bits(a, b) -> bool:
    """Equal values, NaN included; 0.0 and -0.0 count as equal."""
    return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


@pytest.mark.parametrize("dtype", FLOATS)
def test_flush_subnormals_zeroes_exactly_the_subnormal_values(dtype):
    info = np.finfo(dtype)
    largest_subnormal = np.nextafter(info.tiny, dtype(0))
    smallest_subnormal = np.nextafter(dtype(0), dtype(1))
    edges = [info.tiny, largest_subnormal, smallest_subnormal, info.tiny / 2, 1.0, info.max]
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan] + edges + [-e for e in edges], dtype)
    rng = np.random.default_rng(0)
    decades = int(np.log10(info.max))  # normal magnitudes from 10^-decades to 10^decades
    scales = 10.0 ** rng.integers(-decades, decades, 1000)
    normal = (rng.standard_normal(1000) * scales).astype(dtype)
    values = np.concatenate([specials, normal, (rng.random(1000) * info.tiny).astype(dtype)])
    assert subnormal(values).sum() > 500  # the input really holds subnormal values
    original = values.copy()

    result = _kernels.flush_subnormals(values)
    assert same_bits(values, original)  # out=None leaves the input alone
    assert not subnormal(result).any()
    assert same_bits(result, flushed(original))

    in_place = values.copy()
    assert _kernels.flush_subnormals(in_place, out=in_place) is in_place
    assert same_bits(in_place, result)

    strided = np.repeat(original, 2)[::2]  # a non-contiguous input
    out = np.empty_like(original)
    _kernels.flush_subnormals(strided, out=out)
    assert same_bits(out, result)


def saturating_logits(dtype) -> np.ndarray:
    """Pre-activations from -120 to 120: sigmoid and its gradient reach below tiny in both types."""
    limit = 120.0 if dtype == np.float32 else 800.0
    return np.linspace(-limit, limit, 4001, dtype=dtype).reshape(1, -1)


@pytest.mark.parametrize("dtype", FLOATS)
def test_sigmoid_forward_and_backward_hold_no_subnormal_values(dtype):
    z = saturating_logits(dtype)
    upstream = np.full_like(z, 1e-3)
    with np.errstate(over="ignore", under="ignore"):
        textbook = 1 / (1 + np.exp(-z))  # the unflushed forward, operation for operation
    # sigmoid's own subnormal range is narrow: the last units before exp(-z) overflows
    assert subnormal(textbook).any()

    out, cache = activations.sigmoid_forward(z)
    assert not subnormal(out).any()
    assert same_bits(out, flushed(textbook))

    with np.errstate(under="ignore"):
        product = (1 - out) * upstream * out  # the unflushed gradient, in the generated order
    assert subnormal(product).any()
    dz = activations.sigmoid_backward(upstream, cache)
    assert not subnormal(dz).any()
    assert same_bits(dz, flushed(product))

    # The same bits through a workspace (the lowered, in-place form of the same formula).
    workspace = {}
    out_kept, cache_kept = activations.sigmoid_forward(z, workspace=workspace)
    assert same_bits(out_kept, out)
    assert same_bits(activations.sigmoid_backward(upstream, cache_kept, workspace=workspace), dz)


@pytest.mark.parametrize("dtype", FLOATS)
def test_fused_losses_give_no_subnormal_gradient(dtype):
    logits = saturating_logits(dtype).reshape(-1, 1).repeat(3, axis=1)
    logits[:, 1] = 0.0  # each row: a saturated logit and a moderate one
    targets = np.zeros_like(logits)
    targets[:, 2] = 1.0
    for forward, backward in (
        (losses.bce_with_logits_forward, losses.bce_with_logits_backward),
        (losses.softmax_cross_entropy_forward, losses.softmax_cross_entropy_backward),
    ):
        for workspace in (None, {}):
            _, cache = forward(logits, targets, workspace=workspace)
            gradient = backward(cache, workspace=workspace)
            assert np.isfinite(gradient).all()
            assert not subnormal(gradient).any(), forward.__name__


def test_seed_network_batch_built_to_saturate_gives_the_convolution_no_subnormals():
    """Kernels 8 times the initial ones put the sigmoid's inputs far into both tails (as
    a long training run does): the unflushed gradient into the convolution would hold
    hundreds of subnormal values; the generated one holds none, and is otherwise the same.
    No layer's output or gradient holds any (the average pool's quarter of small values
    is flushed too)."""
    net = build("seed", seed=0, dtype=np.float32, threads=1)
    net.params["conv1_w"] *= 8
    rng = np.random.default_rng(1)
    images = rng.random((64, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, 64)

    sigmoid_layer = net.layers[1]
    seen = {}
    forward, backward = sigmoid_layer.forward, sigmoid_layer.backward

    def record_forward(x, params, keep=True):
        seen["z"] = x.copy()
        return forward(x, params, keep)

    def record_backward(dout, grads):
        seen["da"] = dout.copy()
        seen["dz"] = backward(dout, grads)
        return seen["dz"]

    sigmoid_layer.forward, sigmoid_layer.backward = record_forward, record_backward
    found = {}

    def counting(call, key):
        def counted(*args):
            result = call(*args)  # the first layer's backward returns None: no dx
            found[key] = 0 if result is None else int(subnormal(result).sum())
            return result

        return counted

    for index, layer in enumerate(net.layers):  # every layer's outputs and gradients
        for part in ("forward", "backward"):
            setattr(layer, part, counting(getattr(layer, part), (index, part)))
    _, _, grads = net.loss_and_gradients(images, labels)
    assert len(found) == 2 * len(net.layers)
    assert not any(found.values()), found

    with np.errstate(over="ignore", under="ignore"):
        textbook = 1 / (1 + np.exp(-seen["z"]))
        product = (1 - textbook) * seen["da"] * textbook
    assert subnormal(textbook).sum() > 100 and subnormal(product).sum() > 100
    assert not subnormal(seen["dz"]).any()
    assert same_bits(seen["dz"], flushed(product))
    for name, gradient in grads.items():
        assert not subnormal(gradient).any(), name
