"""A trained run as a Python object: :func:`load_run` and :class:`TrainedNetwork`.

``cnnderive.load_run(RUN_DIR)`` reads ``RUN_DIR/checkpoint.npz`` and returns the network
with its trained weights.  Its :meth:`TrainedNetwork.predict` takes images as MNIST holds
them (28x28 pixels, one channel, white on black; uint8 0-255 or floats in [0, 1]) and
returns the data set's labels; :meth:`TrainedNetwork.probabilities` gives each label's
probability.  :func:`read_images` reads PNG files and IDX image files into that form
(``cnnderive predict`` uses both).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .data import IMAGE_SIZE, NUM_CLASSES, DataError, read_idx
from .networks import NETWORKS, build, toy_images

__all__ = ["RunError", "TrainedNetwork", "load_run", "read_images"]

CLASS_NAMES = {
    "mnist": tuple(str(digit) for digit in range(NUM_CLASSES)),
    "fashion-mnist": (
        "T-shirt/top",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle boot",
    ),
}

# A digit drawn at another size is scaled, as MNIST's were, to fit a box of this side,
# and placed with its centre of mass at the image's centre.
_DIGIT_BOX = 20


class RunError(ValueError):
    """A run folder, or an image given to it, that cannot be used; the message says why."""


class TrainedNetwork:
    """A network of a ``cnnderive train`` run, with the weights of its checkpoint.

    Attributes: ``net`` (the network's name), ``dataset``, ``epoch`` (epochs trained),
    ``labels`` (the labels :meth:`predict` returns, in the column order of
    :meth:`probabilities`) and ``names`` (each label's name: a digit, or a Fashion-MNIST
    class).  The toy network tells only two labels apart.
    """

    def __init__(self, network, meta: dict):
        self.network = network
        self.net = network.name
        self.dataset = meta.get("dataset", "mnist")
        self.epoch = int(meta["epoch"])
        self.meta = meta
        names = CLASS_NAMES.get(self.dataset, CLASS_NAMES["mnist"])
        if hasattr(network, "positive"):  # the toy network: one output, P(positive)
            self.labels = (network.negative, network.positive)
        else:
            self.labels = tuple(range(network.num_classes))
        self.names = tuple(names[label] for label in self.labels)

    def __repr__(self) -> str:
        return f"<TrainedNetwork {self.net} on {self.dataset}, epoch {self.epoch}>"

    def probabilities(self, images) -> np.ndarray:
        """(N, len(labels)) probabilities of each of :attr:`labels` for each image."""
        x = self._network_input(images)
        network = self.network
        out = []
        for start in range(0, len(x), 500):
            out.append(network.probabilities(network.logits(x[start : start + 500])))
        p = np.concatenate(out) if out else np.zeros((0, network.num_classes), network.dtype)
        if hasattr(network, "positive"):
            p = np.concatenate([1 - p, p], axis=1)
        return p.astype(np.float64)

    def predict(self, images) -> np.ndarray:
        """The most probable label of each image, as an int64 array of N labels."""
        p = self.probabilities(images)
        return np.asarray(self.labels, dtype=np.int64)[p.argmax(axis=1)]

    def _network_input(self, images) -> np.ndarray:
        x = np.asarray(images)
        if x.dtype.kind not in "uif":
            raise RunError(f"predict: images must be numbers, got dtype {x.dtype}")
        if x.ndim == 2:
            x = x[None]
        if x.ndim == 4 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise RunError(
                f"predict: images must be {IMAGE_SIZE}x{IMAGE_SIZE} pixels, shaped (N, 28, 28), "
                f"(N, 28, 28, 1) or (28, 28); got shape {np.shape(images)} (read_images "
                "brings PNG files of any size to that form)"
            )
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255
        x = x.astype(self.network.dtype)[..., None]
        if x.size and not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
            raise RunError(
                "predict: pixel values must lie in [0, 1] (or be uint8 0-255), got "
                f"{x.min():g} to {x.max():g}"
            )
        if self.network.input_shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
            x = toy_images(x)
        return x


def load_run(run_dir: str | os.PathLike) -> TrainedNetwork:
    """The network of the run in ``run_dir`` (a ``cnnderive train`` output folder), with
    the weights of its checkpoint.  Raises :class:`RunError` if it holds no usable run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        hint = (
            f"; pass the run folder that holds it ({run_dir.parent})"
            if run_dir.name == ckpt.CHECKPOINT_NAME
            else "; pass the folder of a cnnderive train run (--out)"
        )
        raise RunError(f"{run_dir} is not a folder{hint}")
    try:
        checkpoint = ckpt.load(run_dir / ckpt.CHECKPOINT_NAME)
    except ckpt.CheckpointError as error:
        raise RunError(str(error)) from None
    meta = checkpoint.meta
    if meta.get("net") not in NETWORKS:
        raise RunError(f"{run_dir}: the checkpoint's network {meta.get('net')!r} is unknown")
    network = build(meta["net"], int(meta.get("seed", 0)))
    try:
        network.load_params(checkpoint.params)
    except ValueError as error:
        raise RunError(f"{run_dir}: {error}") from None
    return TrainedNetwork(network, meta)


# ---------------------------------------------------------------------------- images


def read_images(path: str | os.PathLike) -> np.ndarray:
    """The images of a PNG file (one) or an IDX image file (all of it) as (N, 28, 28)
    floats in [0, 1], white on black as in MNIST.

    A PNG is made grey (the mean of its colour channels, over white where it is
    transparent) and turned to white on black when its border is light.  A 28x28 PNG is
    then used as it is; any other size is brought to MNIST's form: the drawing's bounding
    box scaled to fit 20x20 pixels and centred by its centre of mass in a 28x28 image.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path} is not a file")
    with open(path, "rb") as stream:
        head = stream.read(8)
    if head == b"\x89PNG\r\n\x1a\n":
        return _png_image(path)[None]
    try:
        array = read_idx(path)
    except DataError as error:
        raise RunError(f"{path} is neither a PNG file nor a readable IDX file ({error})") from None
    if array.ndim != 3:
        raise RunError(f"{path} is an IDX file of labels, not of images")
    if array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise RunError(
            f"{path} holds {array.shape[1]}x{array.shape[2]} images; IDX images must be "
            f"{IMAGE_SIZE}x{IMAGE_SIZE} (give other sizes as PNG files)"
        )
    return array.astype(np.float32) / 255


def _png_image(path: Path) -> np.ndarray:
    from matplotlib import image as mpimage

    try:
        pixels = np.asarray(mpimage.imread(path, format="png"), dtype=np.float64)
    except (OSError, ValueError, SyntaxError) as error:
        raise RunError(f"{path} is not a readable PNG file ({error})") from None
    if pixels.dtype.kind != "f" or pixels.max(initial=0) > 1:  # 16-bit PNGs come as 0-65535
        pixels = pixels / 65535
    if pixels.ndim == 3:
        if pixels.shape[2] in (2, 4):  # with alpha: over a white background
            alpha = pixels[..., -1:]
            pixels = pixels[..., :-1] * alpha + (1 - alpha)
        pixels = pixels.mean(axis=2)
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise RunError(f"{path}: a PNG of shape {pixels.shape} is no image")
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.mean() > 0.5:  # a dark drawing on light paper: MNIST's digits are light on dark
        pixels = 1 - pixels
    if pixels.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return pixels.astype(np.float32)
    return _as_mnist_digit(pixels, path).astype(np.float32)


def _as_mnist_digit(pixels: np.ndarray, path: Path) -> np.ndarray:
    """The drawing cropped to its ink, scaled to fit 20x20, centred by mass in 28x28."""
    ink = pixels > 0.1 * pixels.max(initial=0)
    if not ink.any():
        raise RunError(f"{path} is blank: no drawing to classify")
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    drawing = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = _DIGIT_BOX / max(drawing.shape)
    height = max(1, round(drawing.shape[0] * scale))
    width = max(1, round(drawing.shape[1] * scale))
    small = _resample(drawing, height, width)
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    total = small.sum()
    ys, xs = np.indices(small.shape)
    centre_y = (ys * small).sum() / total if total else (height - 1) / 2
    centre_x = (xs * small).sum() / total if total else (width - 1) / 2
    top = int(np.clip(round((IMAGE_SIZE - 1) / 2 - centre_y), 0, IMAGE_SIZE - height))
    left = int(np.clip(round((IMAGE_SIZE - 1) / 2 - centre_x), 0, IMAGE_SIZE - width))
    out[top : top + height, left : left + width] = small
    return np.clip(out, 0, 1)


def _resample(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """``pixels`` at ``height`` x ``width``: each new pixel the mean of the old pixels
    it covers (weighted by how much of each it covers), so thin strokes are kept."""

    def weights(old: int, new: int) -> np.ndarray:
        # (new, old): the share of old pixel j inside new pixel i, as a fraction of i.
        edges = np.linspace(0, old, new + 1)
        starts, ends = edges[:-1, None], edges[1:, None]
        j = np.arange(old)[None, :]
        overlap = np.clip(np.minimum(ends, j + 1) - np.maximum(starts, j), 0, None)
        return overlap / overlap.sum(axis=1, keepdims=True)

    return weights(pixels.shape[0], height) @ pixels @ weights(pixels.shape[1], width).T
