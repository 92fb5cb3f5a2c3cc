"""``cnnderive train`` and ``cnnderive evaluate``.

Examples::

    cnnderive train --net seed                       # the default recipe, runs/seed-mnist-seed0
    cnnderive train --net lenet --epochs 5 --optimizer adam --lr 1e-3 --out runs/quick
    cnnderive train --net seed --epochs 20 --resume  # continue runs/seed-mnist-seed0
    cnnderive train --net seed --dataset fashion-mnist --epochs 3 --lr 0.1 --shift 0
    cnnderive evaluate runs/seed-mnist-seed0 --json
    cnnderive evaluate runs/seed-mnist-seed0 --confusion  # per-class accuracy, confusion.png
    cnnderive predict runs/seed-mnist-seed0 digit.png     # the class of a drawn digit

Options left out take the network's default recipe (:data:`train.loop.RECIPES`); with
``--resume`` they take the checkpoint's recipe instead, and only ``--epochs`` (the total
to reach), ``--lr``, ``--batch-size`` and ``--threads`` may change (an exact
continuation needs them unchanged). Bad input and data problems print one line and exit with code 2; a loss
that becomes NaN or infinite stops the run with exit code 1, keeping the last good
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from cnnderive_common.commandline import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    Terminated,
    UsageError,
    silence_stdout,
)
from cnnderive_common.files import folder_problem

from .data import DATASETS, DataError, load_dataset
from .networks import NETWORKS

__all__ = ["add_parsers"]

CONFUSION_NAME = "confusion.png"


def note(line: str) -> None:
    """A message about how a command runs (data found, a setting that will be slow):
    on stderr, apart from the results."""
    print(line, file=sys.stderr)


def add_parsers(commands) -> None:
    """Add the ``train`` and ``evaluate`` subcommands to ``commands`` (argparse subparsers)."""
    from .loop import ALTERNATIVE_OPTIMIZERS, RECIPES

    defaults = "; ".join(f"{r.net}: {r.describe()}" for r in RECIPES.values())
    per_net = "the network's recipe, below"
    p = commands.add_parser(
        "train",
        help="train a network on MNIST or Fashion-MNIST",
        description="Train a network assembled from the generated layers. Writes RUN_DIR/"
        "metrics.json, checkpoint.npz (every epoch), curves.png and filters.png. "
        f"Default recipes: {defaults}.",
    )
    p.add_argument("--net", required=True, choices=sorted(NETWORKS), help="network to train")
    p.add_argument(
        "--epochs",
        type=int,
        help=f"number of epochs (with --resume: the total; default: {per_net})",
    )
    p.add_argument("--batch-size", type=int, help=f"images per minibatch (default: {per_net})")
    p.add_argument("--dataset", choices=DATASETS, help="data set (default mnist)")
    p.add_argument("--data-dir", help="folder holding the data set's IDX files")
    p.add_argument("--no-download", action="store_true", help="never try to download data")
    p.add_argument("--seed", type=int, help="seed of initialisation and shuffling (default 0)")
    p.add_argument(
        "--out", metavar="RUN_DIR", help="run folder (default runs/<net>-<dataset>-seed<S>)"
    )
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.npz")
    p.add_argument("--optimizer", choices=("sgd", "adam"), help=f"optimiser (default: {per_net})")
    p.add_argument(
        "--lr",
        type=float,
        help=f"learning rate of the first epoch (default: {per_net}; with --optimizer adam: "
        + ", ".join(f"{net} {alt['adam']['lr']:g}" for net, alt in ALTERNATIVE_OPTIMIZERS.items())
        + ")",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        help="decoupled weight decay of the kernels and weights (default 0)",
    )
    p.add_argument(
        "--shift",
        type=int,
        help=f"augment: move each image by up to this many pixels (0: off; default: {per_net})",
    )
    p.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="use only N training images: the first of each class, then the second of "
        "each, and so on (the same images for every seed; default: all)",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="K",
        help="cut each batch into K parts computed at the same time by K processes "
        "(default: 2 for seed and lenet, 1 for toy); K changes the result only by rounding",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: only on a terminal)",
    )
    p.set_defaults(run=run_train)

    e = commands.add_parser(
        "evaluate",
        help="accuracy of a trained run on the test split",
        description="Accuracy of RUN_DIR/checkpoint.npz on the test split of its data set, "
        "or on the validation split when there is no test set.",
    )
    e.add_argument("run_dir", metavar="RUN_DIR", help="folder of a cnnderive train run")
    e.add_argument("--data-dir", help="folder holding the data set's IDX files")
    e.add_argument("--no-download", action="store_true", help="never try to download data")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument(
        "--confusion",
        action="store_true",
        help=f"also give each class's accuracy and the confusion matrix (printed, and drawn "
        f"in RUN_DIR/{CONFUSION_NAME})",
    )
    e.set_defaults(run=run_evaluate)

    pr = commands.add_parser(
        "predict",
        help="classify images with a trained run",
        description="Print each image's most probable class and the probability of every "
        "class, by the network of RUN_DIR/checkpoint.npz. IMAGE is a PNG file (a digit drawn "
        "at any size, dark on light or light on dark: brought to MNIST's 28x28 form) or an "
        "IDX image file (every image in it).",
    )
    pr.add_argument("run_dir", metavar="RUN_DIR", help="folder of a cnnderive train run")
    pr.add_argument("images", metavar="IMAGE", nargs="+", help="PNG or IDX image file")
    pr.add_argument("--json", action="store_true", help="print the results as JSON")
    pr.set_defaults(run=run_predict)


# ------------------------------------------------------------------------------ helpers


def _positive(name: str, value, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{name} must be at least {minimum}, got {value}")


def _load(dataset: str, data_dir, no_download: bool, log):
    try:
        return load_dataset(dataset, data_dir, allow_download=not no_download, log=log)
    except DataError as error:
        raise UsageError(str(error)) from None


def _load_checkpoint(path: Path):
    from . import checkpoint as ckpt

    try:
        return ckpt.load(path)
    except ckpt.CheckpointError as error:
        raise UsageError(str(error)) from None


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _given(recipe, args, options):
    """``recipe`` with those of ``options`` (recipe fields, named as the CLI's) that were given."""
    given = {name: getattr(args, name) for name in options}
    return replace(recipe, **{name: value for name, value in given.items() if value is not None})


def _recipe(args):
    """The run's recipe and its checkpoint (when resuming), from the options and defaults."""
    from .checkpoint import CHECKPOINT_NAME
    from .loop import ALTERNATIVE_OPTIMIZERS, RECIPES, Recipe

    _positive("--epochs", args.epochs)
    _positive("--batch-size", args.batch_size)
    _positive("--limit", args.limit)
    _positive("--seed", args.seed, 0)
    _positive("--shift", args.shift, 0)
    side = NETWORKS[args.net].input_shape[0]
    if args.shift is not None and args.shift >= side:
        raise UsageError(
            f"--shift must be less than the {args.net} network's image side ({side} pixels), "
            f"got {args.shift}: a shift that large moves every image out of its frame"
        )
    _positive("--threads", args.threads)
    cores = _usable_cores()
    if args.threads is not None and args.threads > cores:
        note(
            f"note: --threads {args.threads} is more than the {cores} core"
            f"{'s' if cores != 1 else ''} this process may use: the parts of each batch "
            f"will take turns on them, and a step will be slower than with --threads {cores}"
        )
    if args.weight_decay is not None and not (0 <= args.weight_decay < math.inf):
        raise UsageError(f"--weight-decay must be a number of at least 0, got {args.weight_decay}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    seed = 0 if args.seed is None else args.seed
    dataset = args.dataset or "mnist"
    out = Path(args.out) if args.out else Path("runs") / f"{args.net}-{dataset}-seed{seed}"
    checkpoint_path = out / CHECKPOINT_NAME

    if not args.resume:
        if checkpoint_path.exists():
            raise UsageError(
                f"{out} already holds a run; pass --resume to continue it, or choose another --out"
            )
        recipe = replace(RECIPES[args.net], seed=seed, dataset=dataset, limit=args.limit)
        if args.optimizer is not None and args.optimizer != recipe.optimizer:
            alternative = ALTERNATIVE_OPTIMIZERS[args.net][args.optimizer]
            recipe = replace(recipe, optimizer=args.optimizer, **alternative)
        options = ("epochs", "batch_size", "lr", "weight_decay", "shift", "threads")
        return _given(recipe, args, options), out, None

    if not checkpoint_path.exists():
        raise UsageError(f"--resume: there is no checkpoint to resume in {out} ({checkpoint_path})")
    checkpoint = _load_checkpoint(checkpoint_path)
    stored = Recipe.from_dict(checkpoint.meta["recipe"])
    fixed = {
        "--net": (args.net, stored.net),
        "--dataset": (args.dataset, stored.dataset),
        "--seed": (args.seed, stored.seed),
        "--optimizer": (args.optimizer, stored.optimizer),
        "--limit": (args.limit, stored.limit),
        "--weight-decay": (args.weight_decay, stored.weight_decay),
        "--shift": (args.shift, stored.shift),
    }
    for option, (given, kept) in fixed.items():
        if given is not None and given != kept:
            # --net is required, so it cannot be left out: name the right one.
            advice = f"pass {option} {kept}" if option == "--net" else "leave it out"
            raise UsageError(
                f"--resume: {option} {given} differs from the checkpoint's "
                f"{'none' if kept is None else kept}; {advice} or start a new run with "
                "another --out"
            )
    return _given(stored, args, ("epochs", "batch_size", "lr", "threads")), out, checkpoint


def _changed_on_resume(recipe, checkpoint) -> None:
    """Say so when --lr or --batch-size replaces the checkpoint's value."""
    from .loop import Recipe

    stored = Recipe.from_dict(checkpoint.meta["recipe"])
    for option, name in (("--lr", "lr"), ("--batch-size", "batch_size")):
        if getattr(recipe, name) != getattr(stored, name):
            print(
                f"note: {option} {getattr(recipe, name):g} replaces the checkpoint's "
                f"{getattr(stored, name):g} from epoch {checkpoint.epoch + 1} on (metrics.json "
                "records each epoch's); the run will differ from an uninterrupted one",
                file=sys.stderr,
            )


# ---------------------------------------------------------------------------- commands


def run_train(args) -> int:
    recipe, out, checkpoint = _recipe(args)
    try:
        return _train(args, recipe, out, checkpoint)
    except BrokenPipeError:
        # The reader of the output went away (`... | head -1`): not a problem of the run
        # folder. The run stops as if interrupted, and says where it stands on stderr.
        silence_stdout()
        print(f"cnnderive train: the output was closed. {_saved_epoch_text(out)}", file=sys.stderr)
        return EXIT_BROKEN_PIPE


def _train(args, recipe, out: Path, checkpoint) -> int:
    from .checkpoint import CHECKPOINT_NAME
    from .loop import TrainingDiverged, train
    from .parallel import WorkerFailed

    if checkpoint is not None and checkpoint.epoch >= recipe.epochs:
        print(
            f"{out} is already at epoch {checkpoint.epoch} of {recipe.epochs}; nothing to do "
            "(pass a larger --epochs to train on)"
        )
        return 0
    if checkpoint is not None:
        _changed_on_resume(recipe, checkpoint)
    problem = folder_problem(out)
    if problem is not None:  # before loading data and training
        raise UsageError(f"cannot write the run to {out}: {problem}; choose another --out")
    bundle = _load(recipe.dataset, args.data_dir, args.no_download, note)
    print(f"Data: {bundle.source}")
    if checkpoint is not None and checkpoint.meta.get("data") != bundle.name:
        print(
            f"warning: the checkpoint was trained on {checkpoint.meta.get('data')} "
            f"({checkpoint.meta.get('source')}), now continuing on {bundle.name}",
            file=sys.stderr,
        )
    elif checkpoint is not None and checkpoint.meta.get("data_fingerprint") not in (
        None,
        bundle.fingerprint,
    ):
        note(
            f"warning: the checkpoint was trained on other {bundle.name} files "
            f"({checkpoint.meta.get('source')}) than these; the run continues on these"
        )
    what = "Resuming" if checkpoint is not None else "Training"
    start = checkpoint.epoch if checkpoint is not None else 0
    print(
        f"{what} {recipe.net} ({recipe.describe()}, seed {recipe.seed}) "
        f"from epoch {start + 1} to {recipe.epochs} in {out}"
    )
    began = time.perf_counter()
    try:
        net, history = train(
            recipe, bundle, out, resume_from=checkpoint, progress=args.progress, note=note
        )
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        print(
            f"\n{'terminated' if terminated else 'interrupted'}. {_saved_epoch_text(out)}",
            file=sys.stderr,
        )
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except BrokenPipeError:
        raise  # see run_train; not an OSError of the run folder
    except TrainingDiverged as error:
        print(f"cnnderive train: {error}", file=sys.stderr)
        return 1
    except WorkerFailed as error:
        print(
            f"cnnderive train: {error}\nThe checkpoint of the last completed epoch is kept; "
            "--resume continues from it (--threads 1 keeps everything in one process).",
            file=sys.stderr,
        )
        return 1
    except ValueError as error:  # e.g. --limit leaves no image of the toy task's digits
        raise UsageError(str(error)) from None
    except OSError as error:  # a full disk, say, while saving
        kept = (
            " The checkpoint of the last completed epoch is kept; --resume continues from it."
            if (out / CHECKPOINT_NAME).exists()
            else ""
        )
        print(
            f"cnnderive train: could not write {error.filename or out}: "
            f"{error.strerror or error}.{kept}",
            file=sys.stderr,
        )
        return 1
    last = history[-1]
    print(
        f"Done in {time.perf_counter() - began:.1f} s: validation accuracy "
        f"{100 * last['val_accuracy']:.2f}%"
        + (
            f", test accuracy {100 * last['test_accuracy']:.2f}%"
            if last.get("test_accuracy") is not None
            else ""
        )
        + f". Wrote {out}/metrics.json, checkpoint.npz, curves.png, filters.png."
    )
    sys.stdout.flush()  # a closed pipe shows here, inside run_train's handler
    return 0


def _saved_epoch_text(out: Path) -> str:
    """What an interrupted run kept, and how to go on."""
    from . import checkpoint as ckpt

    try:
        epoch = ckpt.load(out / ckpt.CHECKPOINT_NAME).epoch
    except (OSError, ckpt.CheckpointError):
        return "No checkpoint was saved."
    kept = "the initial weights (no epoch finished)" if epoch == 0 else f"epoch {epoch}"
    return (
        f"{out}/{ckpt.CHECKPOINT_NAME} holds {kept}; run the same command with --resume to "
        "continue from there."
    )


def _load_run(run_dir: str):
    from .run import RunError, load_run

    try:
        return load_run(run_dir)
    except RunError as error:
        raise UsageError(str(error)) from None


def run_evaluate(args) -> int:
    from .loop import evaluate, prepare_splits

    run_dir = Path(args.run_dir)
    run = _load_run(args.run_dir)
    meta, net = run.meta, run.network
    log = note if args.json else print
    bundle = _load(run.dataset, args.data_dir, args.no_download, note)
    _, validation, test = prepare_splits(net, bundle)
    split_name, split = ("test", test) if test is not None else ("validation", validation)
    recorded = meta.get("data_fingerprint")
    if meta.get("data") != bundle.name:
        if split_name == "validation":
            # Another data set's validation images may be among the run's training images
            # (the shipped subset's all come from full MNIST's training set).
            note(
                f"warning: {run_dir} was trained on {meta.get('data')}, and this is the "
                f"validation split of {bundle.name}, which may hold images it trained on; pass "
                "--data-dir with the data it was trained on for a fair score"
            )
    elif recorded is not None and recorded != bundle.fingerprint:
        # Same name, other content: MNIST digits in a folder given for a Fashion-MNIST
        # run look like Fashion-MNIST files in every respect but this one.
        note(
            f"warning: {run_dir} was trained on {meta.get('data')} from other files than "
            f"these ({bundle.source.rstrip('.')}): their training images differ, so they may "
            f"not be {run.dataset} at all; pass --data-dir with the data it was trained on"
        )
    accuracy, correct, count = evaluate(net, split)
    result = {
        "run_dir": str(run_dir),
        "net": meta["net"],
        "epoch": run.epoch,
        "dataset": bundle.name,
        "source": bundle.source,
        "trained_on": meta.get("data"),
        "split": split_name,
        "accuracy": accuracy,
        "correct": correct,
        "count": count,
    }
    if args.confusion:
        result |= _confusion(run, split, run_dir / CONFUSION_NAME, split_name, bundle.name)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    log(f"Data: {bundle.source}")
    untrained = " (untrained: the run stopped before its first epoch ended)"
    print(
        f"{meta['net']} after epoch {run.epoch}: {split_name} accuracy "
        f"{100 * accuracy:.2f}% ({correct:,} of {count:,} images)"
        + (untrained if run.epoch == 0 else "")
    )
    if args.confusion:
        print(_confusion_text(run, result))
        print(f"Wrote {run_dir / CONFUSION_NAME}.")
    return 0


def _confusion(run, split, path: Path, split_name: str, data_name: str) -> dict:
    """Per-class accuracy and the confusion matrix of ``run`` on ``split``; draws ``path``."""
    import numpy as np

    from .plots import plot_confusion

    classes = len(run.labels)
    predicted = run.network.predict(split.images)
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (split.labels, predicted), 1)
    totals = matrix.sum(axis=1)
    per_class = [
        (int(matrix[i, i]) / int(totals[i])) if totals[i] else None for i in range(classes)
    ]
    problem = folder_problem(path.parent)
    if problem is not None:
        raise UsageError(f"cannot write {path}: {problem}")
    plot_confusion(
        matrix,
        run.names,
        path,
        f"{run.net} after epoch {run.epoch}, {split_name} split of {data_name}",
    )
    return {
        "classes": list(run.names),
        "class_accuracy": per_class,
        "confusion": matrix.tolist(),
        "confusion_rows": "true class",
        "confusion_columns": "predicted class",
    }


def _confusion_text(run, result: dict) -> str:
    names = result["classes"]
    matrix = result["confusion"]
    width = max(6, *(len(name) for name in names), len(str(max(max(row) for row in matrix))))
    lines = ["", "Per class (rows: true class, columns: predicted class):"]
    lines.append(f"{'':>{width}} " + " ".join(f"{n:>{width}}" for n in names) + "  accuracy")
    for name, row, accuracy in zip(names, matrix, result["class_accuracy"]):
        shown = "-" if accuracy is None else f"{100 * accuracy:.1f}%"
        lines.append(f"{name:>{width}} " + " ".join(f"{v:>{width}}" for v in row) + f"  {shown:>8}")
    return "\n".join(lines)


def run_predict(args) -> int:
    from .run import RunError, read_images

    run = _load_run(args.run_dir)
    results = []
    for path in args.images:
        try:
            images = read_images(path)
        except RunError as error:
            raise UsageError(str(error)) from None
        probabilities = run.probabilities(images)
        for index, row in enumerate(probabilities):
            best = int(row.argmax())
            results.append(
                {
                    "image": path if len(images) == 1 else f"{path}[{index}]",
                    "class": run.names[best],
                    "label": int(run.labels[best]),
                    "probability": float(row[best]),
                    "probabilities": {name: float(p) for name, p in zip(run.names, row)},
                }
            )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for item in results:
        others = ", ".join(f"{name} {p:.3f}" for name, p in item["probabilities"].items())
        print(f"{item['image']}: {item['class']} ({100 * item['probability']:.1f}%); {others}")
    return 0
