"""Named arrays kept as consecutive pieces of one 1-D array.

A network's parameters, its gradients and an optimiser's state are a dozen arrays,
some of a few values only. An update that treats every element alike (an optimiser
step, adding up the gradients of two parts of a batch) costs a few NumPy calls per
array, and at a dozen arrays per step those calls, not the arithmetic, are its cost:
about 0.1 ms per LeNet step. Kept as pieces of one array, the same update is a few
calls on that array, with the same result element by element.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["FlatArrays", "joined"]


class FlatArrays(dict):
    """A dict of named arrays whose values are views of ``flat``, one after another in
    the dict's order.

    The names and the views are fixed when it is made. ``arrays[name] = value`` copies
    ``value`` into that name's view (it must have the view's shape); a new name, or
    deleting one, is an error. So ``flat`` always holds every value, and an update may
    run on it.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype, buffer=None):
        """Zeros of ``shapes``; or, given ``buffer`` (a writable buffer, say a shared
        mapping made before worker processes are forked), views of what it holds. It is
        not written here: another process may be using it."""
        super().__init__()
        dtype = np.dtype(dtype)
        size = self.size_of(shapes)
        if buffer is None:
            flat = np.zeros(size, dtype=dtype)
        else:
            flat = np.frombuffer(buffer, dtype=dtype, count=size)
        offset = 0
        for name, shape in shapes.items():
            count = math.prod(shape)
            dict.__setitem__(self, name, flat[offset : offset + count].reshape(shape))
            offset += count
        self.flat = flat
        self.layout = tuple((name, tuple(shape)) for name, shape in shapes.items())

    @staticmethod
    def size_of(shapes: dict[str, tuple[int, ...]]) -> int:
        """Elements in arrays of ``shapes``."""
        return sum(math.prod(shape) for shape in shapes.values())

    @classmethod
    def copy_of(cls, arrays: dict[str, np.ndarray], dtype, buffer=None) -> FlatArrays:
        """``arrays``' values, cast to ``dtype``, copied into a new FlatArrays."""
        joined = cls({name: np.shape(value) for name, value in arrays.items()}, dtype, buffer)
        for name, value in arrays.items():
            joined[name] = value
        return joined

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.layout)

    def __setitem__(self, name, value):
        try:
            view = dict.__getitem__(self, name)
        except KeyError:
            raise KeyError(f"{name!r} is not one of the arrays here ({', '.join(self)})") from None
        if np.shape(value) != view.shape:
            raise ValueError(
                f"{name} has shape {view.shape}; an array of shape {np.shape(value)} cannot "
                "be stored in it"
            )
        view[...] = value

    def _fixed(self, *args, **kwargs):
        raise TypeError("the names of a FlatArrays are fixed; write into its arrays instead")

    __delitem__ = pop = popitem = clear = setdefault = update = _fixed

    def __reduce__(self):
        # A copy (pickle, copy.deepcopy) is a plain dict of copies: the views would
        # otherwise be pickled one by one and no longer share one array.
        return (dict, ({name: value.copy() for name, value in self.items()},))


def joined(*groups: dict) -> list[np.ndarray] | None:
    """The flat arrays of ``groups`` when all of them are FlatArrays of the same names,
    shapes and dtype (an update may then run on them at once); else None."""
    first = groups[0]
    if not isinstance(first, FlatArrays):
        return None
    for group in groups[1:]:
        if (
            not isinstance(group, FlatArrays)
            or group.layout != first.layout
            or group.flat.dtype != first.flat.dtype
        ):
            return None
    return [group.flat for group in groups]
