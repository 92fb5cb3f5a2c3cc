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


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    replace_atomically(path, lambda handle: fig.savefig(handle, format="png"))


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
    """Each output channel of a (KH, KW, C_in, C_out) kernel as an image (input channel 0)."""
    kernel = np.asarray(kernel, dtype=np.float64)
    count = kernel.shape[3]
    cols = min(count, 10)
    rows = math.ceil(count / cols)
    fig = _figure(1.1 * cols + 0.8, 1.1 * rows + 0.6)
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
        ax.set_title(str(index), fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8)
    if title:
        fig.suptitle(title)
    _save(fig, path)
