"""Proofs at the sizes the shipped networks use.

The sweep of each layer (derive/layers.py) proves its closed forms on small
configurations.  Until proofs that hold for all sizes exist, the configurations that
the shipped networks (seed, toy, lenet in cnnderive/train/networks.py) actually run are
proven too, each at its real size: image size, channels, kernel, stride, padding,
features and classes as in the network.  The batch is 2 (the smallest batch in which the
closed forms' sums over examples show), except for the convolutions, whose proofs grow
with the batch and run at batch 1 (the sweep proves the batch sums of convolutions at
batches 1 and 2).  ``tests/test_network_sizes.py`` checks that this list holds every
configuration the networks run.

Linear layers (convolution, dense, pooling by averages, flatten) are proven on
polynomial tables (``method="coefficients"``, see derive.multilinear); the others with
SymPy's derivative.  ``cnnderive verify --network-sizes`` runs these proofs (about two
minutes on two cores); CI runs it, ``generate`` does not.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

from derive.layer import Configuration, Layer
from derive.layers import LAYERS
from derive.verify import LayerResult, VerificationError, prove

# Layers whose proofs run on polynomial tables: linear in each operand.
LINEAR = {"conv2d", "dense", "avgpool2d", "flatten"}


def _configuration(layer: Layer, values: dict[str, int]) -> Configuration:
    """A configuration of ``layer`` from its size and parameter names."""
    symbols = {}
    for item in layer.inputs:
        for dim in item.axes:
            symbols[dim.name] = dim
    for param in layer.params:
        symbols[param.symbol.name] = param.symbol
    if set(values) != set(symbols):
        raise ValueError(f"{layer.name}: sizes {sorted(values)}, expected {sorted(symbols)}")
    return {symbols[name]: value for name, value in values.items()}


def _conv(h, w, c, k, c_out, padding=0):
    return {
        "batch": 1,
        "in_height": h,
        "in_width": w,
        "in_channels": c,
        "kernel_height": k,
        "kernel_width": k,
        "out_channels": c_out,
        "stride": 1,
        "padding": padding,
    }


def _pool(h, w, c, size=2):
    return {"batch": 2, "in_height": h, "in_width": w, "channels": c, "size": size, "stride": size}


def _flat(h, w, c):
    return {"batch": 2, "in_height": h, "in_width": w, "channels": c}


def _dense(d_in, d_out):
    return {"batch": 2, "in_features": d_in, "out_features": d_out}


def _each(features):
    """An elementwise layer on ``features`` values per example (any shape: the count matters)."""
    return {"batch": 2, "features": features}


def _loss(classes):
    return {"batch": 2, "classes": classes}


# network -> (layer, sizes) in the order the network runs them (each ReLU before a max pool
# runs after it, see derive/rewrites.py), the loss and the outputs' activation last.
NETWORK_SIZES: dict[str, list[tuple[str, dict[str, int]]]] = {
    "seed": [
        ("conv2d", _conv(28, 28, 1, 9, 20)),
        ("sigmoid", _each(20 * 20 * 20)),
        ("avgpool2d", _pool(20, 20, 20)),
        ("flatten", _flat(10, 10, 20)),
        ("dense", _dense(2000, 10)),
        ("bce_with_logits", _loss(10)),
        ("sigmoid", _each(10)),  # the outputs: probabilities from the logits
    ],
    "toy": [
        ("conv2d", _conv(6, 6, 1, 3, 1)),
        ("maxpool2d", _pool(4, 4, 1)),
        ("relu", _each(2 * 2 * 1)),
        ("flatten", _flat(2, 2, 1)),
        ("dense", _dense(4, 1)),
        ("bce_with_logits", _loss(1)),
        ("sigmoid", _each(1)),
    ],
    "lenet": [
        ("conv2d", _conv(28, 28, 1, 5, 6, padding=2)),
        ("maxpool2d", _pool(28, 28, 6)),
        ("relu", _each(14 * 14 * 6)),
        ("conv2d", _conv(14, 14, 6, 5, 16)),
        ("maxpool2d", _pool(10, 10, 16)),
        ("relu", _each(5 * 5 * 16)),
        ("flatten", _flat(5, 5, 16)),
        ("dense", _dense(400, 120)),
        ("relu", _each(120)),
        ("dense", _dense(120, 84)),
        ("relu", _each(84)),
        ("dense", _dense(84, 10)),
        ("softmax_cross_entropy", _loss(10)),
        ("softmax", _each(10)),
    ],
}


def jobs() -> list[tuple[str, str, dict[str, int]]]:
    """(networks that use it, layer, sizes) for each distinct configuration, largest first."""
    users: dict[tuple, list[str]] = {}
    for network, entries in NETWORK_SIZES.items():
        for layer, sizes in entries:
            users.setdefault((layer, tuple(sorted(sizes.items()))), []).append(network)
    found = [(", ".join(sorted(set(n))), layer, dict(items)) for (layer, items), n in users.items()]
    # The big convolutions first, so that two workers finish together.
    return sorted(found, key=lambda job: (job[1] != "conv2d", job[1], sorted(job[2].items())))


def _prove_one(number: int) -> tuple[int, str, float, str]:
    """(number, description, seconds, error): one job, in a worker process."""
    networks, name, sizes = jobs()[number]
    layer = LAYERS[name]
    config = _configuration(layer, sizes)
    method = "coefficients" if name in LINEAR else "diff"
    start = time.perf_counter()
    try:
        prove(layer, config, method=method)
        error = ""
    except VerificationError as failure:
        error = str(failure)
    text = f"{name} [{layer.describe(config)}] ({networks})"
    return number, text, time.perf_counter() - start, error


def _ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def verify_network_sizes(
    workers: int | None = None, progress: Callable[[int, int], None] | None = None
) -> list[LayerResult]:
    """One row per layer of the catalogue that the networks use: its configurations at
    the networks' sizes, all proven or the first failure."""
    numbers = list(range(len(jobs())))
    workers = workers or min(2, os.cpu_count() or 1)
    done: list[tuple[int, str, float, str]] = []
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_ctrl_c) as pool:
            for result in pool.map(_prove_one, numbers):
                done.append(result)
                if progress is not None:
                    progress(len(done), len(numbers))
    else:
        for number in numbers:
            done.append(_prove_one(number))
            if progress is not None:
                progress(len(done), len(numbers))
    rows: dict[str, LayerResult] = {}
    for number, text, seconds, error in sorted(done):
        name = jobs()[number][1]
        row = rows.setdefault(name, LayerResult(name, True, 0.0, [], {}, ""))
        row.configurations.append(text)
        row.seconds += seconds
        if error and row.ok:
            row.ok, row.error = False, error
    return [rows[name] for name in LAYERS if name in rows]
