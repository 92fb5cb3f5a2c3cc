"""derive/network_sizes.py lists every layer configuration the shipped networks run, in
the order they run them: recorded here from a training step of each network."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from derive.network_sizes import NETWORK_SIZES, jobs
from generated import activations, avgpool2d, conv2d, dense, flatten, losses, maxpool2d


def _recorder(calls, name, sizes_of, function):
    @functools.wraps(function)  # the same name and module: the networks look them up
    def recorded(*args, **kwargs):
        calls.append((name, sizes_of(*args, **kwargs)))
        return function(*args, **kwargs)

    return recorded


def _image_sizes(x):
    return {"in_height": x.shape[1], "in_width": x.shape[2]}


SIZES = {
    (conv2d, "forward", "conv2d"): lambda x, w, b, stride=1, padding=0, **_: {
        **_image_sizes(x),
        "in_channels": x.shape[3],
        "kernel_height": w.shape[0],
        "kernel_width": w.shape[1],
        "out_channels": w.shape[3],
        "stride": stride,
        "padding": padding,
    },
    (dense, "forward", "dense"): lambda x, w, b, **_: {
        "in_features": w.shape[0],
        "out_features": w.shape[1],
    },
    (maxpool2d, "forward", "maxpool2d"): lambda x, size=2, stride=None, **_: {
        **_image_sizes(x),
        "channels": x.shape[3],
        "size": size,
        "stride": size if stride is None else stride,
    },
    (avgpool2d, "forward", "avgpool2d"): lambda x, size=2, stride=None, **_: {
        **_image_sizes(x),
        "channels": x.shape[3],
        "size": size,
        "stride": size if stride is None else stride,
    },
    (flatten, "forward", "flatten"): lambda x, **_: {**_image_sizes(x), "channels": x.shape[3]},
    **{
        (activations, f"{name}_forward", name): lambda z, **_: {
            "features": int(np.prod(z.shape[1:]))
        }
        for name in ("relu", "sigmoid", "softmax", "tanh")
    },
    **{
        (losses, f"{name}_forward", name): lambda logits, targets, **_: {"classes": logits.shape[1]}
        for name in ("bce_with_logits", "softmax_cross_entropy")
    },
}


@pytest.mark.parametrize("network", sorted(NETWORK_SIZES))
def test_every_configuration_a_network_runs_is_proven_at_its_size(network, monkeypatch):
    from cnnderive.train.networks import build

    calls = []
    for (module, function, name), sizes_of in SIZES.items():
        monkeypatch.setattr(
            module, function, _recorder(calls, name, sizes_of, getattr(module, function))
        )
    net = build(network, dtype=np.float64)  # after the patches: layers keep their functions
    images = np.random.default_rng(0).random((3, *net.input_shape))
    net.loss_and_gradients(images, np.array([0, 1, 0]))
    listed = [
        (name, {k: v for k, v in sizes.items() if k != "batch"})
        for name, sizes in NETWORK_SIZES[network]
    ]
    assert calls == listed


def test_each_configuration_is_proven_once():
    assert len(jobs()) == len({(layer, tuple(sorted(s.items()))) for _, layer, s in jobs()})


def test_the_proofs_at_network_sizes_run_and_report_per_layer(monkeypatch):
    """A cheap part of the list (the full run takes minutes and runs in CI)."""
    from derive import network_sizes

    cheap = [job for job in jobs() if job[1] in ("dense", "relu") and "toy" in job[0]]
    assert len(cheap) == 2
    monkeypatch.setattr(network_sizes, "jobs", lambda: cheap)
    rows = network_sizes.verify_network_sizes(workers=1)
    assert [(row.name, row.ok, len(row.configurations)) for row in rows] == [
        ("dense", True, 1),
        ("relu", True, 1),
    ]


def test_network_sizes_is_used_alone(capsys):
    from cnnderive.cli import main

    assert main(["verify", "--network-sizes", "--layer", "relu"]) == 2
    assert "--network-sizes" in capsys.readouterr().err
