"""RUN_DIR/curves.png and RUN_DIR/filters.png, drawn with matplotlib's Agg backend.

Figures are built with ``matplotlib.figure.Figure`` and an Agg canvas directly, so no
GUI backend is ever chosen and pyplot's global state is left alone. matplotlib is
imported only when a plot is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cnnderive_common.files import replace_atomically

__all__ = ["plot_curves", "plot_filters"]


def _figure(width: float, height: float, layout=None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, tight: bool = False) -> None:
    """Write ``fig``; ``tight``: cropped to its content plus a small margin."""
    extra = {"bbox_inches": "tight", "pad_inches": 0.08} if tight else {}
    replace_atomically(path, lambda handle: fig.savefig(handle, format="png", **extra))


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """Training loss, and train / validation / test accuracy, per epoch."""
    epochs = [row["epoch"] for row in history]
    fig = _figure(10, 4)
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [row["loss"] for row in history], "o-", label="training loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("mean training loss")
    loss_ax.set_title("loss")
    loss_ax.grid(alpha=0.3)
    for key, label in (
        ("train_accuracy", "training (running)"),
        ("val_accuracy", "validation"),
        ("test_accuracy", "test"),
    ):
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            acc_ax.plot(
                epochs, [np.nan if v is None else 100 * v for v in values], "o-", label=label
            )
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy (%)")
    acc_ax.set_title("accuracy")
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_filters(kernel: np.ndarray, path: Path, title: str = "") -> None:
    """Each output channel of a (KH, KW, C_in, C_out) kernel as an image (input channel 0).

    The figure is sized by the filters and the title (wrapped onto lines of about 36
    characters), and saved cropped to what it shows: the toy network's single 3x3 filter
    and the seed network's twenty 9x9 filters both come out without clipped text or wide
    empty margins."""
    import textwrap

    kernel = np.asarray(kernel, dtype=np.float64)
    count = kernel.shape[3]
    cols = min(count, 10)
    rows = math.ceil(count / cols)
    width = 0.9 * cols + 0.9
    # About 11 characters of the 9-point title per inch; at least 36 a line, so that the
    # toy's single filter gets a figure wide enough for a readable title.
    lines = textwrap.wrap(title, max(36, int(11 * width))) if title else []
    width = max(width, 0.09 * max((len(line) for line in lines), default=0))
    fig = _figure(width, 0.9 * rows + 0.25 * len(lines) + 0.2, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    limit = float(np.abs(kernel[:, :, 0, :]).max()) or 1.0
    image = None
    for index, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if index >= count:
            ax.axis("off")
            continue
        image = ax.imshow(
            kernel[:, :, 0, index], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest"
        )
        if count > 1:  # a lone filter needs no number
            ax.set_title(str(index), fontsize=8, pad=2)
    if image is not None:
        fig.colorbar(
            image, ax=list(axes), shrink=0.9 if rows > 1 else 1.0, aspect=15 * rows, pad=0.01
        )
    if lines:
        fig.suptitle("\n".join(lines), fontsize=9)
    _save(fig, path, tight=True)


def plot_confusion(matrix: np.ndarray, names, path: Path, title: str = "") -> None:
    """The confusion matrix (rows: true class, columns: predicted class) as a heat map of
    each row's shares, with the counts written in, and each class's accuracy beside it."""
    matrix = np.asarray(matrix)
    count = len(names)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    longest = max(len(name) for name in names)
    side = 0.55 * count + 0.09 * longest + 2.2
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(count):
        for j in range(count):
            if matrix[i, j]:
                ax.text(
                    j,
                    i,
                    str(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7 if count > 2 else 10,
                    color="white" if shares[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(count), names, rotation=90 if longest > 2 else 0)
    accuracy = [
        f"{name}  {100 * shares[i, i]:.1f}%" if totals[i, 0] else f"{name}  -"
        for i, name in enumerate(names)
    ]
    ax.set_yticks(range(count), accuracy)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (and its accuracy)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path, tight=True)
