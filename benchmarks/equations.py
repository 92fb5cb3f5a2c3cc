"""Layers generated from one equation against hand-written vectorised NumPy, in one run.

    python benchmarks/equations.py            # 64 x 32 x 32 x 16, float32
    python benchmarks/equations.py --quick    # fewer repeats

Each equation is derived, proven and generated into a temporary package with
``cnnderive generate --equation``; its forward + backward is timed against the NumPy a
careful engineer writes by hand for the same layer (window views and einsum, or shifted
slices, whichever is faster), after checking that both give the same values.  Both sides
alternate, so a busy moment of this shared machine touches both.  The ratio printed is
generated time / hand-written time: below 3 is the target.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import describe_environment  # noqa: E402

EQUATIONS = {
    "dilated_conv": "Z[n,i,j,o] = sum[c,u,v](X[n, i+2*u, j+2*v, c] * W[u,v,c,o])",
    "strided_conv": "Z[n,i,j,o] = b[o] + sum[c,u,v](pad(X,0,1,1,0)[n, 2*i+u, 2*j+v, c] * W[u,v,c,o])",
    "depthwise": "Z[n,i,j,c] = sum[u,v](X[n, i+u, j+v, c] * W[u,v,c])",
    "conv1d": "Z[n,t,o] = sum[c,k](X[n, t+k, c] * W[k,c,o])",
    "bilinear": "Z[n] = sum[i,j](X[n,i] * A[i,j] * Y[n,j])",
    "squared_distance": "Z[n,m] = sum[f]((X[n,f] - Y[m,f])**2)",
    "overlapping_max": "Z[n,i,j,c] = max[u<3, v<3](X[n, 2*i+u, 2*j+v, c])",
}


# -- hand-written references: forward, then the gradients for upstream g ----------------


def dilated_conv(X, W, g=None):
    windows = sliding_window_view(X, (5, 5), axis=(1, 2))[..., ::2, ::2]  # n i j c u v
    out = np.einsum("nijcuv,uvco->nijo", windows, W, optimize=True)
    if g is None:
        return out
    dW = np.einsum("nijcuv,nijo->uvco", windows, g, optimize=True)
    dX = np.zeros_like(X)
    h, w = g.shape[1:3]
    for u in range(3):
        for v in range(3):
            dX[:, 2 * u : 2 * u + h, 2 * v : 2 * v + w] += g @ W[u, v].T
    return {"X": dX, "W": dW}


def strided_conv(X, W, b, g=None):
    padded = np.pad(X, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = sliding_window_view(padded, (3, 3), axis=(1, 2))[:, ::2, ::2]
    out = np.einsum("nijcuv,uvco->nijo", windows, W, optimize=True) + b
    if g is None:
        return out
    dW = np.einsum("nijcuv,nijo->uvco", windows, g, optimize=True)
    dpadded = np.zeros_like(padded)
    h, w = g.shape[1:3]
    for u in range(3):
        for v in range(3):
            dpadded[:, u : u + 2 * h : 2, v : v + 2 * w : 2] += g @ W[u, v].T
    return {"X": dpadded[:, 1:-1, 1:-1], "W": dW, "b": g.sum(axis=(0, 1, 2))}


def depthwise(X, W, g=None):
    h, w = X.shape[1] - 2, X.shape[2] - 2
    out = sum(X[:, u : u + h, v : v + w] * W[u, v] for u in range(3) for v in range(3))
    if g is None:
        return out
    dW = np.stack(
        [
            np.einsum("nijc,nijc->c", g, X[:, u : u + h, v : v + w])
            for u in range(3)
            for v in range(3)
        ]
    ).reshape(W.shape)
    dX = np.zeros_like(X)
    for u in range(3):
        for v in range(3):
            dX[:, u : u + h, v : v + w] += g * W[u, v]
    return {"X": dX, "W": dW}


def conv1d(X, W, g=None):
    windows = sliding_window_view(X, W.shape[0], axis=1)  # n t c k
    out = np.einsum("ntck,kco->nto", windows, W, optimize=True)
    if g is None:
        return out
    dW = np.einsum("ntck,nto->kco", windows, g, optimize=True)
    dX = np.zeros_like(X)
    for k in range(W.shape[0]):
        dX[:, k : k + g.shape[1]] += g @ W[k].T
    return {"X": dX, "W": dW}


def bilinear(X, A, Y, g=None):
    XA = X @ A
    out = np.einsum("nj,nj->n", XA, Y)
    if g is None:
        return out
    return {"X": (g[:, None] * Y) @ A.T, "A": X.T @ (g[:, None] * Y), "Y": g[:, None] * XA}


def squared_distance(X, Y, g=None):
    out = (X * X).sum(1)[:, None] + (Y * Y).sum(1)[None, :] - 2 * X @ Y.T
    if g is None:
        return out
    return {
        "X": 2 * (g.sum(1)[:, None] * X - g @ Y),
        "Y": 2 * (g.sum(0)[:, None] * Y - g.T @ X),
    }


def overlapping_max(X, g=None):
    windows = sliding_window_view(X, (3, 3), axis=(1, 2))[:, ::2, ::2]
    flat = windows.reshape(windows.shape[:4] + (9,))
    position = flat.argmax(-1)
    out = np.take_along_axis(flat, position[..., None], -1)[..., 0]
    if g is None:
        return out
    dX = np.zeros_like(X)
    h, w = out.shape[1:3]
    for k in range(9):
        u, v = divmod(k, 3)
        dX[:, u : u + 2 * h : 2, v : v + 2 * w : 2] += np.where(position == k, g, 0)
    return {"X": dX}


def inputs(name, rng, n, side, channels):
    f32 = np.float32
    shapes = {
        "dilated_conv": {"X": (n, side, side, channels), "W": (3, 3, channels, channels)},
        "strided_conv": {
            "X": (n, side, side, channels),
            "W": (3, 3, channels, channels),
            "b": (channels,),
        },
        "depthwise": {"X": (n, side, side, channels), "W": (3, 3, channels)},
        "conv1d": {"X": (n, side * side, channels), "W": (5, channels, channels)},
        "bilinear": {"X": (n * 64, 256), "A": (256, 256), "Y": (n * 64, 256)},
        "squared_distance": {"X": (n * 16, 128), "Y": (n * 16, 128)},
        "overlapping_max": {"X": (n, side, side, channels)},
    }[name]
    return {k: rng.standard_normal(s).astype(f32) for k, s in shapes.items()}


def compare(module, reference, arrays, g, repeats):
    """Median seconds of one forward + backward, generated and by hand, alternating."""

    def generated():
        _, cache = module.forward(**arrays)
        module.backward(g, cache)

    def by_hand():
        reference(**arrays)
        reference(**arrays, g=g)

    times = {generated: [], by_hand: []}
    for function in times:
        function()  # warm-up
    for _ in range(repeats):
        for function in times:
            start = time.perf_counter()
            function()
            times[function].append(time.perf_counter() - start)
    return statistics.median(times[generated]), statistics.median(times[by_hand])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    repeats = 3 if args.quick else 9
    print(describe_environment())
    folder = Path(tempfile.mkdtemp(prefix="cnnderive-bench-"))
    command = [sys.executable, "-m", "cnnderive", "generate", "--output", str(folder / "benchpkg")]
    for name, text in EQUATIONS.items():
        command += ["--equation", f"{name}: {text}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    sys.path.insert(0, str(folder))
    rng = np.random.default_rng(0)
    print(f"\nforward + backward, float32, batch {args.batch}, 32x32x16 images; ms (median)")
    print(f"{'layer':<18}{'generated':>11}{'by hand':>11}{'ratio':>8}")
    worst = 0.0
    for name in EQUATIONS:
        module = importlib.import_module(f"benchpkg.{name}")
        reference = globals()[name]
        arrays = inputs(name, rng, args.batch, 32, 16)
        out, cache = module.forward(**arrays)
        g = rng.standard_normal(out.shape).astype(np.float32)
        mine = module.backward(g, cache)
        theirs = reference(**arrays, g=g)
        np.testing.assert_allclose(out, reference(**arrays), rtol=2e-3, atol=2e-3)
        for key in theirs:
            np.testing.assert_allclose(mine[key], theirs[key], rtol=2e-3, atol=2e-3)

        ours, theirs_time = compare(module, reference, arrays, g, repeats)
        ratio = ours / theirs_time
        worst = max(worst, ratio)
        print(f"{name:<18}{1e3 * ours:>11.2f}{1e3 * theirs_time:>11.2f}{ratio:>7.2f}x")
    print(f"\nworst ratio {worst:.2f}x (target: below 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
