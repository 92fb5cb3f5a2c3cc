"""Images per second of real training: ``cnnderive train``'s loop against PyTorch loops.

    python benchmarks/training.py                   # seed and lenet, batches 64 and 256
    python benchmarks/training.py --net seed --batch 256 --epochs 1 --rounds 3
    python benchmarks/training.py --no-compile      # leave torch.compile out (it compiles for minutes)

What users run: whole epochs over real data, full Fashion-MNIST when Debian's
dataset-fashion-mnist is installed (else the shipped MNIST subset), without
augmentation (``--shift 0``), each side on ``--threads`` cores (default 2).

* generated: ``cnnderive.train.loop.train`` itself, the default recipe of the network
  with the batch size, epochs, threads and shift set here; its images/s are those of
  its metrics.json (the training loop's time per epoch, evaluation apart).
* pytorch eager: a plain PyTorch loop over the same images in the same order (the
  same permutation per epoch): gather the batch, forward, loss, backward,
  torch.optim.SGD with momentum, the loss and accuracy read back every step as
  cnnderive's loop does; the same network from the same initial parameters;
  ``torch.set_num_threads(threads)``; evaluation of the validation split after each
  epoch, timed apart.
* torch.compile: the same loop with the model compiled (``torch.compile``, default
  mode). Compiling happens in untimed warm-up steps (a full batch, the epoch's last
  smaller batch, both evaluation batch sizes), after which parameters and optimiser
  state are put back; the compile time is printed apart, and "amortised" is the
  epoch's images/s with the compile time added to one epoch.

Each run is its own process; runs alternate between the implementations, ``--rounds``
times, generated first in odd rounds and last in even ones. The table gives the median
images/s over all epochs of all rounds and the range of the per-round medians; ratio =
generated images/s / reference images/s, then the range and the median of the
per-round ratios (a round's runs follow each other, so their ratio is the least
disturbed by the machine's slow and fast phases).

Then, for the generated network (in this process, one thread): whether subnormal values
occurred in any layer's output or gradient over a few batches of the trained network;
a per-layer breakdown of one epoch's steps; and the time of one step on a batch built
to hold subnormal values (a saturated network: kernels scaled up) against a normal
batch, with the generated flushes of subnormal values on and, for comparison, off.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
from _measure import OtherLoad, describe_environment, percent
from threadpoolctl import threadpool_limits
from train_step import layer_label, print_breakdown, torch_model

from cnnderive.train import optim
from cnnderive.train.data import load_dataset
from cnnderive.train.loop import RECIPES, epoch_permutation, prepare_splits, train
from cnnderive.train.networks import build
from cnnderive.train.parallel import one_blas_thread

F32 = np.float32
IMPLEMENTATIONS = ("generated", "eager", "compile")
NAMES = {"generated": "generated", "eager": "pytorch eager", "compile": "torch.compile"}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown CPU"
    fields = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    return (
        f"{fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family', '?')}, "
        f"model {fields.get('model', '?')}, {vector})"
    )


def load(dataset: str):
    """The data bundle: full Fashion-MNIST if installed, else what load_dataset finds offline."""
    return load_dataset(dataset, allow_download=False, log=lambda _: None)


def recipe_for(net: str, batch: int, epochs: int, threads: int):
    return replace(RECIPES[net], batch_size=batch, epochs=epochs, shift=0, threads=threads)


# ------------------------------------------------------------------------- generated


def run_generated(net_name, batch, epochs, threads, dataset):
    bundle = load(dataset)
    recipe = recipe_for(net_name, batch, epochs, threads)
    with tempfile.TemporaryDirectory() as run_dir:
        _, history = train(recipe, bundle, run_dir, progress=False, log=lambda _: None)
    return {
        "images_per_second": [row["images_per_second"] for row in history],
        "eval_seconds": [row["eval_seconds"] for row in history],
        "val_accuracy": history[-1]["val_accuracy"],
        "data": bundle.source,
    }


# ----------------------------------------------------------------------------- torch


def run_torch(net_name, batch, epochs, threads, dataset, compiled):
    import torch

    torch.set_num_threads(threads)
    bundle = load(dataset)
    recipe = recipe_for(net_name, batch, epochs, threads)
    net = build(net_name, recipe.seed, dtype=F32, threads=1)
    train_split, val_split, _ = prepare_splits(net, bundle)
    model = torch_model(torch, net_name, net.params)
    net.close()
    images = torch.from_numpy(np.ascontiguousarray(train_split.images.transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(train_split.labels.astype(np.int64))
    val_images = torch.from_numpy(np.ascontiguousarray(val_split.images.transpose(0, 3, 1, 2)))
    val_labels = torch.from_numpy(val_split.labels.astype(np.int64))
    n = len(labels)
    if net_name == "seed":
        bce = torch.nn.BCEWithLogitsLoss(reduction="sum")

        def loss_of(logits, y):  # cnnderive's fused sigmoid + BCE, summed over classes / m
            target = torch.nn.functional.one_hot(y, 10).to(logits.dtype)
            return bce(logits, target) / len(y)
    else:
        loss_of = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum)
    forward = torch.compile(model) if compiled else model

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        logits = forward(x)
        loss = loss_of(logits, y)
        loss.backward()
        optimizer.step()
        return loss.item(), int((logits.argmax(1) == y).sum())

    def evaluate():
        correct = 0
        with torch.no_grad():
            for start in range(0, len(val_labels), 500):
                logits = forward(val_images[start : start + 500])
                correct += int((logits.argmax(1) == val_labels[start : start + 500]).sum())
        return correct / len(val_labels)

    compile_seconds = None
    if compiled:
        # Compile for every shape the epochs will see, then put the state back.
        saved_model = copy.deepcopy(model.state_dict())
        saved_optimizer = copy.deepcopy(optimizer.state_dict())
        began = time.perf_counter()
        sizes = {batch, n % batch or batch}
        for size in sorted(sizes):
            step(images[:size], labels[:size])
        evaluate()
        compile_seconds = time.perf_counter() - began
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)

    rates, eval_seconds = [], []
    for epoch in range(1, epochs + 1):
        order = torch.from_numpy(epoch_permutation(recipe.seed, epoch, n))
        loss_sum, correct = 0.0, 0
        began = time.perf_counter()
        for start in range(0, n, batch):
            index = order[start : start + batch]
            loss, hits = step(images[index], labels[index])
            loss_sum += loss * len(index)
            correct += hits
        rates.append(n / (time.perf_counter() - began))
        began = time.perf_counter()
        accuracy = evaluate()
        eval_seconds.append(time.perf_counter() - began)
    return {
        "images_per_second": rates,
        "eval_seconds": eval_seconds,
        "val_accuracy": accuracy,
        "compile_seconds": compile_seconds,
        "torch": f"torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, oneDNN "
        f"{'on' if torch.backends.mkldnn.is_available() else 'off'}, {threads} threads",
    }


def worker(args):
    if args.worker == "generated":
        threadpool_limits(args.threads, user_api="blas")
        record = run_generated(args.net[0], args.batch[0], args.epochs, args.threads, args.dataset)
    else:
        compiled = args.worker == "compile"
        record = run_torch(
            args.net[0], args.batch[0], args.epochs, args.threads, args.dataset, compiled
        )
    print(json.dumps(record))


def run_worker(impl, net_name, batch, args):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        impl,
        "--net",
        net_name,
        "--batch",
        str(batch),
        "--epochs",
        str(args.epochs),
        "--threads",
        str(args.threads),
        "--dataset",
        args.dataset,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------ subnormals and the breakdown


def subnormal_count(a) -> int:
    a = np.asarray(a)
    if a.dtype.kind != "f":
        return 0
    return int(np.count_nonzero((a != 0) & (np.abs(a) < np.finfo(a.dtype).tiny)))


def instrument(net, on_call):
    """Wrap every layer's forward and backward, and the loss: ``on_call(label, part, fn, args)``."""
    originals = []
    for index, layer in enumerate(net.layers):
        label = layer_label(index, layer)
        for part in ("forward", "backward"):
            original = getattr(layer, part)
            originals.append((layer, part))

            def wrapped(*a, _original=original, _label=label, _part=part, **k):
                return on_call(_label, _part, _original, a, k)

            setattr(layer, part, wrapped)
    loss_label = f"{len(net.layers):2d} loss"
    for part, name in (("forward", "_loss_forward"), ("backward", "_loss_backward")):
        original = getattr(net, name)
        originals.append((net, name))

        def wrapped(*a, _original=original, _part=part, **k):
            return on_call(loss_label, _part, _original, a, k)

        setattr(net, name, wrapped)
    return originals


def uninstrument(originals):
    for owner, name in originals:
        delattr(owner, name)


def subnormals_per_layer(net, images, labels, batch, steps=4):
    """Subnormal values seen per batch in each layer's outputs and gradients."""
    counts = {}

    def count(label, part, fn, args, kwargs):
        result = fn(*args, **kwargs)
        values = result if isinstance(result, tuple) else (result,)
        seen = sum(subnormal_count(v) for v in values if isinstance(v, np.ndarray))
        if part == "backward" and args:  # the upstream gradient too
            seen += subnormal_count(args[0])
        counts[(label, part)] = counts.get((label, part), 0) + seen
        return result

    originals = instrument(net, count)
    try:
        for s in range(steps):
            net.loss_and_gradients(
                images[s * batch : (s + 1) * batch], labels[s * batch : (s + 1) * batch]
            )
    finally:
        uninstrument(originals)
    return {key: value / steps for key, value in counts.items() if value}


def breakdown(net_name, batch, threads, bundle):
    """ms per step in each layer of one real epoch (this process's part of each batch)."""
    recipe = recipe_for(net_name, batch, 1, threads)
    net = build(net_name, recipe.seed, dtype=F32, threads=threads)
    optimizer = optim.build(recipe.optimizer, net.params, **recipe.optimizer_hyper())
    optimizer.start_epoch(1)
    train_split, _, _ = prepare_splits(net, bundle)
    rows = {}

    def timed(label, part, fn, args, kwargs):
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            row = rows.setdefault(label, {"forward": 0.0, "backward": 0.0})
            row[part] += time.perf_counter() - began

    n = len(train_split.labels)
    order = epoch_permutation(recipe.seed, 1, n)
    images, labels = train_split.images, train_split.labels
    originals = instrument(net, timed)
    update = 0.0
    steps = 0
    grads = None
    batch_images = np.empty((min(batch, n), *images.shape[1:]), images.dtype)
    began = time.perf_counter()
    try:
        for start in range(0, n, batch):
            index = order[start : start + batch]
            # As cnnderive train's loop: the batch and the gradients in kept arrays.
            x = np.take(images, index, axis=0, out=batch_images[: len(index)], mode="clip")
            _, _, grads = net.loss_and_gradients(x, labels[index], out=grads)
            update_began = time.perf_counter()
            optimizer.step(net.params, grads)
            update += time.perf_counter() - update_began
            steps += 1
    finally:
        total = time.perf_counter() - began
        uninstrument(originals)
        net.close()
    table = {label: {k: 1e3 * v / steps for k, v in row.items()} for label, row in rows.items()}
    table["   SGD update"] = {"forward": 0.0, "backward": 1e3 * update / steps}
    return table, 1e3 * total / steps


def saturated(net_name, params):
    """Parameters that drive the network into the range where its formulas make subnormals."""
    params = {k: v.copy() for k, v in params.items()}
    if net_name == "seed":
        params["conv1_w"] *= 8  # sigmoid's inputs far into both tails
    else:
        params["fc3_w"] *= 60  # logits hundreds apart: softmax probabilities below tiny
    return params


def subnormal_step_times(net_name, batch, images, labels, repeats=15):
    """Median ms of one step (threads=1): normal and saturated parameters, flushes on and off."""
    import generated._kernels as kernels

    flush = kernels.flush_subnormals
    net = build(net_name, 0, dtype=F32, threads=1)
    normal = {k: v.copy() for k, v in net.params.items()}
    variants = {"normal": normal, "saturated": saturated(net_name, normal)}
    x, y = images[:batch], labels[:batch]
    results = {}
    try:
        for flushing in (True, False):
            kernels.flush_subnormals = (
                flush if flushing else (lambda a, out=None: a if out is None else out)
            )
            for name, params in variants.items():
                net.load_params(params)
                times, found = [], 0
                for r in range(repeats + 3):
                    began = time.perf_counter()
                    _, _, grads = net.loss_and_gradients(x, y)
                    if r >= 3:
                        times.append(time.perf_counter() - began)
                found = subnormals_per_layer(net, x, y, batch, steps=1)
                results[(name, flushing)] = (1e3 * statistics.median(times), sum(found.values()))
    finally:
        kernels.flush_subnormals = flush
        net.close()
    return results


# ---------------------------------------------------------------------------- driver


def spread(values):
    return f"{min(values):,.0f}-{max(values):,.0f}" if len(values) > 1 else f"{values[0]:,.0f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", nargs="+", default=["seed", "lenet"], choices=["seed", "lenet"])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each implementation")
    parser.add_argument("--threads", type=int, default=2, help="cores for each side (default 2)")
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist"])
    parser.add_argument("--no-torch", action="store_true", help="time only the generated loop")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument(
        "--no-analysis", action="store_true", help="skip subnormals, breakdown and saturated steps"
    )
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    impls = ["generated"]
    try:
        import torch  # noqa: F401  (a reference only; never a dependency)

        if not args.no_torch:
            impls.append("eager")
            if not args.no_compile:
                impls.append("compile")
    except ImportError:
        pass
    bundle = load(args.dataset)
    print(f"CPU: {cpu_model()}")
    print(describe_environment())
    print(f"data: {bundle.source}; {len(bundle.train.labels):,} training images, shift 0")
    print(
        f"{args.epochs} epoch(s) per run, {args.rounds} round(s), {args.threads} threads each; "
        "runs alternate between implementations"
    )
    results, loads, torch_text = {}, [], None
    for round_index in range(args.rounds):
        # The order turns round by round (generated first, then last): a machine that
        # speeds up or slows down over the minutes of a benchmark would otherwise favour
        # whichever implementation always runs first.
        order = impls if round_index % 2 == 0 else impls[::-1]
        for net_name in args.net:
            for batch in args.batch:
                for impl in order:
                    load_meter = OtherLoad()
                    record = run_worker(impl, net_name, batch, args)
                    loads.append(load_meter.share())
                    if record is None:
                        print(f"  {NAMES[impl]} failed for {net_name} batch {batch} (see above)")
                        continue
                    torch_text = record.get("torch", torch_text)
                    results.setdefault((net_name, batch, impl), []).append(record)
                    rates = ", ".join(f"{r:,.0f}" for r in record["images_per_second"])
                    extra = (
                        f", compiled in {record['compile_seconds']:.1f} s"
                        if record.get("compile_seconds")
                        else ""
                    )
                    print(
                        f"  round {round_index + 1}: {net_name} batch {batch} {NAMES[impl]}: "
                        f"{rates} images/s per epoch, validation "
                        f"{100 * record['val_accuracy']:.1f}%{extra}",
                        flush=True,
                    )
    if torch_text:
        print(torch_text)

    print()
    header = f"{'network':<8} {'batch':>5} {'implementation':<15} {'images/s':>9} {'range':>15} {'ratio':>25}"
    print(header)
    print("-" * len(header))
    for net_name in args.net:
        for batch in args.batch:
            medians = {}
            for impl in impls:
                records = results.get((net_name, batch, impl))
                if not records:
                    continue
                all_rates = [r for record in records for r in record["images_per_second"]]
                per_round = [statistics.median(record["images_per_second"]) for record in records]
                medians[impl] = (statistics.median(all_rates), per_round)
            if "generated" not in medians:
                continue
            generated, generated_rounds = medians["generated"]
            for impl, (median, per_round) in medians.items():
                ratio = ""
                if impl != "generated":
                    ratios = [g / r for g, r in zip(generated_rounds, per_round)]
                    ratio = (
                        f"{generated / median:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}, "
                        f"median {statistics.median(ratios):.2f})"
                    )
                print(
                    f"{net_name:<8} {batch:>5} {NAMES[impl]:<15} {median:>9,.0f} "
                    f"{spread(per_round):>15} {ratio:>25}"
                )
                if impl == "compile":
                    records = results[(net_name, batch, impl)]
                    compile_seconds = [r["compile_seconds"] for r in records]
                    epoch_seconds = len(bundle.train.labels) / median
                    amortised = len(bundle.train.labels) / (epoch_seconds + min(compile_seconds))
                    print(
                        f"{'':<14} compile {spread(compile_seconds)} s; with it added to one "
                        f"epoch: {amortised:,.0f} images/s, ratio {generated / amortised:.2f}x"
                    )
    print(
        "images/s: median over every epoch of every round; range: of the per-round medians; "
        "ratio: generated / that implementation (above 1: generated is faster), with the "
        "range and the median of the per-round ratios (each round's two runs ran next to "
        "each other, so these see the same state of the machine)"
    )
    print(
        "CPU time other processes used during the runs (share of the machine): "
        + ", ".join(percent(share) for share in loads)
    )
    if args.no_analysis:
        return

    train_split = bundle.train
    with one_blas_thread():
        for net_name in args.net:
            net = build(net_name, 0, dtype=F32, threads=1)
            images = net.prepare(train_split).images
            labels = net.prepare(train_split).labels
            net.close()
            for batch in args.batch:
                # Subnormals in a trained network (one epoch of the real loop).
                recipe = recipe_for(net_name, batch, 1, 1)
                with tempfile.TemporaryDirectory() as run_dir:
                    trained, _ = train(recipe, bundle, run_dir, progress=False, log=lambda _: None)
                found = subnormals_per_layer(trained, images, labels, batch)
                trained.close()
                text = (
                    ", ".join(
                        f"{label.strip()} {part} {count:,.0f}"
                        for (label, part), count in found.items()
                    )
                    or "none"
                )
                print(
                    f"\nsubnormal values per batch, {net_name} batch {batch}, after one epoch: {text}"
                )
                times = subnormal_step_times(net_name, batch, images, labels)
                for flushing in (True, False):
                    normal, _ = times[("normal", flushing)]
                    slow, count = times[("saturated", flushing)]
                    print(
                        f"  one step, one thread, flushes {'on ' if flushing else 'off'}: normal "
                        f"batch {normal:.2f} ms, saturated batch {slow:.2f} ms "
                        f"({count:,} subnormal values), ratio {slow / normal:.2f}"
                    )
    for net_name in args.net:
        for batch in args.batch:
            table, total = breakdown(net_name, batch, args.threads, bundle)
            print(
                f"\nwhere the generated step's time goes: {net_name}, batch {batch}, one real "
                f"epoch, {args.threads} threads ({total:.2f} ms/step instrumented; with two "
                "threads this process's part of each batch)"
            )
            print_breakdown(table, total)


if __name__ == "__main__":
    main()
