"""cnnderive: derive CNN backpropagation with SymPy, prove it, generate NumPy, train.

``import cnnderive`` loads nothing else; each entry point below imports what it needs
when it is called.  The Python API of a trained run::

    import cnnderive
    run = cnnderive.load_run("runs/lenet-mnist-seed0")
    run.predict(images)        # labels of (N, 28, 28) images, white on black, in [0, 1]
    run.probabilities(images)  # (N, classes) probabilities, columns in run.labels order
    cnnderive.read_images("digit.png")  # a PNG or IDX file as such images
"""

from __future__ import annotations

__all__ = ["derivation", "load_run", "read_images"]


def derivation(layer, **sizes):
    """The step-by-step derivation of ``layer`` (a name such as "conv2d", or a Layer
    object), which a Jupyter notebook shows as rendered mathematics.  Sizes are the
    keywords of `cnnderive derive` (height=4, stride=2, ...); see
    cnnderive.book.notebook.derivation."""
    from cnnderive.book.notebook import derivation as make

    return make(layer, **sizes)


def _check_packages() -> None:
    from cnnderive.cli import shadowing_problem

    problem = shadowing_problem()
    if problem is not None:
        raise ImportError(problem)


def load_run(run_dir):
    """The network of a ``cnnderive train`` run folder with its trained weights: a
    :class:`cnnderive.train.run.TrainedNetwork` (``predict``, ``probabilities``).
    Raises ``cnnderive.train.run.RunError`` (a ValueError) if the folder holds no run."""
    _check_packages()
    from cnnderive.train.run import load_run as load

    return load(run_dir)


def read_images(path):
    """A PNG file (one image) or an IDX image file (all of them) as (N, 28, 28) floats
    in [0, 1], white on black, ready for ``predict`` (see cnnderive.train.run.read_images)."""
    from cnnderive.train.run import read_images as read

    return read(path)
