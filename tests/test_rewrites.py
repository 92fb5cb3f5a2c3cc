"""The ReLU / max-pool reordering is a rewrite proven in derive/ (derive/rewrites.py),
written into generated/rewrites.py, and applied by the networks only where the proof's
premises hold: exactly those two layers, at parameter values the proof covered."""

from __future__ import annotations

import numpy as np
import pytest

from cnnderive.train import networks
from cnnderive.train.networks import NETWORKS, Network, apply_proven_swaps, build, split_batch
from derive.layers import avgpool2d, relu
from derive.rewrites import RELU_THEN_MAX_POOL, Swap, prove_swap, verify_swaps
from derive.verify import VerificationError
from generated import rewrites


def test_the_swap_is_proven_and_generated_for_the_pools_the_networks_use():
    (result,) = verify_swaps()
    assert result.ok and result.configurations > 100
    names, proven = rewrites.SWAPS[("activations.relu_forward", "maxpool2d.forward")]
    assert names == ("size", "stride")
    assert proven == frozenset(result.proven)
    assert (2, 2) in proven


def test_the_proof_refuses_a_swap_that_does_not_hold():
    """A ReLU and an average pool do not commute: the same proof fails."""
    swap = Swap("relu then avgpool2d", relu, avgpool2d, avgpool2d.configurations, avgpool2d)
    with pytest.raises(VerificationError, match="differ"):
        for config in avgpool2d.configurations():
            prove_swap(swap, config)


def _run(layers, x):
    for layer in layers:
        x = layer.forward(x, {})
    return x


def test_a_relu_before_an_average_pool_stays_in_place():
    relu_layer, pool = networks._relu(), networks._avgpool()
    assert apply_proven_swaps([relu_layer, pool]) == [relu_layer, pool]
    # Were it swapped, the outputs would change: the mean of ReLU'd values is not the
    # ReLU of the mean.
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 3))
    assert not np.allclose(_run([relu_layer, pool], x), _run([pool, relu_layer], x))


def test_a_relu_before_a_max_pool_moves_only_at_proven_parameters():
    relu_layer, pool = networks._relu(), networks._maxpool()
    assert apply_proven_swaps([relu_layer, pool]) == [pool, relu_layer]
    wide = networks._maxpool(size=4)  # outside the proven sweep (sizes 1 to 3)
    assert apply_proven_swaps([relu_layer, wide]) == [relu_layer, wide]
    assert RELU_THEN_MAX_POOL.second.name == "maxpool2d"


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_every_network_swaps_only_proven_pairs(name):
    net = build(name)
    defined = [networks._forward_name(layer) for layer in net._layers()]
    running = [networks._forward_name(layer) for layer in net.layers]
    assert sorted(map(str, defined)) == sorted(map(str, running))
    for before, after in zip(defined, running):
        if before != after:
            assert {before, after} == {"activations.relu_forward", "maxpool2d.forward"}


def test_the_parts_are_weighted_by_their_sizes_when_uneven():
    assert Network._weights(split_batch(7, 3)) == [3 / 7, 2 / 7, 2 / 7]
    assert Network._weights(split_batch(2, 3)) == [1 / 2, 1 / 2]
    assert sum(Network._weights(split_batch(33, 4))) == pytest.approx(1.0, abs=1e-15)
