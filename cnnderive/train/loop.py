"""The training loop: shuffled minibatches, per-epoch evaluation, checkpoints, metrics, plots.

What a run writes in its folder, RUN_DIR:

``checkpoint.npz``
    Written (atomically) when a new run starts, as epoch 0, and after every epoch:
    parameters, optimiser state, epoch, seed, network name, data set and its source,
    the recipe and the metrics so far. See :mod:`train.checkpoint`.
``metrics.json``
    The run's recipe and, per epoch: mean training loss, running training accuracy
    (over the epoch's minibatches, as the weights changed), validation accuracy, test
    accuracy (``null`` without a test split), training seconds and images per second,
    and the seconds spent evaluating.
``curves.png``, ``filters.png``
    Loss and accuracy per epoch; the first convolution's filters (:mod:`train.plots`).

Exact resumption: epoch ``e`` visits the training images in the order
``np.random.default_rng([seed, e]).permutation(n)`` and (when the recipe asks for
augmentation) moves them by translations drawn from ``default_rng([seed, e, 1])``:
both depend on nothing but the seed and the epoch. The network has no other
randomness and the optimiser state is saved whole. So a run resumed from the
checkpoint of epoch ``k`` ends with bit for bit the weights of a run that never stopped.

A loss that is NaN or infinite (or parameters that stop being finite) ends the run
with :class:`TrainingDiverged`, naming the epoch and step; the checkpoint of the last
completed epoch is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cnnderive_common.files import replace_atomically

from . import checkpoint as ckpt
from . import optim
from .data import DataBundle, Split, first_of_each_class
from .networks import Network, build
from .parallel import one_blas_thread

__all__ = [
    "ALTERNATIVE_OPTIMIZERS",
    "RECIPES",
    "Recipe",
    "TrainingDiverged",
    "epoch_permutation",
    "evaluate",
    "prepare_splits",
    "train",
]

METRICS_NAME = "metrics.json"
CURVES_NAME = "curves.png"
FILTERS_NAME = "filters.png"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a run's result, apart from the data."""

    net: str
    optimizer: str
    lr: float
    lr_decay: float
    batch_size: int
    epochs: int
    seed: int = 0
    dataset: str = "mnist"
    limit: int | None = None  # use only ``limit`` training images (data.first_of_each_class)
    weight_decay: float = 0.0  # decoupled, see train.optim
    shift: int = 0  # augmentation: random translations of up to this many pixels
    momentum: float = 0.95  # SGD only: the momentum reached after its warm-up from 0.5
    threads: int = 1  # parts of each batch computed at once (train.parallel); rounding only

    def describe(self) -> str:
        text = f"{self.optimizer} lr {self.lr:g}"
        if self.optimizer == "sgd":
            text += f" momentum 0.5->{self.momentum:g}"
        if self.lr_decay != 1:
            text += f" x{self.lr_decay:g} per epoch"
        if self.weight_decay:
            text += f", weight decay {self.weight_decay:g}"
        if self.shift:
            text += f", shifts of up to {self.shift} px"
        text += f", batch {self.batch_size}, {self.epochs} epoch{'s' if self.epochs != 1 else ''}"
        if self.threads > 1:
            text += f", {self.threads} threads"
        return text

    def optimizer_hyper(self) -> dict[str, float]:
        hyper = {"lr": self.lr, "lr_decay": self.lr_decay, "weight_decay": self.weight_decay}
        if self.optimizer == "sgd":
            hyper["momentum"] = self.momentum
        return hyper

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# The default recipe of each network: the best found on the shipped 4,500 / 500 MNIST
# subset within a few minutes of CPU time. Validation accuracy over three seeds at the
# last epoch: seed 97.0-97.8% (Adam instead: about 92-93% after 8 epochs), lenet
# 98.0-98.8%, toy 100% (on Fashion-MNIST, seeds 0-7: 92-95.5%). SGD's momentum rises
# from 0.5 to ``momentum`` over the first 500 steps. seed and lenet split each batch
# over two cores (two parts of 16 images); the toy network's steps are too small to
# gain from it.
RECIPES: dict[str, Recipe] = {
    "seed": Recipe(
        "seed", "sgd", lr=0.5, lr_decay=0.85, batch_size=32, epochs=12, shift=1, threads=2
    ),
    # lr 0.2 for the toy: at 0.5 its single ReLU channel died (all outputs 0, loss stuck
    # at log 2) on Fashion-MNIST for 2 of 8 seeds; at 0.2 none did, on either data set.
    "toy": Recipe("toy", "sgd", lr=0.2, lr_decay=0.8, batch_size=32, epochs=10),
    "lenet": Recipe(
        "lenet",
        "sgd",
        lr=0.05,
        lr_decay=0.85,
        batch_size=32,
        epochs=15,
        shift=2,
        momentum=0.9,
        threads=2,
    ),
}

# What ``--optimizer`` changes in a recipe when it names the other optimiser.
ALTERNATIVE_OPTIMIZERS: dict[str, dict[str, dict[str, float]]] = {
    "seed": {"adam": {"lr": 2e-3, "lr_decay": 0.8}},
    "toy": {"adam": {"lr": 2e-2, "lr_decay": 0.8}},
    "lenet": {"adam": {"lr": 1e-3, "lr_decay": 0.85}},
}


class TrainingDiverged(RuntimeError):
    """The loss (or a parameter) stopped being finite."""

    def __init__(self, epoch: int, step: int, steps: int, what: str, kept: Path | None, kept_epoch):
        self.epoch, self.step, self.steps = epoch, step, steps
        self.kept, self.kept_epoch = kept, kept_epoch
        where = f"epoch {epoch}, step {step} of {steps}"
        if kept is not None:
            tail = f"the last good checkpoint (epoch {kept_epoch}) is kept in {kept}"
        else:
            tail = "no checkpoint was written"
        super().__init__(
            f"training stopped: {what} at {where}; {tail}. Try a smaller learning rate (--lr)."
        )


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits ``n`` training images."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_shifts(seed: int, epoch: int, n: int, shift: int) -> np.ndarray:
    """(n, 2) random (down, right) translations in [-shift, shift] for epoch ``epoch``."""
    return np.random.default_rng([seed, epoch, 1]).integers(-shift, shift + 1, size=(n, 2))


def shift_images(
    images: np.ndarray, offsets: np.ndarray, shift: int, *, padded: np.ndarray | None = None
) -> np.ndarray:
    """Each image moved by its (down, right) offset, zeros coming in at the edges.

    Image i is the height x width window of the zero-padded image that starts ``shift -
    offset`` pixels in; the windows are picked as whole blocks (measured: 0.19 -> 0.06 ms
    for 32 MNIST images, against indexing every pixel).

    ``padded``: None, or the array of the padded images (N, H + 2*shift, W + 2*shift, C)
    that a training loop keeps from batch to batch, zero on the border: only its
    interior is written here, so the border stays zero.
    """
    n, height, width, channels = images.shape
    shape = (n, height + 2 * shift, width + 2 * shift, channels)
    if padded is None:
        padded = np.zeros(shape, images.dtype)
    elif padded.shape != shape or padded.dtype != images.dtype:
        raise ValueError(f"padded has shape {padded.shape}, {padded.dtype}; expected {shape}")
    padded[:, shift : shift + height, shift : shift + width] = images
    windows = sliding_window_view(padded, (height, width), axis=(1, 2))  # (n, y0, x0, C, H, W)
    picked = windows[np.arange(n), shift - offsets[:, 0], shift - offsets[:, 1]]  # (n, C, H, W)
    return np.ascontiguousarray(np.moveaxis(picked, 1, -1))


class _EpochBatches:
    """The batches of one epoch, in order, each gathered into one of two kept arrays.

    A step reads its batch from one array while :meth:`gather_next`, which the loop
    calls in the step's ``meanwhile`` (Network.loss_and_gradients), gathers the
    next batch into the other: with worker processes this runs while they finish their
    parts, where between two steps they would wait for it (see
    Network._passes: gathering 64 images takes 0.02-0.05 ms).
    """

    def __init__(self, images, labels, order, batch, buffers, shift, offsets, padded):
        self.images, self.labels, self.order = images, labels, order
        self.batch_size = batch
        self.buffers, self.shift, self.offsets, self.padded = buffers, shift, offsets, padded
        self.steps = math.ceil(len(order) / batch)
        self._step = 0  # the step whose batch was handed out last
        self._next = None  # (step, images, labels) gathered ahead

    def _gather(self, step: int):
        first = (step - 1) * self.batch_size
        index = self.order[first : first + self.batch_size]
        # mode="clip": the indices are a permutation's, all in range; the default
        # mode="raise" would gather into a new array and copy it.
        out = self.buffers[step % 2][: len(index)]
        x = np.take(self.images, index, axis=0, out=out, mode="clip")
        if self.shift:
            x = shift_images(
                x,
                self.offsets[first : first + self.batch_size],
                self.shift,
                padded=self.padded[: len(index)],
            )
        return x, self.labels[index]

    def of_step(self, step: int):
        """(images, labels) of step ``step`` (counted from 1)."""
        if self._next is not None and self._next[0] == step:
            _, x, y = self._next
        else:
            x, y = self._gather(step)
        self._step, self._next = step, None
        return x, y

    def gather_next(self) -> None:
        """Gather the batch after the one handed out last, if there is one."""
        if self._step < self.steps and self._next is None:
            self._next = (self._step + 1, *self._gather(self._step + 1))


def prepare_splits(
    net: Network, bundle: DataBundle, limit: int | None = None
) -> tuple[Split, Split, Split | None]:
    """(train, validation, test) as ``net``'s task sees them; ``limit`` cuts the training set
    after the task has chosen its images (the toy network's ``--limit 10`` is 10 images of
    its two classes, not the two of them among the first 10 of all ten digits)."""
    train = net.prepare(bundle.train)
    if limit is not None:
        train = first_of_each_class(train, limit)
    test = net.prepare(bundle.test) if bundle.test is not None else None
    return train, net.prepare(bundle.validation), test


def evaluate(net: Network, split: Split, batch_size: int = 500) -> tuple[float, int, int]:
    """(accuracy, correct, count) of ``net`` on ``split``."""
    count = len(split.labels)
    if count == 0:
        return float("nan"), 0, 0
    correct = int(np.sum(net.predict(split.images, batch_size) == split.labels))
    return correct / count, correct, count


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _write_json(path: Path, data) -> None:
    text = json.dumps(data, indent=2) + "\n"
    replace_atomically(path, lambda handle: handle.write(text.encode()))


def _finite(params: dict[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(p).all()) for p in params.values())


def metrics_recipe(recipe: Recipe, optimizer) -> dict:
    """The recipe as metrics.json records it: SGD's momentum as the schedule it follows
    (a single number would read as a constant momentum), none for Adam, which has none."""
    recipe_dict = asdict(recipe)
    if isinstance(optimizer, optim.SGD):
        recipe_dict["momentum"] = {
            "start": optimizer.momentum_start,
            "end": optimizer.momentum,
            "rises_over_steps": int(optimizer.momentum_steps),
        }
    else:
        del recipe_dict["momentum"]
    return recipe_dict


def write_plots(run_dir: Path, net: Network, history: list[dict], title: str) -> None:
    """curves.png (when there is an epoch to show) and filters.png (when the weights are finite)."""
    from . import plots

    if history:
        plots.plot_curves(history, run_dir / CURVES_NAME, title)
    if _finite(net.params):
        plots.plot_filters(
            net.params[net.first_conv],
            run_dir / FILTERS_NAME,
            f"{title}: first convolution's filters",
        )


def train(
    recipe: Recipe,
    bundle: DataBundle,
    run_dir: str | Path,
    *,
    resume_from: ckpt.Checkpoint | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    note: Callable[[str], None] = _to_stderr,
    dtype=np.float32,
) -> tuple[Network, list[dict]]:
    """Train ``recipe.net`` on ``bundle`` for epochs up to ``recipe.epochs``.

    With ``resume_from``, parameters, optimiser state and history come from that
    checkpoint and training continues after its epoch; the recipe's ``lr`` and
    ``batch_size`` apply from there on (keep them unchanged for an exact continuation).
    ``progress`` shows a tqdm bar (None: only on a terminal). ``log`` receives the
    lines of results, ``note`` the remarks on how the run goes. Returns the network and
    the metrics history. Raises :class:`TrainingDiverged` on a NaN / inf loss.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / ckpt.CHECKPOINT_NAME
    net = build(recipe.net, recipe.seed, dtype=dtype, threads=recipe.threads)
    optimizer = optim.build(recipe.optimizer, net.params, **recipe.optimizer_hyper())
    train_split, val_split, test_split = prepare_splits(net, bundle, recipe.limit)
    if len(train_split.labels) == 0:
        raise ValueError(f"no training images left for the {recipe.net} network")
    used, offered = len(train_split.labels), len(bundle.train.labels)
    if recipe.batch_size > used:
        note(
            f"note: the batch size {recipe.batch_size} is larger than the {used:,} training "
            f"images: each epoch is a single step on all {used:,} of them"
        )
    task = net.task(recipe.dataset)
    if used != offered or len(val_split.labels) != len(bundle.validation.labels):
        log(
            f"The {recipe.net} network trains on {used:,} of the {offered:,} training images "
            f"and is scored on {len(val_split.labels):,} of the "
            f"{len(bundle.validation.labels):,} validation images"
            + (
                f" and {len(test_split.labels):,} of the {len(bundle.test.labels):,} test images"
                if test_split is not None
                else ""
            )
            + (f" ({task})." if task else ".")
        )

    if resume_from is not None:
        net.load_params(resume_from.params)
        optimizer.load_state_dict(resume_from.optimizer)
        optimizer.lr = float(recipe.lr)
        history = list(resume_from.meta.get("history", []))
        start = resume_from.epoch
    else:
        history, start = [], 0

    title = f"{recipe.net} on {bundle.name}, seed {recipe.seed}"

    def save(epoch: int) -> None:
        meta = {
            "net": recipe.net,
            "epoch": epoch,
            "seed": recipe.seed,
            "dataset": recipe.dataset,
            "data": bundle.name,
            "source": bundle.source,
            "recipe": asdict(recipe),
            "history": history,
            "data_fingerprint": bundle.fingerprint,
        }
        ckpt.save(
            checkpoint_path,
            ckpt.Checkpoint(params=net.params, optimizer=optimizer.state_dict(), meta=meta),
        )
        _write_json(
            run_dir / METRICS_NAME,
            {k: meta[k] for k in ("net", "dataset", "data", "source", "seed")}
            | {"recipe": metrics_recipe(recipe, optimizer), "epochs": history},
        )

    if resume_from is None:
        save(0)
    last_saved = start

    from tqdm import tqdm

    images, labels = train_split.images, train_split.labels
    n = len(labels)
    batch = recipe.batch_size
    steps = math.ceil(n / batch)
    # The batch's images are gathered into one kept array, and the step's gradients go
    # into the previous step's: new arrays of that size at every step cost more than the
    # copying (the C library returns the freed memory, the next step faults its pages
    # in again; see optim.Optimizer._work).
    # Two such arrays, used in turn (see _EpochBatches).
    batch_images = [np.empty((min(batch, n), *images.shape[1:]), images.dtype) for _ in range(2)]
    if recipe.shift:
        height, width, channels = images.shape[1:]
        padded_images = np.zeros(
            (min(batch, n), height + 2 * recipe.shift, width + 2 * recipe.shift, channels),
            images.dtype,
        )
    grads = None
    bar = None
    try:
        # A diverging run overflows before its loss turns NaN; the checks below report it,
        # so NumPy's overflow warnings would only say the same thing less clearly.
        # --threads 1 is one core: BLAS at one thread too, for the whole run (measured: a
        # second BLAS thread makes a LeNet step 8-20 % faster on an idle machine, but 2-3
        # times slower while another program keeps one core busy). With worker processes
        # this process holds BLAS to one thread in every pass anyway; set once here, the
        # passes need not set it and put it back at every step.
        single = recipe.threads == 1 or net.uses_workers
        one_core = one_blas_thread() if single else contextlib.nullcontext()
        with one_core, np.errstate(over="ignore", invalid="ignore"):
            for epoch in range(start + 1, recipe.epochs + 1):
                optimizer.start_epoch(epoch)
                order = epoch_permutation(recipe.seed, epoch, n)
                if recipe.shift:
                    offsets = epoch_shifts(recipe.seed, epoch, n, recipe.shift)
                loss_sum, correct = 0.0, 0
                bar = tqdm(
                    total=n,
                    desc=f"epoch {epoch}/{recipe.epochs}",
                    unit="img",
                    disable=(None if progress is None else not progress),
                    leave=False,
                    dynamic_ncols=True,
                )
                batches = _EpochBatches(
                    images,
                    labels,
                    order,
                    batch,
                    batch_images,
                    recipe.shift,
                    offsets if recipe.shift else None,
                    padded_images if recipe.shift else None,
                )

                def meanwhile(batches=batches) -> None:
                    # What a step can do while its worker processes finish their parts:
                    # gather the next batch, and run the optimiser's part of the update
                    # that needs no gradient (Network.loss_and_gradients,
                    # Optimizer.prepare_step).
                    batches.gather_next()
                    optimizer.prepare_step(net.params)

                began = time.perf_counter()
                for step in range(1, steps + 1):
                    x, y = batches.of_step(step)
                    loss, outputs, grads = net.loss_and_gradients(
                        x, y, out=grads, meanwhile=meanwhile
                    )
                    if not math.isfinite(loss):
                        raise TrainingDiverged(
                            epoch,
                            step,
                            steps,
                            f"the loss became {loss}",
                            checkpoint_path if checkpoint_path.exists() else None,
                            last_saved,
                        )
                    optimizer.step(net.params, grads)
                    loss_sum += loss * len(y)
                    correct += int(np.sum(net.classes(outputs) == y))
                    seen = min(step * batch, n)
                    bar.update(len(y))
                    if step % 10 == 0 or step == steps:
                        bar.set_postfix(
                            loss=f"{loss_sum / seen:.4f}",
                            acc=f"{100 * correct / seen:.2f}%",
                            refresh=False,
                        )
                seconds = time.perf_counter() - began
                bar.close()
                if not _finite(net.params):
                    raise TrainingDiverged(
                        epoch,
                        steps,
                        steps,
                        "a parameter became NaN or infinite",
                        checkpoint_path if checkpoint_path.exists() else None,
                        last_saved,
                    )
                began = time.perf_counter()
                val_acc = evaluate(net, val_split)[0]
                test_acc = evaluate(net, test_split)[0] if test_split is not None else None
                row = {
                    "epoch": epoch,
                    "loss": loss_sum / n,
                    "train_accuracy": correct / n,
                    "val_accuracy": val_acc,
                    "test_accuracy": test_acc,
                    "lr": optimizer.current_lr,
                    "batch_size": batch,
                    "seconds": seconds,
                    "images_per_second": n / seconds if seconds > 0 else None,
                    "eval_seconds": time.perf_counter() - began,
                }
                history.append(row)
                save(epoch)
                last_saved = epoch
                test_text = f", test {100 * test_acc:.2f}%" if test_acc is not None else ""
                log(
                    f"epoch {epoch}/{recipe.epochs}: loss {row['loss']:.4f}, "
                    f"train {100 * row['train_accuracy']:.2f}%, validation {100 * val_acc:.2f}%"
                    f"{test_text} ({seconds:.1f} s, {row['images_per_second']:.0f} images/s)"
                )
    finally:
        if bar is not None:
            bar.close()
        net.close()
        write_plots(run_dir, net, history, title)
    return net, history
