"""Images per second of one training step of the real networks, generated code vs a reference.

    python benchmarks/train_step.py              # seed and lenet, batches 64 and 256
    python benchmarks/train_step.py --quick      # fewer steps, a few seconds
    python benchmarks/train_step.py --net seed --batch 256 --numpy

One step is what ``cnnderive train`` does per batch: the network's forward pass (loss
and outputs), its backward pass (every layer's generated backward) and an SGD-with-
momentum update of the parameters, in float32. The networks are those of
cnnderive/train/networks.py, built with seed 0, on MNIST images (the shipped subset).

The reference is PyTorch eager on the CPU with the identical network (same layers,
same initial parameters, same loss, torch.optim.SGD with momentum) when torch can be
imported, and otherwise a hand-vectorised NumPy implementation written for speed
(im2col + BLAS, patches kept from the forward pass, in-place elementwise work, no
gradient for the input image). ``--numpy`` adds the NumPy reference beside torch.
Both sides use two cores (``--threads``): torch.set_num_threads(2), and the generated
network built with threads=2, which cuts each batch in two halves computed at once by
this process and one worker process, BLAS at one thread each (cnnderive/train/parallel.py), as
``cnnderive train`` does by default. The NumPy reference uses BLAS's two threads.
Before timing, one step's loss and gradients of each reference are checked against
the generated network's from the same parameters.

Timing: warm-up steps, then rounds that alternate between the implementations; the
step time is the median over all timed steps (time.perf_counter), and images/s is the
batch size over it. The breakdown times each layer's forward and backward inside the
generated step (a separate, instrumented run); with two threads that is this
process's half of the batch, and "other" includes waiting for the worker's half and
adding up the two halves' gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from _measure import OtherLoad, describe_environment, percent
from numpy.lib.stride_tricks import as_strided
from threadpoolctl import threadpool_limits

from cnnderive.train.networks import build
from cnnderive.train.optim import SGD

try:  # torch is optional: a reference for this benchmark only, never a dependency
    import torch
except Exception:  # ImportError, or a broken install
    torch = None

F32 = np.float32
LR, MOMENTUM = 0.01, 0.9


# --------------------------------------------------------------------------- helpers


def mnist_batch(n):
    """The first n training images of the shipped MNIST subset (random images if absent)."""
    try:
        from cnnderive.train.data import load_dataset

        split = load_dataset("mnist", allow_download=False, log=lambda _: None).train
        images = np.ascontiguousarray(split.images[:n], dtype=F32)
        labels = np.asarray(split.labels[:n], dtype=np.int64)
        if len(labels) == n:
            return images, labels
    except Exception:
        pass
    rng = np.random.default_rng(0)
    return rng.random((n, 28, 28, 1), dtype=F32), rng.integers(0, 10, n)


# ---------------------------------------------------------------- generated network


class GeneratedStep:
    """One training step of a cnnderive/train/networks.py network with cnnderive/train/optim.py's SGD."""

    name = "generated"

    def __init__(self, net_name, images, labels, threads=2):
        self.net = build(net_name, seed=0, dtype=F32, threads=threads)
        self.opt = SGD(
            self.net.params, lr=LR, lr_decay=1.0, momentum=MOMENTUM, momentum_start=MOMENTUM
        )
        self.images, self.labels = images, labels

    def gradients(self):
        loss, _, grads = self.net.loss_and_gradients(self.images, self.labels)
        return loss, grads

    def __call__(self):
        _, _, grads = self.net.loss_and_gradients(self.images, self.labels)
        self.opt.step(self.net.params, grads)

    def close(self):
        self.net.close()  # joins the worker processes, so their CPU time is accounted


def layer_label(index, layer):
    weight = getattr(layer, "weight", None)
    kind = type(layer).__name__.strip("_").lower()
    if weight:
        module = layer.module.__name__.rsplit(".", 1)[-1]
        return f"{index:2d} {module} ({weight.rsplit('_', 1)[0]})"
    forward = getattr(layer, "_forward", None)
    if forward is not None:
        module = getattr(forward, "__module__", "").rsplit(".", 1)[-1]
        function = getattr(forward, "__name__", "").replace("_forward", "")
        label = (
            function if module == "activations" else (module if function == "forward" else function)
        )
        return f"{index:2d} {label}"
    return f"{index:2d} {kind}"


def breakdown(step, steps, warmup):
    """ms per step spent in each layer's forward and backward, the loss and the update."""
    net = step.net
    rows = {}

    def timed(label, part, fn):
        rows.setdefault(label, {"forward": 0.0, "backward": 0.0})

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                rows[label][part] += time.perf_counter() - start

        return wrapper

    saved = []
    for index, layer in enumerate(net.layers):
        label = layer_label(index, layer)
        saved.append(layer)
        layer.forward = timed(label, "forward", layer.forward)
        layer.backward = timed(label, "backward", layer.backward)
    loss_label = f"{len(net.layers):2d} loss"
    net._loss_forward = timed(loss_label, "forward", net._loss_forward)
    net._loss_backward = timed(loss_label, "backward", net._loss_backward)
    net.probabilities = timed("   outputs (probabilities)", "forward", net.probabilities)
    update = timed("   SGD update", "backward", step.opt.step)
    try:
        warm_up(step, warmup)
        for row in rows.values():
            row["forward"] = row["backward"] = 0.0
        total = 0.0
        for _ in range(steps):
            begin = time.perf_counter()
            _, _, grads = net.loss_and_gradients(step.images, step.labels)
            update(net.params, grads)
            total += time.perf_counter() - begin
    finally:
        for layer in saved:
            del layer.forward, layer.backward
        del net._loss_forward, net._loss_backward, net.probabilities
    table = {label: {k: 1e3 * v / steps for k, v in row.items()} for label, row in rows.items()}
    return table, 1e3 * total / steps


# --------------------------------------------------------------------- torch network


def _dense_from_flatten(w, h, wd, c):
    """A dense weight (H*W*C, out) that follows an NHWC flatten, for torch's NCHW flatten."""
    out = w.shape[1]
    return w.reshape(h, wd, c, out).transpose(3, 2, 0, 1).reshape(out, c * h * wd)


def torch_model(torch, net_name, params):
    """The network in PyTorch (NCHW), with the generated network's initial parameters."""
    nn = torch.nn
    p = {k: np.array(v, dtype=F32) for k, v in params.items()}

    def conv(w, b, padding=0):
        layer = nn.Conv2d(w.shape[2], w.shape[3], w.shape[:2], padding=padding)
        layer.weight.data = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
        layer.bias.data = torch.from_numpy(b.copy())
        return layer

    def linear(w, b):
        layer = nn.Linear(w.shape[0], w.shape[1])
        layer.weight.data = torch.from_numpy(np.ascontiguousarray(w))
        layer.bias.data = torch.from_numpy(b.copy())
        return layer

    if net_name == "seed":
        return nn.Sequential(
            conv(p["conv1_w"], p["conv1_b"]),
            nn.Sigmoid(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            linear(_dense_from_flatten(p["fc_w"], 10, 10, 20), p["fc_b"]),
        )
    if net_name != "lenet":
        raise ValueError(f"no torch reference for the {net_name} network")
    return nn.Sequential(
        conv(p["conv1_w"], p["conv1_b"], padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        conv(p["conv2_w"], p["conv2_b"]),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        linear(_dense_from_flatten(p["fc1_w"], 5, 5, 16), p["fc1_b"]),
        nn.ReLU(),
        linear(p["fc2_w"].T, p["fc2_b"]),
        nn.ReLU(),
        linear(p["fc3_w"].T, p["fc3_b"]),
    )


class TorchStep:
    """The identical network in PyTorch eager (NCHW), from the generated network's parameters."""

    name = "pytorch eager"

    def __init__(self, net_name, params, images, labels):
        nn = torch.nn
        self.model = torch_model(torch, net_name, params)
        n = len(labels)
        if net_name == "seed":
            bce = nn.BCEWithLogitsLoss(reduction="sum")
            self.target = torch.from_numpy(np.eye(10, dtype=F32)[labels])
            self.loss = lambda logits, target: bce(logits, target) / n
        elif net_name == "lenet":
            self.target = torch.from_numpy(labels)
            self.loss = nn.CrossEntropyLoss()
        else:
            raise ValueError(f"no torch reference for the {net_name} network")
        self.net_name = net_name
        self.x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)

    def gradients(self):
        """(loss, grads) of one batch, gradients in the generated network's layout."""
        self.model.zero_grad(set_to_none=True)
        loss = self.loss(self.model(self.x), self.target)
        loss.backward()
        grads = {}
        names = ["conv1", "conv2"] if self.net_name == "lenet" else ["conv1"]
        layers = [m for m in self.model if isinstance(m, torch.nn.Conv2d)]
        for name, layer in zip(names, layers):
            grads[f"{name}_w"] = layer.weight.grad.numpy().transpose(2, 3, 1, 0)
            grads[f"{name}_b"] = layer.bias.grad.numpy()
        dense = [m for m in self.model if isinstance(m, torch.nn.Linear)]
        if self.net_name == "seed":
            w = dense[0].weight.grad.numpy().reshape(10, 20, 10, 10)
            grads["fc_w"] = w.transpose(2, 3, 1, 0).reshape(2000, 10)
            grads["fc_b"] = dense[0].bias.grad.numpy()
        else:
            w = dense[0].weight.grad.numpy().reshape(120, 16, 5, 5)
            grads["fc1_w"] = w.transpose(2, 3, 1, 0).reshape(400, 120)
            grads["fc1_b"] = dense[0].bias.grad.numpy()
            for name, layer in zip(("fc2", "fc3"), dense[1:]):
                grads[f"{name}_w"] = layer.weight.grad.numpy().T
                grads[f"{name}_b"] = layer.bias.grad.numpy()
        return float(loss), grads

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.model(self.x), self.target)
        loss.backward()
        self.opt.step()


# ------------------------------------------------------- hand-vectorised NumPy network
#
# What a person writes when NumPy speed is the goal: im2col patches made once in the
# forward pass and kept for the weight gradient, BLAS for every product, elementwise
# work in place, pooling by strided slices, and no gradient for the input image.


def _im2col(x, k):
    """Patches (N*H'*W', k*k*C) of a valid k x k correlation over NHWC x."""
    n, h, w, c = x.shape
    oh, ow = h - k + 1, w - k + 1
    if c == 1:
        # One tap at a time: each copy moves whole output rows, not k values at a time.
        cols = np.empty((k, k, n, oh, ow), dtype=x.dtype)
        for u in range(k):
            for v in range(k):
                cols[u, v] = x[:, u : u + oh, v : v + ow, 0]
        return cols.reshape(k * k, n * oh * ow).T, (n, oh, ow)
    s = x.strides
    view = as_strided(x, (n, oh, ow, k, k, c), (s[0], s[1], s[2], s[1], s[2], s[3]))
    return view.reshape(n * oh * ow, k * k * c), (n, oh, ow)


def _conv_input_gradient(dz, w, shape):
    """dX of a valid k x k correlation: one (C_out x C_in) product per tap, added back shifted."""
    n, h, wd, c_in = shape
    k, _, _, c_out = w.shape
    oh, ow = h - k + 1, wd - k + 1
    taps = np.matmul(dz.reshape(-1, c_out), w.reshape(k * k, c_in, c_out).transpose(0, 2, 1))
    taps = taps.reshape(k, k, n, oh, ow, c_in)
    out = np.zeros(shape, dtype=dz.dtype)
    for u in range(k):
        for v in range(k):
            out[:, u : u + oh, v : v + ow, :] += taps[u, v]
    return out


def _sigmoid_inplace(z):
    np.multiply(z, 0.5, out=z)
    np.tanh(z, out=z)
    z += 1
    z *= 0.5
    return z


def _maxpool2(a):
    """2x2 max pool and the mask of each window's first maximum."""
    corners = [a[:, u::2, v::2, :] for u in (0, 1) for v in (0, 1)]
    top = np.maximum(np.maximum(corners[0], corners[1]), np.maximum(corners[2], corners[3]))
    masks, free = [], np.ones(top.shape, dtype=bool)
    for corner in corners:
        hit = corner == top
        hit &= free
        free &= ~hit
        masks.append(hit)
    return top, masks


def _maxpool2_backward(dp, masks, shape):
    dx = np.empty(shape, dtype=dp.dtype)
    for (u, v), mask in zip(((0, 0), (0, 1), (1, 0), (1, 1)), masks):
        np.multiply(dp, mask, out=dx[:, u::2, v::2, :])
    return dx


class NumpyStep:
    """The same network and update, hand-vectorised in NumPy for speed."""

    name = "numpy (hand-vectorised)"

    def __init__(self, net_name, params, images, labels):
        self.net_name = net_name
        self.params = {k: np.array(v, dtype=F32) for k, v in params.items()}
        self.opt = SGD(self.params, lr=LR, lr_decay=1.0, momentum=MOMENTUM, momentum_start=MOMENTUM)
        self.x = images
        self.labels = labels
        self.onehot = np.eye(10, dtype=F32)[labels]
        self.x_padded = (
            np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))) if net_name == "lenet" else None
        )

    def gradients(self):
        return (self._seed if self.net_name == "seed" else self._lenet)()

    def __call__(self):
        _, grads = self.gradients()
        self.opt.step(self.params, grads)

    def _seed(self):
        p, n = self.params, len(self.labels)
        cols, (_, oh, ow) = _im2col(self.x, 9)
        a = cols @ p["conv1_w"].reshape(81, 20)
        a += p["conv1_b"]
        _sigmoid_inplace(a)
        a = a.reshape(n, oh, ow, 20)
        pooled = a[:, 0::2] + a[:, 1::2]
        pooled = pooled[:, :, 0::2] + pooled[:, :, 1::2]
        pooled *= 0.25
        flat = pooled.reshape(n, 2000)
        logits = flat @ p["fc_w"]
        logits += p["fc_b"]
        loss = float((np.logaddexp(0, logits) - self.onehot * logits).sum() / n)
        d = _sigmoid_inplace(logits.copy())
        d -= self.onehot
        d /= n
        grads = {"fc_w": flat.T @ d, "fc_b": d.sum(axis=0)}
        dp = (d @ p["fc_w"].T).reshape(n, 10, 10, 20)
        dp *= 0.25
        da = np.repeat(np.repeat(dp, 2, axis=1), 2, axis=2)
        da *= a
        np.subtract(1, a, out=a)
        da *= a
        dz = da.reshape(-1, 20)
        grads["conv1_w"] = (cols.T @ dz).reshape(9, 9, 1, 20)
        grads["conv1_b"] = dz.sum(axis=0)
        return loss, grads

    def _lenet(self):
        p, n = self.params, len(self.labels)
        cols1, _ = _im2col(self.x_padded, 5)
        z1 = cols1 @ p["conv1_w"].reshape(25, 6)
        z1 += p["conv1_b"]
        np.maximum(z1, 0, out=z1)
        a1 = z1.reshape(n, 28, 28, 6)
        p1, masks1 = _maxpool2(a1)
        cols2, _ = _im2col(p1, 5)
        z2 = cols2 @ p["conv2_w"].reshape(150, 16)
        z2 += p["conv2_b"]
        np.maximum(z2, 0, out=z2)
        a2 = z2.reshape(n, 10, 10, 16)
        p2, masks2 = _maxpool2(a2)
        f = p2.reshape(n, 400)
        h1 = f @ p["fc1_w"]
        h1 += p["fc1_b"]
        np.maximum(h1, 0, out=h1)
        h2 = h1 @ p["fc2_w"]
        h2 += p["fc2_b"]
        np.maximum(h2, 0, out=h2)
        logits = h2 @ p["fc3_w"]
        logits += p["fc3_b"]
        shifted = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        total = e.sum(axis=1, keepdims=True)
        loss = float((np.log(total)[:, 0] - shifted[np.arange(n), self.labels]).sum() / n)
        d = e / total
        d -= self.onehot
        d /= n
        grads = {"fc3_w": h2.T @ d, "fc3_b": d.sum(axis=0)}
        d = d @ p["fc3_w"].T
        d *= h2 > 0
        grads["fc2_w"], grads["fc2_b"] = h1.T @ d, d.sum(axis=0)
        d = d @ p["fc2_w"].T
        d *= h1 > 0
        grads["fc1_w"], grads["fc1_b"] = f.T @ d, d.sum(axis=0)
        d = (d @ p["fc1_w"].T).reshape(n, 5, 5, 16)
        d = _maxpool2_backward(d, masks2, a2.shape)
        d *= a2 > 0
        dz2 = d.reshape(-1, 16)
        grads["conv2_w"] = (cols2.T @ dz2).reshape(5, 5, 6, 16)
        grads["conv2_b"] = dz2.sum(axis=0)
        d = _conv_input_gradient(dz2, p["conv2_w"], p1.shape)
        d = _maxpool2_backward(d, masks1, a1.shape)
        d *= a1 > 0
        dz1 = d.reshape(-1, 6)
        grads["conv1_w"] = (cols1.T @ dz1).reshape(5, 5, 1, 6)
        grads["conv1_b"] = dz1.sum(axis=0)
        return loss, grads


# ---------------------------------------------------------------------------- driver


def print_breakdown(table, total):
    """The per-layer table of a step's ``total`` ms: forward, backward, their share, and
    the rest of the step (Python between the layers, waiting for the other processes)."""
    print(f"  {'layer':<28} {'forward ms':>10} {'backward ms':>11} {'total ms':>9} {'share':>6}")
    accounted = 0.0
    for label, row in table.items():
        both = row["forward"] + row["backward"]
        accounted += both
        print(
            f"  {label:<28} {row['forward']:>10.2f} {row['backward']:>11.2f} "
            f"{both:>9.2f} {100 * both / total:>5.1f}%"
        )
    other = total - accounted
    print(
        f"  {'   other (Python, waiting)':<28} {'':>10} {'':>11} {other:>9.2f} "
        f"{100 * other / total:>5.1f}%"
    )


def check_same(label, want, got):
    """A reference's first-step loss and gradients match the generated network's."""
    want_loss, want_grads = want
    got_loss, got_grads = got
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-4, err_msg=f"{label}: loss")
    assert sorted(got_grads) == sorted(want_grads), f"{label}: gradient names differ"
    for key, value in want_grads.items():
        scale = float(np.abs(value).max()) or 1.0
        np.testing.assert_allclose(
            got_grads[key], value, rtol=1e-3, atol=1e-4 * scale, err_msg=f"{label}: d{key}"
        )


WARMUP_SECONDS = 1.0


def warm_up(step, warmup):
    """``warmup`` untimed calls of ``step``, and more until WARMUP_SECONDS have passed.

    A freshly forked worker process first shares a core with its parent until the
    scheduler moves it (measured: steps about twice as slow for the first ~0.1 s).
    """
    began = time.perf_counter()
    count = 0
    while count < warmup or time.perf_counter() - began < WARMUP_SECONDS:
        step()
        count += 1


def time_step(step, steps, warmup):
    """Seconds of each of ``steps`` timed calls of ``step`` after warming up."""
    warm_up(step, warmup)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


IMPLEMENTATIONS = {"generated": GeneratedStep, "torch": TorchStep, "numpy": NumpyStep}


def worker(impl, nets, batches, steps, warmup, with_breakdown, threads):
    """Time one implementation (in its own process); print the results as JSON."""
    if impl == "torch":
        torch.set_num_threads(threads)
    else:
        # NumPy's BLAS on as many cores as the other side gets (with two processes, the
        # generated network holds each to one BLAS thread itself).
        threadpool_limits(threads, user_api="blas")
    out = []
    for net_name in nets:
        for n in batches:
            images, labels = mnist_batch(n)
            generated = GeneratedStep(net_name, images, labels, threads)
            if impl == "generated":
                step = generated
            else:
                initial = {k: v.copy() for k, v in generated.net.params.items()}
                step = IMPLEMENTATIONS[impl](net_name, initial, images, labels)
                check_same(
                    f"{net_name} batch {n}: {step.name}", generated.gradients(), step.gradients()
                )
                generated.close()
                del generated
                time.sleep(0.5)  # let NumPy's BLAS threads go idle before timing the reference
            record = {"net": net_name, "batch": n, "name": step.name}
            record["times"] = time_step(step, steps, warmup)
            if impl == "generated":
                step.close()
                if with_breakdown:
                    fresh = GeneratedStep(net_name, images, labels, threads)
                    record["breakdown"], record["instrumented"] = breakdown(
                        fresh, max(steps // 2, 1), warmup
                    )
                    fresh.close()
            out.append(record)
    print(json.dumps(out))


def run_worker(impl, args, steps, warmup, with_breakdown):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        impl,
        "--net",
        *args.net,
        "--batch",
        *map(str, args.batch),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--threads",
        str(args.threads),
    ]
    if not with_breakdown:
        command.append("--no-breakdown")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"the {impl} worker failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a few seconds)")
    parser.add_argument("--net", nargs="+", default=["seed", "lenet"], choices=["seed", "lenet"])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument(
        "--numpy", action="store_true", help="time the hand-vectorised NumPy reference beside torch"
    )
    parser.add_argument(
        "--no-torch", action="store_true", help="do not use torch even if installed"
    )
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-layer breakdown")
    parser.add_argument("--rounds", type=int, help="rounds of alternating worker processes")
    parser.add_argument("--steps", type=int, help="timed steps per round")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="cores for each side: the generated network's --threads and torch.set_num_threads "
        "(default 2)",
    )
    # Untimed steps first (at least WARMUP_SECONDS): a worker process's first steps after
    # the fork are slow.
    parser.add_argument("--warmup", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=sorted(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker(
            args.worker,
            args.net,
            args.batch,
            args.steps,
            args.warmup,
            not args.no_breakdown,
            args.threads,
        )
        return

    rounds = args.rounds or 2
    steps = args.steps or (4 if args.quick else 12)
    impls = ["generated"]
    if torch is not None and not args.no_torch:
        impls.append("torch")
    if len(impls) == 1 or args.numpy:
        impls.append("numpy")

    if torch is not None:
        reference = f"torch {torch.__version__}, set to {args.threads} threads"
    else:
        reference = "torch not importable: the reference is hand-vectorised NumPy"
    print(describe_environment([reference]))
    if "torch" not in impls:
        print("reference: hand-vectorised NumPy (torch not used)")
    print(
        f"float32, one step = forward + backward + SGD(momentum {MOMENTUM}) update; median of "
        f"{rounds} x {steps} steps, each implementation in its own process, rounds alternating"
    )
    times, names, breakdowns, disturbed = {}, {}, {}, []
    for round_index in range(rounds):
        for impl in impls:
            with_breakdown = impl == "generated" and round_index == 0 and not args.no_breakdown
            load = OtherLoad()
            records = run_worker(impl, args, steps, args.warmup, with_breakdown)
            disturbed.append((impl, load.share()))
            for record in records:
                key = (record["net"], record["batch"])
                times.setdefault(key, {}).setdefault(impl, []).extend(record["times"])
                names[impl] = record["name"]
                if "breakdown" in record:
                    breakdowns[key] = (record["breakdown"], record["instrumented"])

    print()
    header = f"{'network':<8} {'batch':>5} " + " ".join(f"{names[i] + ' img/s':>28}" for i in impls)
    header += "".join(f" {'ratio vs ' + i:>16}" for i in impls[1:])
    print(header)
    print("-" * len(header))
    for (net_name, n), by_impl in times.items():
        median = {impl: statistics.median(by_impl[impl]) for impl in impls}
        line = f"{net_name:<8} {n:>5} " + " ".join(
            f"{n / median[i]:>13,.0f} ({1e3 * median[i]:6.2f} ms/step)" for i in impls
        )
        line += "".join(f" {median[i] / median['generated']:>15.2f}x" for i in impls[1:])
        print(line)
    print("ratio = reference step time / generated step time (above 1: generated is faster)")

    for (net_name, n), (table, total) in breakdowns.items():
        print()
        print(
            f"where the generated step's time goes: {net_name}, batch {n} ({total:.2f} ms/step instrumented)"
        )
        print_breakdown(table, total)
    shares = ", ".join(f"{impl} {percent(share)}" for impl, share in disturbed)
    print(
        f"\nCPU time other processes used during each worker run (share of the machine): {shares}."
        " More than a few % means the numbers above are disturbed."
    )


if __name__ == "__main__":
    main()
