"""``cnnderive train`` and ``cnnderive evaluate``.

Examples::

    cnnderive train --net seed                       # the default recipe, runs/seed-mnist-seed0
    cnnderive train --net lenet --epochs 5 --optimizer adam --lr 1e-3 --out runs/quick
    cnnderive train --net seed --epochs 20 --resume  # continue runs/seed-mnist-seed0
    cnnderive train --net seed --dataset fashion-mnist --epochs 3 --lr 0.1 --shift 0
    cnnderive evaluate runs/seed-mnist-seed0 --json

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
import sys
import time
from dataclasses import replace
from pathlib import Path

from cnnderive_common.commandline import UsageError
from cnnderive_common.files import folder_problem

from .data import DATASETS, DataError, load_dataset
from .networks import NETWORKS

__all__ = ["add_parsers"]


def add_parsers(commands) -> None:
    """Add the ``train`` and ``evaluate`` subcommands to ``commands`` (argparse subparsers)."""
    from .loop import RECIPES

    defaults = "; ".join(f"{r.net}: {r.describe()}" for r in RECIPES.values())
    p = commands.add_parser(
        "train",
        help="train a network on MNIST or Fashion-MNIST",
        description="Train a network assembled from the generated layers. Writes RUN_DIR/"
        "metrics.json, checkpoint.npz (every epoch), curves.png and filters.png. "
        f"Default recipes: {defaults}.",
    )
    p.add_argument("--net", required=True, choices=sorted(NETWORKS), help="network to train")
    p.add_argument("--epochs", type=int, help="number of epochs (with --resume: the total)")
    p.add_argument("--batch-size", type=int, help="images per minibatch")
    p.add_argument("--dataset", choices=DATASETS, help="data set (default mnist)")
    p.add_argument("--data-dir", help="folder holding the data set's IDX files")
    p.add_argument("--no-download", action="store_true", help="never try to download data")
    p.add_argument("--seed", type=int, help="seed of initialisation and shuffling (default 0)")
    p.add_argument(
        "--out", metavar="RUN_DIR", help="run folder (default runs/<net>-<dataset>-seed<S>)"
    )
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.npz")
    p.add_argument("--optimizer", choices=("sgd", "adam"), help="optimiser")
    p.add_argument("--lr", type=float, help="learning rate of the first epoch")
    p.add_argument(
        "--weight-decay", type=float, help="decoupled weight decay of the kernels and weights"
    )
    p.add_argument(
        "--shift", type=int, help="augment: move each image by up to this many pixels (0: off)"
    )
    p.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="use only N training images: the first of each class, then the second of "
        "each, and so on (the same images for every seed)",
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
    e.set_defaults(run=run_evaluate)


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
    from .checkpoint import CHECKPOINT_NAME
    from .loop import TrainingDiverged, train
    from .parallel import WorkerFailed

    recipe, out, checkpoint = _recipe(args)
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
    bundle = _load(recipe.dataset, args.data_dir, args.no_download, print)
    print(f"Data: {bundle.source}")
    if checkpoint is not None and checkpoint.meta.get("data") != bundle.name:
        print(
            f"warning: the checkpoint was trained on {checkpoint.meta.get('data')} "
            f"({checkpoint.meta.get('source')}), now continuing on {bundle.name}",
            file=sys.stderr,
        )
    what = "Resuming" if checkpoint is not None else "Training"
    start = checkpoint.epoch if checkpoint is not None else 0
    print(
        f"{what} {recipe.net} ({recipe.describe()}, seed {recipe.seed}) "
        f"from epoch {start + 1} to {recipe.epochs} in {out}"
    )
    began = time.perf_counter()
    try:
        net, history = train(recipe, bundle, out, resume_from=checkpoint, progress=args.progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted. {_saved_epoch_text(out)}", file=sys.stderr)
        return 130
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


def run_evaluate(args) -> int:
    from .checkpoint import CHECKPOINT_NAME
    from .loop import evaluate, prepare_splits
    from .networks import build

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        hint = (
            f"; pass the run folder that holds it ({run_dir.parent})"
            if run_dir.name == CHECKPOINT_NAME
            else "; pass the folder of a cnnderive train run (--out)"
        )
        raise UsageError(f"{run_dir} is not a folder{hint}")
    checkpoint = _load_checkpoint(run_dir / CHECKPOINT_NAME)
    meta = checkpoint.meta
    if meta.get("net") not in NETWORKS:
        raise UsageError(f"{run_dir}: the checkpoint's network {meta.get('net')!r} is unknown")
    net = build(meta["net"], int(meta.get("seed", 0)))
    try:
        net.load_params(checkpoint.params)
    except ValueError as error:
        raise UsageError(f"{run_dir}: {error}") from None

    def log(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout)

    bundle = _load(meta.get("dataset", "mnist"), args.data_dir, args.no_download, log)
    _, validation, test = prepare_splits(net, bundle)
    split_name, split = ("test", test) if test is not None else ("validation", validation)
    if split_name == "validation" and meta.get("data") != bundle.name:
        # Another data set's validation images may be among the run's training images
        # (the shipped subset's all come from full MNIST's training set).
        print(
            f"warning: {run_dir} was trained on {meta.get('data')}, and this is the "
            f"validation split of {bundle.name}, which may hold images it trained on; pass "
            "--data-dir with the data it was trained on for a fair score",
            file=sys.stderr,
        )
    accuracy, correct, count = evaluate(net, split)
    result = {
        "run_dir": str(run_dir),
        "net": meta["net"],
        "epoch": checkpoint.epoch,
        "dataset": bundle.name,
        "source": bundle.source,
        "trained_on": meta.get("data"),
        "split": split_name,
        "accuracy": accuracy,
        "correct": correct,
        "count": count,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        log(f"Data: {bundle.source}")
        untrained = " (untrained: the run stopped before its first epoch ended)"
        print(
            f"{meta['net']} after epoch {checkpoint.epoch}: {split_name} accuracy "
            f"{100 * accuracy:.2f}% ({correct:,} of {count:,} images)"
            + (untrained if checkpoint.epoch == 0 else "")
        )
    return 0
