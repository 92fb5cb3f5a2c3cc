"""Forward + backward time of each generated layer beside a straightforward NumPy reference.

    python benchmarks/layers.py            # batches 64 and 256, about a minute or two
    python benchmarks/layers.py --quick    # fewer repeats, a few seconds
    python benchmarks/layers.py --batch 256 --layer conv

The layers are those of the seed network (conv 9x9x1x20 valid on 28x28x1 -> sigmoid ->
2x2 average pool -> flatten 2000 -> dense 2000->10 -> sigmoid/BCE), max pool 2x2 and
ReLU at the seed's sizes, and LeNet's two convolutions (5x5 1->6 padding 2 on 28x28x1,
5x5 6->16 valid on 14x14x6), all in float32.

The reference is what a blog-post CNN in NumPy does: per-sample (and per-channel)
loops over scipy.signal.correlate2d / convolve2d for the convolution, loops over
window positions or np.kron for pooling, plain NumPy expressions for activations,
dense layer and loss. Before anything is timed the reference's outputs and gradients
are checked against the generated code's (np.testing.assert_allclose), so both sides
compute the same numbers.

Each timing is the median of several repeats (time.perf_counter) after a warm-up call.
The ratio is reference ms / generated ms: above 1 means the generated code is faster.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import numpy as np

try:
    from scipy import signal
except ImportError:  # pragma: no cover - scipy is in the "bench" extra
    sys.exit("benchmarks/layers.py needs scipy (pip install -e '.[bench]')")

from _measure import OtherLoad, describe_environment, percent

from generated import activations, avgpool2d, conv2d, dense, flatten, losses, maxpool2d

F32 = np.float32


# ----------------------------------------------------------------------------- timing


def median_ms(fn, repeats, warmup=1):
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


# ---------------------------------------------------------------- reference layers
#
# Written the way NumPy CNN tutorials write them: one image (and one channel pair) at
# a time through scipy.signal, pooling by loops over window positions or np.kron.


def ref_conv_forward(x, w, b, padding):
    n = x.shape[0]
    kh, kw, c_in, c_out = w.shape
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out_h, out_w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    z = np.empty((n, out_h, out_w, c_out), dtype=x.dtype)
    for i in range(n):
        for o in range(c_out):
            acc = np.full((out_h, out_w), b[o], dtype=x.dtype)
            for c in range(c_in):
                acc += signal.correlate2d(xp[i, :, :, c], w[:, :, c, o], mode="valid")
            z[i, :, :, o] = acc
    return z, xp


def ref_conv_backward(dz, xp, w, padding):
    n = dz.shape[0]
    kh, kw, c_in, c_out = w.shape
    dw = np.zeros_like(w)
    dxp = np.zeros_like(xp)
    for i in range(n):
        for o in range(c_out):
            for c in range(c_in):
                dw[:, :, c, o] += signal.correlate2d(xp[i, :, :, c], dz[i, :, :, o], mode="valid")
                dxp[i, :, :, c] += signal.convolve2d(dz[i, :, :, o], w[:, :, c, o], mode="full")
    db = dz.sum(axis=(0, 1, 2))
    h, w_ = xp.shape[1] - 2 * padding, xp.shape[2] - 2 * padding
    dx = dxp[:, padding : padding + h, padding : padding + w_, :]
    return dx, dw, db


def ref_avgpool_forward(x, k=2):
    n, h, w, c = x.shape
    out = np.empty((n, h // k, w // k, c), dtype=x.dtype)
    for i in range(n):
        out[i] = x[i].reshape(h // k, k, w // k, k, c).mean(axis=(1, 3))
    return out


def ref_avgpool_backward(dout, k=2):
    n, oh, ow, c = dout.shape
    dx = np.empty((n, oh * k, ow * k, c), dtype=dout.dtype)
    block = np.ones((k, k), dtype=dout.dtype) / (k * k)
    for i in range(n):
        for ch in range(c):
            dx[i, :, :, ch] = np.kron(dout[i, :, :, ch], block)
    return dx


def ref_maxpool_forward(x, k=2):
    n, h, w, c = x.shape
    oh, ow = h // k, w // k
    out = np.empty((n, oh, ow, c), dtype=x.dtype)
    where = np.empty((n, oh, ow, c), dtype=np.int64)
    for i in range(oh):
        for j in range(ow):
            window = x[:, i * k : i * k + k, j * k : j * k + k, :].reshape(n, k * k, c)
            where[:, i, j, :] = window.argmax(axis=1)  # first maximum, row-major
            out[:, i, j, :] = window.max(axis=1)
    return out, where


def ref_maxpool_backward(dout, where, shape, k=2):
    n, oh, ow, c = dout.shape
    dx = np.zeros(shape, dtype=dout.dtype)
    for i in range(oh):
        for j in range(ow):
            mask = where[:, i, j, :][:, None, :] == np.arange(k * k)[None, :, None]
            block = (mask * dout[:, i, j, :][:, None, :]).reshape(n, k, k, c)
            dx[:, i * k : i * k + k, j * k : j * k + k, :] += block
    return dx


# ------------------------------------------------------------------------------ cases
#
# A case builds its inputs for a batch size and returns three callables:
#   forward()          -> (outputs, state): the generated forward pass(es)
#   backward(state)    -> gradients: the generated backward pass(es)
#   reference()        -> outputs + gradients of the reference, in the same order.


class Case:
    def __init__(self, forward, backward, reference):
        self.forward, self.backward, self.reference = forward, backward, reference

    def generated(self):
        outputs, state = self.forward()
        return (*outputs, *self.backward(state))


def _conv_case(rng, n, height, c_in, k, c_out, padding):
    x = rng.random((n, height, height, c_in), dtype=F32)
    w = (rng.standard_normal((k, k, c_in, c_out)) / k).astype(F32)
    b = rng.standard_normal(c_out).astype(F32)
    out_h = height + 2 * padding - k + 1
    dz = rng.standard_normal((n, out_h, out_h, c_out)).astype(F32)

    def forward():
        z, cache = conv2d.forward(x, w, b, padding=padding)
        return (z,), cache

    def reference():
        z, xp = ref_conv_forward(x, w, b, padding)
        return (z, *ref_conv_backward(dz, xp, w, padding))

    return Case(forward, lambda cache: conv2d.backward(dz, cache), reference)


def _activation_case(rng, n, name):
    z = rng.standard_normal((n, 20, 20, 20)).astype(F32)
    da = rng.standard_normal(z.shape).astype(F32)
    forward = getattr(activations, f"{name}_forward")
    backward = getattr(activations, f"{name}_backward")

    if name == "sigmoid":

        def reference():
            a = 1.0 / (1.0 + np.exp(-z))
            return a, da * a * (1 - a)

    else:

        def reference():
            return np.maximum(z, 0), da * (z > 0)

    return Case(
        lambda: (lambda a, cache: ((a,), cache))(*forward(z)),
        lambda cache: (backward(da, cache),),
        reference,
    )


def _pool_case(rng, n, module):
    x = rng.standard_normal((n, 20, 20, 20)).astype(F32)
    dout = rng.standard_normal((n, 10, 10, 20)).astype(F32)

    def forward():
        out, cache = module.forward(x, size=2)
        return (out,), cache

    if module is avgpool2d:

        def reference():
            return ref_avgpool_forward(x), ref_avgpool_backward(dout)

    else:

        def reference():
            out, where = ref_maxpool_forward(x)
            return out, ref_maxpool_backward(dout, where, x.shape)

    return Case(forward, lambda cache: (module.backward(dout, cache),), reference)


def _dense_case(rng, n):
    x = rng.standard_normal((n, 10, 10, 20)).astype(F32)
    w = (rng.standard_normal((2000, 10)) / np.sqrt(2000)).astype(F32)
    b = rng.standard_normal(10).astype(F32)
    dz = rng.standard_normal((n, 10)).astype(F32)

    def forward():
        f, flat_cache = flatten.forward(x)
        z, cache = dense.forward(f, w, b)
        return (z,), (flat_cache, cache)

    def backward(state):
        flat_cache, cache = state
        df, dw, db = dense.backward(dz, cache)
        return flatten.backward(df, flat_cache), dw, db

    def reference():
        f = x.reshape(n, -1)
        z = f @ w + b
        return z, (dz @ w.T).reshape(x.shape), f.T @ dz, dz.sum(axis=0)

    return Case(forward, backward, reference)


def _loss_case(rng, n):
    z = rng.standard_normal((n, 10)).astype(F32)
    y = np.eye(10, dtype=F32)[rng.integers(0, 10, n)]

    def forward():
        loss, cache = losses.bce_with_logits_forward(z, y)
        return (np.asarray(loss),), cache

    def reference():
        p = 1.0 / (1.0 + np.exp(-z))
        loss = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum() / n
        return np.asarray(loss), (p - y) / n

    return Case(forward, lambda cache: (losses.bce_with_logits_backward(cache),), reference)


CASES = [
    ("conv 9x9 1->20 (seed)", lambda rng, n: _conv_case(rng, n, 28, 1, 9, 20, 0)),
    ("sigmoid 20x20x20 (seed)", lambda rng, n: _activation_case(rng, n, "sigmoid")),
    ("avgpool 2x2 20x20x20 (seed)", lambda rng, n: _pool_case(rng, n, avgpool2d)),
    ("flatten+dense 2000->10 (seed)", _dense_case),
    ("sigmoid+BCE on logits (seed)", _loss_case),
    ("maxpool 2x2 20x20x20", lambda rng, n: _pool_case(rng, n, maxpool2d)),
    ("relu 20x20x20", lambda rng, n: _activation_case(rng, n, "relu")),
    ("conv 5x5 1->6 pad 2 (LeNet)", lambda rng, n: _conv_case(rng, n, 28, 1, 5, 6, 2)),
    ("conv 5x5 6->16 (LeNet)", lambda rng, n: _conv_case(rng, n, 14, 6, 5, 16, 0)),
]


def check_same(name, got, want):
    """The generated code and the reference agree (float32 sums: loose but meaningful)."""
    assert len(got) == len(want), name
    for index, (g, r) in enumerate(zip(got, want)):
        g, r = np.asarray(g), np.asarray(r)
        assert g.shape == r.shape, f"{name}: result {index} has shape {g.shape}, not {r.shape}"
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(
            g, r, rtol=1e-4, atol=1e-4 * scale, err_msg=f"{name}: result {index} differs"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a few seconds)")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="batch sizes")
    parser.add_argument("--layer", default="", help="only layers whose name contains this")
    parser.add_argument("--repeats", type=int, help="timed repeats of the generated code")
    args = parser.parse_args(argv)

    repeats = args.repeats or (5 if args.quick else 21)
    ref_repeats = 1 if args.quick else 3
    print(describe_environment())
    print(
        f"float32; median of {repeats} (generated) / {ref_repeats} (reference) repeats "
        "after a warm-up; ms for one forward + backward"
    )
    print()
    header = (
        f"{'layer':<30} {'batch':>5} {'gen fwd':>8} {'gen bwd':>8} "
        f"{'generated':>10} {'reference':>10} {'ratio':>7} {'other':>6}"
    )
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    whole_run = OtherLoad()
    for name, build in CASES:
        if args.layer and args.layer not in name:
            continue
        for n in args.batch:
            case = build(rng, n)
            row_load = OtherLoad()
            check_same(f"{name}, batch {n}", case.generated(), case.reference())
            _, state = case.forward()
            fwd_ms = median_ms(case.forward, repeats, warmup=2)
            bwd_ms = median_ms(functools.partial(case.backward, state), repeats, warmup=2)
            gen_ms = median_ms(case.generated, repeats, warmup=2)
            ref_ms = median_ms(case.reference, ref_repeats, warmup=0 if args.quick else 1)
            print(
                f"{name:<30} {n:>5} {fwd_ms:>8.2f} {bwd_ms:>8.2f} {gen_ms:>10.2f} "
                f"{ref_ms:>10.2f} {ref_ms / gen_ms:>6.1f}x {percent(row_load.share()):>6}",
                flush=True,
            )
    print()
    print("generated / reference: ms per forward+backward (median); ratio = reference / generated")
    print(
        "other: CPU time other processes used during the row, as a share of the machine; "
        f"whole run {percent(whole_run.share())}. Rows with more than a few % are disturbed."
    )


if __name__ == "__main__":
    main()
