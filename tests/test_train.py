"""Tests for the networks, optimisers and training loop (train/networks.py, optim.py, loop.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cnnderive.train import checkpoint as ckpt
from cnnderive.train import networks, optim
from cnnderive.train.data import DataBundle, Split, load_dataset
from cnnderive.train.flat import FlatArrays, joined
from cnnderive.train.loop import (
    RECIPES,
    Recipe,
    TrainingDiverged,
    epoch_permutation,
    epoch_shifts,
    shift_images,
    train,
)
from cnnderive.train.networks import NETWORKS, build, split_batch, toy_images
from cnnderive.train.parallel import WorkerFailed


@pytest.fixture(scope="module")
def shipped():
    """The shipped 4,500 / 500 MNIST subset (never a download, never a user's cache)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CNNDERIVE_DATA", "/nonexistent-cnnderive-cache")
    try:
        return load_dataset("mnist", allow_download=False, log=lambda line: None)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def small(shipped):
    """240 training images of every digit (the subset's files are sorted by digit) and a test split."""
    train_ = Split(shipped.train.images[::19][:240], shipped.train.labels[::19][:240])
    validation = Split(shipped.validation.images[::5], shipped.validation.labels[::5])
    test = Split(shipped.validation.images[2::10], shipped.validation.labels[2::10])
    return DataBundle("mnist-5k", "a test slice of the shipped subset.", train_, validation, test)


# ------------------------------------------------------------------------------ imports


def test_training_code_never_imports_sympy_or_the_generators(tmp_path):
    """Import every train.* module, run a training step and draw the plots, in a fresh Python."""
    code = (
        "import sys\n"
        "import numpy as np\n"
        "import cnnderive.train.cli, cnnderive.train.loop, cnnderive.train.networks, cnnderive.train.optim, cnnderive.train.plots, "
        "cnnderive.train.checkpoint, cnnderive.train.data\n"
        "net = cnnderive.train.networks.build('lenet')\n"
        "opt = cnnderive.train.optim.build('adam', net.params, lr=1e-3)\n"
        "loss, out, grads = net.loss_and_gradients(np.zeros((2, 28, 28, 1), np.float32), np.array([1, 2]))\n"
        "opt.step(net.params, grads)\n"
        f"cnnderive.train.loop.write_plots(__import__('pathlib').Path({str(tmp_path)!r}), net, "
        "[{'epoch': 1, 'loss': loss, 'train_accuracy': 0.5, 'val_accuracy': 0.5, "
        "'test_accuracy': None}], 't')\n"
        "import tqdm\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'sympy', 'jinja2', 'derive', 'codegen'})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
    assert (tmp_path / "curves.png").exists() and (tmp_path / "filters.png").exists()


# ----------------------------------------------------------------------------- networks


def test_registry_and_parameter_counts():
    assert set(NETWORKS) == {"seed", "toy", "lenet"}
    assert build("toy").num_parameters() == 15
    assert build("seed").num_parameters() == 9 * 9 * 20 + 20 + 2000 * 10 + 10
    lenet = build("lenet")
    assert lenet.num_parameters() == 156 + 2416 + 48120 + 10164 + 850
    for name in NETWORKS:
        net = build(name, seed=3)
        assert all(p.dtype == np.float32 for p in net.params.values())
        assert net.layers[0].input_gradient is False  # the images need no gradient
        again = build(name, seed=3)
        assert all(np.array_equal(net.params[k], again.params[k]) for k in net.params)


def test_toy_task_is_digit_one_against_zero_on_6x6_images(shipped):
    net = build("toy")
    split = net.prepare(shipped.validation)
    assert split.images.shape == (100, 6, 6, 1) and split.images.dtype == np.float32
    assert np.bincount(split.labels).tolist() == [50, 50]
    first = shipped.validation.images[shipped.validation.labels == 0][0, :, :, 0]
    expected = first[2:26, 2:26].reshape(6, 4, 6, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(split.images[0, :, :, 0], expected, rtol=1e-6)
    assert toy_images(shipped.validation.images[:2]).shape == (2, 6, 6, 1)


def _batch(name: str, rng: np.random.Generator, n: int = 3):
    shape = NETWORKS[name].input_shape
    images = rng.random((n, *shape))
    labels = rng.integers(0, NETWORKS[name].num_classes if name != "toy" else 2, size=n)
    return images, labels


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_gradients_match_finite_differences_in_float64(name):
    """d/dt L(p + t d) at t = 0, from the generated backward and from central differences."""
    rng = np.random.default_rng(7)
    net = build(name, seed=1, dtype=np.float64)
    assert all(p.dtype == np.float64 for p in net.params.values())
    # Non-zero biases, so that no ReLU sits exactly at its kink.
    for key, value in net.params.items():
        if key.endswith("_b"):
            value[...] = rng.normal(0, 0.1, value.shape)
    images, labels = _batch(name, rng)
    loss, outputs, grads = net.loss_and_gradients(images, labels)
    assert set(grads) == set(net.params)
    for key, value in net.params.items():
        assert grads[key].shape == value.shape and grads[key].dtype == np.float64
        direction = rng.standard_normal(value.shape)
        analytic = float(np.sum(grads[key] * direction))
        eps = 1e-6
        original = value.copy()
        value[...] = original + eps * direction
        plus = net.forward(images, labels)[0]
        value[...] = original - eps * direction
        minus = net.forward(images, labels)[0]
        value[...] = original
        numeric = (plus - minus) / (2 * eps)
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (key, analytic, numeric)


@pytest.mark.parametrize("name", ["lenet", "toy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_after_max_pool_gives_the_losses_and_gradients_of_the_definition_order(
    name, dtype, monkeypatch
):
    """The networks run each max pool before the ReLU that precedes it in their definition.
    Reference: the same network in definition order; the values must be equal, not close."""
    reordered = build(name, seed=4, dtype=dtype)
    monkeypatch.setattr(networks, "apply_proven_swaps", list)
    in_definition_order = build(name, seed=4, dtype=dtype)

    def forwards(net):
        return [getattr(layer, "_forward", None) for layer in net.layers]

    assert forwards(reordered) != forwards(in_definition_order)  # the pools did move
    rng = np.random.default_rng(11)
    for key, value in reordered.params.items():
        if key.endswith("_b"):
            # Biases of both signs: over the blank background every window of a channel
            # ties at its bias, all positive or all negative.
            value[...] = rng.normal(0, 0.2, value.shape)
            in_definition_order.params[key][...] = value
    images = np.zeros((6, *reordered.input_shape), dtype=dtype)
    side = reordered.input_shape[0]
    inner = slice(side // 4, side - side // 4)  # a written middle, a blank border
    images[:, inner, inner] = rng.random(images[:, inner, inner].shape)
    images[4:] = rng.standard_normal(images[4:].shape)  # and no blank background at all
    labels = rng.integers(0, reordered.num_classes if name != "toy" else 2, size=6)
    loss1, outputs1, grads1 = reordered.loss_and_gradients(images, labels)
    loss2, outputs2, grads2 = in_definition_order.loss_and_gradients(images, labels)
    assert loss1 == loss2
    assert np.array_equal(outputs1, outputs2)
    for key in grads2:
        assert np.array_equal(grads1[key], grads2[key]), key
        assert np.any(grads2[key] != 0), key  # every parameter takes part


def test_split_batch_makes_contiguous_parts_of_nearly_equal_size():
    assert split_batch(7, 3) == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert split_batch(2, 3) == [slice(0, 1), slice(1, 2)]  # never an empty part
    assert split_batch(5, 1) == [slice(0, 5)]


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("batch", [7, 2])
def test_parts_on_worker_processes_give_the_one_process_result(name, batch):
    """threads=3: part 0 here, two parts in worker processes, recombined with weights m_i/m.
    Reference: the same network in one process; float64, so only rounding may differ."""
    rng = np.random.default_rng(batch)
    one, three = (
        build(name, seed=2, dtype=np.float64),
        build(name, seed=2, dtype=np.float64, threads=3),
    )
    try:
        images = rng.random((batch, *one.input_shape))
        labels = rng.integers(0, 2 if name == "toy" else 10, batch)
        loss1, out1, grads1 = one.loss_and_gradients(images, labels)
        loss3, out3, grads3 = three.loss_and_gradients(images, labels)
        assert loss3 == pytest.approx(loss1, rel=1e-12, abs=1e-14)
        np.testing.assert_allclose(out3, out1, rtol=1e-12, atol=1e-15)
        assert grads3.keys() == grads1.keys()
        for key in grads1:
            np.testing.assert_allclose(
                grads3[key], grads1[key], rtol=1e-10, atol=1e-14, err_msg=key
            )
        np.testing.assert_allclose(three.logits(images), one.logits(images), rtol=1e-12)
        # Gradients written into a kept FlatArrays (as the training loop passes the previous
        # step's) are that very object, holding the same values, with no trace of its old ones.
        for net, want in ((one, grads1), (three, grads3)):
            kept = FlatArrays(net.params.shapes(), np.float64)
            kept.flat[:] = np.nan
            _, _, into = net.loss_and_gradients(images, labels, out=kept)
            assert into is kept
            np.testing.assert_array_equal(into.flat, FlatArrays.copy_of(want, np.float64).flat)
            # Anything else is refused before the pass, with the way out.
            wrong = [dict(want), FlatArrays({"w": (2,)}, np.float64)]
            wrong.append(FlatArrays(net.params.shapes(), np.float32))
            for bad in wrong:
                with pytest.raises(ValueError, match="out=None"):
                    net.loss_and_gradients(images, labels, out=bad)
        # The workers see parameter changes made in this process.
        for value in three.params.values():
            value *= 0.5
        for value in one.params.values():
            value *= 0.5
        np.testing.assert_allclose(three.logits(images), one.logits(images), rtol=1e-12)
    finally:
        three.close()


@pytest.mark.parametrize("threads", [1, 2])
def test_meanwhile_runs_once_after_this_process_part_and_changes_nothing(threads):
    """loss_and_gradients(meanwhile=f) calls f once, after this process's part and, with
    workers, while their request is still unanswered; the step's results are bit for bit
    those of a step without it."""
    rng = np.random.default_rng(8)
    images, labels = rng.random((6, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 6)
    plain, hooked = build("lenet", threads=threads), build("lenet", threads=threads)
    seen = []

    def meanwhile():
        # This process's part is done: its loss cache has been used up by its backward.
        seen.append((hooked._loss_cache, list(hooked._workers.pending) if threads > 1 else []))

    try:
        want = plain.loss_and_gradients(images, labels)
        got = hooked.loss_and_gradients(images, labels, meanwhile=meanwhile)
        assert seen == [(None, [0] if threads > 1 else [])]
        assert got[0] == want[0]
        assert np.array_equal(got[1], want[1])
        assert np.array_equal(got[2].flat, want[2].flat)
        # An error in it stops the step like any other, and the next step is whole.
        with pytest.raises(ZeroDivisionError):
            hooked.loss_and_gradients(images, labels, meanwhile=lambda: 1 / 0)
        again = hooked.loss_and_gradients(images, labels)
        assert np.array_equal(again[2].flat, want[2].flat)
    finally:
        plain.close()
        hooked.close()


def test_a_failing_worker_names_the_error_and_the_network_recovers():
    net = build("lenet", threads=2)
    try:
        images = np.zeros((4, 28, 28, 1), np.float32)
        with pytest.raises(WorkerFailed, match="IndexError"):
            net.forward(images, np.array([1, 2, 3, 99]))  # 99 is in the worker's part
        loss, outputs = net.forward(images, np.array([1, 2, 3, 4]))
        assert np.isfinite(loss) and outputs.shape == (4, 10)
        assert set(net.backward()) == set(net.params)
    finally:
        net.close()


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting to be reaped is gone too
        return stat.read().split(")")[-1].split()[0] != "Z"


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_an_error_in_this_process_part_does_not_shift_the_workers_replies():
    """A label out of range in part 0 raises here while the worker has answered; the next
    step must still equal the one-process result (reference: threads=1, float64)."""
    rng = np.random.default_rng(4)
    images, labels = rng.random((6, 28, 28, 1)), rng.integers(0, 10, 6)
    one, two = build("lenet", dtype=np.float64), build("lenet", dtype=np.float64, threads=2)
    try:
        two.loss_and_gradients(images, labels)
        with pytest.raises(IndexError):
            two.forward(images, np.array([99, 1, 2, 3, 4, 5]))
        with pytest.raises(RuntimeError, match="needs a forward"):
            two.backward()
        loss1, _, grads1 = one.loss_and_gradients(images, labels)
        loss2, _, grads2 = two.loss_and_gradients(images, labels)
        assert loss2 == pytest.approx(loss1, rel=1e-12)
        for key in grads1:
            np.testing.assert_allclose(grads2[key], grads1[key], rtol=1e-10, atol=1e-14)
    finally:
        two.close()


def test_a_worker_killed_between_steps_is_reported_and_replaced():
    import os
    import signal

    net = build("seed", threads=2)
    try:
        images, labels = np.zeros((4, 28, 28, 1), np.float32), np.array([1, 2, 3, 4])
        net.loss_and_gradients(images, labels)
        worker = net._workers.processes[0].pid
        os.kill(worker, signal.SIGKILL)
        assert _wait_gone(worker)
        with pytest.raises(WorkerFailed, match="died"):
            net.loss_and_gradients(images, labels)
        loss, _, grads = net.loss_and_gradients(images, labels)
        assert np.isfinite(loss) and set(grads) == set(net.params)
    finally:
        net.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_a_worker_runs_on_one_thread_without_starting_a_blas_thread_pool():
    """A worker must not start BLAS's thread pool: OpenBLAS's idle pool thread spins for
    about 0.1 s, on a core the two processes compute on.  The parent runs with BLAS at
    two threads here, as a script that never limits it does."""
    import os

    from threadpoolctl import threadpool_info, threadpool_limits

    net = build("lenet", threads=2)
    try:
        with threadpool_limits(limits=2, user_api="blas"):
            images = np.zeros((4, 28, 28, 1), np.float32)
            net.loss_and_gradients(images, np.arange(4))
            worker = net._workers.processes[0].pid
            assert len(os.listdir(f"/proc/{worker}/task")) == 1
            # and the parent's own setting is its own again
            blas = [info for info in threadpool_info() if info["user_api"] == "blas"]
            assert all(info["num_threads"] == 2 for info in blas)
    finally:
        net.close()


def test_workers_stop_when_the_network_is_dropped_or_its_process_is_killed(tmp_path):
    import gc
    import subprocess
    import sys

    net = build("toy", threads=2)
    net.forward(np.zeros((4, 6, 6, 1), np.float32), np.array([0, 1, 0, 1]))
    worker = net._workers.processes[0].pid
    del net
    gc.collect()
    assert _wait_gone(worker), "dropping the network left its worker running"

    script = (
        "import os, signal, numpy as np\n"
        "from cnnderive.train.networks import build\n"
        "net = build('toy', threads=2)\n"
        "net.forward(np.zeros((4, 6, 6, 1), np.float32), np.array([0, 1, 0, 1]))\n"
        "print(net._workers.processes[0].pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    orphan = int(done.stdout.split()[0])
    assert _wait_gone(orphan), "a worker outlived its killed parent"


def test_a_script_that_never_closes_its_network_still_exits():
    # At exit, multiprocessing's own handler would terminate() the workers (which ignore
    # SIGTERM) and wait for them forever; parallel.py closes them first.
    script = (
        "import numpy as np\n"
        "from cnnderive.train.networks import build\n"
        "net = build('toy', threads=2)\n"
        "net.forward(np.zeros((4, 6, 6, 1), np.float32), np.array([0, 1, 0, 1]))\n"
        "net.backward()\n"
        "print('computed', flush=True)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the script hung at exit, waiting for its worker processes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "computed"


def test_threads_must_be_a_whole_number_of_at_least_one():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be a whole number"):
            build("seed", threads=bad)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_forward_outputs_are_probabilities(name):
    rng = np.random.default_rng(0)
    net = build(name)
    images, labels = _batch(name, rng, 5)
    loss, probs = net.forward(images.astype(np.float32), labels)
    assert np.isfinite(loss) and loss > 0
    assert probs.shape == (5, NETWORKS[name].num_classes)
    assert ((probs >= 0) & (probs <= 1)).all()
    if name == "lenet":
        np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    assert net.predict(images.astype(np.float32)).shape == (5,)


# --------------------------------------------------------------------------- optimisers


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimiser_updates_in_place_and_its_state_round_trips(kind):
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    before = {k: v for k, v in params.items()}
    grads = [
        {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        for _ in range(6)
    ]
    first = optim.build(kind, params, lr=0.01)
    first.start_epoch(1)
    for g in grads[:3]:
        first.step(params, g)
    assert all(params[k] is before[k] and params[k].dtype == np.float32 for k in params)
    state = first.state_dict()
    copy = {k: v.copy() for k, v in params.items()}
    second = optim.build(kind, copy, lr=0.5)
    second.load_state_dict(state)
    for g in grads[3:]:
        first.step(params, g)
        second.step(copy, g)
    for k in params:
        assert np.array_equal(params[k], copy[k])


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_one_update_over_flat_arrays_is_the_update_of_each_array(kind, weight_decay):
    """FlatArrays parameters and gradients take the one-call update; plain dicts the
    per-array one. Same bits, through a state round trip in the middle."""
    rng = np.random.default_rng(1)
    shapes = {"conv_w": (2, 2, 1, 3), "conv_b": (3,), "fc_w": (12, 2), "fc_b": (2,)}
    start = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(6)
    ]
    plain = {k: v.copy() for k, v in start.items()}
    flat = FlatArrays.copy_of(start, np.float32)
    hyper = {"lr": 0.05, "weight_decay": weight_decay}
    by_array, at_once = optim.build(kind, plain, **hyper), optim.build(kind, flat, **hyper)
    for opt in (by_array, at_once):
        opt.start_epoch(1)
    for step, g in enumerate(grads):
        if step == 3:  # the joined state must survive load_state_dict
            at_once.load_state_dict(at_once.state_dict())
        by_array.step(plain, g)
        at_once.step(flat, FlatArrays.copy_of(g, np.float32))
    for k in shapes:
        assert np.array_equal(flat[k], plain[k]), k
        assert not np.array_equal(flat[k], start[k]), k
    assert at_once.state_dict()["buffers"].keys() == by_array.state_dict()["buffers"].keys()
    assert at_once._joined and not by_array._joined  # each took the path named above


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("flat", ["arrays", "flat", "flat parameters, array gradients"])
def test_prepare_step_then_step_is_step_alone_bit_for_bit(kind, flat):
    """The training loop runs each step's gradient-free part (prepare_step) while the
    gradients are computed; with it, every update is the one step() alone makes, over
    the momentum's rise and a state round trip, with the parameters untouched until
    step()."""
    rng = np.random.default_rng(3)
    shapes = {"conv_w": (2, 2, 1, 3), "conv_b": (3,), "fc_w": (12, 2)}
    start = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(7)
    ]

    def arrays(values, gradients=False):
        copies = {k: v.copy() for k, v in values.items()}
        if flat == "arrays" or (gradients and flat != "flat"):
            return copies
        return FlatArrays.copy_of(copies, np.float32)

    alone, ahead = arrays(start), arrays(start)
    hyper = {"lr": 0.05, "weight_decay": 0.1}
    if kind == "sgd":
        hyper["momentum_steps"] = 4  # the momentum rises during the test
    by_step, prepared = optim.build(kind, alone, **hyper), optim.build(kind, ahead, **hyper)
    for opt in (by_step, prepared):
        opt.start_epoch(1)
    for step, g in enumerate(grads):
        if step == 4:
            prepared.load_state_dict(prepared.state_dict())
        before = {k: np.array(v) for k, v in ahead.items()}
        state = {k: np.array(v) for k, v in prepared.buffers.items()}
        prepared.prepare_step(ahead)
        assert all(np.array_equal(ahead[k], before[k]) for k in shapes)
        # the state has moved on (its decay), unless there is none yet
        assert step == 0 or any(not np.array_equal(prepared.buffers[k], state[k]) for k in state)
        g = arrays(g, gradients=True)
        by_step.step(alone, g)
        prepared.step(ahead, g)
        for k in shapes:
            assert np.array_equal(ahead[k].view(np.uint32), alone[k].view(np.uint32)), (step, k)
    assert by_step.step_count == prepared.step_count == len(grads)
    # Half a step is neither repeated nor saved.
    prepared.prepare_step(ahead)
    with pytest.raises(RuntimeError, match="twice"):
        prepared.prepare_step(ahead)
    with pytest.raises(RuntimeError, match="half a step"):
        prepared.state_dict()
    prepared.step(ahead, arrays(grads[0], gradients=True))
    assert prepared.state_dict()["step"] == len(grads) + 1


def test_flat_arrays_copy_into_their_views_and_keep_their_names():
    arrays = FlatArrays({"w": (2, 3), "b": (3,)}, np.float32)
    arrays["b"] = [1, 2, 3]
    assert arrays.flat.tolist() == [0] * 6 + [1, 2, 3]
    assert np.shares_memory(arrays["w"], arrays.flat)
    with pytest.raises(KeyError, match="not one of the arrays"):
        arrays["x"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        arrays["b"] = np.zeros(4)
    with pytest.raises(TypeError, match="fixed"):
        del arrays["w"]
    assert joined(arrays, FlatArrays(arrays.shapes(), np.float32)) is not None
    assert joined(arrays, FlatArrays({"b": (3,), "w": (2, 3)}, np.float32)) is None
    assert joined(arrays, dict(arrays)) is None


def test_updates_with_gradients_of_another_dtype_are_the_written_out_formulas():
    """Reference: the update rules written out as NumPy expressions, float64 parameters and
    float32 gradients (each product in the dtype the expression gives it), bit for bit."""
    rng = np.random.default_rng(5)
    start = {"a_w": rng.standard_normal((3, 4)), "a_b": rng.standard_normal(4)}
    grads = {
        name: rng.standard_normal(value.shape).astype(np.float32) for name, value in start.items()
    }
    for kind in ("sgd", "adam"):
        params = {name: value.copy() for name, value in start.items()}
        opt = optim.build(kind, params, lr=0.1)
        for _ in range(3):
            opt.step(params, grads)
        for name, value in start.items():
            want, f = value.copy(), np.float64
            first, second = np.zeros_like(want), np.zeros_like(want)
            for step in range(1, 4):
                g = grads[name]
                if kind == "sgd":
                    mu = opt.momentum_start + (opt.momentum - opt.momentum_start) * min(
                        (step - 1) / opt.momentum_steps, 1.0
                    )
                    first *= f(mu)
                    first -= f(opt.lr) * g
                    want += first
                else:
                    first *= f(opt.beta1)
                    first += f(1.0 - opt.beta1) * g
                    second *= f(opt.beta2)
                    second += f(1.0 - opt.beta2) * (g * g)
                    lr_t = opt.lr * np.sqrt(1 - opt.beta2**step) / (1 - opt.beta1**step)
                    eps_t = opt.eps * np.sqrt(1 - opt.beta2**step)
                    want -= f(lr_t) * (first / (np.sqrt(second) + f(eps_t)))
            assert np.array_equal(params[name], want), (kind, name)
        # Gradients given as lists are read as arrays, as before the work arrays.
        listed = {name: value.copy() for name, value in start.items()}
        optim.build(kind, listed, lr=0.1).step(listed, {n: g.tolist() for n, g in grads.items()})
        again = {name: value.copy() for name, value in start.items()}
        optim.build(kind, again, lr=0.1).step(
            again, {n: np.asarray(g.tolist()) for n, g in grads.items()}
        )
        assert all(np.array_equal(listed[n], again[n]) for n in start)


def test_sgd_schedule_momentum_rises_and_lr_halves():
    sgd = optim.SGD({"w": np.zeros(2, np.float32)}, lr=0.1, momentum_steps=10)
    sgd.start_epoch(1)
    assert sgd.current_momentum == 0.5 and sgd.current_lr == 0.1
    sgd.step_count = 20
    sgd.start_epoch(3)
    assert sgd.current_momentum == 0.95 and sgd.current_lr == pytest.approx(0.025)


# -------------------------------------------------------------------------------- loop


def test_shift_images_moves_each_image_by_its_offset():
    images = np.arange(2 * 5 * 5, dtype=np.float32).reshape(2, 5, 5, 1)
    moved = shift_images(images, np.array([[1, -2], [0, 0]]), 2)
    assert moved.dtype == np.float32 and moved.shape == images.shape
    expected = np.zeros((5, 5), np.float32)
    expected[1:, :3] = images[0, :4, 2:, 0]
    assert np.array_equal(moved[0, :, :, 0], expected)
    assert np.array_equal(moved[1], images[1])
    offsets = epoch_shifts(3, 1, 100, 2)
    assert offsets.min() == -2 and offsets.max() == 2
    assert np.array_equal(offsets, epoch_shifts(3, 1, 100, 2))
    # Reference for random offsets and three channels: pixel by pixel, out[y, x] = in[y - down,
    # x - right] where that is inside the image, else 0.
    rng = np.random.default_rng(0)
    images = rng.random((6, 7, 9, 3)).astype(np.float32)
    offsets = rng.integers(-3, 4, size=(6, 2))
    moved = shift_images(images, offsets, 3)
    expected = np.zeros_like(images)
    for i, (down, right) in enumerate(offsets):
        for y in range(7):
            for x in range(9):
                if 0 <= y - down < 7 and 0 <= x - right < 9:
                    expected[i, y, x] = images[i, y - down, x - right]
    assert np.array_equal(moved, expected) and moved.flags.c_contiguous
    # A kept padded array, as the training loop passes, gives the same images batch after
    # batch: its border stays zero.
    padded = np.zeros((6, 13, 15, 3), np.float32)
    for _ in range(2):
        assert np.array_equal(shift_images(images, offsets, 3, padded=padded), expected)
        shift_images(rng.random((6, 7, 9, 3)).astype(np.float32), offsets[::-1], 3, padded=padded)
    with pytest.raises(ValueError, match="padded has shape"):
        shift_images(images, offsets, 2, padded=padded)


@pytest.mark.parametrize("shift", [0, 2])
def test_epoch_batches_are_the_permutations_batches_whether_gathered_ahead_or_not(shift):
    """_EpochBatches hands out step s's images and labels, gathered ahead by gather_next or
    not; gathering the next batch leaves the current one's images as they were."""
    from cnnderive.train.loop import _EpochBatches

    rng = np.random.default_rng(3)
    images = rng.random((23, 5, 4, 2)).astype(np.float32)
    labels = np.arange(23)
    order = epoch_permutation(1, 1, 23)
    offsets = epoch_shifts(1, 1, 23, shift) if shift else None
    buffers = [np.empty((5, 5, 4, 2), np.float32) for _ in range(2)]
    padded = np.zeros((5, 5 + 2 * shift, 4 + 2 * shift, 2), np.float32) if shift else None
    batches = _EpochBatches(images, labels, order, 5, buffers, shift, offsets, padded)
    assert batches.steps == 5
    for step in range(1, 6):
        index = order[(step - 1) * 5 : step * 5]
        want = images[index]
        if shift:
            want = shift_images(want, offsets[(step - 1) * 5 : step * 5], shift)
        x, y = batches.of_step(step)
        held = x.copy()
        if step % 2:  # every other step gathers its successor ahead
            batches.gather_next()
            batches.gather_next()  # a second call gathers nothing more
        assert np.array_equal(x, held) and np.array_equal(x, want), step
        assert np.array_equal(y, labels[index]), step
    batches.gather_next()  # after the last step: nothing to gather
    assert batches._next is None


def test_epoch_permutation_depends_only_on_seed_and_epoch():
    assert np.array_equal(epoch_permutation(1, 2, 50), epoch_permutation(1, 2, 50))
    assert not np.array_equal(epoch_permutation(1, 2, 50), epoch_permutation(1, 3, 50))
    assert sorted(epoch_permutation(0, 1, 50)) == list(range(50))


@pytest.mark.parametrize(
    "net, kind, extra",
    [
        ("seed", "adam", {"lr": 2e-3}),
        ("seed", "sgd", {"lr": 0.5, "threads": 2}),
        ("lenet", "sgd", {"lr": 0.05, "momentum": 0.9, "shift": 1, "weight_decay": 1e-3}),
        ("toy", "sgd", {"lr": 0.5}),
    ],
)
def test_resume_gives_bitwise_the_weights_of_an_uninterrupted_run(
    small, tmp_path, net, kind, extra
):
    recipe = Recipe(net, kind, lr_decay=0.8, batch_size=32, epochs=2, seed=5, **extra)
    straight, history = train(
        recipe, small, tmp_path / "straight", progress=False, log=lambda s: None
    )
    assert [row["epoch"] for row in history] == [1, 2]

    train(replace_epochs(recipe, 1), small, tmp_path / "split", progress=False, log=lambda s: None)
    saved = ckpt.load(tmp_path / "split" / "checkpoint.npz")
    assert saved.epoch == 1
    resumed, history2 = train(
        recipe, small, tmp_path / "split", resume_from=saved, progress=False, log=lambda s: None
    )
    for key in straight.params:
        assert np.array_equal(straight.params[key], resumed.params[key]), key
    a = ckpt.load(tmp_path / "straight" / "checkpoint.npz")
    b = ckpt.load(tmp_path / "split" / "checkpoint.npz")
    assert a.epoch == b.epoch == 2
    assert a.optimizer["step"] == b.optimizer["step"]
    for key in a.optimizer["buffers"]:
        assert np.array_equal(a.optimizer["buffers"][key], b.optimizer["buffers"][key])
    for key in a.params:
        assert np.array_equal(a.params[key], b.params[key]) and a.params[key].dtype == np.float32
    assert [r["loss"] for r in history] == [r["loss"] for r in history2]

    metrics = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    row = metrics["epochs"][-1]
    for key in (
        "loss",
        "train_accuracy",
        "val_accuracy",
        "test_accuracy",
        "seconds",
        "images_per_second",
    ):
        assert isinstance(row[key], float), key
    for name in ("curves.png", "filters.png"):
        assert (tmp_path / "split" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def replace_epochs(recipe: Recipe, epochs: int) -> Recipe:
    from dataclasses import replace

    return replace(recipe, epochs=epochs)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(small, tmp_path):
    good = Recipe("lenet", "sgd", lr=0.01, lr_decay=1.0, batch_size=32, epochs=1, seed=0)
    train(good, small, tmp_path, progress=False, log=lambda s: None)
    before = ckpt.load(tmp_path / "checkpoint.npz")
    bytes_before = (tmp_path / "checkpoint.npz").read_bytes()

    absurd = Recipe("lenet", "sgd", lr=1e30, lr_decay=1.0, batch_size=32, epochs=3, seed=0)
    with pytest.raises(TrainingDiverged) as caught:
        train(absurd, small, tmp_path, resume_from=before, progress=False, log=lambda s: None)
    error = caught.value
    assert error.epoch == 2 and 1 <= error.step <= error.steps
    message = str(error)
    assert f"epoch 2, step {error.step} of {error.steps}" in message
    assert "last good checkpoint (epoch 1)" in message
    assert (tmp_path / "checkpoint.npz").read_bytes() == bytes_before
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1]


def test_nan_in_the_first_epoch_keeps_the_initial_checkpoint(small, tmp_path):
    absurd = Recipe("lenet", "sgd", lr=1e30, lr_decay=1.0, batch_size=32, epochs=1, seed=0)
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step \d+ of 8"):
        train(absurd, small, tmp_path, progress=False, log=lambda s: None)
    kept = ckpt.load(tmp_path / "checkpoint.npz")
    assert kept.epoch == 0
    fresh = build("lenet", seed=0)
    for key in fresh.params:
        assert np.array_equal(kept.params[key], fresh.params[key])


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.load(tmp_path / "checkpoint.npz")
    (tmp_path / "checkpoint.npz").write_bytes(b"not a zip")
    with pytest.raises(ckpt.CheckpointError, match="not an .npz archive"):
        ckpt.load(tmp_path / "checkpoint.npz")
    np.savez(tmp_path / "checkpoint.npz", other=np.zeros(2))  # an archive, but no meta
    with pytest.raises(ckpt.CheckpointError, match="not a readable"):
        ckpt.load(tmp_path / "checkpoint.npz")


def test_every_network_has_a_default_recipe_and_an_alternative_optimiser():
    from cnnderive.train.loop import ALTERNATIVE_OPTIMIZERS

    for name in NETWORKS:
        recipe = RECIPES[name]
        assert recipe.net == name and recipe.epochs >= 1 and recipe.batch_size >= 1
        (other,) = {"sgd", "adam"} - {recipe.optimizer}
        assert set(ALTERNATIVE_OPTIMIZERS[name][other]) <= {"lr", "lr_decay", "momentum"}


def test_one_blas_thread_nests_and_puts_the_outer_setting_back():
    from threadpoolctl import threadpool_info

    from cnnderive.train.parallel import one_blas_thread

    def blas_threads():
        return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]

    before = blas_threads()
    with one_blas_thread():
        assert all(n == 1 for n in blas_threads())
        with one_blas_thread():
            assert all(n == 1 for n in blas_threads())
        assert all(n == 1 for n in blas_threads())  # the inner exit kept the limit
    assert blas_threads() == before


def test_a_waiting_process_tries_for_a_bounded_time_then_blocks_until_released_or_gone(
    monkeypatch,
):
    import multiprocessing
    import threading
    import time

    from cnnderive.train import parallel

    monkeypatch.setattr(parallel, "_CHECK_SECONDS", 0.02)
    semaphore = multiprocessing.get_context("fork").Semaphore(0)
    semaphore.release()
    began = time.perf_counter()
    assert parallel._take(semaphore, 10.0, lambda: True)  # released: taken at once
    assert time.perf_counter() - began < 1.0
    # Never released, and the releasing process gone: False after the polling time and
    # one check.
    began = time.perf_counter()
    assert not parallel._take(semaphore, 0.05, lambda: False)
    assert 0.05 <= time.perf_counter() - began < 1.0
    # Released while the waiter blocks (no polling): taken then.
    threading.Timer(0.1, semaphore.release).start()
    began = time.perf_counter()
    assert parallel._take(semaphore, 0.0, lambda: True)
    assert 0.1 <= time.perf_counter() - began < 2.0

    class ReleasedAsItsProcessWent:  # the timed wait misses it, the last try finds it
        def acquire(self, block=True, timeout=None):
            return timeout is None

    assert parallel._take(ReleasedAsItsProcessWent(), 0.0, lambda: False)
    # Processes that would share a core do not poll: it would take time from the other one.
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert parallel._poll_seconds(2) == 0.0
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert parallel._poll_seconds(2) == parallel._POLL_SECONDS > 0
