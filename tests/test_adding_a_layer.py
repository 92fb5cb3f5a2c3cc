"""Adding a layer, as the README's "Add a layer with one equation" describes: the engineer
writes only the forward pass; cnnderive derives, proves and generates the rest, and the
generated module trains a network.  No gradient is written anywhere in this file."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from cnnderive.cli import main

LEAKY_RELU = "leaky_relu: Z[n,i,j,c] = relu(X[n,i,j,c]) - relu(-X[n,i,j,c]) / 100"
CONV = "conv: Z[n,i,j,o] = b[o] + sum[c,u,v](pad(X,0,1,1,0)[n, 2*i+u, 2*j+v, c] * W[u,v,c,o])"
POOL = "pool: Z[n,i,j,c] = max[u<3, v<3](X[n, 2*i+u, 2*j+v, c])"
DENSE = "dense: Z[n,o] = b[o] + sum[f](X[n,f] * W[f,o])"


@pytest.fixture(scope="module")
def mylayers(tmp_path_factory):
    """``cnnderive generate --equation ... --output mylayers``, then ``import mylayers``."""
    folder = tmp_path_factory.mktemp("project")
    arguments = ["generate", "--output", str(folder / "mylayers")]
    for equation in (LEAKY_RELU, CONV, POOL, DENSE):
        arguments += ["--equation", equation]
    assert main(arguments) == 0
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("mylayers")
    finally:
        sys.path.remove(str(folder))
        for name in list(sys.modules):
            if name.split(".")[0] == "mylayers":
                del sys.modules[name]


def test_leaky_relu_from_its_equation(mylayers):
    from mylayers import leaky_relu

    x = np.random.default_rng(3).standard_normal((2, 4, 5, 3))
    out, cache = leaky_relu.forward(X=x)
    np.testing.assert_allclose(out, np.where(x > 0, x, x / 100), rtol=1e-15, atol=1e-18)
    delta = np.random.default_rng(4).standard_normal(x.shape)
    dx = leaky_relu.backward(delta, cache)["X"]
    np.testing.assert_allclose(dx, np.where(x > 0, delta, delta / 100), rtol=1e-15, atol=1e-18)


def test_a_network_of_equation_layers_learns(mylayers):
    """conv (stride 2, padding 1) -> leaky ReLU -> overlapping max pool -> dense, softmax
    cross-entropy from generated/, SGD on 2,000 shipped MNIST images for three epochs."""
    from mylayers import conv, dense, leaky_relu, pool

    from cnnderive.train.data import load_dataset
    from generated import losses

    data = load_dataset("mnist", allow_download=False, log=lambda line: None)
    rng = np.random.default_rng(0)
    chosen = rng.permutation(len(data.train.labels))[:2000]  # the subset is sorted by class
    images, labels = data.train.images[chosen].astype(np.float64), data.train.labels[chosen]
    params = {
        "conv_W": rng.standard_normal((3, 3, 1, 8)) * 0.3,
        "conv_b": np.zeros(8),
        "dense_W": rng.standard_normal((8 * 6 * 6, 10)) * 0.05,
        "dense_b": np.zeros(10),
    }

    def step(x, y, lr):
        z1, c1 = conv.forward(X=x, W=params["conv_W"], b=params["conv_b"])  # 14 x 14
        a1, c2 = leaky_relu.forward(X=z1)
        p1, c3 = pool.forward(X=a1)  # 6 x 6
        flat = p1.reshape(len(x), -1)
        logits, c4 = dense.forward(X=flat, W=params["dense_W"], b=params["dense_b"])
        loss, c5 = losses.softmax_cross_entropy_forward(logits, np.eye(10)[y])
        g4 = dense.backward(losses.softmax_cross_entropy_backward(c5), c4)
        g3 = pool.backward(g4["X"].reshape(p1.shape), c3)
        g2 = leaky_relu.backward(g3["X"], c2)
        g1 = conv.backward(g2["X"], c1)
        for name, gradient in (
            ("conv_W", g1["W"]),
            ("conv_b", g1["b"]),
            ("dense_W", g4["W"]),
            ("dense_b", g4["b"]),
        ):
            params[name] -= lr * gradient
        return float(loss), np.mean(np.argmax(logits, axis=1) == y)  # fmt: skip

    first = None
    for _ in range(3):
        order = rng.permutation(len(images))
        for start in range(0, len(images), 32):
            batch = order[start : start + 32]
            loss, _ = step(images[batch], labels[batch], lr=0.3)
            first = loss if first is None else first
    held_out = rng.permutation(len(data.validation.labels))[:300]
    validation = data.validation.images[held_out].astype(np.float64)
    z1, _ = conv.forward(X=validation, W=params["conv_W"], b=params["conv_b"])
    p1, _ = pool.forward(X=leaky_relu.forward(X=z1)[0])
    logits, _ = dense.forward(
        X=p1.reshape(len(validation), -1), W=params["dense_W"], b=params["dense_b"]
    )
    accuracy = np.mean(np.argmax(logits, axis=1) == data.validation.labels[held_out])
    assert loss < first / 2 and accuracy > 0.8, (first, loss, accuracy)
